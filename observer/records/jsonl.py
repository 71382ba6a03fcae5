"""Append-only JSONL: the live record format of long runs (proxy, live capture).

Each line is one record ``{"table": ..., <columns>}``.  The writer flushes at least every
``flush_s`` seconds from a background timer, so a killed process loses at most that much, and
rotates files by size or UTC day.  The reader skips a torn or corrupt line and counts it.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from observer.config import TimeWindow
from observer.records.schema import I64, STR, TABLES, conform
from observer.text import network_text


def _clean(value: Any) -> Any:
    """JSON has no NaN: write missing values as null."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _line(table: str, row: dict[str, Any]) -> str:
    """One JSONL line; rows without NaN or NA (nearly all) skip the per-value cleaning."""
    try:
        return json.dumps({"table": table, **row}, allow_nan=False)
    except (ValueError, TypeError):
        cleaned = {k: _clean(v) for k, v in row.items()}
        return json.dumps({"table": table, **cleaned}, allow_nan=False, default=str)


class JsonlWriter:
    """Thread-safe, rotating, time-flushed JSONL writer for record rows.

    ``write`` only queues the row; lines are made and written in batches at each flush (every
    ``flush_s`` from a background timer, or once ``batch_rows`` are queued).  A row costs the
    proxy ~22 µs per HTTP request when serialised on its own between mitmproxy's events and a
    few µs in a batch (docs/proxy.md), and a killed process still loses at most ``flush_s``.
    Rows are kept, not copied, until then: hand over a dict that is not changed afterwards.
    """

    def __init__(
        self,
        directory: str | Path,
        prefix: str,
        *,
        flush_s: float = 0.5,
        max_bytes: int = 256 * 1024 * 1024,
        batch_rows: int = 4096,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.flush_s = flush_s
        self.batch_rows = batch_rows
        self._lock = threading.Lock()
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._file = None
        self._day_end = 0.0
        self.error: OSError | None = None
        self.lost = 0  # rows of batches that failed (disk full, read-only); a few may be on disk
        self._cut = False
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
        self._size = path.stat().st_size  # counted, not asked: tell() flushes on every row
        if self._cut:
            self._file.write("\n")
            self._size += 1
            self._cut = False
        self._day_end = (now // 86_400 + 1) * 86_400  # a new file each UTC day

    def write(self, table: str, row: dict[str, Any]) -> None:
        """Queue one record of ``table`` for the next flush."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table}")
        with self._lock:
            if self._file is None:
                self._open(time.time())  # the file exists from the first row on, as readers expect
            self._pending.append((table, row))
            if len(self._pending) >= self.batch_rows:
                self._drain()

    def _drain(self) -> None:
        """Write the queued rows (the lock is held).  On an OSError the batch is counted in
        ``lost``, the error kept in ``error`` and raised to the caller."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            now = time.time()
            for table, row in pending:
                if self._file is None or now >= self._day_end or self._size >= self.max_bytes:
                    self._open(now)
                line = _line(table, row) + "\n"
                self._file.write(line)
                self._size += len(line)  # json.dumps writes ASCII: characters are bytes
            self._file.flush()
        except OSError as exc:
            self.lost += len(pending)
            self.error = exc
            self._discard()
            raise

    def _discard(self) -> None:
        """Drop the file object after a failed write: its buffer still holds part of the failed
        batch, which is not written later behind newer rows.  The line the fault may have cut is
        ended by the next file opened (the reader skips the torn line and the empty one)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        self._cut = True

    def flush(self) -> None:
        """Write every queued row to the file (the OS's cache)."""
        with self._lock:
            self._drain()

    def _flush_loop(self) -> None:
        # A full disk must not kill the flusher with a traceback: keep the error in `error` for
        # the owner to report, and keep trying (space may come back).
        while not self._closed.wait(self.flush_s):
            with contextlib.suppress(OSError):
                self.flush()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            try:
                self._drain()
            finally:
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
    skipped_where: list[str] = field(default_factory=list)  # "file:line"
    reasons: Counter[str] = field(default_factory=Counter)  # why lines were skipped


def record_problem(table: Any, record: Any, window: tuple[float, float] | None) -> str | None:
    """Why ``record`` is not a row of ``table`` with values of the schema's types and a time
    inside ``window`` (then a reader skips and counts it), else None.

    Strings are made valid text in place (``observer.text``), so a JSON ``\\udc80`` escape
    cannot break the Parquet writer later.
    """
    if not isinstance(record, dict):
        return "not a JSON object"
    columns = TABLES.get(table) if isinstance(table, str) else None
    if columns is None:
        return f"unknown table {table!r}"
    for key, value in record.items():
        dtype = columns.get(key)
        if dtype is None:
            return f"{table} has no column {key!r}"
        if value is None:
            continue
        if dtype == STR:
            if not isinstance(value, str):
                return f"{key} is not text"
            record[key] = network_text(value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{key} is not a number"
        elif isinstance(value, int) and not -(2**63) <= value < 2**63:
            return f"{key} is out of range"
        elif not math.isfinite(value):
            return f"{key} is not finite"
        elif dtype == I64 and not (float(value).is_integer() and abs(value) < 2**63):
            return f"{key} is not a whole number"
    if window is not None:
        for key in (k for k, v in record.items() if k.startswith("ts") and v is not None):
            if not window[0] <= record[key] <= window[1]:
                return f"{key} outside the time window"
    return None


def _open_text(path: Path) -> TextIO:
    """A JSONL file as text lines, gunzipped when it is gzip (rotated logs); invalid UTF-8 bytes
    become U+FFFD (the text policy of ``observer.text``)."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


def read_jsonl(paths: list[str | Path], window: TimeWindow | None = None) -> JsonlRead:
    """Read JSONL record files; a line that is torn, corrupt, not of the schema or timed outside
    ``window`` (if given) is skipped and counted, never fatal; so is an unreadable file."""
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
    bounds = window.bounds() if window is not None else None
    skipped = 0
    where: list[str] = []
    reasons: Counter[str] = Counter()
    for path in paths:
        lineno = 0
        try:
            with _open_text(Path(path)) as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        table = record.pop("table", None) if isinstance(record, dict) else None
                        why = record_problem(table, record, bounds)
                    except (ValueError, RecursionError):
                        why = "not valid JSON"
                    if why is None:
                        rows[table].append(record)
                    else:
                        skipped += 1
                        where.append(f"{path}:{lineno}")
                        reasons[why] += 1
        except (OSError, EOFError, zlib.error) as exc:  # unreadable, or a damaged gzip stream
            skipped += 1
            where.append(f"{path}:{lineno + 1}")
            reasons[f"unreadable from here on ({getattr(exc, 'strerror', None) or exc})"] += 1
    tables = {t: conform(t, pd.DataFrame(r)) for t, r in rows.items()}
    return JsonlRead(tables, skipped, where, reasons)
