"""Report time for the demo week and a month of one phone, beside a naive renderer of the same data.

Each scenario is simulated and replayed once into benchmarks/data/report-<name>/ (git-ignored) and
analysed once; then, per repeat:
  * ``observer report RECORDS -o OUT`` as a user runs it (fresh process: imports, Parquet read,
    aggregation, plots, files), wall time;
  * ``write_report`` alone, in-process (what ``observer demo`` pays), warm;
  * the peer: the same records drawn without aggregating first (one matplotlib point per activity
    bin and connection, SVG), which is what a report that plots raw records would pay.
Medians of --repeat runs, and the page size, are printed side by side.

    .venv/bin/python benchmarks/report.py [--scenario week month] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"


def prepare(name: str) -> tuple[Path, object]:
    """Records and findings.json of a bundled scenario (built once, then reused)."""
    from observer.analysis import analyze, records_stamp, write_findings
    from observer.catalog import load_catalog
    from observer.records import read_records
    from observer.simulate import load_scenario, simulate
    from observer.sources import replay

    scenario = load_scenario(name)
    config = scenario.lab_config()
    work = DATA / f"report-{name}"
    records_dir = work / "records"
    if not (records_dir / "findings.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        pcap = work / "capture.pcap"
        t = time.perf_counter()
        simulate(scenario, pcap)
        replay([pcap], records_dir, config=config, overwrite=True)
        stamp = records_stamp(records_dir)
        records = read_records(records_dir)
        write_findings(analyze(records, config, load_catalog(config.catalogs), source=stamp),
                       records_dir / "findings.json")
        pcap.unlink()
        print(f"[{name}] prepared in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return records_dir, config


def cli_report(records_dir: Path, out: Path) -> tuple[float, float]:
    """Wall time and CPU time (user + system; steadier on a shared machine) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "observer", "report", str(records_dir), "-o", str(out)],
                   check=True, capture_output=True, cwd=ROOT, timeout=600)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def naive_plot(records: dict) -> float:
    """The peer: every activity bin and connection as its own point, rendered to SVG."""
    from matplotlib.figure import Figure

    t = time.perf_counter()
    fig = Figure(figsize=(10, 6))
    up, down = fig.subplots(2, 1, sharex=True)
    act = records["activity"]
    conns = records["connections"]
    up.scatter(act["ts_bin"], act["bytes_up"], s=2)
    down.scatter(act["ts_bin"], act["bytes_down"], s=2)
    up.scatter(conns["ts_start"], conns["bytes_up"], s=2)
    fig.savefig(io.BytesIO(), format="svg")
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", nargs="+", default=["week", "month"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from observer.analysis import read_findings
    from observer.records import read_records
    from observer.report import write_report

    rows = []
    for name in args.scenario:
        records_dir, _ = prepare(name)
        records = read_records(records_dir)
        findings = read_findings(records_dir / "findings.json")
        out = DATA / f"report-{name}" / "report"
        cli, cpu, warm, peer = [], [], [], []
        for _ in range(args.repeat):
            wall, used = cli_report(records_dir, out)
            cli.append(wall)
            cpu.append(used)
            t = time.perf_counter()
            page = write_report(records, findings, out)
            warm.append(time.perf_counter() - t)
            peer.append(naive_plot(records))
        rows.append((
            name, len(records["connections"]), len(records["activity"]),
            statistics.median(cli), statistics.median(cpu), statistics.median(warm),
            statistics.median(peer),
            page.stat().st_size,
        ))
    print(f"{'scenario':<9} {'connections':>11} {'activity':>9} {'observer report':>16} "
          f"{'(cpu)':>8} {'write_report':>13} {'naive plot':>11} {'html':>9}")
    for name, n_conn, n_act, cli, used, warm, peer, size in rows:
        print(f"{name:<9} {n_conn:>11,} {n_act:>9,} {cli:>14.2f} s {used:>6.2f} s "
              f"{warm:>11.2f} s {peer:>9.2f} s {size / 1e6:>6.2f} MB")
    print(f"(medians of {args.repeat}; observer report = the command in a fresh process, wall and "
          "CPU; write_report = in-process, warm; naive plot = every record drawn, SVG)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
