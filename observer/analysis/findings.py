"""From record tables to findings: one verdict per endpoint group, with its evidence.

The verdicts, in order of precedence:
- periodic bulk upload: bulk events recur with a period and stable local-time phase, the test is
  significant after correction for every group and period tried, most covered cycles have one,
  and at most two events fall near the phase per occurrence (a scheduled job, not a busy hour);
- periodic heartbeat: small contacts at regular intervals (a timer, not a clock), in a group
  without bulk events;
- irregular uploads: bulk events without a schedule (what a user sending videos looks like);
- nothing notable.
A heartbeat never hides bulk events: a group with both gets the uploads' verdict, and its
``heartbeat_s`` says how often it beats.
A catalog category "backup" keeps its verdict and is flagged ``is_backup`` and worded as a
scheduled backup.  The result is a typed ``Findings`` (observer.records.findings);
docs/findings.md documents every field.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from observer import words
from observer.analysis.coverage import SILENCE_S, device_coverage
from observer.analysis.groups import endpoint_groups
from observer.analysis.periodicity import (
    CLOCK_PERIODS,
    FAMILY_WEIGHTS,
    FREE_MAX_S,
    FREE_MIN_S,
    MAX_EVENTS,
    MAX_ON_SCHEDULE_PER_CYCLE,
    PROFILE_HALF,
    SLOTS,
    WIDTHS,
    WIDTHS_24H,
    Coverage,
    PeriodicityResult,
    PeriodicityTest,
    day_profile,
    holm,
    interval_regularity,
)
from observer.analysis.uploads import blocks, bulk_events, contacts
from observer.catalog import Catalog
from observer.config import LabConfig, Thresholds
from observer.records.findings import (
    VERDICTS,
    EndpointLabel,
    Event,
    Finding,
    Findings,
    RecordsStamp,
)

HEARTBEAT_MIN_INTERVALS = 8
HEARTBEAT_MAX_PERIOD_S = 6 * 3600.0
HEARTBEAT_MIN_FRACTION = 0.5
CONTACT_GAP_S = 30.0
MIN_SCHEDULE_FRACTION = 0.5  # occurrences / expected cycles
MAX_EVENTS_PER_OCCURRENCE = MAX_ON_SCHEDULE_PER_CYCLE
MAX_JITTER_FRACTION = 1 / 12  # of the period: 2 h for a daily job
APP_KEY = "\x1fapp\x1f"
Heartbeat = tuple[float, float, int, float]  # median interval, regular fraction, intervals, p


def confidence(p: float, alpha: float, occurrences: int) -> str:
    if p <= alpha / 10 and occurrences >= 5:
        return "high"
    if p <= alpha:
        return "medium"
    if p <= 0.1:
        return "low"
    return "none"


def phase_local(result: PeriodicityResult, times: np.ndarray, tz: str) -> str | None:
    """The phase on the local clock; for a free period, the local time of the first event."""
    if result.period_s is None or result.phase_s is None:
        return None
    if result.local_clock:  # every phase in a day: "00:45, 06:45, 12:45, 18:45" for 6 h
        return ", ".join(words.clock_phase(x, result.period_s) for x in result.phases_s)
    if not result.on_schedule:
        return None
    first = pd.Timestamp(times[result.on_schedule[0]], unit="s", tz="UTC").tz_convert(tz)
    return first.strftime("%H:%M")


def schedule_checks(res: PeriodicityResult | None, p: float | None,
                    thresholds: Thresholds) -> dict[str, bool] | None:
    """Each condition of a "periodic bulk upload", so a reader sees which one failed."""
    if res is None or res.period_s is None:
        return None
    return {
        "significant": p is not None and p <= thresholds.alpha,
        "enough_occurrences": res.occurrences >= thresholds.min_occurrences,
        "most_cycles_seen": not res.expected
        or res.occurrences >= MIN_SCHEDULE_FRACTION * res.expected,
        "one_upload_per_cycle": len(res.on_schedule)
        <= MAX_EVENTS_PER_OCCURRENCE * res.occurrences,
        "tight_timing": res.jitter_s is not None
        and res.jitter_s <= MAX_JITTER_FRACTION * res.period_s,
    }


def is_heartbeat(hb: Heartbeat, p: float | None, alpha: float) -> bool:
    median, fraction, n_int, _ = hb
    return (p is not None and p <= alpha and n_int >= HEARTBEAT_MIN_INTERVALS
            and fraction >= HEARTBEAT_MIN_FRACTION and 0 < median <= HEARTBEAT_MAX_PERIOD_S)


@dataclass
class DeviceWindow:
    """What one device's records can show: covered time, and the silences cut from it."""

    coverage: Coverage
    silent: list


