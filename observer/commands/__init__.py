"""Subcommands of the ``observer`` CLI: argument parsing and wiring only, no logic."""

from pathlib import Path


def local_dir(text: str) -> Path:
    """An argparse type for an output directory: local only (``Path`` would turn a URL into a
    folder named "s3:"; records are written locally, then copied to object storage whole)."""
    if "://" in text:
        import argparse

        raise argparse.ArgumentTypeError(f"{text}: write to a local directory (records and "
                                         "reports are read by URL, not written)")
    return Path(text)
