"""Find bulk uploads in a records directory and test whether they recur (a nightly export?).

Reads the record tables written by `observer replay`, `observer capture` or `observer proxy`,
groups connections by endpoint (service, organisation, address block), finds bulk upload events
(also inside long-lived connections), tests each group for a period with a stable local-time phase
(24 h first) against a calibrated null, and writes findings.json (docs/findings.md).  Prints one
line per notable group.  The method is explained in docs/analysis.md.

example:
  observer analyze records/ --config lab.yaml
  observer analyze records/ -o week-findings.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

VERDICT_MARK = {"periodic bulk upload": "!!", "periodic heartbeat": "~", "irregular uploads": "+"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("records", type=Path, metavar="RECORDS_DIR",
                        help="a records directory (from observer replay, capture or proxy)")
    parser.add_argument("--config", type=Path, metavar="LAB.yaml",
                        help="lab config: time zone, thresholds, extra catalogs (default: UTC and "
                             "the built-in thresholds)")
    parser.add_argument("-o", "--output", type=Path, metavar="FINDINGS.json",
                        help="where to write the findings (default: RECORDS_DIR/findings.json)")
    parser.add_argument("--simulations", type=int, default=1000, metavar="N",
                        help="Monte Carlo runs of the null model per event count (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the null simulations")


def run(args: argparse.Namespace) -> int:
    from observer import ObserverError
    from observer.analysis import analyze_records, write_findings
    from observer.catalog import load_catalog
    from observer.config import LabConfig, load_config
    from observer.records import read_records

    if args.simulations < 100:
        raise ObserverError(f"--simulations must be at least 100, not {args.simulations}")
    config = load_config(args.config) if args.config else LabConfig()
    if not args.records.is_dir():
        raise ObserverError(f"records directory {args.records} does not exist")
    records = read_records(args.records)
    if records["connections"].empty:
        raise ObserverError(f"{args.records}: no connection records (run observer replay first)")
    findings = analyze_records(records, config, load_catalog(config.catalogs),
                               n_sim=args.simulations, seed=args.seed)
    path = write_findings(findings, args.output or args.records / "findings.json")
    notable = [f for f in findings["findings"] if f["verdict"] != "nothing notable"]
    for f in notable:
        print(f"{VERDICT_MARK.get(f['verdict'], ' '):>2} {f['summary']}")
    quiet = len(findings["findings"]) - len(notable)
    if args.config is None:
        print("note: no --config given, so 'local time' above is UTC; pass the lab config "
              "for the device owner's time zone")
    print(f"{len(notable)} notable group(s), {quiet} without bulk uploads or heartbeats; "
          f"findings: {path}")
    return 0
