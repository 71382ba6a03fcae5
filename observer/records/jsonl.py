"""Append-only JSONL: the live record format of long runs (proxy, live capture).

Each line is one record ``{"table": ..., <columns>}``.  The writer flushes at least every
``flush_s`` seconds from a background timer, so a killed process loses at most that much, and
rotates files by size or UTC day.  The reader skips a torn or corrupt line and counts it.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from observer.records.schema import TABLES, conform


def _clean(value: Any) -> Any:
    """JSON has no NaN: write missing values as null."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class JsonlWriter:
    """Thread-safe, rotating, time-flushed JSONL writer for record rows."""

    def __init__(
        self,
        directory: str | Path,
        prefix: str,
        *,
        flush_s: float = 0.5,
        max_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.flush_s = flush_s
        self._lock = threading.Lock()
        self._file = None
        self._day = ""
        self._dirty = False
        self.error: OSError | None = None
        self._closed = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="jsonl-flush", daemon=True)
        self._flusher.start()

    def _open(self, now: float) -> None:
        if self._file is not None:
            self._file.close()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        path = self.directory / f"{self.prefix}-{stamp}.jsonl"
        n = 1
        while path.exists() and path.stat().st_size >= self.max_bytes:
            path = self.directory / f"{self.prefix}-{stamp}-{n}.jsonl"
            n += 1
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._day = time.strftime("%Y%m%d", time.gmtime(now))

    def write(self, table: str, row: dict[str, Any]) -> None:
        """Append one record of ``table``."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table}")
        line = json.dumps({"table": table, **{k: _clean(v) for k, v in row.items()}})
        with self._lock:
            now = time.time()
            if (
                self._file is None
                or self._day != time.strftime("%Y%m%d", time.gmtime(now))
                or self._file.tell() >= self.max_bytes
            ):
                self._open(now)
            self._file.write(line + "\n")
            self._dirty = True

    def flush(self) -> None:
        with self._lock:
            if self._file is not None and self._dirty:
                self._file.flush()
                self._dirty = False

    def _flush_loop(self) -> None:
        # A full disk must not kill the flusher with a traceback: keep the error in `error` for
        # the owner to report, and keep trying (space may come back).
        while not self._closed.wait(self.flush_s):
            try:
                self.flush()
            except OSError as exc:
                self.error = exc

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                finally:
                    self._file = None


@dataclass
class JsonlRead:
    """Tables read from JSONL files, with the number of lines skipped as torn or corrupt."""

    tables: dict[str, pd.DataFrame]
    skipped: int = 0
    skipped_where: list[str] = field(default_factory=list)


def read_jsonl(paths: list[str | Path]) -> JsonlRead:
    """Read JSONL record files; torn or corrupt lines are skipped and counted, never fatal."""
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
    skipped = 0
    where: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    table = record.pop("table")
                    rows[table].append(record)
                except (ValueError, KeyError, AttributeError, TypeError):
                    skipped += 1
                    where.append(f"{path}:{lineno}")
    tables = {t: conform(t, pd.DataFrame(r)) for t, r in rows.items()}
    return JsonlRead(tables, skipped, where)
