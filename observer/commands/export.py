"""Write records as a Zeek-style conn.log (for RITA or any Zeek tooling) or as CSV.

The conn.log carries Zeek's full header; fields our records do not know (history, missed_bytes,
local_orig/local_resp, tunnel_parents) are written unset ('-').  CSV follows RFC 4180 (CRLF, fields
with commas, quotes, line breaks or edge spaces quoted); cells that a spreadsheet would run as a
formula (starting with = + - @ tab or CR) are prefixed with a quote.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from observer import ObserverError

if TYPE_CHECKING:
    import pandas as pd


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("records", metavar="RECORDS_DIR",
                        help="records directory written by replay, capture or proxy, or an "
                             "fsspec URL of one (s3://bucket/records)")
    parser.add_argument("--format", choices=("zeek", "csv"), required=True,
                        help="zeek: a conn.log (connections only); csv: any one table")
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="file to write ('-' for standard output)")
    parser.add_argument("--table", default="connections",
                        help="table to write as CSV (default: connections)")
    parser.add_argument("--ssl-log", type=Path, metavar="FILE",
                        help="with --format zeek: also write the TLS server names as a Zeek "
                             "ssl.log (name it ssl.log beside conn.log so tools pair them)")


def run(args: argparse.Namespace) -> int:
    from observer.records import TABLES, read_table
    from observer.records.export import write_conn_log, write_csv, write_ssl_log
    from observer.records.location import Location

    if args.table not in TABLES:
        raise ObserverError(f"unknown table {args.table!r}; known: {', '.join(TABLES)}")
    if args.format == "zeek" and args.table != "connections":
        raise ObserverError("a Zeek conn.log holds connections only; use --format csv for "
                            f"the {args.table} table")
    if args.ssl_log and args.format != "zeek":
        raise ObserverError("--ssl-log goes with --format zeek")
    records = Location.of(args.records)
    if not records.has("meta.json") and not records.has(args.table):
        raise ObserverError(f"{args.records} is not a records directory (no meta.json)")
    frame = read_table(records, args.table)
    write = write_conn_log if args.format == "zeek" else write_csv
    if args.output == "-":
        write(frame, sys.stdout)
        return 0
    count = _write(Path(args.output), write, frame)
    print(f"observer export: wrote {count} {args.table} rows to {args.output}", file=sys.stderr)
    if args.ssl_log:
        named = _write(args.ssl_log, write_ssl_log, frame)
        print(f"observer export: wrote {named} TLS server names to {args.ssl_log}",
              file=sys.stderr)
    return 0


def _write(output: Path, write: Callable[[pd.DataFrame, TextIO], int],
           frame: pd.DataFrame) -> int:
    try:
        with output.open("w", encoding="utf-8", newline="") as out:
            return write(frame, out)
    except OSError as exc:
        raise ObserverError(f"cannot write {output}: {exc.strerror or exc}") from None
