"""Helpers every importer shares: devices, redaction, sessions, and opening compressed logs."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd

from observer import ObserverError
from observer.config import LabConfig
from observer.records import conform

GZIP_MAGIC = b"\x1f\x8b"
REDACTED = "<redacted>"


def read_bytes(path: Path) -> bytes:
    """The file's content, transparently gunzipped (Zeek archives) or inflated (mitmproxy .zhar)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ObserverError(f"cannot read {path}: {exc.strerror or exc}") from None
    if data[:2] == GZIP_MAGIC:
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ObserverError(f"{path}: damaged gzip file: {exc}") from None
    if path.suffix == ".zhar":
        try:
            return zlib.decompress(data)
        except zlib.error as exc:
            raise ObserverError(f"{path}: damaged .zhar (zlib) file: {exc}") from None
    return data


def head_of(head: bytes, path: Path, size: int = 4096) -> bytes:
    """The first bytes of the file's content, looking inside gzip and .zhar compression."""
    if head[:2] == GZIP_MAGIC:
        try:
            with gzip.open(path, "rb") as f:
                return f.read(size)
        except (OSError, EOFError, zlib.error):
            return b""
    if path.suffix == ".zhar":
        try:
            return zlib.decompressobj().decompress(path.read_bytes()[: size * 8], size)
        except (OSError, zlib.error):
            return b""
    return head


def counts(values: pd.Series) -> pd.Series:
    """Non-negative whole numbers as Int64; text, negatives, inf or absurd sizes become NA."""
    numbers = pd.to_numeric(values, errors="coerce").astype("float64")
    sane = numbers.where((numbers >= 0) & (numbers < 2.0**62))
    return sane.round().astype("Int64")


def devices(client_ips: pd.Series, config: LabConfig | None) -> pd.Series:
    """Device names for client addresses: the lab config's name, else the address itself."""
    if config is None or not config.devices:
        return client_ips.astype("string")
    names = {ip: config.device_of(ip) for ip in client_ips.dropna().unique()}
    mapped = client_ips.map(lambda ip: names.get(ip) or ip if isinstance(ip, str) else pd.NA)
    return mapped.astype("string")


def redact_path(url: str, redact: bool = True) -> str:
    """The path of a URL; its query string replaced by a marker unless redaction is off.

    Fragments are dropped always: browsers never send them, HAR files sometimes keep them.
    """
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + (REDACTED if redact else parts.query)
    return path


def session(path: Path, kind: str, ts_start: float | None, ts_end: float | None,
            note: str) -> pd.DataFrame:
    """One sessions row for an imported file, so coverage shows what the import spans."""
    return conform("sessions", pd.DataFrame({
        "session_id": [f"import:{kind}:{path.resolve()}"],
        "source": ["import"],
        "device": pd.Series([pd.NA], dtype="string"),
        "ts_start": [ts_start if ts_start is not None else float("nan")],
        "ts_end": [ts_end if ts_end is not None else float("nan")],
        "interface": [str(path)],
        "note": [note],
    }))
