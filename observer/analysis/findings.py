"""From record tables to findings: one verdict per endpoint group, with its evidence.

The verdicts, in order of precedence:
- periodic bulk upload: bulk events recur with a period and stable local-time phase, the test is
  significant after correction for every group and period tried, most covered cycles have one,
  and at most two events fall near the phase per occurrence (a scheduled job, not a busy hour);
- periodic heartbeat: small contacts at regular intervals (a timer, not a clock);
- irregular uploads: bulk events without a schedule (what a user sending videos looks like);
- nothing notable.
A catalog category "backup" keeps its verdict and is flagged ``is_backup`` and worded as a
scheduled backup.  docs/findings.md documents every key.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from observer import ObserverError
from observer.analysis.coverage import SILENCE_S, device_coverage
from observer.analysis.groups import endpoint_groups
from observer.analysis.periodicity import (
    CLOCK_PERIODS,
    DAY,
    FAMILY_WEIGHTS,
    FREE_MAX_S,
    FREE_MIN_S,
    MAX_EVENTS,
    MAX_ON_SCHEDULE_PER_CYCLE,
    NARROW_MIN_EVENTS,
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
from observer.config import LabConfig

FINDINGS_VERSION = 1
VERDICTS = ("periodic bulk upload", "periodic heartbeat", "irregular uploads", "nothing notable")
HEARTBEAT_MIN_INTERVALS = 8
HEARTBEAT_MAX_PERIOD_S = 6 * 3600.0
HEARTBEAT_MIN_FRACTION = 0.5
CONTACT_GAP_S = 30.0
MIN_SCHEDULE_FRACTION = 0.5  # occurrences / expected cycles
MAX_EVENTS_PER_OCCURRENCE = MAX_ON_SCHEDULE_PER_CYCLE
MAX_JITTER_FRACTION = 1 / 12  # of the period: 2 h for a daily job
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_period(seconds: float) -> str:
    if abs(seconds - DAY) < 60:
        return "day"
    if seconds >= DAY and abs(seconds / DAY - round(seconds / DAY)) < 0.01:
        return f"{round(seconds / DAY)} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    if seconds >= 60:
        return f"{seconds / 60:.3g} min"
    return f"{seconds:.0f} s"


def human_jitter(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def phase_text(result: PeriodicityResult, times: np.ndarray, tz: str) -> str | None:
    """The phase as a reader says it: "02:03" (daily or shorter), "Mon 02:03" (weekly)."""
    if result.period_s is None or result.phase_s is None:
        return None
    if not result.local_clock:
        if not result.on_schedule:
            return None
        first = pd.Timestamp(times[result.on_schedule[0]], unit="s", tz="UTC").tz_convert(tz)
        return first.strftime("%H:%M")
    seconds = round(result.phase_s) % int(DAY)
    clock = f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}"
    if result.period_s >= 7 * DAY - 1:
        day = (3 + int(result.phase_s // DAY)) % 7  # wall-clock day 0 (1970-01-01) was a Thursday
        return f"{WEEKDAYS[day]} {clock}"
    return clock


def _schedule_words(f: dict) -> tuple[str, str, str, str, str]:
    """Period, size, "at about HH:MM local time (+- jitter)", "n of m recorded days", p."""
    every = human_period(f["period_s"])
    size = human_bytes(f["typical_bytes"] or 0)
    when = f" at about {f['phase_local']} local time" if f["phase_local"] else ""
    when += f" (+- {human_jitter(f['jitter_s'] or 0.0)})"
    cycles = "recorded days" if every == "day" else "recorded cycles"
    return every, size, when, f"{f['occurrences']} of {f['expected']} {cycles}", \
        f"p = {f['p_value']:.1g}"


def evidence_note(from_totals: int, n_events: int) -> str | None:
    """What the reader must know when events come from connection totals, not activity bins."""
    if not from_totals:
        return None
    which = "All" if from_totals == n_events else f"{from_totals} of {n_events}"
    return (f"{which} bulk upload events come from connection totals (the source, such as a "
            f"PCAPdroid CSV or a Zeek conn.log, had no per-10-second activity): each is a whole "
            f"connection treated as one block, timed by its start.")


def _listed(stats: pd.Series | None, column: str) -> list[str]:
    if stats is None or not isinstance(stats[column], list):
        return []
    return stats[column]


def _confidence(p: float, alpha: float, occurrences: int) -> str:
    if p <= alpha / 10 and occurrences >= 5:
        return "high"
    if p <= alpha:
        return "medium"
    if p <= 0.1:
        return "low"
    return "none"


class Analysis:
    """One run of the analysis over a set of record tables (per device, per group)."""

    def __init__(self, config: LabConfig, catalog: Catalog, *, n_sim: int = 1000, seed: int = 0,
                 silence_s: float = SILENCE_S) -> None:
        self.config = config
        self.catalog = catalog
        self.thresholds = config.thresholds
        self.n_sim = n_sim
        self.seed = seed
        self.silence_s = silence_s

    def run(self, records: dict[str, pd.DataFrame]) -> dict:
        conns = records["connections"]
        sessions = records["sessions"]
        groups = endpoint_groups(conns, self.catalog)
        blk = blocks(records["activity"], conns, self.config.bin_seconds)
        events = bulk_events(blk, groups, self.thresholds)
        touch = contacts(blk, groups, max(CONTACT_GAP_S, 3 * self.config.bin_seconds))

        devices = sorted(set(groups["device"].dropna()) | set(blk["device"].dropna()))
        coverage: dict[str, Coverage] = {}
        silent: dict[str, list] = {}
        tests: dict[str, PeriodicityTest] = {}
        for device in devices:
            coverage[device], silent[device] = device_coverage(
                sessions, blk, device, silence_s=self.silence_s
            )
            tests[device] = PeriodicityTest(coverage[device], self.config.timezone,
                                            n_sim=self.n_sim, seed=self.seed)

        meta = groups.drop_duplicates("key").set_index("key")
        by_key_events = {k: e.sort_values("ts_start") for k, e in events.groupby("key")}
        by_key_touch = {k: t["ts"].to_numpy() for k, t in touch.groupby("key")}

        periodic: dict[str, PeriodicityResult] = {}
        profiled: dict[str, int] = {}
        # Bulk events of endpoint groups (app groups repeat them: each upload counted once).
        endpoint_events = events[~events["key"].str.contains("\x1fapp\x1f", regex=False)]
        device_counts = {d: tests[d].slot_counts(
            endpoint_events.loc[endpoint_events["device"] == d, "ts_start"]) for d in devices}
        heartbeat: dict[str, tuple[float, float, int, float]] = {}
        labels: list[tuple[str, str]] = []
        raw: list[float] = []
        for key in meta.index:
            device = str(meta.at[key, "device"])
            ev = by_key_events.get(key)
            if ev is not None and len(ev) >= self.thresholds.min_occurrences:
                # The null's day profile: when the device uploaded to everyone but this group
                # (the group's own schedule must not make itself look expected).
                mine = tests[device].slot_counts(ev["ts_start"])
                others = np.maximum(device_counts[device] - mine, 0.0)
                profiled[key] = int(others.sum())
                res = tests[device].test(ev["ts_start"].to_numpy(), ev["bytes_up"].to_numpy(),
                                         profile=day_profile(others))
                periodic[key] = res
                labels.append((key, "bulk"))
                raw.append(res.p_value_raw)
            times = by_key_touch.get(key)
            if times is not None and len(times) > HEARTBEAT_MIN_INTERVALS:
                hb = interval_regularity(times, coverage[device])
                heartbeat[key] = hb
                labels.append((key, "heartbeat"))
                raw.append(hb[3])
        adjusted = dict(zip(labels, holm(raw), strict=True))

        group_stats = self._group_stats(conns, groups)
        findings = []
        for key in meta.index:
            findings.append(self._finding(
                key, meta.loc[key], group_stats.loc[key] if key in group_stats.index else None,
                by_key_events.get(key), periodic.get(key), adjusted.get((key, "bulk")),
                heartbeat.get(key), adjusted.get((key, "heartbeat")), tests,
            ))
            findings[-1]["null_profile_events"] = profiled.get(key)
        findings.sort(key=lambda f: (VERDICTS.index(f["verdict"]), f["p_value"] or 1.0,
                                     -(f["bytes_up"] or 0)))
        return {
            "schema_version": FINDINGS_VERSION,
            "generated_at": time.time(),
            "timezone": self.config.timezone,
            "parameters": self._parameters(len(raw)),
            "coverage": self._coverage(coverage, silent),
            "findings": findings,
        }

    def _parameters(self, n_tests: int) -> dict:
        return {
            **asdict(self.thresholds),
            "bin_seconds": self.config.bin_seconds,
            "clock_periods_s": list(CLOCK_PERIODS),
            "free_period_range_s": [FREE_MIN_S, FREE_MAX_S],
            "window_widths": list(WIDTHS),
            "window_widths_24h_busy": list(WIDTHS_24H),
            "busy_group_events": NARROW_MIN_EVENTS,
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

    @staticmethod
    def _coverage(coverage: dict[str, Coverage], silent: dict[str, list]) -> dict:
        def describe(cov: Coverage, gaps: list) -> dict:
            start, end = cov.span
            pairs = zip(cov.intervals, cov.intervals[1:], strict=False)
            holes = [[a, b] for (_, a), (b, _) in pairs]
            return {"ts_start": start, "ts_end": end, "covered_s": cov.total_s, "gaps": holes,
                    "silent_gaps": [list(g) for g in gaps]}

        intervals = sorted(iv for cov in coverage.values() for iv in cov.intervals)
        merged: list[list[float]] = []
        for a, b in intervals:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        out = describe(Coverage(tuple((a, b) for a, b in merged)), [])
        out["devices"] = {d: describe(cov, silent[d]) for d, cov in coverage.items()}
        return out

    @staticmethod
    def _group_stats(conns: pd.DataFrame, groups: pd.DataFrame) -> pd.DataFrame:
        joined = groups[["conn_id", "key"]].merge(
            conns[["conn_id", "server_name", "server_ip", "bytes_up", "bytes_down"]], on="conn_id"
        )
        joined["bytes_up"] = joined["bytes_up"].fillna(0).astype("int64")
        joined["bytes_down"] = joined["bytes_down"].fillna(0).astype("int64")
        g = joined.groupby("key")
        stats = g.agg(connections=("conn_id", "nunique"), bytes_up=("bytes_up", "sum"),
                      bytes_down=("bytes_down", "sum"))

        def top(col: str) -> pd.Series:
            sub = joined.dropna(subset=[col])
            sizes = sub.groupby(["key", col])["bytes_up"].sum().reset_index()
            sizes = sizes.sort_values(["key", "bytes_up"], ascending=[True, False])
            return sizes.groupby("key")[col].apply(lambda s: [str(x) for x in s.head(20)])

        stats["names"] = top("server_name")
        stats["server_ips"] = top("server_ip")
        return stats

    def _finding(self, key: str, meta: pd.Series, stats: pd.Series | None,
                 events: pd.DataFrame | None, res: PeriodicityResult | None, p_bulk: float | None,
                 hb: tuple[float, float, int, float] | None, p_hb: float | None,
                 tests: dict[str, PeriodicityTest]) -> dict:
        """One finding: the group's identity, verdict, schedule and evidence."""
        tz = self.config.timezone
        device = str(meta["device"])
        alpha = self.thresholds.alpha
        n_events = 0 if events is None else len(events)
        finding: dict = {
            "group": str(meta["group"]),
            "group_kind": str(meta["group_kind"]),
            "device": device,
            "service": None if pd.isna(meta["service"]) else str(meta["service"]),
            "organization": None if pd.isna(meta["organization"]) else str(meta["organization"]),
            "category": None if pd.isna(meta["category"]) else str(meta["category"]),
            "names": _listed(stats, "names"),
            "server_ips": _listed(stats, "server_ips"),
            "verdict": "nothing notable",
            "is_backup": bool(meta["is_backup"]),
            "period_s": None, "phase_s": None, "phase_local": None, "jitter_s": None,
            "occurrences": n_events, "expected": None, "typical_bytes": None,
            "p_value": None, "p_value_raw": None, "confidence": "none",
            "summary": "",
            "connections": 0 if stats is None else int(stats["connections"]),
            "bytes_up": 0 if stats is None else int(stats["bytes_up"]),
            "bytes_down": 0 if stats is None else int(stats["bytes_down"]),
            "bulk_events": n_events,
            "period_family": None,
            "events": [],
        }
        times = np.array([]) if events is None else events["ts_start"].to_numpy()
        on_schedule: set[int] = set()
        if res is not None and res.period_s is not None:
            on_schedule = set(res.on_schedule)
            finding.update({
                "period_s": round(res.period_s, 1), "phase_s": round(res.phase_s or 0.0, 1),
                "phase_local": phase_text(res, times, tz),
                "jitter_s": None if res.jitter_s is None else round(res.jitter_s, 1),
                "occurrences": res.occurrences, "expected": res.expected,
                "p_value": p_bulk, "p_value_raw": res.p_value_raw,
                "period_family": res.family,
                "confidence": _confidence(p_bulk or 1.0, alpha, res.occurrences),
            })
        finding["evidence_note"] = None
        if events is not None and len(events):
            sched = [i for i in range(len(events)) if i in on_schedule] or list(range(len(events)))
            finding["typical_bytes"] = int(np.median(events["bytes_up"].to_numpy()[sched]))
            finding["events"] = self._events(events, on_schedule, tz)
            finding["evidence_note"] = evidence_note(int(events["from_totals"].sum()), n_events)
        checks = self._schedule_checks(res, p_bulk)
        finding["schedule_checks"] = checks
        if checks is not None and all(checks.values()):
            finding["verdict"] = "periodic bulk upload"
        elif hb is not None and self._is_heartbeat(hb, p_hb):
            median, fraction, n_int, _ = hb
            finding.update({
                "verdict": "periodic heartbeat", "period_s": round(median, 1), "phase_s": None,
                "phase_local": None, "jitter_s": None, "occurrences": n_int + 1,
                "expected": round(tests[device].coverage.total_s / median),
                "p_value": p_hb, "p_value_raw": hb[3], "period_family": "intervals",
                "confidence": _confidence(p_hb or 1.0, alpha, n_int),
                "regular_fraction": round(fraction, 3),
            })
        elif n_events:
            finding["verdict"] = "irregular uploads"
        finding["summary"] = self._summary(finding)
        return finding

    def _schedule_checks(self, res: PeriodicityResult | None, p: float | None) -> dict | None:
        """Each condition of a "periodic bulk upload", so a reader sees which one failed."""
        if res is None or res.period_s is None:
            return None
        return {
            "significant": p is not None and p <= self.thresholds.alpha,
            "enough_occurrences": res.occurrences >= self.thresholds.min_occurrences,
            "most_cycles_seen": not res.expected
            or res.occurrences >= MIN_SCHEDULE_FRACTION * res.expected,
            "one_upload_per_cycle": len(res.on_schedule)
            <= MAX_EVENTS_PER_OCCURRENCE * res.occurrences,
            "tight_timing": res.jitter_s is not None
            and res.jitter_s <= MAX_JITTER_FRACTION * res.period_s,
        }

    def _is_heartbeat(self, hb: tuple[float, float, int, float], p: float | None) -> bool:
        median, fraction, n_int, _ = hb
        return (p is not None and p <= self.thresholds.alpha and n_int >= HEARTBEAT_MIN_INTERVALS
                and fraction >= HEARTBEAT_MIN_FRACTION and 0 < median <= HEARTBEAT_MAX_PERIOD_S)

    @staticmethod
    def _events(events: pd.DataFrame, on_schedule: set[int], tz: str) -> list[dict]:
        local = pd.to_datetime(events["ts_start"], unit="s", utc=True).dt.tz_convert(tz)
        out = []
        for i, (row, when) in enumerate(zip(events.itertuples(index=False), local, strict=True)):
            out.append({
                "ts_start": float(row.ts_start), "ts_end": float(row.ts_end),
                "local_time": when.isoformat(timespec="seconds"),
                "bytes_up": int(row.bytes_up), "bytes_down": int(row.bytes_down),
                "server_name": None if pd.isna(row.server_name) else str(row.server_name),
                "conn_ids": [str(c) for c in row.conn_ids],
                "on_schedule": i in on_schedule,
                "from_totals": bool(row.from_totals),
            })
        return out

    @staticmethod
    def _summary(f: dict) -> str:
        note = f" {f['evidence_note']}" if f["evidence_note"] else ""
        if f["group_kind"] == "app":
            return Analysis._app_summary(f) + note
        who = f["group"] + (f" ({f['organization']})" if f["organization"] and
                            f["organization"] != f["group"] else "")
        verdict = f["verdict"]
        if verdict == "periodic bulk upload":
            every, size, when, seen, chance = _schedule_words(f)
            if f["is_backup"]:
                return (f"Scheduled backup: {f['device']} sends about {size} to {who} every {every}"
                        f"{when}; seen on {seen} ({chance}).{note}")
            return (f"{f['device']} uploads about {size} to {who} every {every}{when}; "
                    f"seen on {seen}; the chance of so regular a pattern arising by accident is "
                    f"{chance}.{note}")
        if verdict == "periodic heartbeat":
            return (f"{who} is contacted every {human_period(f['period_s'])} with small amounts of "
                    f"data ({f['occurrences']} contacts): a heartbeat, not a bulk upload.")
        if verdict == "irregular uploads":
            extra = " (a backup service)" if f["is_backup"] else ""
            return (f"{f['bulk_events']} bulk upload(s) to {who}{extra} at irregular times, "
                    f"{human_bytes(f['bytes_up'])} up in total; no schedule found.{note}")
        return f"No bulk uploads or regular contacts to {who}."

    @staticmethod
    def _app_summary(f: dict) -> str:
        """An app group is who sends (PCAPdroid's attribution), not where: say so, and where to."""
        app = f"the app {f['group']}"
        names = f["names"] or f["server_ips"]
        where = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        to = f" to {where}" if where else ""
        verdict = f["verdict"]
        if verdict == "periodic bulk upload":
            every, size, when, seen, chance = _schedule_words(f)
            return (f"On {f['device']}, {app} uploaded about {size}{to} every {every}{when}; "
                    f"seen on {seen}; the chance of so regular a pattern arising by accident is "
                    f"{chance}.")
        if verdict == "periodic heartbeat":
            return (f"On {f['device']}, {app} contacted{to or ' its servers'} every "
                    f"{human_period(f['period_s'])} with small amounts of data "
                    f"({f['occurrences']} contacts): a heartbeat, not a bulk upload.")
        if verdict == "irregular uploads":
            return (f"On {f['device']}, {app} uploaded {human_bytes(f['bytes_up'])} in "
                    f"{f['bulk_events']} bulk upload(s){to} at irregular times; no schedule "
                    f"found.")
        return f"On {f['device']}, {app} made no bulk uploads or regular contacts."


def analyze_records(records: dict[str, pd.DataFrame], config: LabConfig, catalog: Catalog,
                    *, n_sim: int = 1000, seed: int = 0) -> dict:
    """The findings (docs/findings.md) of a set of record tables, JSON-serialisable."""
    from observer.records import TABLES, empty

    tables = {t: records.get(t, empty(t)) for t in TABLES}
    return Analysis(config, catalog, n_sim=n_sim, seed=seed).run(tables)


def _json_default(value: object) -> object:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_findings(findings: dict, path: Path) -> Path:
    """Write findings as UTF-8 JSON (atomically, so a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(findings, indent=1, default=_json_default, allow_nan=False),
                       encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise ObserverError(f"cannot write findings {path}: {exc.strerror or exc}") from None
    return path
