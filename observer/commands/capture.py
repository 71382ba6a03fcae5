"""Live capture (not built yet: issue #4)."""

from __future__ import annotations

import argparse

from observer.commands import not_built


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    raise not_built("live capture", 4)
