"""Analysis of a lab's dataset: one process, every local core, and a local Dask cluster.

Builds the simulator's fleet (default 10 phones x 90 days, the fleet's everyday traffic: chat,
telemetry, heartbeats, media, scheduled jobs) once into benchmarks/data/scale-<P>x<D>/ (git-ignored;
the pcap is deleted after the replay), then runs ``analyze_devices`` in a fresh process per mode:
  * 1 process: devices one after another (``observer analyze``'s default);
  * all cores: a process pool over devices (``--jobs N``, N = the cores available);
  * Dask: a LocalCluster with one single-threaded worker per core (``--dask --workers N``);
  * for contrast, ``analyze(read_records(...))``: every device's records in one process at once.
Then the fleet report (``write_fleet``) from the same findings, reading one device's records at a
time (``observer report``) and, for contrast, every device's records at once (the report before
it read per device); and the replay of the bundled fleet scenario's hourly rotated files
(``--replay-days``, default 7: 168 files) with ``--jobs 1``, ``--jobs N`` and ``--dask --workers
N``, checking that the records are the same.  Prints wall time, CPU time of the mode's processes
together (user + system, imports included: steadier than wall time on a shared machine), the
main process's peak memory and the largest peak of any worker process (VmHWM and CPU times
sampled from /proc every 0.2 s while the mode runs; VmHWM is a high-water mark, so sampling
misses only a worker's last idle moments), and checks that every mode's findings are identical.

    .venv/bin/python benchmarks/scale.py [--phones 10] [--days 90] [--simulations 1000]
        [--replay-days 7] [--only analysis|report|replay]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
MODES = ("1 process", "all cores (--jobs)", "Dask LocalCluster", "whole tables at once")
REPORT_MODES = ("report, one device at a time", "report, whole tables at once")
REPLAY_MODES = ("replay --jobs 1", "replay --jobs N", "replay --dask --workers N")
SECTIONS = {"analysis": MODES, "report": REPORT_MODES, "replay": REPLAY_MODES}


def fleet(phones: int, days: int):
    from observer.simulate import fleet_scenario

    return replace(fleet_scenario(phones=phones, days=days, seed=1), rotate_s=0.0)


def prepare(phones: int, days: int) -> Path:
    """The fleet's records directory (simulated and replayed once, then reused)."""
    from observer.simulate import simulate
    from observer.sources import replay

    work = DATA / f"scale-{phones}x{days}"
    records = work / "records"
    if not (work / "done").exists():
        work.mkdir(parents=True, exist_ok=True)
        scenario = fleet(phones, days)
        pcap = work / "fleet.pcap"
        t = time.perf_counter()
        simulate(scenario, pcap)
        size = pcap.stat().st_size
        replay([pcap], records, config=scenario.lab_config(), overwrite=True)
        pcap.unlink()
        (work / "done").write_text(f"{size}\n")
        print(f"[scale] {phones} phones x {days} days: {size / 1e9:.1f} GB of pcap simulated and "
              f"replayed in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return records


def rotated(days: int) -> Path:
    """The bundled fleet scenario's hourly rotated capture files for ``days`` (kept)."""
    from observer.simulate import load_scenario, simulate

    capture = DATA / f"scale-replay-{days}d"
    if not (capture / "done").exists():
        simulate(load_scenario("fleet").with_days(days), capture / "capture")
        (capture / "done").write_text("")
    return capture / "capture"


def sample_workers(stop: threading.Event, peaks: dict[int, int], cpu: dict[int, float]) -> None:
    """Peak RSS (kB) and CPU seconds so far of every descendant process, sampled until ``stop``
    (its last sample is taken when the workers are idle, so it holds their whole CPU time)."""
    import psutil

    me = psutil.Process()
    while not stop.wait(0.2):
        for child in me.children(recursive=True):
            try:
                status = Path(f"/proc/{child.pid}/status").read_text()
                times = child.cpu_times()
            except (OSError, psutil.Error):
                continue
            cpu[child.pid] = times.user + times.system
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peaks[child.pid] = max(peaks.get(child.pid, 0), int(line.split()[1]))


def run_mode(mode: str, records: Path, phones: int, days: int, n_sim: int,
             replay_days: int, out: Path) -> None:
    """What one mode does; its result (findings, report or records) goes to ``out``."""
    from observer.analysis import analyze, records_stamp
    from observer.analysis.scale import analyze_devices, available_cores
    from observer.catalog import load_catalog
    from observer.records import read_records

    cores = available_cores()
    if mode in REPLAY_MODES:
        from observer.sources import replay

        options = {REPLAY_MODES[0]: {"jobs": 1}, REPLAY_MODES[1]: {"jobs": cores},
                   REPLAY_MODES[2]: {"jobs": cores, "dask": "local"}}[mode]
        replay([rotated(replay_days)], out, overwrite=True, progress=False, **options)
        return
    if mode in REPORT_MODES:
        from observer.records.findings import Findings
        from observer.report import write_fleet
        from observer.report.fleet import device_records

        findings = Findings.from_dict(json.loads((records.parent / "findings-0.json").read_text()))
        whole = mode == REPORT_MODES[1]
        write_fleet(read_records(records) if whole else device_records(records, []), findings,
                    out)
        return
    scenario = fleet(phones, days)
    config = replace(scenario.lab_config(), timezone=scenario.timezone)
    options = {MODES[0]: {}, MODES[1]: {"jobs": cores},
               MODES[2]: {"dask": "local", "workers": cores}}.get(mode)
    catalog = load_catalog(config.catalogs)
    if options is None:
        findings = analyze(read_records(records), config, catalog, n_sim=n_sim,
                           source=records_stamp(records))
    else:
        findings = analyze_devices(records, config, catalog, n_sim=n_sim, **options)
    data = findings.to_dict()
    data.pop("generated_at")
    out.write_text(json.dumps(data, sort_keys=True))


def measure(mode: str, records: Path, phones: int, days: int, n_sim: int, replay_days: int,
            out: Path) -> None:
    """One mode, in this (fresh) process; figures as JSON on stdout."""
    from observer.analysis.scale import available_cores

    peaks: dict[int, int] = {}
    cpu: dict[int, float] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_workers, args=(stop, peaks, cpu), daemon=True)
    sampler.start()
    t = time.perf_counter()
    run_mode(mode, records, phones, days, n_sim, replay_days, out)
    wall = time.perf_counter() - t
    stop.set()
    sampler.join()
    me = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall_s": wall, "cpu_s": me.ru_utime + me.ru_stime + sum(cpu.values()),
                      "main_cpu_s": me.ru_utime + me.ru_stime, "main_mb": me.ru_maxrss / 1024,
                      "worker_mb": max(peaks.values(), default=0) / 1024,
                      "processes": len(peaks), "cores": available_cores()}))


