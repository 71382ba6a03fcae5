"""Detection: does `observer analyze` find nightly exports (and only those), beside RITA's beacons?

Each scenario is simulated with ``observer.simulate`` (ground truth from the simulator), replayed
with ``observer.sources.replay`` and analysed with ``observer.analysis.analyze_records``.  In the
same run RITA v5's beacon score (re-implemented here from its published source, analysis/beacons.go:
mean of timestamp, data-size, histogram and duration scores) is computed on the same data twice:
on connections per (device, server name), as RITA does, and on our bulk upload events per group.

A "periodic bulk upload" finding is a true positive when its group holds the export's server name,
its period is within 2% of the job's, and its phase within 60 minutes of the job's local time.  A
backup finding (is_backup) is never an export false positive, but each scenario with a backup job
must report it as a backup.  RITA "flags" a pair whose score is at least a threshold (0.8 and 0.5
by default); the per-scenario table shows the first.

    .venv/bin/python benchmarks/detection.py [--quick] [--only NAME] [--rita-thresholds 0.8 0.5]

Records are cached under benchmarks/data/detection/ (git-ignored), keyed by a hash of the
scenario, so a second run only analyses; delete that folder after changing the simulator or the
replay.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from observer.analysis import analyze_records  # noqa: E402
from observer.catalog import load_catalog  # noqa: E402
from observer.records import read_records  # noqa: E402
from observer.simulate import Scenario, simulate  # noqa: E402
from observer.sources import replay  # noqa: E402

DATA = ROOT / "benchmarks" / "data" / "detection"
EXPORT_NAME = "sync.example-analytics.net"
DAY = 86400.0
PHASE_TOLERANCE_S = 3600.0


# --- the scenario grid -----------------------------------------------------------------------

def export(**kw) -> dict:
    job = {"name": "export", "kind": "export", "server_name": EXPORT_NAME, "size_mb": 20,
           "at": "02:00", "every": "24h", "jitter_min": 15}
    job.update(kw)
    if job.get("inside_long_lived"):
        job.pop("server_name")
    return job


BACKUP = {"name": "wa-backup", "kind": "backup", "server_name": "backup.googleapis.com",
          "size_mb": 8, "size_jitter": 0.3, "at": "03:30", "every": "24h", "jitter_min": 10,
          "jitter": "normal"}
HEAVY_MEDIA = {"media_per_day": 140, "media_upload_share": 0.5, "media_median_kb": 2500}
NIGHT_GAP = [{"day": 2, "at": "22:00", "hours": 9}, {"day": 4, "at": "13:00", "hours": 3}]


def grid() -> list[dict]:
    """>= 30 scenarios: export present/absent, jitter, misses, length, size, inside the chat
    connection or not, and the confounders."""
    s: list[dict] = []

    def add(name: str, days: int, jobs: list[dict], seed: int, **extra) -> None:
        s.append({"name": name, "days": days, "seed": seed, "jobs": jobs, **extra})

    # Export in its own connections: jitter, misses, days, size.
    add("exp-7d-j0", 7, [export(jitter_min=0)], 11)
    add("exp-7d-j20", 7, [export(jitter_min=20)], 12)
    add("exp-7d-j60", 7, [export(jitter_min=60)], 13)
    add("exp-7d-j30-normal", 7, [export(jitter_min=30, jitter="normal")], 14)
    add("exp-10d-miss20", 10, [export(miss_rate=0.2)], 15)
    add("exp-10d-miss40", 10, [export(miss_rate=0.4, jitter_min=30)], 16)
    add("exp-14d-miss40-j60", 14, [export(miss_rate=0.4, jitter_min=60)], 17)
    add("exp-3d", 3, [export(jitter_min=10)], 18)
    add("exp-4d", 4, [export(jitter_min=20)], 19)
    add("exp-5d-1MB", 5, [export(size_mb=1, jitter_min=10)], 20)
    add("exp-4d-500MB", 4, [export(size_mb=500, jitter_min=10)], 21)
    add("exp-14d-j45", 14, [export(jitter_min=45, at="23:30")], 22)
    # Export hidden inside the long-lived chat connection.
    add("chat-7d-j0", 7, [export(inside_long_lived=True, jitter_min=0)], 31)
    add("chat-7d-j30", 7, [export(inside_long_lived=True, jitter_min=30)], 32)
    add("chat-10d-miss30", 10, [export(inside_long_lived=True, miss_rate=0.3)], 33)
    add("chat-5d-5MB", 5, [export(inside_long_lived=True, size_mb=5, at="04:10")], 34)
    add("chat-14d-j60-miss20", 14, [export(inside_long_lived=True, jitter_min=60,
                                           miss_rate=0.2)], 35)
    add("chat-3d", 3, [export(inside_long_lived=True, jitter_min=5)], 36)
    # Confounders beside an export.
    add("exp+backup", 7, [export(), BACKUP], 41)
    add("exp+heavy-media", 7, [export(jitter_min=30)], 42, activity=HEAVY_MEDIA)
    add("exp+heartbeat-90s", 7, [export()], 43, activity={"telemetry_interval_s": 90})
    add("exp+doze-long", 7, [export(at="03:00")], 44,
        activity={"doze_start": "23:00", "doze_end": "08:00"})
    add("exp+dst-spring", 7, [export(jitter_min=10)], 45, start="2026-03-26")
    add("exp+dst-autumn", 7, [export(jitter_min=10, at="02:30")], 46, start="2026-10-22")
    add("exp+gaps", 8, [export(jitter_min=20)], 47, gaps=NIGHT_GAP)
    add("chat+backup+media", 7, [export(inside_long_lived=True), BACKUP], 48,
        activity=HEAVY_MEDIA)
    add("exp-to-media-cdn", 7, [export(server_name="mmg.whatsapp.net", size_mb=10)], 50,
        activity=HEAVY_MEDIA)
    add("exp-6h", 5, [export(every="6h", at="01:00", size_mb=5, jitter_min=10)], 49)
    # No export: the detector must stay quiet (a backup must be named as a backup).
    add("none-7d", 7, [], 51)
    add("none-14d", 14, [], 52)
    add("none-heavy-media", 7, [], 53, activity=HEAVY_MEDIA)
    add("none-heavy-media-14d", 14, [], 54, activity=HEAVY_MEDIA)
    add("backup-only", 7, [BACKUP], 55)
    add("backup-only-14d-media", 14, [BACKUP], 56, activity=HEAVY_MEDIA)
    add("none-dst", 7, [], 57, start="2026-03-26")
    add("none-gaps", 8, [], 58, gaps=NIGHT_GAP)
    add("none-doze", 7, [], 59, activity={"doze_start": "22:00", "doze_end": "09:00"})
    add("none-3d", 3, [], 60)
    add("irregular-uploads", 7, [export(jitter_min=600, miss_rate=0.3, size_mb=10)], 61)
    return s


QUICK = ("exp-7d-j20", "exp-10d-miss40", "exp-4d", "chat-7d-j30", "exp+backup",
         "exp+dst-spring", "none-7d", "none-heavy-media", "backup-only", "irregular-uploads")


# --- RITA v5 beacon score (analysis/beacons.go, default weights 0.25 each) ---------------------

def _quartiles(x: np.ndarray) -> tuple[float, float, float]:
    """montanaflynn/stats Quartile: medians of the lower and upper halves (median excluded)."""
    x = np.sort(x)
    n = len(x)
    half = n // 2
    lower, upper = (x[:half], x[half + 1:]) if n % 2 else (x[:half], x[half:])
    return float(np.median(lower)), float(np.median(x)), float(np.median(upper))


def _stat_score(values: np.ndarray, default_mad: float) -> float:
    q1, q2, q3 = _quartiles(values)
    den = q3 - q1
    skew = (q1 + q3 - 2 * q2) / den if den >= 10 and q2 != q1 and q2 != q3 else 0.0
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    mad_score = (median - mad) / median if median >= 1 else default_mad
    return round(((1 - abs(skew)) + max(mad_score, 0.0)) / 2, 3)


def rita_score(ts: np.ndarray, sizes: np.ndarray, t_min: float, t_max: float) -> float | None:
    """RITA's beacon score over [t_min, t_max]; None where RITA refuses to score (< 4 timestamps
    or < 3 non-zero intervals)."""
    ts = np.sort(np.floor(ts))
    if len(ts) < 4:
        return None
    deltas = np.diff(ts)
    if np.count_nonzero(deltas) < 3:
        return None
    ts_score = _stat_score(np.sort(deltas[deltas > 0]), 1.0)
    ds_score = _stat_score(np.asarray(sizes, float), 0.0)
    edges = np.linspace(t_min, t_max, 25)
    hist = np.histogram(np.clip(ts, t_min, t_max), bins=edges)[0]
    cv = hist.std() / hist.mean()
    cv_score = 0.0 if cv > 1 else round(1 - cv, 3)
    bars = int(np.count_nonzero(hist))
    bin_size = np.ceil(hist.max() * 0.05)
    counts: dict[int, int] = {}
    for f in hist[hist > 0]:
        key = int(np.floor(f / bin_size) * bin_size)
        counts[key] = counts.get(key, 0) + 1
    bimodal = 0.0
    if bars >= 11:
        top = sorted(counts.values(), reverse=True)[:2]
        bimodal = min(1.0, round(sum(top) / max(bars - 1, 1), 3))
    hist_score = max(cv_score, bimodal)
    run = longest = 0
    for f in np.concatenate([hist, hist]):
        run = run + 1 if f > 0 else 0
        longest = max(longest, run)
    longest = min(longest, len(hist))
    dur_score = 0.0
    if bars >= 6:
        coverage = min(1.0, np.ceil((ts[-1] - ts[0]) / (t_max - t_min) * 1000) / 1000)
        consistency = min(1.0, np.ceil(longest / 12 * 1000) / 1000)
        dur_score = max(coverage, consistency)
    return round(0.25 * (ts_score + ds_score + hist_score + dur_score), 3)


# --- running one scenario ----------------------------------------------------------------------

@dataclass
class Outcome:
    name: str
    days: int
    has_export: bool
    has_backup: bool
    tp: int = 0
    fp: int = 0
    fn: int = 0
    backup_found: bool | None = None
    period_err_s: float | None = None
    phase_err_s: float | None = None
    p_value: float | None = None
    min_p_other: float | None = None
    rita_conn: dict = field(default_factory=dict)
    rita_events: dict = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def prepare(spec: dict) -> tuple[Path, dict, Scenario]:
    """Simulate and replay once; later runs read the cached records."""
    scenario = Scenario.from_dict(dict(spec), name=spec["name"])
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = DATA / f"{spec['name']}-{key}"
    records = folder / "records"
    truth_file = folder / "capture.truth.json"
    if not (records / "meta.json").exists() or not truth_file.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        pcap = folder / "capture.pcap"
        truth_file = simulate(scenario, pcap, progress=False)
        stats = replay([pcap], records, config=scenario.lab_config(), progress=False)
        if stats.errors:
            raise SystemExit(f"{spec['name']}: replay errors: {stats.errors}")
        pcap.unlink()  # the records are what the benchmark needs; keep the cache small
    return records, json.loads(truth_file.read_text()), scenario


def circular_error(a: float, b: float, period: float) -> float:
    d = (a - b) % period
    return min(d, period - d)


def evaluate(spec: dict, rita_thresholds: tuple[float, ...]) -> Outcome:
    records_dir, truth, scenario = prepare(spec)
    config = scenario.lab_config()
    t0 = time.perf_counter()
    records = read_records(records_dir)
    findings = analyze_records(records, config, load_catalog(config.catalogs))
    seconds = time.perf_counter() - t0
    jobs = {j["name"]: j for j in truth["scenario"]["jobs"]}
    exp_job = next((j for j in jobs.values() if j["kind"] == "export"), None)
    backup_job = next((j for j in jobs.values() if j["kind"] == "backup"), None)
    exp_name = (truth["chat"]["server_name"] if exp_job and exp_job["inside_long_lived"]
                else exp_job and exp_job["server_name"])
    # A job that can never look periodic (jitter of hours) is "irregular": no export expected.
    periodic_export = exp_job is not None and exp_job["jitter_min"] <= 90
    out = Outcome(spec["name"], scenario.days, periodic_export, backup_job is not None,
                  seconds=seconds)
    found = False
    for f in findings["findings"]:
        if f["verdict"] != "periodic bulk upload":
            # The smallest p-value of another group's bulk upload test (heartbeats excluded).
            if f["p_value"] is not None and f["period_family"] != "intervals":
                out.min_p_other = min(out.min_p_other or 1.0, f["p_value"])
            continue
        if f["is_backup"]:
            if backup_job and backup_job["server_name"] in f["names"]:
                out.backup_found = True
            continue
        match = periodic_export and exp_name in f["names"]
        if match:
            period_err = abs(f["period_s"] - exp_job["every_s"])
            phase_err = circular_error(f["phase_s"] % DAY, exp_job["at_s"] % DAY,
                                       min(DAY, exp_job["every_s"]))
            close = period_err <= 0.02 * exp_job["every_s"] and phase_err <= PHASE_TOLERANCE_S
            if close and not found:
                out.tp, found = 1, True
                out.period_err_s, out.phase_err_s = period_err, phase_err
                out.p_value = f["p_value"]
                continue
            out.notes.append(f"mismatch P={f['period_s']} phase={f['phase_local']}")
        out.fp += 1
        out.notes.append(f"FP {f['group']} P={f['period_s']} {f['phase_local']} p={f['p_value']}")
    if periodic_export and not found:
        out.fn = 1
    if backup_job and out.backup_found is None:
        out.backup_found = False
    out.rita_conn = rita_on_connections(records, exp_name if periodic_export else None,
                                        rita_thresholds)
    out.rita_events = rita_on_events(findings, exp_name if periodic_export else None,
                                     rita_thresholds)
    return out


def _rita_tally(scored: list[tuple[list[str], float | None]], exp_name: str | None,
                thresholds: tuple[float, ...], backup: str = "backup.googleapis.com") -> dict:
    """TP/FP/FN per threshold, and the export's own score."""
    out = {t: _rita_at(scored, exp_name, t, backup) for t in thresholds}
    out["score"] = out[thresholds[0]]["score"]
    return out


