"""Analysis of a lab's dataset: one process, every local core, and a local Dask cluster.

Builds the simulator's fleet (default 10 phones x 90 days, the fleet's everyday traffic: chat,
telemetry, heartbeats, media, scheduled jobs) once into benchmarks/data/scale-<P>x<D>/ (git-ignored;
the pcap is deleted after the replay), then runs ``analyze_devices`` in a fresh process per mode:
  * 1 process: devices one after another (``observer analyze``'s default);
  * all cores: a process pool over devices (``--jobs N``, N = the cores available);
  * Dask: a LocalCluster with one single-threaded worker per core (``--dask --workers N``);
  * for contrast, ``analyze(read_records(...))``: every device's records in one process at once.
Prints wall time, CPU time of the mode's processes together (user + system, imports included:
steadier than wall time on a shared machine), the main process's peak memory and the largest
peak of any worker process (VmHWM and CPU times sampled from /proc every 0.2 s while the mode
runs; VmHWM is a high-water mark, so sampling misses only a worker's last idle moments), and
checks that every mode's findings are identical.

    .venv/bin/python benchmarks/scale.py [--phones 10] [--days 90] [--simulations 1000]
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


def measure(mode: str, records: Path, phones: int, days: int, n_sim: int, out: Path) -> None:
    """One mode, in this (fresh) process: findings to ``out``, figures as JSON on stdout."""
    from observer.analysis import analyze, records_stamp
    from observer.analysis.scale import analyze_devices, available_cores
    from observer.catalog import load_catalog
    from observer.records import read_records

    scenario = fleet(phones, days)
    config = replace(scenario.lab_config(), timezone=scenario.timezone)
    cores = available_cores()
    options = {MODES[0]: {}, MODES[1]: {"jobs": cores},
               MODES[2]: {"dask": "local", "workers": cores}}.get(mode)
    catalog = load_catalog(config.catalogs)
    peaks: dict[int, int] = {}
    cpu: dict[int, float] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_workers, args=(stop, peaks, cpu), daemon=True)
    sampler.start()
    t = time.perf_counter()
    if options is None:
        findings = analyze(read_records(records), config, catalog, n_sim=n_sim,
                           source=records_stamp(records))
    else:
        findings = analyze_devices(records, config, catalog, n_sim=n_sim, **options)
    wall = time.perf_counter() - t
    stop.set()
    sampler.join()
    me = resource.getrusage(resource.RUSAGE_SELF)
    data = findings.to_dict()
    data.pop("generated_at")
    out.write_text(json.dumps(data, sort_keys=True))
    print(json.dumps({"wall_s": wall, "cpu_s": me.ru_utime + me.ru_stime + sum(cpu.values()),
                      "main_mb": me.ru_maxrss / 1024,
                      "worker_mb": max(peaks.values(), default=0) / 1024,
                      "processes": len(peaks), "cores": cores}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phones", type=int, default=10)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--simulations", type=int, default=1000, metavar="N")
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    records = prepare(args.phones, args.days)
    work = records.parent
    if args.measure:
        measure(args.measure, records, args.phones, args.days, args.simulations,
                work / f"findings-{MODES.index(args.measure)}.json")
        return
    import pyarrow.parquet as pq

    def rows(table: str) -> int:
        files = (records / table).rglob("*.parquet")
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)

    size = sum(f.stat().st_size for f in records.rglob("*.parquet")) / 1e6
    print(f"{args.phones} phones x {args.days} days: {rows('connections'):,} connections, "
          f"{rows('activity'):,} activity rows, {size:.0f} MB of Parquet; "
          f"{args.simulations} null simulations per event count")
    print("| mode | wall | CPU (all processes) | main process peak | largest worker peak "
          "| worker processes |")
    print("|---|--:|--:|--:|--:|--:|")
    for i, mode in enumerate(MODES):
        run = subprocess.run([sys.executable, __file__, "--phones", str(args.phones), "--days",
                              str(args.days), "--simulations", str(args.simulations),
                              "--measure", mode], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        if run.returncode:
            print(f"| {mode} | failed: {run.stderr.strip().splitlines()[-1:]} |")
            continue
        m = json.loads(run.stdout.strip().splitlines()[-1])
        workers = f"{m['worker_mb']:.0f} MB" if m["processes"] else "-"
        print(f"| {mode} | {m['wall_s']:.1f} s | {m['cpu_s']:.0f} s | {m['main_mb']:.0f} MB "
              f"| {workers} | {m['processes']} |", flush=True)
        found = (work / f"findings-{i}.json").read_text()
        if i and found != (work / "findings-0.json").read_text():
            print(f"  !! {mode}: findings differ from the 1-process run")


if __name__ == "__main__":
    main()
