"""Write the timing report of a records directory: HTML, Markdown, findings.json, endpoints.csv.

Uses RECORDS_DIR/findings.json when `observer analyze` wrote it from the records as they are now;
findings of other records (some added or replaced since) are never used: the analysis runs again
(device by device).  With several devices, writes a report per device, an index.html and
fleet.json, reading one device's records at a time.  RECORDS_DIR may be an fsspec URL
(s3://bucket/records).  report.html is one self-contained file: it opens offline and runs no script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from observer.commands import local_dir

if TYPE_CHECKING:
    from observer.config import LabConfig
    from observer.records.location import Location


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("records", metavar="RECORDS_DIR",
                        help="records directory, or an fsspec URL of one (s3://bucket/records)")
    parser.add_argument(
        "-o",
        "--out",
        type=local_dir,
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


def stale_reason(records: Location, current: object) -> str | None:
    """Why findings.json cannot be used for the records as they are now (None: it can)."""
    from observer.analysis import FINDINGS_VERSION, read_findings

    if not records.has("findings.json"):
        return "no findings.json yet"
    found = read_findings(records.place("findings.json"))
    if found.schema_version != FINDINGS_VERSION:
        return f"findings.json has schema version {found.schema_version}, not {FINDINGS_VERSION}"
    if found.records is None or found.records != current:
        return "the records changed since findings.json was written"
    return None


def _zone_of(findings_path: str | Path, config: LabConfig) -> LabConfig:
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
    from observer.analysis import read_findings, records_stamp
    from observer.analysis.scale import analyze_devices
    from observer.catalog import load_catalog
    from observer.config import LabConfig, load_config
    from observer.records import partition_devices, read_records
    from observer.records.location import Location
    from observer.records.parquet import warn_unreadable
    from observer.report import write_fleet, write_report
    from observer.report.fleet import device_records, devices

    records = Location.of(args.records)
    if not records.is_dir():
        raise ObserverError(f"records directory {args.records} does not exist")
    config = load_config(args.config) if args.config else LabConfig()
    stamp = records_stamp(records)
    owners = partition_devices(records, "connections")
    if not owners:
        raise ObserverError(f"{args.records}: no connection records, nothing to report "
                            "(run observer replay, capture or proxy first)")
    findings_path = records.place("findings.json")
    reason = "--reanalyze" if args.reanalyze else stale_reason(records, stamp)
    problems: list[str] = []
    if reason is None:
        findings = read_findings(findings_path)
    else:
        if records.has("findings.json"):
            if args.config is None:
                config = _zone_of(findings_path, config)
            print(f"observer report: analysing again ({reason}; times in {config.timezone})",
                  file=sys.stderr)
        findings = analyze_devices(records, config, load_catalog(config.catalogs),
                                   problems=problems)
    if len(owners) > 1:  # one device's records at a time
        written = write_fleet(device_records(records, problems), findings, args.out)
    else:
        whole = read_records(records, problems=problems)
        if whole["connections"].empty:
            raise ObserverError(f"{args.records}: no connection records could be read, "
                                "nothing to report")
        writer = write_fleet if len(devices(whole)) > 1 else write_report
        written = writer(whole, findings, args.out)
    warn_unreadable(args.records, problems)
    print(written)
    return 0