def _rita_at(scored: list[tuple[list[str], float | None]], exp_name: str | None,
             threshold: float, backup: str) -> dict:
    tp = fp = 0
    best = None
    for names, score in scored:
        hit = exp_name is not None and exp_name in names
        if hit:
            best = score if best is None or (score or 0) > best else best
        if score is None or score < threshold:
            continue
        if hit:
            tp = 1
        elif backup not in names:
            fp += 1
    return {"tp": tp, "fp": fp, "fn": int(exp_name is not None and not tp), "score": best}


def rita_on_connections(records: dict[str, pd.DataFrame], exp_name: str | None,
                        thresholds: tuple[float, ...]) -> dict:
    """RITA's view: every connection start per (device, server name), sizes = total bytes."""
    conns = records["connections"].dropna(subset=["server_name"])
    t_min, t_max = float(conns["ts_start"].min()), float(conns["ts_end"].max())
    scored = []
    for name, g in conns.groupby("server_name"):
        sizes = (g["bytes_up"].fillna(0) + g["bytes_down"].fillna(0)).to_numpy(float)
        scored.append(([str(name)], rita_score(g["ts_start"].to_numpy(float), sizes, t_min,
                                                t_max)))
    return _rita_tally(scored, exp_name, thresholds)


def rita_on_events(findings: dict, exp_name: str | None, thresholds: tuple[float, ...]) -> dict:
    """RITA's score applied to our bulk upload events per group (the same events we test)."""
    cov = findings["coverage"]
    scored = []
    for f in findings["findings"]:
        if not f["events"]:
            continue
        ts = np.array([e["ts_start"] for e in f["events"]])
        sizes = np.array([e["bytes_up"] for e in f["events"]], float)
        scored.append((f["names"], rita_score(ts, sizes, cov["ts_start"], cov["ts_end"])))
    return _rita_tally(scored, exp_name, thresholds)


