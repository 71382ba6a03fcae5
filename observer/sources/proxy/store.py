"""The proxy run's record store: open connections, their JSONL rows, and Parquet at the end.

No mitmproxy here.  Rows go to ``<dir>/live/proxy-<run>-<UTC time>.jsonl`` (flushed every half
second, rotated by size and UTC day); on a clean stop this run's files become Parquet tables in
``<dir>``.  Finished activity bins are written as time passes and open connections are written
as partial rows every ``checkpoint_s``, so a killed proxy loses at most that much.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from observer.records import JsonlWriter, read_jsonl, write_table
from observer.sources.proxy import jsonl_import
from observer.sources.proxy.records import ConnRecord
from observer.sources.proxy.traffic import activity_rows

log = logging.getLogger(__name__)


class RecordStore:
    """Owns the writer and the records of the connections that are still open."""

    def __init__(
        self,
        directory: str | Path,
        *,
        bin_s: float,
        device_of: Callable[[str | None], str],
        checkpoint_s: float,
        session_device: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.bin_s = bin_s
        self.device_of = device_of
        self.checkpoint_s = checkpoint_s
        self.session_device = session_device
        self.run = uuid.uuid4().hex[:12]
        self.prefix = f"proxy-{self.run}"
        self.writer: JsonlWriter | None = None
        self.open_conns: dict[str, ConnRecord] = {}
        self.session: dict[str, Any] = {}
        self.rows_written = 0
        self._last_checkpoint = 0.0

    @property
    def live_dir(self) -> Path:
        return self.directory / "live"

    def start(self, now: float, interface: str, note: str = "") -> None:
        self.writer = JsonlWriter(self.live_dir, self.prefix)
        self.session = {
            "session_id": f"proxy-{self.run}",
            "source": "proxy",
            "device": self.session_device,
            "ts_start": now,
            "ts_end": None,
            "interface": interface,
            "filter": None,
            "note": note,
        }
        self.write("sessions", self.session)
        self._last_checkpoint = now

    def write(self, table: str, row: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(table, row)
            self.rows_written += 1

    def write_bins(self, rec: ConnRecord, before: float | None) -> None:
        bins = rec.traffic.take_bins(before)
        for row in activity_rows(rec.conn_id, rec.device, self.bin_s, bins):
            self.write("activity", row)

    def finish(self, key: str, rec: ConnRecord) -> None:
        """Write a closed connection's final row and its remaining bins."""
        self.open_conns.pop(key, None)
        self.write_bins(rec, None)
        self.write("connections", rec.row())

    def tick(self, now: float) -> None:
        """Write the finished bins of open connections; every checkpoint, their partial rows."""
        checkpoint = now - self._last_checkpoint >= self.checkpoint_s
        for rec in list(self.open_conns.values()):
            self.write_bins(rec, now)
            if checkpoint:
                self.write("connections", rec.row())
        if checkpoint:
            self._last_checkpoint = now

    def stop(self, now: float, *, parquet: bool, note: str = "") -> dict[str, int]:
        """Write still-open connections as open, close the files, convert them to Parquet."""
        for rec in list(self.open_conns.values()):
            rec.ts_end = now
            self.write_bins(rec, None)
            self.write("connections", rec.row())
        if self.session:
            self.write("sessions", {**self.session, "ts_end": now, "note": note})
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if not parquet:
            return {}
        files = sorted(self.live_dir.glob(f"{self.prefix}-*.jsonl"))
        if not files:
            return {}
        tables = jsonl_import.tidy(read_jsonl(files).tables)
        return {table: write_table(self.directory, table, df) for table, df in tables.items()}

