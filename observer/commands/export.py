"""Export to Zeek conn.log and CSV (not built yet: issue #8)."""

from __future__ import annotations

import argparse

from observer.commands import not_built


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    raise not_built("export to Zeek conn.log and CSV", 8)