# --- calibration under the null ---------------------------------------------------------------

def calibration(lists: int, seed: int = 5) -> list[tuple[str, int, float, float]]:
    """Share of random event lists (over a week with a night-time capture gap) whose raw p-value
    falls below 0.05 and 0.01: a calibrated test gives about 5% and 1%.  "uniform": events and
    null uniform in time.  "day profile": events drawn at the simulator's hour-of-day user
    activity (quiet nights, busy evenings), the null's profile estimated from 300 other such
    events (as the analysis estimates it from the device's other groups)."""
    from observer.analysis.periodicity import Coverage, PeriodicityTest, day_profile
    from observer.simulate.plan import HOURLY

    t0 = Scenario().local_midnight(0)
    cover = Coverage(((t0, t0 + 2.9 * DAY), (t0 + 3.3 * DAY, t0 + 7 * DAY)))
    test = PeriodicityTest(cover, "Europe/Berlin", n_sim=1000, seed=seed + 1)
    rng = np.random.default_rng(seed)
    truth = np.repeat(HOURLY / HOURLY.sum() / 2, 2)
    profile = day_profile(test.slot_counts(test.sample(rng, (300,), truth)))
    rows = []
    for n in (4, 7, 14):
        ps = np.array([test.test(cover.sample(rng, (n,))).p_value_raw for _ in range(lists)])
        rows.append(("uniform", n, float(np.mean(ps < 0.05)), float(np.mean(ps < 0.01))))
    for n in (7, 14, 60):
        ps = np.array([test.test(test.sample(rng, (n,), truth), profile=profile).p_value_raw
                       for _ in range(lists)])
        rows.append(("day profile", n, float(np.mean(ps < 0.05)), float(np.mean(ps < 0.01))))
    return rows


