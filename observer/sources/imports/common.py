"""Helpers every importer shares: devices, sessions, and opening compressed logs."""

from __future__ import annotations

import zlib
from pathlib import Path

import pandas as pd

from observer import ObserverError
from observer.config import LabConfig
from observer.devices import DeviceMap
from observer.records import conform
from observer.sources.pcapfile import gunzip

GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: Path) -> tuple[bytes, str | None]:
    """The file's content, transparently gunzipped (Zeek archives) or inflated (mitmproxy .zhar).

    A damaged gzip file gives the content before the damage and a note saying where it stopped,
    so a line-based log keeps its lines before the fault; nothing readable is an error.
    """
    try:
        data = path.read_bytes()
        if data[:2] == GZIP_MAGIC:
            content, damage = gunzip(path)
            if damage is None:
                return content, None
            if not content:
                raise ObserverError(f"{path}: damaged gzip file: {damage}")
            return content, f"damaged gzip file: {damage} after {len(content)} bytes of content"
    except OSError as exc:
        raise ObserverError(f"cannot read {path}: {exc.strerror or exc}") from None
    if path.suffix == ".zhar":
        try:
            return zlib.decompress(data), None
        except zlib.error as exc:
            raise ObserverError(f"{path}: damaged .zhar (zlib) file: {exc}") from None
    return data, None


def counts(values: pd.Series) -> pd.Series:
    """Non-negative whole numbers as Int64; text, negatives, inf or absurd sizes become NA."""
    numbers = pd.to_numeric(values, errors="coerce").astype("float64")
    sane = numbers.where((numbers >= 0) & (numbers < 2.0**62))
    return sane.round().astype("Int64")


def devices(client_ips: pd.Series, config: LabConfig | None) -> pd.Series:
    """Device names for client addresses, from the one device map (``observer.devices``): the
    lab config's name (address, prefix), else the address in its usual text form."""
    names = DeviceMap.from_config(config).names_of(client_ips)
    return pd.Series(names, index=client_ips.index, dtype="string")


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