@dataclass
class GroupTests:
    """Every test of a run (bulk periodicity, heartbeat intervals), Holm-corrected together
    across the groups of every device."""

    periodic: dict[str, PeriodicityResult] = field(default_factory=dict)
    heartbeat: dict[str, Heartbeat] = field(default_factory=dict)
    profiled: dict[str, int] = field(default_factory=dict)
    p_bulk: dict[str, float] = field(default_factory=dict)
    p_heartbeat: dict[str, float] = field(default_factory=dict)
    count: int = 0

    @classmethod
    def run(cls, keys: pd.Index, events: pd.DataFrame, by_key_events: dict[str, pd.DataFrame],
            by_key_touch: dict[str, np.ndarray], window: DeviceWindow, test: PeriodicityTest,
            min_occurrences: int) -> GroupTests:
        """One device's tests (``events`` are its bulk events), raw p-values only: ``corrected``
        adjusts them together with every other device's."""
        out = cls()
        # Bulk events of endpoint groups (app groups repeat them: each upload counted once).
        endpoint_events = events[~events["key"].str.contains(APP_KEY, regex=False)]
        device_counts = test.slot_counts(endpoint_events["ts_start"])
        for key in keys:
            ev = by_key_events.get(key)
            if ev is not None and len(ev) >= min_occurrences:
                # The null's day profile: when the device uploaded to everyone but this group
                # (the group's own schedule must not make itself look expected).
                mine = test.slot_counts(ev["ts_start"])
                others = np.maximum(device_counts - mine, 0.0)
                out.profiled[key] = int(others.sum())
                out.periodic[key] = test.test(ev["ts_start"].to_numpy(),
                                              ev["bytes_up"].to_numpy(),
                                              profile=day_profile(others))
            times = by_key_touch.get(key)
            if times is not None and len(times) > HEARTBEAT_MIN_INTERVALS:
                out.heartbeat[key] = interval_regularity(times, window.coverage)
        return out

    @classmethod
    def corrected(cls, parts: list[GroupTests]) -> GroupTests:
        """All devices' tests, Holm-adjusted together (the adjustment does not depend on the
        order of the tests, so devices may be tested anywhere and in any order)."""
        out = cls()
        for part in parts:
            out.periodic.update(part.periodic)
            out.heartbeat.update(part.heartbeat)
            out.profiled.update(part.profiled)
        labels = [(k, "bulk") for k in out.periodic] + [(k, "heartbeat") for k in out.heartbeat]
        raw = ([r.p_value_raw for r in out.periodic.values()]
               + [hb[3] for hb in out.heartbeat.values()])
        for (key, kind), p in zip(labels, holm(raw), strict=True):
            (out.p_bulk if kind == "bulk" else out.p_heartbeat)[key] = p
        out.count = len(raw)
        return out


@dataclass
class DevicePart:
    """One device's share of a run, before the tests of all devices are corrected together:
    what a worker process sends back (small: no records, no null simulations)."""

    device: str
    window: DeviceWindow
    tests: GroupTests
    meta: pd.DataFrame  # one row per group key: identity and catalog facts
    stats: pd.DataFrame  # per group key: connections, bytes, names, addresses
    events: dict[str, pd.DataFrame]  # per group key: its bulk events by start time
    labels: list[EndpointLabel]


def describe_coverage(windows: dict[str, DeviceWindow]) -> dict:
    """The covered time of all devices together, and of each device under ``devices``."""
    def describe(cov: Coverage, gaps: list) -> dict:
        start, end = cov.span
        pairs = zip(cov.intervals, cov.intervals[1:], strict=False)
        holes = [[a, b] for (_, a), (b, _) in pairs]
        return {"ts_start": start, "ts_end": end, "covered_s": cov.total_s, "gaps": holes,
                "silent_gaps": [list(g) for g in gaps]}

    intervals = sorted(iv for w in windows.values() for iv in w.coverage.intervals)
    merged: list[list[float]] = []
    for a, b in intervals:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out = describe(Coverage(tuple((a, b) for a, b in merged)), [])
    out["devices"] = {d: describe(w.coverage, w.silent) for d, w in windows.items()}
    return out


