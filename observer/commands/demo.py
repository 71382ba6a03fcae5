"""Run the whole path on a simulated week of one phone: simulate -> replay -> analyze -> report.

Writes everything under --out (default ./demo-output) and ends with the path of the report.
Nothing leaves this machine: the capture is simulated.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario", help="scenario YAML (default: the bundled 7-day week.yaml)", default=None
    )
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output directory")
    parser.add_argument("--seed", type=int, default=None, help="override the scenario's seed")


def run(args: argparse.Namespace) -> int:
    import time

    from observer.analysis import analyze, records_stamp, write_findings
    from observer.catalog import load_catalog
    from observer.records import read_records
    from observer.report import write_report
    from observer.simulate import load_scenario, simulate
    from observer.sources import replay

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    scenario = load_scenario(args.scenario)
    if args.seed is not None:
        scenario = scenario.with_seed(args.seed)
    config = scenario.lab_config()
    pcap = out / "capture.pcap"
    records_dir = out / "records"
    report_dir = out / "report"

    def step(label: str) -> float:
        print(f"[demo] {label}", flush=True)
        return time.monotonic()

    t = step(f"simulating {scenario.days} days of '{scenario.device}' -> {pcap}")
    truth = simulate(scenario, pcap)
    print(f"[demo]   {time.monotonic() - t:.1f} s; ground truth in {truth}")
    t = step(f"replaying {pcap} -> {records_dir}")
    stats = replay([pcap], records_dir, config=config, overwrite=True)
    print(f"[demo]   {time.monotonic() - t:.1f} s; {stats.summary()}")
    t = step("analysing")
    stamp = records_stamp(records_dir)
    records = read_records(records_dir)
    findings = analyze(records, config, load_catalog(config.catalogs), source=stamp)
    findings_path = write_findings(findings, records_dir / "findings.json")
    print(f"[demo]   {time.monotonic() - t:.1f} s; findings in {findings_path}")
    t = step(f"writing the report -> {report_dir}")
    report = write_report(records, findings, report_dir)
    print(f"[demo]   {time.monotonic() - t:.1f} s")
    print(f"\nReport: {report.resolve()}")
    return 0
