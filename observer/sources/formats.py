"""The input formats replay reads, in one list, each chosen by content, never by file name alone.

Every format is one module with ``sniff(head, path) -> bool`` and ``read(path, config)``.  ``head``
is the first ``HEAD_BYTES`` of the file's content, already inside gzip or ``.zhar`` compression;
``path`` may be a directory (Zeek logs, JSONL records).  A module with ``PACKETS = True``
(``pcapfile``) returns packet batches from ``read`` for the flow engine; the others return record
tables (``dict[str, DataFrame]``).  Adding a format is one module, one line in ``FORMATS``, its
tests and its docs (docs/interop.md).  The first module that says yes wins, so the most specific
sniff comes first.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from types import ModuleType

import pandas as pd

from observer import ObserverError
from observer.config import LabConfig
from observer.sources import mitmflows, pcapfile
from observer.sources.imports import har, pcapdroid_csv, zeek
from observer.sources.proxy import jsonl_import

HEAD_BYTES = 4096
FORMATS: tuple[ModuleType, ...] = (pcapfile, mitmflows, jsonl_import, zeek, har, pcapdroid_csv)


def content_head(path: Path) -> bytes:
    """The first bytes of a file's content (inside gzip or ``.zhar``); ``b""`` for a directory."""
    if path.is_dir():
        return b""
    try:
        with path.open("rb") as handle:
            head = handle.read(HEAD_BYTES)
        if pcapfile.kind_of(head) == "gzip":
            return pcapfile.gunzip_head(path, HEAD_BYTES)
        if path.suffix == ".zhar":
            with path.open("rb") as handle:
                return zlib.decompressobj().decompress(handle.read(HEAD_BYTES * 8), HEAD_BYTES)
    except zlib.error:
        return b""
    except OSError as exc:
        raise ObserverError(f"cannot read {path}: {exc.strerror or exc}") from None
    return head


def format_for(path: Path) -> ModuleType | None:
    """The format module that reads this file or directory, if any."""
    path = Path(path)
    head = content_head(path)
    for module in FORMATS:
        if module.sniff(head, path):
            return module
    return None


def is_packets(module: ModuleType) -> bool:
    """Whether ``module.read`` gives packet batches (for the flow engine), not record tables."""
    return getattr(module, "PACKETS", False)


def read_tables(path: Path, config: LabConfig | None = None) -> dict[str, pd.DataFrame]:
    """Record tables from a file or directory of any table format (not a packet capture)."""
    path = Path(path)
    module = format_for(path)
    if module is None or is_packets(module):
        raise ObserverError(f"{path}: not a format an importer reads ({names()}; judged by "
                            "content)" if module is None else
                            f"{path}: a packet capture; use observer replay")
    return module.read(path, config)


def names() -> str:
    """The formats' names for messages ("pcap, pcapng, ..., PCAPdroid CSV")."""
    return ", ".join(module.NAME for module in FORMATS)