def group_stats(conns: pd.DataFrame, groups: pd.DataFrame) -> pd.DataFrame:
    """Per group: connections, bytes, and its names and addresses, most upstream bytes first."""
    joined = groups[["conn_id", "key"]].merge(
        conns[["conn_id", "server_name", "server_ip", "bytes_up", "bytes_down"]], on="conn_id"
    )
    joined["bytes_up"] = joined["bytes_up"].fillna(0).astype("int64")
    joined["bytes_down"] = joined["bytes_down"].fillna(0).astype("int64")
    stats = joined.groupby("key").agg(connections=("conn_id", "nunique"),
                                      bytes_up=("bytes_up", "sum"),
                                      bytes_down=("bytes_down", "sum"))

    def top(col: str) -> pd.Series:
        sub = joined.dropna(subset=[col])
        sizes = sub.groupby(["key", col])["bytes_up"].sum().reset_index()
        sizes = sizes.sort_values(["key", "bytes_up"], ascending=[True, False])
        return sizes.groupby("key")[col].apply(lambda s: [str(x) for x in s.head(20)])

    stats["names"] = top("server_name")
    stats["server_ips"] = top("server_ip")
    return stats


def endpoint_labels(conns: pd.DataFrame, groups: pd.DataFrame) -> list[EndpointLabel]:
    """The endpoint group of every (device, server name, address), for the report to show."""
    rows = groups[groups["group_kind"] != "app"].merge(
        conns[["conn_id", "server_name", "server_ip"]], on="conn_id")
    cols = ["device", "server_name", "server_ip", "group", "group_kind", "label", "service",
            "organization"]
    rows = rows[cols].astype(object).where(rows[cols].notna(), None).drop_duplicates(cols[:3])
    return [EndpointLabel(*r) for r in rows.itertuples(index=False, name=None)]


def _text(value: object) -> str | None:
    return None if pd.isna(value) else str(value)


