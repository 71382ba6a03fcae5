"""Find bulk uploads in a records directory and test whether they recur (a nightly export?).

Reads the record tables written by `observer replay`, `observer capture` or `observer proxy`,
groups connections by endpoint (service, organisation, address block), finds bulk upload events
(also inside long-lived connections), tests each group for a period with a stable local-time phase
(24 h first) against a calibrated null, and writes findings.json (docs/findings.md).  Prints one
line per notable group.  The method is explained in docs/analysis.md.

Devices are analysed one at a time (one device's records in memory at once): in this process,
in N processes (--jobs N), or on a Dask cluster (--dask: a local one, or a scheduler's address).
The findings are the same whichever way they ran.

example:
  observer analyze records/ --config lab.yaml
  observer analyze records/ -o week-findings.json
  observer analyze records/ --jobs 8
  observer analyze records/ --dask --workers 4
  observer analyze /shared/records/ --dask tcp://scheduler.lab:8786
  observer analyze s3://lab-bucket/records --jobs 4   (fsspec URL; needs s3fs, docs/performance.md)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from observer.commands import add_dask_arguments

VERDICT_MARK = {"periodic bulk upload": "!!", "periodic heartbeat": "~", "irregular uploads": "+"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("records", metavar="RECORDS_DIR",
                        help="a records directory (from observer replay, capture or proxy), or "
                             "an fsspec URL of one (s3://bucket/records, gs://..., file://...)")
    parser.add_argument("--config", type=Path, metavar="LAB.yaml",
                        help="lab config: time zone, thresholds, extra catalogs (default: UTC and "
                             "the built-in thresholds)")
    parser.add_argument("-o", "--output", metavar="FINDINGS.json",
                        help="where to write the findings (default: RECORDS_DIR/findings.json)")
    parser.add_argument("--simulations", type=int, default=1000, metavar="N",
                        help="Monte Carlo runs of the null model per event count (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the null simulations")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="analyse devices in N processes on this machine (default 1)")
    add_dask_arguments(parser, "analyse devices", "RECORDS_DIR at the same path or URL")


def run(args: argparse.Namespace) -> int:
    from observer import ObserverError, words
    from observer.analysis import write_findings
    from observer.analysis.scale import analyze_devices
    from observer.catalog import load_catalog
    from observer.config import LabConfig, load_config
    from observer.records.location import Location
    from observer.records.parquet import warn_unreadable

    if args.simulations < 100:
        raise ObserverError(f"--simulations must be at least 100, not {args.simulations}")
    if args.jobs < 1 or (args.workers is not None and args.workers < 1):
        raise ObserverError("--jobs and --workers must be at least 1")
    if args.jobs > 1 and args.dask is not None:
        raise ObserverError("--jobs and --dask exclude each other (--workers sizes a local "
                            "Dask cluster)")
    if args.workers is not None and args.dask != "local":
        raise ObserverError("--workers sizes a local Dask cluster: use it with --dask and no "
                            "address (a remote cluster has its own workers)")
    config = load_config(args.config) if args.config else LabConfig()
    records = Location.of(args.records)
    if not records.is_dir():
        raise ObserverError(f"records directory {args.records} does not exist")
    problems: list[str] = []
    findings = analyze_devices(records, config, load_catalog(config.catalogs),
                               n_sim=args.simulations, seed=args.seed, jobs=args.jobs,
                               dask=args.dask, workers=args.workers, problems=problems)
    warn_unreadable(args.records, problems)
    path = write_findings(findings, args.output or records.place("findings.json"))
    notable = [f for f in findings.findings if f.verdict != "nothing notable"]
    for f in notable:
        print(f"{VERDICT_MARK.get(f.verdict, ' '):>2} {f.summary}")
    note = words.zone_note(findings.timezone, findings.timezone_configured)
    if note:
        print(f"note: {note}")
    quiet = len(findings.findings) - len(notable)
    print(f"{len(notable)} notable group(s), {quiet} without bulk uploads or heartbeats; "
          f"findings: {path}")
    return 0
