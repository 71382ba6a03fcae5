"""Reduce records to the few small tables the report draws, before any plotting.

A month of one phone is millions of activity rows; every plot here reads at most a few thousand
numbers (services x hours, days x 24, endpoints), so the report stays fast at any capture length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from observer.catalog import Catalog

UNNAMED = "unnamed addresses"
OTHER = "all other"
BIN_CHOICES = (3600.0, 7200.0, 10800.0, 21600.0, 43200.0, 86400.0)
MAX_BINS = 400
MAX_SERVICES = 6  # lines in the timeline; the rest are summed as OTHER
TOP_ENDPOINTS = 30  # rows of the HTML table; the CSV has them all
_QUARTER = 900.0  # UTC bucket that maps exactly onto local hours in every time zone


@dataclass
class Timeline:
    """Upload and download bytes per service per time bin (rows follow ``services``)."""

    bin_s: float
    starts: np.ndarray  # UTC epoch seconds of each bin
    services: list[str]
    up: np.ndarray  # shape (services, bins)
    down: np.ndarray


@dataclass
class Heatmap:
    """Upload bytes per local day (rows) and local hour of day (columns)."""

    days: list[pd.Timestamp]
    up: np.ndarray  # shape (days, 24)


@dataclass
class Coverage:
    """When something was recording, per lane (source and interface), and the gaps between."""

    ts_start: float
    ts_end: float
    lanes: dict[str, list[tuple[float, float]]]
    gaps: list[tuple[float, float]]
    covered_s: float
    known: bool  # False when nothing says when recording ran
    dropped: int = 0
    sessions: list[dict] = field(default_factory=list)
    inferred: bool = False  # lanes come from the analysis's coverage, not from session records


def _base_domain(name: str) -> str:
    labels = name.strip().lower().rstrip(".").split(".")
    return ".".join(labels[-2:]) if len(labels) > 2 else ".".join(labels)


def label_connections(conns: pd.DataFrame, catalog: Catalog) -> pd.DataFrame:
    """Service and organization of each connection, looked up once per distinct (name, address)."""
    names = conns["server_name"].fillna("")
    ips = conns["server_ip"].fillna("")
    codes, uniques = pd.factorize(names + "\x00" + ips)
    services, orgs = [], []
    for key in uniques:
        name, ip = key.split("\x00", 1)
        hit = catalog.match(name or None, ip or None)
        if hit is not None:
            services.append(hit.service)
            orgs.append(hit.organization)
        elif name:
            services.append(_base_domain(name))
            orgs.append("")
        else:
            services.append(UNNAMED)
            orgs.append("")
    service = pd.Categorical(services)
    return pd.DataFrame(
        {
            # Categorical: the month-long tables below group millions of bins by these codes.
            "service": pd.Categorical.from_codes(service.codes[codes], service.categories)
            if len(codes)
            else pd.Categorical([]),
            "organization": np.asarray(orgs, dtype=object)[codes] if len(codes) else [],
        },
        index=conns.index,
    )


def traffic(records: dict[str, pd.DataFrame], service: pd.Series) -> pd.DataFrame:
    """(service, ts, bytes_up, bytes_down) from activity bins, and from connections without bins."""
    conns = records["connections"]
    activity = records.get("activity")
    service = service.astype("category")
    categories = service.cat.categories
    service_codes = service.cat.codes.to_numpy()
    parts = []
    have_bins = np.zeros(len(conns), dtype=bool)

    def part(codes: np.ndarray, ts: np.ndarray, up: pd.Series, down: pd.Series) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "service": pd.Categorical.from_codes(codes, categories),
                "ts": ts.astype("float64"),
                "bytes_up": up.fillna(0).to_numpy(dtype="int64"),
                "bytes_down": down.fillna(0).to_numpy(dtype="int64"),
            }
        )

    if activity is not None and not activity.empty:
        # conn_id may repeat (a connection flushed twice); bins take the first row's service.
        codes, ids = pd.factorize(conns["conn_id"])
        first = np.full(len(ids) + 1, -1)
        first[codes[::-1]] = np.arange(len(conns))[::-1]
        unique_pos = pd.Index(ids).get_indexer(activity["conn_id"])
        known = unique_pos >= 0
        has = np.zeros(len(ids) + 1, dtype=bool)
        has[unique_pos[known]] = True
        have_bins = has[codes]
        rows = first[unique_pos[known]]
        parts.append(
            part(
                service_codes[rows],
                activity["ts_bin"].to_numpy(dtype="float64")[known],
                activity["bytes_up"][known],
                activity["bytes_down"][known],
            )
        )
    rest = ~have_bins
    parts.append(
        part(
            service_codes[rest],
            conns["ts_start"].to_numpy(dtype="float64")[rest],
            conns["bytes_up"][rest],
            conns["bytes_down"][rest],
        )
    )
    out = pd.concat(parts, ignore_index=True)
    return out[np.isfinite(out["ts"])]


def timeline(flow: pd.DataFrame, t0: float, t1: float, keep: list[str]) -> Timeline:
    """Bins of whole hours for the ``keep`` services, the rest summed as OTHER.

    Hourly up to about two weeks; longer captures get wider bins so the plot keeps at most
    ``MAX_BINS`` columns (a bin per pixel or two, and an SVG that stays small).
    """
    span = max(t1 - t0, 1.0)
    bin_s = next((b for b in BIN_CHOICES if span / b <= MAX_BINS), BIN_CHOICES[-1])
    start = np.floor(t0 / bin_s) * bin_s
    n = int(np.ceil((t1 - start) / bin_s)) + 1
    services = list(keep)
    # Map each category code to its row (kept service, or OTHER) without touching strings per bin.
    categories = list(flow["service"].cat.categories)
    lookup = np.array([keep.index(c) if c in keep else len(keep) for c in categories] + [len(keep)])
    row_codes = lookup[flow["service"].cat.codes.to_numpy()]
    if (row_codes == len(keep)).any():
        services.append(OTHER)
    col = np.clip(((flow["ts"].to_numpy() - start) // bin_s).astype("int64"), 0, n - 1)
    up = np.zeros((len(services), n))
    down = np.zeros((len(services), n))
    np.add.at(up, (row_codes, col), flow["bytes_up"].to_numpy(dtype="float64"))
    np.add.at(down, (row_codes, col), flow["bytes_down"].to_numpy(dtype="float64"))
    return Timeline(bin_s, start + bin_s * np.arange(n), services, up, down)


def heatmap(flow: pd.DataFrame, tz: ZoneInfo, t0: float, t1: float) -> Heatmap:
    """Sum uploads into UTC quarter hours, then place each quarter in its local day and hour."""
    quarter = (flow["ts"].to_numpy() // _QUARTER).astype("int64")
    sums = pd.Series(flow["bytes_up"].to_numpy(dtype="float64")).groupby(quarter).sum()
    first = pd.Timestamp(t0, unit="s", tz="UTC").tz_convert(tz).normalize().tz_localize(None)
    last = pd.Timestamp(t1, unit="s", tz="UTC").tz_convert(tz).normalize().tz_localize(None)
    days = list(pd.date_range(first, last, freq="D"))
    up = np.zeros((len(days), 24))
    if len(sums):
        local = pd.to_datetime(sums.index.to_numpy() * _QUARTER, unit="s", utc=True).tz_convert(tz)
        day = ((local.tz_localize(None).normalize() - first) // pd.Timedelta(days=1)).to_numpy()
        inside = (day >= 0) & (day < len(days))
        np.add.at(up, (day[inside], local.hour.to_numpy()[inside]), sums.to_numpy()[inside])
    return Heatmap(days, up)


def top_services(flow: pd.DataFrame, must: list[str]) -> list[str]:
    """The services moving the most bytes up, plus any a finding is about."""
    totals = flow.groupby("service", observed=True)["bytes_up"].sum().sort_values(ascending=False)
    keep = [s for s in must if s in totals.index][:MAX_SERVICES]
    for service in totals.index:
        if len(keep) >= MAX_SERVICES:
            break
        if service not in keep and totals[service] > 0:
            keep.append(service)
    return keep


# The columns of the top-endpoints table (first_seen / last_seen are UTC epoch seconds).
ENDPOINT_COLUMNS = [
    "name", "named", "service", "organization", "addresses", "connections", "bytes_up",
    "bytes_down", "first_seen", "last_seen",
]


def endpoints(conns: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """One row per server name (or bare address when a connection had no name), biggest first."""
    if conns.empty:
        return pd.DataFrame(columns=ENDPOINT_COLUMNS)
    named = conns["server_name"].notna() & (conns["server_name"] != "")
    frame = pd.DataFrame(
        {
            "name": conns["server_name"].where(named, conns["server_ip"]).fillna("(no address)"),
            "named": named,
            "service": labels["service"],
            "organization": labels["organization"],
            "server_ip": conns["server_ip"],
            "bytes_up": conns["bytes_up"].fillna(0).astype("int64"),
            "bytes_down": conns["bytes_down"].fillna(0).astype("int64"),
            "ts_start": conns["ts_start"],
            "ts_end": conns["ts_end"].fillna(conns["ts_start"]),
        }
    )
    grouped = frame.groupby(["name", "named"], sort=False, dropna=False)
    out = grouped.agg(
        service=("service", "first"),
        organization=("organization", "first"),
        addresses=("server_ip", "nunique"),
        connections=("bytes_up", "size"),
        bytes_up=("bytes_up", "sum"),
        bytes_down=("bytes_down", "sum"),
        first_seen=("ts_start", "min"),
        last_seen=("ts_end", "max"),
    ).reset_index()
    return out.sort_values(["bytes_up", "bytes_down"], ascending=False, ignore_index=True)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def coverage(sessions: pd.DataFrame, t0: float, t1: float, min_gap_s: float = 300.0) -> Coverage:
    """Recording lanes from session records; gaps are stretches no session covered."""
    rows = sessions.dropna(subset=["ts_start"]) if not sessions.empty else sessions
    if rows.empty:
        return Coverage(t0, t1, {}, [], 0.0, known=False)
    ends = rows["ts_end"].fillna(t1).to_numpy(dtype="float64")
    starts = rows["ts_start"].to_numpy(dtype="float64")
    lo, hi = min(t0, float(starts.min())), max(t1, float(ends.max()))
    lanes: dict[str, list[tuple[float, float]]] = {}
    listing = []
    for (_, row), a, b in zip(rows.iterrows(), starts, ends, strict=True):
        lane = (
            " · ".join(str(v) for v in (row["source"], row["interface"]) if pd.notna(v))
            or "capture"
        )
        lanes.setdefault(lane, []).append((float(a), float(b)))
        listing.append(
            {
                "lane": lane,
                "ts_start": float(a),
                "ts_end": float(b),
                "captured": None
                if pd.isna(row["packets_captured"])
                else int(row["packets_captured"]),
                "dropped": None if pd.isna(row["packets_dropped"]) else int(row["packets_dropped"]),
                "note": None if pd.isna(row["note"]) else str(row["note"]),
            }
        )
    covered = _union([iv for ivs in lanes.values() for iv in ivs])
    gaps = []
    cursor = lo
    for a, b in covered:
        if a - cursor >= min_gap_s:
            gaps.append((cursor, a))
        cursor = max(cursor, b)
    if hi - cursor >= min_gap_s:
        gaps.append((cursor, hi))
    dropped = int(rows["packets_dropped"].fillna(0).sum())
    listing.sort(key=lambda s: s["ts_start"])
    return Coverage(lo, hi, lanes, gaps, sum(b - a for a, b in covered), True, dropped, listing)


def coverage_from_findings(raw: dict, t0: float, t1: float) -> Coverage | None:
    """Without session records, the analysis's own coverage (start, end, gaps) is the next best."""
    try:
        lo, hi = float(raw["ts_start"]), float(raw["ts_end"])
        gaps = sorted((float(a), float(b)) for a, b in raw.get("gaps") or [])
    except (KeyError, TypeError, ValueError):
        return None
    lane, cursor = [], lo
    for a, b in gaps:
        if a > cursor:
            lane.append((cursor, a))
        cursor = max(cursor, b)
    if hi > cursor:
        lane.append((cursor, hi))
    covered = sum(b - a for a, b in lane)
    lo, hi = min(lo, t0), max(hi, t1)
    return Coverage(lo, hi, {"records": lane}, gaps, covered, True, inferred=True)


def span(records: dict[str, pd.DataFrame]) -> tuple[float, float] | None:
    """First and last moment any record speaks of."""
    lows, highs = [], []
    for table, lo_col, hi_col in (
        ("connections", "ts_start", "ts_end"),
        ("activity", "ts_bin", "ts_bin"),
        ("sessions", "ts_start", "ts_end"),
        ("dns", "ts", "ts"),
        ("http", "ts_request", "ts_request"),
    ):
        df = records.get(table)
        if df is None or df.empty:
            continue
        lo, hi = df[lo_col].min(), df[hi_col].max()
        if pd.notna(lo):
            lows.append(float(lo))
        if pd.notna(hi):
            highs.append(float(hi))
    if not lows:
        return None
    return min(lows), max(highs or lows)