class FindingBuilder:
    """Turns one group's identity, tests and events into its ``Finding`` (verdict and words)."""

    def __init__(self, config: LabConfig, tests: GroupTests, windows: dict[str, DeviceWindow],
                 tz_configured: bool) -> None:
        self.tz = config.timezone
        self.thresholds = config.thresholds
        self.tests = tests
        self.windows = windows
        self.tz_configured = tz_configured

    def build(self, key: str, meta: pd.Series, stats: pd.Series | None,
              events: pd.DataFrame | None) -> Finding:
        device = str(meta["device"])
        n_events = 0 if events is None else len(events)
        listed = stats is not None and isinstance(stats["names"], list)
        finding = Finding(
            group=str(meta["group"]), group_kind=str(meta["group_kind"]),
            label=str(meta["label"]) if "label" in meta and pd.notna(meta["label"])
            else str(meta["group"]),
            device=device, service=_text(meta["service"]),
            organization=_text(meta["organization"]), category=_text(meta["category"]),
            names=stats["names"] if listed else [],
            server_ips=stats["server_ips"] if stats is not None
            and isinstance(stats["server_ips"], list) else [],
            is_backup=bool(meta["is_backup"]), occurrences=n_events, bulk_events=n_events,
            connections=0 if stats is None else int(stats["connections"]),
            bytes_up=0 if stats is None else int(stats["bytes_up"]),
            bytes_down=0 if stats is None else int(stats["bytes_down"]),
            covered_s=round(self.windows[device].coverage.total_s, 1),
            null_profile_events=self.tests.profiled.get(key),
        )
        res = self.tests.periodic.get(key)
        on_schedule = self._schedule(finding, res, key, events)
        if events is not None and n_events:
            sched = [i for i in range(n_events) if i in on_schedule] or list(range(n_events))
            finding.typical_bytes = int(np.median(events["bytes_up"].to_numpy()[sched]))
            finding.events = self._events(events, on_schedule)
            finding.evidence_note = words.evidence_note(int(events["from_totals"].sum()),
                                                        n_events)
        finding.schedule_checks = schedule_checks(res, self.tests.p_bulk.get(key),
                                                  self.thresholds)
        self._verdict(finding, key)
        finding.summary = words.verdict_sentence(finding, self.tz,
                                                 tz_configured=self.tz_configured)
        return finding

    def _schedule(self, finding: Finding, res: PeriodicityResult | None, key: str,
                  events: pd.DataFrame | None) -> set[int]:
        """The periodicity test's numbers, whenever the group was tested; its on-schedule events."""
        if res is None or res.period_s is None:
            return set()
        times = np.array([]) if events is None else events["ts_start"].to_numpy()
        p = self.tests.p_bulk.get(key)
        finding.period_s = round(res.period_s, 1)
        finding.phase_s = round(res.phase_s or 0.0, 1)
        finding.phase_local = phase_local(res, times, self.tz)
        finding.jitter_s = None if res.jitter_s is None else round(res.jitter_s, 1)
        finding.occurrences, finding.expected = res.occurrences, res.expected
        finding.p_value, finding.p_value_raw = p, res.p_value_raw
        finding.period_family = res.family
        finding.confidence = confidence(p or 1.0, self.thresholds.alpha, res.occurrences)
        return set(res.on_schedule)

    def _verdict(self, finding: Finding, key: str) -> None:
        """Bulk uploads come first: a group that also beats (a chat connection carrying a nightly
        export) keeps its uploads' verdict and numbers, and ``heartbeat_s`` tells the beat."""
        hb, p_hb = self.tests.heartbeat.get(key), self.tests.p_heartbeat.get(key)
        beats = hb is not None and is_heartbeat(hb, p_hb, self.thresholds.alpha)
        if beats:
            finding.heartbeat_s = round(hb[0], 1)
        if finding.schedule_checks is not None and all(finding.schedule_checks.values()):
            finding.verdict = "periodic bulk upload"
        elif beats and not finding.bulk_events:
            median, fraction, n_int, p_raw = hb
            finding.verdict = "periodic heartbeat"
            finding.period_s, finding.phase_s, finding.phase_local = round(median, 1), None, None
            finding.jitter_s, finding.occurrences = None, n_int + 1
            finding.expected = round(self.windows[finding.device].coverage.total_s / median)
            finding.p_value, finding.p_value_raw = p_hb, p_raw
            finding.period_family = "intervals"
            finding.confidence = confidence(p_hb or 1.0, self.thresholds.alpha, n_int)
            finding.regular_fraction = round(fraction, 3)
        elif finding.bulk_events:
            finding.verdict = "irregular uploads"

    def _events(self, events: pd.DataFrame, on_schedule: set[int]) -> list[Event]:
        local = pd.to_datetime(events["ts_start"], unit="s", utc=True).dt.tz_convert(self.tz)
        return [
            Event(ts_start=float(row.ts_start), ts_end=float(row.ts_end),
                  local_time=when.isoformat(timespec="seconds"),
                  bytes_up=int(row.bytes_up), bytes_down=int(row.bytes_down),
                  server_name=_text(row.server_name),
                  conn_ids=[str(c) for c in row.conn_ids],
                  on_schedule=i in on_schedule, from_totals=bool(row.from_totals))
            for i, (row, when) in enumerate(zip(events.itertuples(index=False), local,
                                                strict=True))
        ]


