"""Importers of other tools' files: Zeek logs, HAR archives, PCAPdroid's connections CSV.

The replay dispatcher calls ``sniff`` on a file's first bytes and, when it says yes, ``read`` to get
record tables (source = "import").  The importer is chosen by content, never by file name alone.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pandas as pd

from observer import ObserverError
from observer.config import LabConfig
from observer.sources.imports import har, pcapdroid_csv, zeek
from observer.sources.imports.common import head_of

__all__ = ["importer_for", "read", "sniff"]

IMPORTERS: tuple[ModuleType, ...] = (zeek, har, pcapdroid_csv)


def importer_for(head: bytes, path: Path) -> ModuleType | None:
    """The importer module that recognises this content (or directory of Zeek logs), if any."""
    path = Path(path)
    if path.is_dir():
        return zeek if zeek.is_zeek_dir(path) else None
    content = head_of(head, path)
    for module in IMPORTERS:
        if module.sniff(content):
            return module
    return None


def sniff(head: bytes, path: Path) -> bool:
    """Whether one of the importers reads this file."""
    return importer_for(head, path) is not None


def read(path: Path, config: LabConfig | None = None) -> dict[str, pd.DataFrame]:
    """Record tables from a Zeek log (or directory), a HAR, or a PCAPdroid CSV."""
    path = Path(path)
    head = b""
    if path.is_file():
        try:
            with path.open("rb") as f:
                head = f.read(4096)
        except OSError as exc:
            raise ObserverError(f"cannot read {path}: {exc.strerror or exc}") from None
    module = importer_for(head, path)
    if module is None:
        raise ObserverError(
            f"{path}: not a Zeek log, HAR file or PCAPdroid connections CSV (judged by content)"
        )
    return module.read(path, config)