# --- the table -----------------------------------------------------------------------------------

def pr(tp: int, fp: int, fn: int) -> tuple[float, float]:
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    return precision, recall


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} scenarios")
    parser.add_argument("--only", action="append", help="run only the named scenario(s)")
    parser.add_argument("--rita-thresholds", type=float, nargs="+", default=[0.8, 0.5],
                        help="RITA scores at or above which a pair counts as flagged")
    parser.add_argument("--json", type=Path, help="also write the per-scenario results here")
    parser.add_argument("--calibration", type=int, default=300, metavar="N",
                        help="random event lists per size for the null calibration (0: skip)")
    args = parser.parse_args()
    specs = grid()
    if args.quick:
        specs = [s for s in specs if s["name"] in QUICK]
    if args.only:
        specs = [s for s in specs if s["name"] in args.only]

    print("| scenario | days | export | ours TP/FP/FN | period err | phase err | p-value | "
          "min p (other uploads) | backup found | RITA conn TP/FP (score) | "
          "RITA events TP/FP (score) | analyse s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    outcomes = []
    for spec in specs:
        o = evaluate(spec, tuple(args.rita_thresholds))
        outcomes.append(o)
        t0 = args.rita_thresholds[0]
        rc, re_ = {**o.rita_conn[t0], "score": o.rita_conn["score"]}, \
            {**o.rita_events[t0], "score": o.rita_events["score"]}
        print(f"| {o.name} | {o.days} | {'yes' if o.has_export else 'no'} | "
              f"{o.tp}/{o.fp}/{o.fn} | {fmt(o.period_err_s, '.0f')} s | "
              f"{fmt(None if o.phase_err_s is None else o.phase_err_s / 60, '.1f')} min | "
              f"{fmt(o.p_value, '.1e')} | {fmt(o.min_p_other, '.2g')} | "
              f"{'-' if o.backup_found is None else ('yes' if o.backup_found else 'NO')} | "
              f"{rc['tp']}/{rc['fp']} ({fmt(rc['score'], '.2f')}) | "
              f"{re_['tp']}/{re_['fp']} ({fmt(re_['score'], '.2f')}) | {o.seconds:.2f} |",
              flush=True)
        for note in o.notes:
            print(f"    {o.name}: {note}", file=sys.stderr)

    def summary(label: str, group: list[Outcome]) -> None:
        if not group:
            return
        ours = pr(sum(o.tp for o in group), sum(o.fp for o in group), sum(o.fn for o in group))
        cells = [f"{ours[0]:.2f} / {ours[1]:.2f}"]
        for t in args.rita_thresholds:
            for attr in ("rita_conn", "rita_events"):
                p, r = pr(*(sum(getattr(o, attr)[t][k] for o in group) for k in ("tp", "fp", "fn")))
                cells.append(f"{p:.2f} / {r:.2f}")
        print(f"| {label} ({len(group)} scenarios) | " + " | ".join(cells) + " |")

    print()
    heads = [f"RITA {kind} >= {t}" for t in args.rita_thresholds
             for kind in ("on connections", "on our events")]
    print("| set | ours: precision / recall | " + " | ".join(heads) + " |")
    print("|---|---|" + "---|" * len(heads))
    summary("all", outcomes)
    summary(">= 4 days", [o for o in outcomes if o.days >= 4])
    summary("< 4 days", [o for o in outcomes if o.days < 4])
    quiet = [o for o in outcomes if not o.has_export]
    fp_quiet = sum(o.fp for o in quiet)
    backups = [o for o in outcomes if o.has_backup]
    errs = [o.phase_err_s / 60 for o in outcomes if o.phase_err_s is not None]
    perr = [o.period_err_s for o in outcomes if o.period_err_s is not None]
    pvals = [o.p_value for o in outcomes if o.p_value is not None]
    others = [o.min_p_other for o in outcomes if o.min_p_other is not None]
    print()
    print(f"scenarios without a periodic export: {len(quiet)}, with a 'periodic bulk upload' "
          f"false positive: {sum(1 for o in quiet if o.fp)} ({fp_quiet} findings)")
    print(f"backups named as backups: {sum(1 for o in backups if o.backup_found)}/{len(backups)}")
    if errs:
        print(f"phase error: median {statistics.median(errs):.1f} min, max {max(errs):.1f} min; "
              f"period error: median {statistics.median(perr):.0f} s, max {max(perr):.0f} s")
    if pvals:
        print(f"p-values of true positives: median {statistics.median(pvals):.1e}, "
              f"max {max(pvals):.1e}; smallest p of any other group: {min(others):.2g}"
              if others else "")
    print(f"analysis time per scenario: median {statistics.median(o.seconds for o in outcomes):.2f}"
          f" s, max {max(o.seconds for o in outcomes):.2f} s")
    if args.calibration:
        print()
        print(f"calibration ({args.calibration} random event lists per null and size, raw p):")
        for null, n, p05, p01 in calibration(args.calibration):
            print(f"  {null:11s} n={n:2d}: share p<0.05 = {p05:.3f}, share p<0.01 = {p01:.3f}")
    if args.json:
        args.json.write_text(json.dumps([o.__dict__ for o in outcomes], indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