class Analysis:
    """One run of the analysis over a set of record tables (per device, per group)."""

    def __init__(self, config: LabConfig, catalog: Catalog, *, n_sim: int = 1000, seed: int = 0,
                 silence_s: float = SILENCE_S) -> None:
        self.config = config
        self.catalog = catalog
        self.n_sim = n_sim
        self.seed = seed
        self.silence_s = silence_s

    def run(self, records: dict[str, pd.DataFrame],
            source: RecordsStamp | None = None) -> Findings:
        return self.combine(self.parts(records), source)

    def parts(self, records: dict[str, pd.DataFrame]) -> list[DevicePart]:
        """Everything that can be done per device (all of it but the correction), by device."""
        conns = records["connections"]
        thresholds = self.config.thresholds
        groups = endpoint_groups(conns, self.catalog, (thresholds.network_prefix_v4,
                                                       thresholds.network_prefix_v6))
        blk = blocks(records["activity"], conns, self.config.bin_seconds)
        events = bulk_events(blk, groups, self.config.thresholds)
        touch = contacts(blk, groups, max(CONTACT_GAP_S, 3 * self.config.bin_seconds))
        devices = sorted(set(groups["device"].dropna()) | set(blk["device"].dropna()))
        meta = groups.drop_duplicates("key").set_index("key")
        stats = group_stats(conns, groups)
        by_key_events = {k: e.sort_values("ts_start") for k, e in events.groupby("key")}
        by_key_touch = {k: t["ts"].to_numpy() for k, t in touch.groupby("key")}
        labels = endpoint_labels(conns, groups)
        parts = []
        for device in devices:
            window, test = self._window(records["sessions"], blk, device)
            keys = meta.index[meta["device"] == device]
            tests = GroupTests.run(keys, events[events["device"] == device], by_key_events,
                                   by_key_touch, window, test, thresholds.min_occurrences)
            parts.append(DevicePart(
                device=device, window=window, tests=tests, meta=meta.loc[keys],
                stats=stats.loc[stats.index.intersection(keys)],
                events={k: by_key_events[k] for k in keys if k in by_key_events},
                labels=[x for x in labels if x.device == device]))
        return parts

    def combine(self, parts: list[DevicePart], source: RecordsStamp | None = None) -> Findings:
        """The findings of all devices' parts: tests corrected together, verdicts, coverage."""
        parts = sorted(parts, key=lambda part: part.device)
        tests = GroupTests.corrected([part.tests for part in parts])
        windows = {part.device: part.window for part in parts}
        tz_configured = bool(getattr(self.config, "timezone_configured", False))
        builder = FindingBuilder(self.config, tests, windows, tz_configured)
        findings = [
            builder.build(key, part.meta.loc[key],
                          part.stats.loc[key] if key in part.stats.index else None,
                          part.events.get(key))
            for part in parts for key in part.meta.index
        ]
        findings.sort(key=lambda f: (VERDICTS.index(f.verdict), f.p_value or 1.0, -f.bytes_up,
                                     f.device, f.group_kind, f.group))
        return Findings(
            findings=findings, timezone=self.config.timezone,
            timezone_configured=tz_configured, generated_at=time.time(), records=source,
            parameters=self._parameters(tests.count), coverage=describe_coverage(windows),
            labels=[x for part in parts for x in part.labels],
        )

    def _window(self, sessions: pd.DataFrame, blk: pd.DataFrame,
                device: str) -> tuple[DeviceWindow, PeriodicityTest]:
        cov, silent = device_coverage(sessions, blk, device, silence_s=self.silence_s)
        return (DeviceWindow(cov, silent),
                PeriodicityTest(cov, self.config.timezone, n_sim=self.n_sim, seed=self.seed))

    def _parameters(self, n_tests: int) -> dict:
        return {
            **asdict(self.config.thresholds),
            "bin_seconds": self.config.bin_seconds,
            "clock_periods_s": list(CLOCK_PERIODS),
            "free_period_range_s": [FREE_MIN_S, FREE_MAX_S],
            "window_widths": list(WIDTHS),
            "window_widths_24h": list(WIDTHS_24H),
            "profile_slots": SLOTS,
            "profile_half_events": PROFILE_HALF,
            "family_weights": FAMILY_WEIGHTS,
            "monte_carlo_runs": self.n_sim,
            "max_events_tested": MAX_EVENTS,
            "silence_gap_s": self.silence_s,
            "tests_corrected": n_tests,
            "correction": "Holm across all groups' tests; "
                          "weighted Bonferroni across period families",
        }


def analyze(records: dict[str, pd.DataFrame], config: LabConfig, catalog: Catalog, *,
            n_sim: int = 1000, seed: int = 0, source: RecordsStamp | None = None) -> Findings:
    """The findings of a set of record tables; ``source`` stamps which records they were."""
    from observer.records import TABLES, empty

    tables = {t: records.get(t, empty(t)) for t in TABLES}
    return Analysis(config, catalog, n_sim=n_sim, seed=seed).run(tables, source)


def analyze_records(records: dict[str, pd.DataFrame], config: LabConfig, catalog: Catalog,
                    *, n_sim: int = 1000, seed: int = 0) -> dict:
    """The findings in their JSON form (docs/findings.md), for scripts and benchmarks."""
    return analyze(records, config, catalog, n_sim=n_sim, seed=seed).to_dict()
