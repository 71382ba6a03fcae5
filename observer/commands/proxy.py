"""The mitmproxy addon (not built yet: issue #5)."""

from __future__ import annotations

import argparse

from observer.commands import not_built


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    raise not_built("the mitmproxy addon", 5)
