"""Write the timing report of a records directory: HTML, Markdown, findings.json, endpoints.csv.

Uses RECORDS_DIR/findings.json when `observer analyze` wrote it from the records as they are now;
findings of other records (some added or replaced since) are never used: the analysis runs again.
With several devices, writes a report per device, an index.html and fleet.json.
report.html is one self-contained file: it opens offline and runs no script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from observer.config import LabConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("records", type=Path, metavar="RECORDS_DIR", help="records directory")
    parser.add_argument(
        "-o",
        "--out",
        type=Path,
        required=True,
        metavar="REPORT_DIR",
        help="directory to write the report into (created if missing)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="lab config (time zone, catalogs, thresholds) for an analysis run here; "
             "default: built-in",
    )
    parser.add_argument(
        "--reanalyze",
        action="store_true",
        help="run the analysis even if RECORDS_DIR/findings.json matches the records",
    )


def stale_reason(findings_path: Path, current: object) -> str | None:
    """Why findings.json cannot be used for the records as they are now (None: it can)."""
    from observer.analysis import FINDINGS_VERSION, read_findings

    if not findings_path.exists():
        return "no findings.json yet"
    found = read_findings(findings_path)
    if found.schema_version != FINDINGS_VERSION:
        return f"findings.json has schema version {found.schema_version}, not {FINDINGS_VERSION}"
    if found.records is None or found.records != current:
        return "the records changed since findings.json was written"
    return None


def _zone_of(findings_path: Path, config: LabConfig) -> LabConfig:
    """Without --config, a new analysis keeps the time zone the lab gave the earlier one (a
    setting, not a result: "nightly" still means the owner's night)."""
    from dataclasses import replace

    from observer import ObserverError
    from observer.analysis import read_findings

    try:
        earlier = read_findings(findings_path)
    except ObserverError:
        return config
    if not earlier.timezone_configured:
        return config
    return replace(config, timezone=earlier.timezone, timezone_configured=True)


def run(args: argparse.Namespace) -> int:
    from observer import ObserverError
    from observer.analysis import analyze, read_findings, records_stamp
    from observer.catalog import load_catalog
    from observer.config import LabConfig, load_config
    from observer.records import read_records
    from observer.report import write_fleet, write_report
    from observer.report.fleet import devices

    if not args.records.is_dir():
        raise ObserverError(f"records directory {args.records} does not exist")
    config = load_config(args.config) if args.config else LabConfig()
    stamp = records_stamp(args.records)
    records = read_records(args.records)
    if records["connections"].empty:
        raise ObserverError(f"{args.records}: no connection records, nothing to report "
                            "(run observer replay, capture or proxy first)")
    findings_path = args.records / "findings.json"
    reason = "--reanalyze" if args.reanalyze else stale_reason(findings_path, stamp)
    if reason is None:
        findings = read_findings(findings_path)
    else:
        if findings_path.exists():
            if args.config is None:
                config = _zone_of(findings_path, config)
            print(f"observer report: analysing again ({reason}; times in {config.timezone})",
                  file=sys.stderr)
        findings = analyze(records, config, load_catalog(config.catalogs), source=stamp)
    if len(devices(records)) > 1:
        print(write_fleet(records, findings, args.out))
    else:
        print(write_report(records, findings, args.out))
    return 0
