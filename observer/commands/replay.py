"""Turn saved captures into records: pcap and pcapng (any byte order, micro- or nanosecond,
gzip-compressed), and the formats of the importers (mitmproxy flow files, Zeek logs, HAR,
PCAPdroid CSV), chosen by content.  Connections that span several files stay one connection.

A damaged file stops at the first bad record with one line naming the file and byte offset; what
was read before it is kept, the other files are still read, and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="capture files or logs, in time order for rotated captures; a "
                        "directory stands for the capture files under it in name order (as "
                        "`observer capture` rotates them), else for its Zeek logs or JSONL records")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="RECORDS_DIR",
                        help="records directory to write (Parquet, partitioned by device and day)")
    parser.add_argument("--config", type=Path, metavar="LAB_YAML",
                        help="lab config: device addresses, bin width, UDP idle timeout")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the tables already in RECORDS_DIR instead of adding to them")
    parser.add_argument("--udp-idle", type=float, metavar="S",
                        help="seconds of silence that end a UDP flow (default: config or 120)")
    parser.add_argument("--bin", type=float, metavar="S",
                        help="activity bin width in seconds (default: config or 10)")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="show a progress bar (default: only on a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from observer.config import load_config
    from observer.sources import replay

    config = load_config(args.config) if args.config else None
    stats = replay(args.files, args.output, config=config, overwrite=args.overwrite,
                   progress=args.progress, udp_idle_s=args.udp_idle, bin_s=args.bin)
    for line in stats.summary().splitlines():
        target = sys.stderr if line.startswith("error: ") else sys.stdout
        print(line, file=target)
    return 1 if stats.errors else 0
