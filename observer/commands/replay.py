"""Pcap replay (not built yet: issue #3)."""

from __future__ import annotations

import argparse

from observer.commands import not_built


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    raise not_built("pcap replay", 3)