def same_records(a: Path, b: Path) -> bool:
    """Whether two replays wrote the same rows (connection ids are content hashes)."""
    from observer.records import read_table

    keys = {"connections": ["conn_id"], "activity": ["conn_id", "ts_bin"],
            "dns": ["ts", "client_ip", "query", "answer"], "sessions": ["session_id"]}
    for table, key in keys.items():
        x, y = (read_table(r, table).sort_values(key, ignore_index=True) for r in (a, b))
        if not x.equals(y):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phones", type=int, default=10)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--simulations", type=int, default=1000, metavar="N")
    parser.add_argument("--replay-days", type=int, default=7, metavar="D",
                        help="days of the bundled fleet scenario (8 phones, hourly files) to "
                             "replay (default 7)")
    parser.add_argument("--only", choices=sorted(SECTIONS), help="run one section")
    parser.add_argument("--measure", choices=[m for ms in SECTIONS.values() for m in ms],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    records = prepare(args.phones, args.days)
    work = records.parent
    outputs = {mode: work / f"out-{i}-{j}" for i, modes in enumerate(SECTIONS.values())
               for j, mode in enumerate(modes)}
    outputs.update({mode: work / f"findings-{j}.json" for j, mode in enumerate(MODES)})
    if args.measure:
        measure(args.measure, records, args.phones, args.days, args.simulations,
                args.replay_days, outputs[args.measure])
        return
    import pyarrow.parquet as pq

    def rows(table: str) -> int:
        files = (records / table).rglob("*.parquet")
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)

    size = sum(f.stat().st_size for f in records.rglob("*.parquet")) / 1e6
    print(f"{args.phones} phones x {args.days} days: {rows('connections'):,} connections, "
          f"{rows('activity'):,} activity rows, {size:.0f} MB of Parquet; "
          f"{args.simulations} null simulations per event count")
    if args.only in (None, "replay"):
        files = sorted(rotated(args.replay_days).glob("*.pcap"))
        print(f"replay: the fleet scenario's {len(files)} hourly files ({args.replay_days} days, "
              f"{sum(f.stat().st_size for f in files) / 1e6:.0f} MB)")
    print("| mode | wall | CPU (all processes) | CPU (main process) | main process peak "
          "| largest worker peak | worker processes |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for section, modes in SECTIONS.items():
        if args.only not in (None, section):
            continue
        if section == "report" and not outputs[MODES[0]].exists():
            print("| report | needs the 1-process analysis's findings: run without --only |")
            continue
        for mode in modes:
            run = subprocess.run([sys.executable, __file__, "--phones", str(args.phones),
                                  "--days", str(args.days), "--simulations",
                                  str(args.simulations), "--replay-days", str(args.replay_days),
                                  "--measure", mode], capture_output=True, text=True, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            if run.returncode:
                print(f"| {mode} | failed: {run.stderr.strip().splitlines()[-1:]} |")
                continue
            m = json.loads(run.stdout.strip().splitlines()[-1])
            workers = f"{m['worker_mb']:.0f} MB" if m["processes"] else "-"
            print(f"| {mode} | {m['wall_s']:.1f} s | {m['cpu_s']:.1f} s | {m['main_cpu_s']:.1f} s "
                  f"| {m['main_mb']:.0f} MB | {workers} | {m['processes']} |", flush=True)
            first, found = outputs[modes[0]], outputs[mode]
            if mode == modes[0]:
                continue
            if section == "analysis" and found.read_text() != first.read_text():
                print(f"  !! {mode}: findings differ from the 1-process run")
            if section == "report" and (found / "fleet.json").read_text() != (
                    first / "fleet.json").read_text():
                print(f"  !! {mode}: fleet.json differs")
            if section == "replay" and not same_records(first, found):
                print(f"  !! {mode}: records differ from --jobs 1")


if __name__ == "__main__":
    main()
