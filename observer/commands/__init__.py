"""Subcommands of the ``observer`` CLI: argument parsing and wiring only, no logic."""

import argparse
from pathlib import Path


def local_dir(text: str) -> Path:
    """An argparse type for an output directory: local only (``Path`` would turn a URL into a
    folder named "s3:"; records are written locally, then copied to object storage whole)."""
    if "://" in text:
        raise argparse.ArgumentTypeError(f"{text}: write to a local directory (records and "
                                         "reports are read by URL, not written)")
    return Path(text)


def add_dask_arguments(parser: argparse.ArgumentParser, work: str, shared: str) -> None:
    """``--dask [ADDRESS]`` and ``--workers N``, worded for the command's ``work`` and the
    ``shared`` input a remote cluster's workers must see."""
    parser.add_argument("--dask", nargs="?", const="local", metavar="ADDRESS",
                        help=f"{work} on dask.distributed: a local cluster, or the scheduler at "
                        f"ADDRESS (tcp://host:8786; its workers must see {shared})")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="worker processes of the local Dask cluster (default: the cores "
                        "available)")
