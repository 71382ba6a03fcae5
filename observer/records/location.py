"""Where a records directory is: a local path, or an fsspec URL (``s3://bucket/lab/records``,
``gs://...``, ``memory://...``, ``file://...``).

The readers of the records (manifest, meta.json, part files, findings.json) go through a
``Location``, so a lab's records on object storage are read as a local directory is, and the
fingerprint of the same records is the same wherever they are read from.  Records are written
only to local paths: the writer's atomic renames and directory fsyncs have no object-store
equivalent (copy a committed directory up whole, e.g. ``aws s3 sync``).  Credentials come from
fsspec's usual configuration (environment, ~/.aws, fsspec config files), never from the command.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from observer import ObserverError

if TYPE_CHECKING:
    import pyarrow.parquet as pq
    from fsspec import AbstractFileSystem

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(place: object) -> bool:
    """Whether ``place`` names a location by URL (a string with a scheme), not a local path."""
    return isinstance(place, str) and URL.match(place) is not None


def _filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise ObserverError(f"{url}: reading records by URL needs fsspec: "
                            "pip install 'telemetry-observer[remote]'") from None
    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as exc:  # no driver for the scheme (s3fs, gcsfs), bad URL
        raise ObserverError(f"{url}: {exc}") from None


class Location:
    """A records directory and the files in it.  Paths inside are ``Path`` for a local
    directory (exactly as before URLs were read) and ``PurePosixPath`` on an fsspec filesystem."""

    def __init__(self, place: str | Path) -> None:
        self.url = str(place)
        self.fs: AbstractFileSystem | None = None
        if is_url(place):
            self.fs, path = _filesystem(str(place))
            self.root: Path | PurePosixPath = PurePosixPath(path)
        else:
            self.root = Path(place)

    @classmethod
    def of(cls, place: str | Path | Location) -> Location:
        return place if isinstance(place, Location) else cls(place)

    def __str__(self) -> str:
        return self.url

    def place(self, name: str) -> str | Path:
        """A file in the directory as the commands take it: a Path, or a URL."""
        if self.fs is None:
            return self.root / name
        return self.url.rstrip("/") + "/" + name

    def _ask(self, question: str, path: Path | PurePosixPath) -> bool:
        """``exists`` or ``isdir`` of a path, asked of the local disk or of the store (a store
        that cannot be reached is one line, not a traceback)."""
        if self.fs is None:
            return path.exists() if question == "exists" else path.is_dir()
        try:
            return bool(getattr(self.fs, question)(str(path)))
        except OSError as exc:
            raise ObserverError(f"{self.url}: {exc}") from None

    def exists(self) -> bool:
        return self._ask("exists", self.root)

    def has(self, name: str) -> bool:
        """Whether the directory holds file ``name``."""
        return self._ask("exists", self.root / name)

    def is_dir(self) -> bool:
        return self._ask("isdir", self.root)

    def read_bytes(self, path: Path | PurePosixPath | str) -> bytes:
        """A file's bytes (``path`` absolute, or relative to the directory); FileNotFoundError
        when it is not there."""
        path = self.root / path
        if self.fs is None:
            return path.read_bytes()
        return self.fs.cat_file(str(path))

    def size(self, path: Path | PurePosixPath) -> int:
        if self.fs is None:
            return path.stat().st_size
        return int(self.fs.size(str(path)))

    def glob(self, pattern: str) -> list[Path | PurePosixPath]:
        """Files matching ``pattern`` (relative, ``*`` within one component), in path order."""
        if self.fs is None:
            return sorted(self.root.glob(pattern))
        return sorted(PurePosixPath(p) for p in self.fs.glob(f"{self.root}/{pattern}"))

    def parquet(self, path: Path | PurePosixPath) -> pq.ParquetFile:
        """A part file, opened for reading (on a remote store: fetched whole, one request)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.fs is None:
            return pq.ParquetFile(path)
        return pq.ParquetFile(pa.BufferReader(self.fs.cat_file(str(path))))


def read_file(place: str | Path) -> bytes:
    """The bytes of one file named by a local path or a URL (findings.json beside records)."""
    if not is_url(place):
        return Path(place).read_bytes()
    fs, path = _filesystem(str(place))
    return fs.cat_file(path)


def write_object(url: str, data: bytes) -> None:
    """Write one file by URL whole (an object store replaces an object in one step)."""
    fs, path = _filesystem(url)
    fs.pipe_file(path, data)
