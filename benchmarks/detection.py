"""Detection: does `observer analyze` find scheduled bulk uploads (and only those), beside RITA's
beacons, on 60+ simulated labs with known answers?

Each scenario is simulated with ``observer.simulate`` (ground truth from the simulator), replayed
with ``observer.sources.replay`` (the lab config names each phone with its MAC and its stable
addresses only, as a user would; in the "identity" family it names no device, so phones are known
by their MACs) and analysed with ``observer.analysis.analyze_records``.

Ground truth: a job is *expected* to be reported as a "periodic bulk upload" when it moves at least
1 MB per run, its jitter is at most 90 minutes and a tenth of its period, and at least 3 of its runs
are in the capture (4 for weekly jobs).  A "periodic bulk upload" finding is a true positive when
it is on the job's phone, its names hold the job's server name (the chat server's for a job inside
the long-lived connection), its period is within 5 % of the job's and its phase within 60 minutes
of the job's local time (modulo the period, or the day for longer periods).  Every other such
finding is a false positive; a heartbeat, a user's uploads, a job with hours of jitter or a weekly
job seen once must not be one.  A backup job counts like any other and must also be named as a
backup (``is_backup``).  RITA v5's beacon score (re-implemented from its published source,
analysis/beacons.go) is computed on connections per server name, as RITA does; a pair "flags"
at a score >= 0.8.

    .venv/bin/python benchmarks/detection.py [--quick] [--only NAME] [--family F] [--jobs 2]
                                             [--reuse-records] [--calibration 1000]

Records are cached under benchmarks/data/detection/ (git-ignored), keyed by a hash of the scenario
and of the simulator's and replay's source (an older copy is deleted), so a second run only
analyses.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from observer.analysis import analyze_records  # noqa: E402
from observer.catalog import load_catalog  # noqa: E402
from observer.config import LabConfig  # noqa: E402
from observer.records import read_records  # noqa: E402
from observer.simulate import Scenario, bundled_names, simulate  # noqa: E402
from observer.simulate.scenario import BUNDLED_DIR  # noqa: E402
from observer.sources import replay  # noqa: E402

DATA = ROOT / "benchmarks" / "data" / "detection"
EXPORT_NAME = "sync.example-analytics.net"
DAY = 86400.0
WEEK = 7 * DAY
PHASE_TOLERANCE_S = 3600.0
PERIOD_TOLERANCE = 0.05
BULK_BYTES = 1_000_000
RITA_THRESHOLD = 0.8


# --- the scenario grid -----------------------------------------------------------------------

def export(**kw) -> dict:
    job = {"name": "export", "kind": "export", "server_name": EXPORT_NAME, "size_mb": 20,
           "at": "02:00", "every": "24h", "jitter_min": 15}
    job.update(kw)
    if job.get("inside_long_lived"):
        job.pop("server_name")
    return job


def job(name: str, server: str, every: str, at: str, size_mb: float, jitter_min: float = 10,
        **kw) -> dict:
    return {"name": name, "kind": "other", "server_name": server, "every": every, "at": at,
            "size_mb": size_mb, "jitter_min": jitter_min, **kw}


BACKUP = {"name": "wa-backup", "kind": "backup", "server_name": "backup.googleapis.com",
          "size_mb": 8, "size_jitter": 0.3, "at": "03:30", "every": "24h", "jitter_min": 10,
          "jitter": "normal"}
WEEKLY_BACKUP = {"name": "weekly-backup", "kind": "backup",
                 "server_name": "drive-backup.googleapis.com", "size_mb": 150, "size_jitter": 0.2,
                 "at": "03:00", "every": "7d", "first_day": 1, "jitter_min": 30}
HEARTBEAT = {"name": "heartbeat", "kind": "other", "server_name": "hb.example-analytics.net",
             "size_kb": 2, "size_jitter": 0.2, "at": "00:00", "every": "4.5m", "jitter_min": 0.3}
HEAVY_MEDIA = {"media_per_day": 140, "media_upload_share": 0.5, "media_median_kb": 2500}
BURSTS = {"media_per_day": 60, "media_upload_share": 0.8, "media_median_kb": 5000}
SILENT = {"messages_per_day": 0, "media_per_day": 0, "quic_per_day": 0,
          "telemetry_interval_s": 3600}
DUAL = {"temporary_ipv6": True}
V6_BUSY = {"ipv6_share": 0.7}
NIGHT_GAP = [{"day": 2, "at": "22:00", "hours": 9}, {"day": 4, "at": "13:00", "hours": 3}]


def grid() -> list[dict]:
    """>= 60 scenarios in families; each family has its own precision and recall."""
    s: list[dict] = []

    def add(family: str, name: str, days: int, jobs: list[dict] | None, seed: int,
            device: dict | None = None, **extra) -> None:
        spec = {"name": name, "family": family, "days": days, "seed": seed, **extra}
        if jobs is not None:
            spec["jobs"] = jobs
        if device:
            spec["device"] = device
        s.append(spec)

    # jitter: a nightly export on its own connections, from none to an hour.
    add("jitter", "exp-7d-j0", 7, [export(jitter_min=0)], 11)
    add("jitter", "exp-7d-j20", 7, [export(jitter_min=20)], 12)
    add("jitter", "exp-7d-j60", 7, [export(jitter_min=60)], 13)
    add("jitter", "exp-7d-j30-normal", 7, [export(jitter_min=30, jitter="normal")], 14)
    add("jitter", "exp-14d-j45", 14, [export(jitter_min=45, at="23:30")], 22)
    # export: misses, capture length, size.
    add("export", "exp-10d-miss20", 10, [export(miss_rate=0.2)], 15)
    add("export", "exp-10d-miss40", 10, [export(miss_rate=0.4, jitter_min=30)], 16)
    add("export", "exp-14d-miss40-j60", 14, [export(miss_rate=0.4, jitter_min=60)], 17)
    add("export", "exp-3d", 3, [export(jitter_min=10)], 18)
    add("export", "exp-4d", 4, [export(jitter_min=20)], 19)
    add("export", "exp-5d-1MB", 5, [export(size_mb=1, jitter_min=10)], 20)
    add("export", "exp-4d-500MB", 4, [export(size_mb=500, jitter_min=10)], 21)
    # chat: the export hidden inside the long-lived chat connection.
    add("chat", "chat-7d-j0", 7, [export(inside_long_lived=True, jitter_min=0)], 31)
    add("chat", "chat-7d-j30", 7, [export(inside_long_lived=True, jitter_min=30)], 32)
    add("chat", "chat-10d-miss30", 10, [export(inside_long_lived=True, miss_rate=0.3)], 33)
    add("chat", "chat-5d-5MB", 5, [export(inside_long_lived=True, size_mb=5, at="04:10")], 34)
    add("chat", "chat-14d-j60-miss20", 14, [export(inside_long_lived=True, jitter_min=60,
                                                   miss_rate=0.2)], 35)
    add("chat", "chat-3d", 3, [export(inside_long_lived=True, jitter_min=5)], 36)
    # confounders beside an export.
    add("confounders", "exp+backup", 7, [export(), BACKUP], 41)
    add("confounders", "exp+heavy-media", 7, [export(jitter_min=30)], 42, activity=HEAVY_MEDIA)
    add("confounders", "exp+heartbeat-90s", 7, [export()], 43,
        activity={"telemetry_interval_s": 90})
    add("confounders", "exp+doze-long", 7, [export(at="03:00")], 44,
        activity={"doze_start": "23:00", "doze_end": "08:00"})
    add("confounders", "exp+dst-spring", 7, [export(jitter_min=10)], 45, start="2026-03-26")
    add("confounders", "exp+dst-autumn", 7, [export(jitter_min=10, at="02:30")], 46,
        start="2026-10-22")
    add("confounders", "exp+gaps", 8, [export(jitter_min=20)], 47, gaps=NIGHT_GAP)
    add("confounders", "chat+backup+media", 7, [export(inside_long_lived=True), BACKUP], 48,
        activity=HEAVY_MEDIA)
    add("confounders", "exp-to-media-cdn", 7, [export(server_name="mmg.whatsapp.net",
                                                      size_mb=10)], 50, activity=HEAVY_MEDIA)
    # periods: 6 h, 8 h, 12 h and weekly jobs with jitter and missed runs.
    add("periods", "per-6h-5d", 5, [export(every="6h", at="01:00", size_mb=5, jitter_min=10)],
        49)
    add("periods", "per-6h-7d-miss15", 7, [job("sync6h", "api.sync-partner.com", "6h", "00:45",
                                               3, 15, miss_rate=0.15)], 62)
    add("periods", "per-8h-7d", 7, [job("sync8h", "push.metrics-hub.org", "8h", "01:20", 4, 10)],
        63)
    add("periods", "per-8h-10d-miss20", 10, [job("sync8h", "push.metrics-hub.org", "8h", "05:10",
                                                 6, 20, miss_rate=0.2)], 64)
    add("periods", "per-12h-7d", 7, [job("batch12h", "batch.adnet-sdk.com", "12h", "01:10", 2,
                                         20)], 65)
    add("periods", "per-12h-10d-miss20", 10, [job("batch12h", "batch.adnet-sdk.com", "12h",
                                                  "09:40", 8, 30, miss_rate=0.2,
                                                  jitter="normal")], 66)
    add("periods", "per-weekly-5w", 35, [job("weekly", "weekly.metrics-collector.io", "7d",
                                             "04:15", 80, 30, first_day=2)], 67)
    add("periods", "per-weekly-6w-miss", 42, [job("weekly", "weekly.metrics-collector.io", "7d",
                                                  "22:30", 60, 45, skip=[2])], 68)
    add("periods", "per-6h+daily", 7, [export(), job("sync6h", "api.sync-partner.com", "6h",
                                                     "00:45", 3, 5)], 69)
    add("periods", "per-8h+12h", 10, [job("sync8h", "push.metrics-hub.org", "8h", "02:20", 4, 10),
                                      job("batch12h", "batch.adnet-sdk.com", "12h", "07:00", 3,
                                          10)], 70)
    # backup: named as a backup, daily or weekly over five weeks.
    add("backup", "backup-only", 7, [BACKUP], 55)
    add("backup", "backup-only-14d-media", 14, [BACKUP], 56, activity=HEAVY_MEDIA)
    add("backup", "backup-weekly-5w", 35, [WEEKLY_BACKUP], 71)
    add("backup", "backup-weekly-5w+export", 35, [WEEKLY_BACKUP, export(miss_rate=0.1)], 72)
    add("backup", "backup-v6-dualstack", 7, [{**BACKUP, "family": "ipv6"}], 73, device=DUAL,
        activity=V6_BUSY)
    # ipv6: dual-stack phones with daily temporary addresses, exports over IPv6 or alternating.
    add("ipv6", "v6-dualstack-exp-v4", 7, [export()], 81, device=DUAL, activity=V6_BUSY)
    add("ipv6", "v6-exp-only-v6", 7, [export(family="ipv6")], 82, device=DUAL, activity=V6_BUSY)
    add("ipv6", "v6-exp-only-v6-stable", 7, [export(family="ipv6", jitter_min=25)], 83)
    add("ipv6", "v6-exp-alternate", 7, [export(family="alternate")], 84, device=DUAL,
        activity=V6_BUSY)
    add("ipv6", "v6-exp-mixed-10d-miss20", 10, [export(family="mixed", miss_rate=0.2)], 85,
        device=DUAL, activity=V6_BUSY)
    add("ipv6", "v6-6h-alternate", 5, [job("sync6h", "api.sync-partner.com", "6h", "00:45", 3, 10,
                                           family="alternate")], 86, device=DUAL)
    add("ipv6", "v6-rotate-12h-exp-alternate", 7, [export(family="alternate")], 87,
        device={**DUAL, "temporary_every": "12h"}, activity=V6_BUSY)
    # phones: several phones on one lab network.
    add("phones", "two-phones-one-export", 7, None, 91, phones=[
        {"name": "alice", "jobs": [export()]}, {"name": "bob", "jobs": [BACKUP]}])
    add("phones", "two-phones-same-app", 7, None, 92, phones=[
        {"name": "alice", "jobs": [export(at="02:00")]},
        {"name": "bob", "jobs": [export(at="04:30", miss_rate=0.15)]}])
    add("phones", "two-phones-dualstack", 7, None, 93, activity=V6_BUSY, phones=[
        {"name": "alice", **DUAL, "jobs": [export(family="alternate")]},
        {"name": "bob", **DUAL, "jobs": []}])
    add("phones", "three-phones-mixed", 7, None, 94, phones=[
        {"name": "a6h", "jobs": [job("sync6h", "api.sync-partner.com", "6h", "00:45", 3, 5)]},
        {"name": "bdaily", "jobs": [export(), BACKUP]},
        {"name": "cnone", "jobs": [HEARTBEAT]}])
    add("phones", "fleet-5-phones", 7, None, 95, fleet={"phones": 5, "with_export": 3})
    # silent: a phone nearly silent apart from its uploads (no chat, no media, hourly telemetry).
    add("silent", "silent-export", 7, [export()], 101, activity=SILENT, chat={"enabled": False})
    add("silent", "silent-export-2MB", 7, [export(size_mb=2)], 102, activity=SILENT,
        chat={"enabled": False})
    add("silent", "silent-6h", 7, [job("sync6h", "api.sync-partner.com", "6h", "00:45", 3, 5)],
        103, activity=SILENT, chat={"enabled": False})
    add("silent", "silent-v6-temporary", 7, [export(family="ipv6")], 104, device=DUAL,
        activity={**SILENT, "ipv6_share": 1.0}, chat={"enabled": False})
    add("silent", "silent-none", 7, [], 105, activity=SILENT, chat={"enabled": False})
    # heartbeats: small periodic contacts are never a bulk upload.
    add("heartbeats", "hb-4.5m", 7, [HEARTBEAT], 111)
    add("heartbeats", "hb-90s", 7, [{**HEARTBEAT, "every": "90s", "size_kb": 1}], 112)
    add("heartbeats", "hb-15m-50KB", 7, [{**HEARTBEAT, "every": "15m", "size_kb": 50}], 113)
    add("heartbeats", "hb+export", 7, [HEARTBEAT, export()], 114)
    # bursts: the user's own uploads (photos, videos) in the evening, irregular.
    add("bursts", "bursts-photos", 7, [], 121, activity=BURSTS)
    add("bursts", "bursts-photos-14d", 14, [], 122, activity=BURSTS)
    add("bursts", "bursts-videos", 7, [], 123, activity={"media_per_day": 12,
                                                        "media_upload_share": 1.0,
                                                        "media_median_kb": 20000})
    add("bursts", "bursts+export", 7, [export(jitter_min=30)], 124, activity=BURSTS)
    # identity: no device in the config (only the time zone): each phone is known by its MAC,
    # across IPv4 and its rotating temporary IPv6 addresses.
    add("identity", "id-dualstack-alternate", 7, [export(family="alternate")], 131, device=DUAL,
        activity=V6_BUSY, config="timezone only")
    add("identity", "id-two-phones-dualstack", 7, None, 132, activity=V6_BUSY,
        config="timezone only", phones=[
            {"name": "alice", **DUAL, "jobs": [export(family="mixed")]},
            {"name": "bob", **DUAL, "jobs": [export(family="ipv6", at="04:00"), BACKUP]}])
    add("identity", "id-silent-v6", 7, [export(family="ipv6")], 133, device=DUAL,
        activity={**SILENT, "ipv6_share": 1.0}, chat={"enabled": False}, config="timezone only")
    add("identity", "id-fleet-4-phones", 7, None, 134, fleet={"phones": 4, "with_export": 2},
        config="timezone only")
    # bundled: the scenarios a user runs first (observer simulate --list); fleet as hourly files.
    for bundled in bundled_names():
        data = yaml.safe_load((BUNDLED_DIR / f"{bundled}.yaml").read_text(encoding="utf-8"))
        s.append({**data, "name": f"bundled-{bundled}", "family": "bundled"})
    # none: no scheduled upload at all (or one with hours of jitter).
    add("none", "none-7d", 7, [], 51)
    add("none", "none-14d", 14, [], 52)
    add("none", "none-heavy-media", 7, [], 53, activity=HEAVY_MEDIA)
    add("none", "none-heavy-media-14d", 14, [], 54, activity=HEAVY_MEDIA)
    add("none", "none-dst", 7, [], 57, start="2026-03-26")
    add("none", "none-gaps", 8, [], 58, gaps=NIGHT_GAP)
    add("none", "none-doze", 7, [], 59, activity={"doze_start": "22:00", "doze_end": "09:00"})
    add("none", "none-3d", 3, [], 60)
    add("none", "none-35d", 35, [], 74)
    add("none", "none-dualstack", 7, [], 75, device=DUAL, activity=V6_BUSY)
    add("none", "none-two-phones", 7, None, 76, phones=[{"name": "alice"}, {"name": "bob"}])
    add("none", "none-two-phones-by-mac", 7, None, 77, config="timezone only", activity=V6_BUSY,
        phones=[{"name": "alice", **DUAL}, {"name": "bob", **DUAL}])
    add("none", "irregular-uploads", 7, [export(jitter_min=600, miss_rate=0.3, size_mb=10)], 61)
    return s


QUICK = ("exp-7d-j20", "exp-10d-miss40", "chat-7d-j30", "exp+backup", "per-6h-7d-miss15",
         "per-weekly-5w", "backup-weekly-5w", "v6-exp-alternate", "two-phones-same-app",
         "silent-export", "hb+export", "bursts-photos", "id-two-phones-dualstack", "none-7d",
         "none-dualstack")


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
class Expected:
    """A job the analysis should report as a periodic bulk upload, with its answer."""

    device: str
    job: str
    kind: str
    name: str  # the server name its bytes go to
    period_s: float
    at_s: float
    runs: int


@dataclass
class Outcome:
    name: str
    family: str
    days: int
    expected: int = 0
    backups: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    fp_not_backup: int = 0  # false positives that are not a backup (must be 0 without an export)
    backups_named: int = 0
    period_err: list[float] = field(default_factory=list)  # relative, per true positive
    phase_err_s: list[float] = field(default_factory=list)
    p_values: list[float] = field(default_factory=list)
    rita: dict = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _source_key() -> str:
    """The simulator's and replay's source: a change to either invalidates the cache."""
    digest = hashlib.sha256()
    for folder in ("observer/simulate", "observer/sources", "observer/devices.py"):
        path = ROOT / folder
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            if f.exists():
                digest.update(f.read_bytes())
    return digest.hexdigest()[:8]


def lab_config(spec: dict, scenario: Scenario) -> LabConfig:
    """The config a user would write: every phone by name, MAC and stable addresses; or, for
    ``config: timezone only``, no devices at all (they are named by their MACs)."""
    config = scenario.lab_config()
    return dataclasses.replace(config, devices=()) if spec.get("config") else config


def prepare(spec: dict, source_key: str, reuse: bool = False) -> tuple[Path, dict, Scenario]:
    """Simulate and replay once; later runs read the cached records.  With ``reuse``, records
    cached by another version of the simulator or replay are read as they are (to measure a
    change to the analysis alone while the replay code changes under it)."""
    data = {k: v for k, v in spec.items() if k not in ("family", "config")}
    scenario = Scenario.from_dict(data, name=spec["name"])
    text = json.dumps(spec, sort_keys=True, default=str)  # a bundled scenario's start is a date
    key = hashlib.sha256((text + source_key).encode()).hexdigest()
    folder = DATA / f"{spec['name']}-{key[:12]}"
    cached = [old for old in DATA.glob(f"{spec['name']}-*")
              if re.fullmatch(rf"{re.escape(spec['name'])}-[0-9a-f]{{12}}", old.name)
              and (old / "records" / "meta.json").exists()
              and (old / "capture.truth.json").exists()]
    if reuse and cached and not (folder / "records" / "meta.json").exists():
        folder = max(cached, key=lambda f: (f / "records" / "meta.json").stat().st_mtime)
    records = folder / "records"
    truth_file = folder / "capture.truth.json"
    if not (records / "meta.json").exists() or not truth_file.exists():
        stale = re.compile(rf"^{re.escape(spec['name'])}-[0-9a-f]{{12}}$")
        for old in DATA.glob(f"{spec['name']}-*"):
            if stale.match(old.name):  # an earlier version of this scenario or of the code
                shutil.rmtree(old, ignore_errors=True)
        folder.mkdir(parents=True)
        pcap = folder / ("capture" if scenario.rotate_s else "capture.pcap")  # rotated: a folder
        truth_file = simulate(scenario, pcap, progress=False)
        stats = replay([pcap], records, config=lab_config(spec, scenario), progress=False)
        if stats.errors:
            raise SystemExit(f"{spec['name']}: replay errors: {stats.errors}")
        # The records are what the benchmark needs; keep the cache small.
        if pcap.is_dir():
            shutil.rmtree(pcap)
        else:
            pcap.unlink()
    return records, json.loads(truth_file.read_text()), scenario


def expected_jobs(truth: dict, by_mac: bool) -> list[Expected]:
    """The jobs a detector should report (module docstring), from the ground truth; on a phone
    named by its MAC when the config names no devices."""
    macs = {p["name"]: p["mac"] for p in truth["phones"]}
    out = []
    for j in truth["scenario"]["jobs"]:
        runs = sum(1 for u in truth["uploads"] if u["job"] == j["name"]
                   and u["device"] == j["device"])
        name = j["server_name"]  # the chat server's for a job inside the chat connection
        if (j["size_bytes"] >= BULK_BYTES and j["jitter_min"] <= 90
                and j["jitter_min"] * 60 <= 0.1 * j["every_s"]
                and runs >= (4 if j["every_s"] >= WEEK else 3)):
            out.append(Expected(macs[j["device"]] if by_mac else j["device"], j["name"],
                                j["kind"], name, j["every_s"], j["at_s"], runs))
    return out


def circular_error(a: float, b: float, period: float) -> float:
    d = (a - b) % period
    return min(d, period - d)


def evaluate(spec: dict, source_key: str, n_sim: int, reuse: bool = False) -> Outcome:
    records_dir, truth, scenario = prepare(spec, source_key, reuse)
    config = lab_config(spec, scenario)
    t0 = time.perf_counter()
    records = read_records(records_dir)
    findings = analyze_records(records, config, load_catalog(config.catalogs), n_sim=n_sim)
    seconds = time.perf_counter() - t0
    expected = expected_jobs(truth, by_mac=bool(spec.get("config")))
    out = Outcome(spec["name"], spec["family"], scenario.days, expected=len(expected),
                  backups=sum(1 for e in expected if e.kind == "backup"), seconds=seconds)
    found: set[int] = set()
    for f in findings["findings"]:
        if f["verdict"] != "periodic bulk upload":
            continue
        match = None
        for i, e in enumerate(expected):
            if i in found or f.get("device") != e.device or e.name not in f["names"]:
                continue
            period_err = abs(f["period_s"] - e.period_s) / e.period_s
            phase_err = circular_error(f["phase_s"] % DAY, e.at_s % DAY, min(DAY, e.period_s))
            if period_err <= PERIOD_TOLERANCE and phase_err <= PHASE_TOLERANCE_S:
                match = i
                out.period_err.append(period_err)
                out.phase_err_s.append(phase_err)
                out.p_values.append(f["p_value"])
                break
            out.notes.append(f"{e.device}/{e.job}: found P={f['period_s']:.0f} s at "
                             f"{f['phase_local']} (job: P={e.period_s:.0f} s)")
        if match is not None:
            found.add(match)
            out.tp += 1
            if expected[match].kind == "backup":
                out.backups_named += bool(f["is_backup"])
                if not f["is_backup"]:
                    out.notes.append(f"{expected[match].job}: found, not named as a backup")
            continue
        out.fp += 1
        out.fp_not_backup += not f["is_backup"]
        out.notes.append(f"FP {f.get('device')}/{f['group']} P={f['period_s']} "
                         f"{f['phase_local']} p={f['p_value']} backup={f['is_backup']}")
    for i, e in enumerate(expected):
        if i not in found:
            out.fn += 1
            tested = [f for f in findings["findings"] if f.get("device") == e.device
                      and e.name in f["names"]]
            why = "; ".join(f"{f['verdict']} P={f['period_s']} p={f['p_value']} checks="
                            f"{_failed_checks(f)}" for f in tested) or "no finding for its group"
            out.notes.append(f"FN {e.device}/{e.job} ({e.runs} runs): {why}")
    out.rita = rita_on_connections(records, {e.name for e in expected}, truth)
    return out


def _failed_checks(finding: dict) -> str:
    checks = finding.get("schedule_checks") or {}
    return ",".join(k for k, v in checks.items() if not v) or "-"


def rita_on_connections(records: dict[str, pd.DataFrame], expected: set[str], truth: dict
                        ) -> dict:
    """RITA's view: every connection start per server name, sizes = total bytes; flagged at
    RITA_THRESHOLD.  Backups are neither a hit nor a false alarm."""
    conns = records["connections"].dropna(subset=["server_name"])
    backups = {j["server_name"] for j in truth["scenario"]["jobs"] if j["kind"] == "backup"}
    t_min, t_max = float(conns["ts_start"].min()), float(conns["ts_end"].max())
    tp = fp = 0
    for name, g in conns.groupby("server_name"):
        sizes = (g["bytes_up"].fillna(0) + g["bytes_down"].fillna(0)).to_numpy(float)
        score = rita_score(g["ts_start"].to_numpy(float), sizes, t_min, t_max)
        if score is None or score < RITA_THRESHOLD:
            continue
        if str(name) in expected:
            tp += 1
        elif str(name) not in backups:
            fp += 1
    return {"tp": tp, "fp": fp, "fn": len(expected) - tp}


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
    for n in (3, 4, 7, 14):
        ps = np.array([test.test(cover.sample(rng, (n,))).p_value_raw for _ in range(lists)])
        rows.append(("uniform", n, float(np.mean(ps < 0.05)), float(np.mean(ps < 0.01))))
    for n in (3, 7, 14, 60):
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


def _run(args: tuple[dict, str, int, bool]) -> Outcome:
    return evaluate(*args)


def scenario_row(o: Outcome) -> str:
    backups = f"{o.backups_named}/{o.backups}" if o.backups else "-"
    period = fmt(max(o.period_err) * 100 if o.period_err else None, ".2f")
    phase = fmt(max(o.phase_err_s) / 60 if o.phase_err_s else None, ".1f")
    p = fmt(max(o.p_values) if o.p_values else None, ".1e")
    ok = "yes" if o.fp == 0 and o.fn == 0 and o.backups_named == o.backups else "**no**"
    return (f"| {o.name} | {o.family} | {o.days} | {o.expected} | {o.tp}/{o.fp}/{o.fn} | "
            f"{backups} | {period} | {phase} | {p} | {o.rita['tp']}/{o.rita['fp']} | "
            f"{o.seconds:.1f} | {ok} |")


def family_row(label: str, group: list[Outcome]) -> str:
    tp, fp, fn = (sum(getattr(o, k) for o in group) for k in ("tp", "fp", "fn"))
    precision, recall = pr(tp, fp, fn)
    rita = pr(*(sum(o.rita[k] for o in group) for k in ("tp", "fp", "fn")))
    quiet = [o for o in group if o.expected == o.backups]
    quiet_fp = sum(1 for o in quiet if o.fp_not_backup)
    backups = sum(o.backups for o in group)
    named = sum(o.backups_named for o in group)
    errs = [e for o in group for e in o.period_err]
    target = precision >= 0.98 and recall >= 0.98 and quiet_fp == 0 and named == backups and (
        not errs or max(errs) <= PERIOD_TOLERANCE)
    return (f"| {label} | {len(group)} | {tp}/{fp}/{fn} | {precision:.3f} | {recall:.3f} | "
            f"{quiet_fp}/{len(quiet)} | {f'{named}/{backups}' if backups else '-'} | "
            f"{fmt(max(errs) * 100 if errs else None, '.2f')} | {rita[0]:.2f} / {rita[1]:.2f} | "
            f"{'yes' if target else '**no**'} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} scenarios")
    parser.add_argument("--only", action="append", help="run only the named scenario(s)")
    parser.add_argument("--family", action="append", help="run only the named family(ies)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="scenarios run in parallel processes (default: 2)")
    parser.add_argument("--monte-carlo", type=int, default=1000, metavar="N",
                        help="simulations per periodicity test (the analysis default: 1000)")
    parser.add_argument("--json", type=Path, help="also write the per-scenario results here")
    parser.add_argument("--calibration", type=int, default=0, metavar="N",
                        help="random event lists per size for the null calibration (0: skip)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--reuse-records", action="store_true",
                        help="analyse the cached records of each scenario even if the simulator "
                             "or replay changed since (for a change to the analysis alone)")
    args = parser.parse_args()
    specs = grid()
    if args.quick:
        specs = [s for s in specs if s["name"] in QUICK]
    if args.only or args.family:  # either a named scenario or one of a named family
        specs = [s for s in specs if s["name"] in (args.only or ()) or
                 s["family"] in (args.family or ())]
    if not specs:
        parser.error("no scenario matches; --list shows them")
    if args.list:
        for spec in specs:
            print(f"{spec['family']:12} {spec['name']}")
        return 0
    started = time.perf_counter()
    key = _source_key()
    work = [(spec, key, args.monte_carlo, args.reuse_records) for spec in specs]
    print("| scenario | family | days | expected | TP/FP/FN | backups named | period err % | "
          "phase err min | max p | RITA TP/FP | analyse s | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    outcomes: list[Outcome] = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for o in pool.map(_run, work) if args.jobs > 1 else map(_run, work):
            outcomes.append(o)
            print(scenario_row(o), flush=True)
            for note in o.notes:
                print(f"    {o.name}: {note}", file=sys.stderr)

    print()
    print("| family | scenarios | TP/FP/FN | precision | recall | no-export scenarios with a "
          "non-backup verdict | backups named | max period err % | RITA >= 0.8 P / R | "
          "targets met |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family in dict.fromkeys(o.family for o in outcomes):
        print(family_row(family, [o for o in outcomes if o.family == family]))
    print(family_row("**all**", outcomes))
    failing = [o.name for o in outcomes if o.fp or o.fn or o.backups_named < o.backups]
    print()
    print(f"scenarios: {len(outcomes)}; failing: {len(failing)}"
          + (f" ({', '.join(failing)})" if failing else ""))
    errs = [e * 100 for o in outcomes for e in o.period_err]
    phases = [e / 60 for o in outcomes for e in o.phase_err_s]
    if errs:
        print(f"period error: median {statistics.median(errs):.2f} %, max {max(errs):.2f} %; "
              f"phase error: median {statistics.median(phases):.1f} min, "
              f"max {max(phases):.1f} min")
    print(f"analysis time per scenario: median "
          f"{statistics.median(o.seconds for o in outcomes):.2f} s, max "
          f"{max(o.seconds for o in outcomes):.2f} s; whole run "
          f"{time.perf_counter() - started:.0f} s with {args.jobs} process(es)")
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
