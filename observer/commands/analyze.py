"""The analysis (not built yet: issue #6)."""

from __future__ import annotations

import argparse

from observer.commands import not_built


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    raise not_built("the analysis", 6)
