"""Reduce records to the few small tables the report draws, before any plotting.

A month of one phone is millions of activity rows; every plot here reads at most a few thousand
numbers (services x hours, days x 24, endpoints), so the report stays fast at any capture length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from observer.records.findings import EndpointLabel

UNLABELLED = "not analysed"  # connections the findings do not label (records newer than them)
OTHER = "all other"
BIN_CHOICES = (3600.0, 7200.0, 10800.0, 21600.0, 43200.0, 86400.0)
MAX_BINS = 400
MAX_DAY_ROWS = 92  # heatmap rows; a longer span puts several days in a row
# Instants a report can draw: a record outside (a clock at 1970, a corrupt 2500) is left out and
# counted, so no span, bin count or date conversion is ever unbounded.
SANE_WINDOW = (631_152_000.0, 4_102_444_800.0)  # 1990-01-01 .. 2100-01-01 UTC
MAX_SERVICES = 6  # lines in the timeline; the rest are summed as OTHER
MAX_FINDING_SERIES = 16  # a finding's own series is never summed into OTHER, up to this many
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

    days: list[pd.Timestamp]  # the first local day of each row
    up: np.ndarray  # shape (rows, 24)
    days_per_row: int = 1


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


def sane(ts: np.ndarray) -> np.ndarray:
    """Which instants lie inside the window a report can draw (NaN never does)."""
    lo, hi = SANE_WINDOW
    return np.isfinite(ts) & (ts >= lo) & (ts <= hi)


def _sane_or_nan(series: pd.Series) -> np.ndarray:
    ts = series.to_numpy(dtype="float64", na_value=np.nan)
    return np.where(sane(ts), ts, np.nan)


def label_connections(conns: pd.DataFrame, labels: Iterable[EndpointLabel]) -> pd.DataFrame:
    """Each connection's label, service and organization as the analysis decided them.

    A join on (device, server name, address) with the findings' label table: the report never
    decides a label itself, so every series carries the name its finding has.
    """
    keys = ["device", "server_name", "server_ip"]
    table = pd.DataFrame(
        [(x.device, x.server_name, x.server_ip, x.label, x.service, x.organization)
         for x in labels],
        columns=[*keys, "label", "service", "organization"],
    )
    table[keys] = table[keys].fillna("").astype(str)
    table = table.drop_duplicates(keys)
    left = pd.DataFrame({
        "device": conns["device"].fillna("unknown").astype(str).to_numpy(),
        "server_name": conns["server_name"].fillna("").astype(str).to_numpy(),
        "server_ip": conns["server_ip"].fillna("").astype(str).to_numpy(),
    })
    joined = left.merge(table, on=keys, how="left")
    return pd.DataFrame(
        {
            # Categorical: the month-long tables below group millions of bins by these codes.
            "label": pd.Categorical(joined["label"].fillna(UNLABELLED).to_numpy()),
            "organization": joined["organization"].fillna("").to_numpy(dtype=object),
        },
        index=conns.index,
    )


def traffic(records: dict[str, pd.DataFrame], service: pd.Series) -> pd.DataFrame:
    """(service, ts, bytes_up, bytes_down) from activity bins, and from connections without bins.

    ``service`` is each connection's label; rows at instants outside ``SANE_WINDOW`` are dropped.
    """
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
    return out[sane(out["ts"].to_numpy())]


def timeline(flow: pd.DataFrame, t0: float, t1: float, keep: list[str]) -> Timeline:
    """Bins of whole hours for the ``keep`` services, the rest summed as OTHER.

    Hourly up to about two weeks; longer captures get wider bins (whole days beyond
    ``BIN_CHOICES``) so the plot keeps at most ``MAX_BINS`` columns whatever the span.
    """
    span = max(t1 - t0, 1.0)
    bin_s = next((b for b in BIN_CHOICES if span / b <= MAX_BINS), None)
    if bin_s is None:
        bin_s = math.ceil(span / MAX_BINS / 86400.0) * 86400.0
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
    """Sum uploads into UTC quarter hours, then place each quarter in its local day and hour.

    At most ``MAX_DAY_ROWS`` rows: a longer span sums several consecutive days per row.
    """
    quarter = (flow["ts"].to_numpy() // _QUARTER).astype("int64")
    sums = pd.Series(flow["bytes_up"].to_numpy(dtype="float64")).groupby(quarter).sum()
    first = pd.Timestamp(t0, unit="s", tz="UTC").tz_convert(tz).normalize().tz_localize(None)
    last = pd.Timestamp(t1, unit="s", tz="UTC").tz_convert(tz).normalize().tz_localize(None)
    n_days = (last - first) // pd.Timedelta(days=1) + 1
    per_row = max(1, math.ceil(n_days / MAX_DAY_ROWS))
    days = list(pd.date_range(first, last, freq=f"{per_row}D"))
    up = np.zeros((len(days), 24))
    if len(sums):
        local = pd.to_datetime(sums.index.to_numpy() * _QUARTER, unit="s", utc=True).tz_convert(tz)
        day = ((local.tz_localize(None).normalize() - first) // pd.Timedelta(days=1)).to_numpy()
        row = day // per_row
        inside = (day >= 0) & (row < len(days))
        np.add.at(up, (row[inside], local.hour.to_numpy()[inside]), sums.to_numpy()[inside])
    return Heatmap(days, up, per_row)


def top_services(flow: pd.DataFrame, must: list[str]) -> list[str]:
    """Every label a notable finding is about (up to ``MAX_FINDING_SERIES``), then the labels
    moving the most bytes up until there are ``MAX_SERVICES`` series."""
    totals = flow.groupby("service", observed=True)["bytes_up"].sum().sort_values(ascending=False)
    keep = list(dict.fromkeys(s for s in must if s in totals.index))[:MAX_FINDING_SERIES]
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
            "service": labels["label"],
            "organization": labels["organization"],
            "server_ip": conns["server_ip"],
            "bytes_up": conns["bytes_up"].fillna(0).astype("int64"),
            "bytes_down": conns["bytes_down"].fillna(0).astype("int64"),
            "ts_start": _sane_or_nan(conns["ts_start"]),
            "ts_end": _sane_or_nan(conns["ts_end"].fillna(conns["ts_start"])),
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


def _lanes(sessions: pd.DataFrame) -> tuple[dict[str, list[tuple[float, float]]], list[dict]]:
    """The recording sessions as the records list them, one lane per source and interface."""
    rows = sessions.dropna(subset=["ts_start"]) if not sessions.empty else sessions
    rows = rows[sane(rows["ts_start"].to_numpy(dtype="float64"))] if len(rows) else rows
    lanes: dict[str, list[tuple[float, float]]] = {}
    listing = []
    for row in rows.itertuples(index=False):
        a = float(row.ts_start)
        b = a if pd.isna(row.ts_end) or not sane(np.array([row.ts_end]))[0] else float(row.ts_end)
        lane = " · ".join(str(v) for v in (row.source, row.interface) if pd.notna(v)) or "capture"
        lanes.setdefault(lane, []).append((a, b))
        listing.append({
            "lane": lane, "ts_start": a, "ts_end": b,
            "captured": None if pd.isna(row.packets_captured) else int(row.packets_captured),
            "dropped": None if pd.isna(row.packets_dropped) else int(row.packets_dropped),
            "note": None if pd.isna(row.note) else str(row.note),
        })
    listing.sort(key=lambda s: s["ts_start"])
    return lanes, listing


def coverage(found: dict, sessions: pd.DataFrame, t0: float, t1: float) -> Coverage:
    """Covered time and gaps as the analysis decided them; session records only draw the lanes.

    Without session records the lane is the analysis's own coverage, labelled as inferred.
    """
    lo, hi = SANE_WINDOW
    try:
        start = min(max(float(found["ts_start"]), lo), hi)
        end = min(max(float(found["ts_end"]), start), hi)
        covered = float(found.get("covered_s") or 0.0)
        gaps = sorted((max(float(a), start), min(float(b), end))
                      for a, b in found.get("gaps") or [] if float(b) > start and float(a) < end)
    except (KeyError, TypeError, ValueError):
        return Coverage(t0, t1, {}, [], 0.0, known=False)
    lanes, listing = _lanes(sessions)
    dropped = sum(s["dropped"] or 0 for s in listing)
    inferred = not lanes
    if inferred:
        lane, cursor = [], start
        for a, b in gaps:
            if a > cursor:
                lane.append((cursor, a))
            cursor = max(cursor, b)
        if end > cursor:
            lane.append((cursor, end))
        lanes = {"records": lane}
    return Coverage(min(start, t0), max(end, t1), lanes, gaps, covered, True, dropped, listing,
                    inferred)


def span(records: dict[str, pd.DataFrame]) -> tuple[float, float] | None:
    """First and last moment any record speaks of, inside ``SANE_WINDOW``."""
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
        lo_ts = df[lo_col].to_numpy(dtype="float64", na_value=np.nan)
        hi_ts = df[hi_col].to_numpy(dtype="float64", na_value=np.nan)
        lo_ts, hi_ts = lo_ts[sane(lo_ts)], hi_ts[sane(hi_ts)]
        if len(lo_ts):
            lows.append(float(lo_ts.min()))
        if len(hi_ts):
            highs.append(float(hi_ts.max()))
    if not lows:
        return None
    return min(lows), max(highs or lows)
