"""Write the timing report of a records directory: HTML, Markdown, findings.json, endpoints.csv.

Uses RECORDS_DIR/findings.json when `observer analyze` wrote one, otherwise runs the analysis first.
report.html is one self-contained file: it opens offline and runs no script.
"""

from __future__ import annotations

import argparse
from pathlib import Path


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
        help="lab config (time zone, catalogs, thresholds); default: built-in",
    )
    parser.add_argument(
        "--reanalyze",
        action="store_true",
        help="run the analysis even if RECORDS_DIR/findings.json exists",
    )


def _read_findings(path: Path) -> dict:
    import json

    from observer import ObserverError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ObserverError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ObserverError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("findings", []), list):
        raise ObserverError(f"{path}: expected an object with a 'findings' list (docs/findings.md)")
    return data


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from observer import ObserverError
    from observer.config import LabConfig, load_config
    from observer.records import read_records
    from observer.report import write_report

    if not args.records.is_dir():
        raise ObserverError(f"records directory {args.records} does not exist")
    config = load_config(args.config) if args.config else LabConfig()
    records = read_records(args.records)
    findings_path = args.records / "findings.json"
    if findings_path.exists() and not args.reanalyze:
        findings = _read_findings(findings_path)
        if args.config is None and findings.get("timezone"):
            # Without a config, show times in the zone the analysis used.
            zone = str(findings["timezone"])
            try:
                ZoneInfo(zone)
            except (ValueError, ZoneInfoNotFoundError):
                raise ObserverError(f"{findings_path}: unknown time zone {zone!r}") from None
            config = replace(config, timezone=zone)
    else:
        from observer.analysis import analyze_records
        from observer.catalog import load_catalog

        findings = analyze_records(records, config, load_catalog(config.catalogs))
    html = write_report(records, findings, config, args.out)
    print(html)
    return 0
