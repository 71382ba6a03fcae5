"""Turn saved captures into records: pcap and pcapng (any byte order, micro- or nanosecond,
gzip-compressed), and the formats of the importers (mitmproxy flow files, Zeek logs, HAR,
PCAPdroid CSV), chosen by content.  Connections that span several files stay one connection.

A damaged file stops at the first bad record with one line naming the file and byte offset; what
was read before it is kept, the other files are still read, and the exit status is non-zero.

Replaying is idempotent: RECORDS_DIR/manifest.json lists every file replayed into it by a
fingerprint of its content, and a file whose content is already there is skipped with a note
(whatever its name: a copy of a rotated capture, or its gzip, is the same file); --replace redoes
it, and its earlier rows go in the same step.  The records change only when the whole replay is
done: a full disk or an interrupted replay leaves them as they were.

Capture files are decoded ahead in --jobs processes (default: the cores available), or on a
Dask cluster (--dask: a local one of --workers processes, or a scheduler's address; one task per
file).  Either way one tracker in this process takes the files in order, so the records are
the same as with --jobs 1; only decoding runs in parallel (docs/performance.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from observer.commands import add_dask_arguments, local_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="capture files or logs, in time order for rotated captures; a "
                        "directory stands for the capture files under it in name order (as "
                        "`observer capture` rotates them), else for its Zeek logs or JSONL records")
    parser.add_argument("-o", "--output", type=local_dir, required=True, metavar="RECORDS_DIR",
                        help="records directory to write (Parquet, partitioned by device and day)")
    parser.add_argument("--config", type=Path, metavar="LAB_YAML",
                        help="lab config: device addresses, bin width, UDP idle timeout")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace all records in RECORDS_DIR instead of adding to them (the "
                        "old ones go only once the new ones are complete)")
    parser.add_argument("--replace", action="store_true",
                        help="replay files already in RECORDS_DIR again, replacing their rows "
                        "(default: skip them with a note)")
    parser.add_argument("--udp-idle", type=float, metavar="S",
                        help="seconds of silence that end a UDP flow (default: config or 120)")
    parser.add_argument("--bin", type=float, metavar="S",
                        help="activity bin width in seconds (default: config or 10)")
    parser.add_argument("-j", "--jobs", type=int, metavar="N",
                        help="processes to read and decode capture files with, this one "
                        "included (default: the cores available); the records are the same")
    add_dask_arguments(parser, "decode capture files, one task per file,",
                       "the files at the same paths")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="show a progress bar (default: only on a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from observer import ObserverError
    from observer.config import load_config
    from observer.records import RecordRun
    from observer.records.manifest import Manifest, plan_sources
    from observer.sources.pipeline import _expand, replay, tune_process
    from observer.sources.workers import default_jobs

    if any(n is not None and n < 1 for n in (args.jobs, args.workers)):
        raise ObserverError("--jobs and --workers must be at least 1")
    if args.jobs is not None and args.dask is not None:
        raise ObserverError("--jobs and --dask exclude each other (--workers sizes a local "
                            "Dask cluster)")
    if args.workers is not None and args.dask != "local":
        raise ObserverError("--workers sizes a local Dask cluster: use it with --dask and no "
                            "address (a remote cluster has its own workers)")
    config = load_config(args.config) if args.config else None
    files: list[Path] = []
    errors: list[str] = []
    for path in args.files:
        try:
            files.extend(_expand(path))
        except ObserverError as exc:
            errors.append(str(exc))
    manifest = Manifest.load(args.output)
    if manifest.damaged:
        raise ObserverError(f"{manifest.damaged}: cannot tell which files the records hold; "
                            "move it away, or replay into a new directory")
    plan = plan_sources(files, manifest, replace=args.replace, overwrite=args.overwrite)
    for note in plan.notes:
        print(note)
    if not plan.files:
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        print("nothing new to replay; the records are unchanged")
        return 1 if errors else 0
    tune_process()
    try:
        with RecordRun(args.output, overwrite=args.overwrite, replace_runs=plan.replace_runs,
                       command="replay") as records:
            stats = replay(plan.files, args.output, config=config, progress=args.progress,
                           udp_idle_s=args.udp_idle, bin_s=args.bin, run=records,
                           jobs=args.jobs or args.workers or default_jobs(), dask=args.dask)
            records.sources = _sources(plan, records.sessions, stats.errors)
    except OSError as exc:
        raise ObserverError(f"cannot write {exc.filename or args.output}: {exc.strerror or exc}; "
                            "nothing was added, the records there are as they were") from None
    stats.errors[:0] = errors
    for line in stats.summary().splitlines():
        target = sys.stderr if line.startswith("error: ") else sys.stdout
        print(line, file=target)
    if records.duplicates:
        print("not added again, already in the records (the same connections through another "
              "file, e.g. a live capture's JSONL): "
              + ", ".join(f"{table} {n:,}" for table, n in records.duplicates.items()))
    return 1 if stats.errors else 0


def _sources(plan, sessions: list, errors: list[str]) -> list[dict]:
    """Manifest entries of the files read: packets from their session rows (one per capture file,
    by name, in order); a file that could not be read at all is not entered."""
    import pandas as pd

    names = [n for frame in sessions for n in zip(frame["interface"], frame["packets_captured"],
                                                  strict=True)]
    entries = []
    for path in plan.files:
        if path not in plan.prints:
            continue
        match = next((i for i, (name, _) in enumerate(names) if name == path.name), None)
        if match is None and any(error.startswith(f"{path}:") for error in errors):
            continue
        packets = names.pop(match)[1] if match is not None else None
        entries.append(plan.entry(path, None if packets is None or pd.isna(packets)
                                  else int(packets)))
    return entries
