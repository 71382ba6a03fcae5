"""The proxy run's record store: open connections, their JSONL rows, and Parquet at the end.

No mitmproxy here.  Rows go to ``<dir>/live/proxy-<run>-<UTC time>.jsonl`` (flushed every half
second, rotated by size and UTC day); on a clean stop this run's files become Parquet tables in
``<dir>``.  Finished activity bins are written as time passes and open connections are written
as partial rows every ``checkpoint_s``, so a killed proxy loses at most that much.
``convert`` turns one run's JSONL files into Parquet; ``observer proxy`` calls it after mitmdump
has exited, so a run whose mitmdump died is converted too, closed at the time of its last record.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from observer import ObserverError
from observer.records import JsonlWriter, RecordRun, read_jsonl
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
        run: str = "",
    ) -> None:
        self.directory = Path(directory)
        self.bin_s = bin_s
        self.device_of = device_of
        self.checkpoint_s = checkpoint_s
        self.session_device = session_device
        self.run = run or uuid.uuid4().hex[:12]
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
        private_dir(self.directory)
        private_dir(self.live_dir)
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
        """Write the finished bins of open connections; every checkpoint, their partial rows.
        A write the JSONL writer could not make since the last tick is raised here (the hook
        that calls this counts and logs it)."""
        if self.writer is not None and self.writer.error is not None:
            error, self.writer.error = self.writer.error, None
            raise OSError(error.errno, f"records not written ({self.writer.lost} rows so far): "
                          f"{error.strerror or error}")
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
        return convert(self.directory, self.run)


# The time columns of each table: the latest of them is when a run was last heard from.
def private_dir(path: Path) -> None:
    """Create ``path`` readable by its owner only (records say what a person's phone did)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def convert(directory: str | Path, run: str) -> dict[str, int]:
    """Write one run's JSONL files (``<directory>/live/proxy-<run>-*.jsonl``) as Parquet tables;
    rows per table.  On failure the JSONL files stay and an ObserverError says why."""
    directory = Path(directory)
    files = sorted((directory / "live").glob(f"proxy-{run}-*.jsonl"))
    if not files:
        return {}
    try:
        tables = jsonl_import.tidy(read_jsonl(files).tables)
        with RecordRun(directory, command="proxy") as records:  # all tables or none
            return {table: records.write(table, df) for table, df in tables.items()}
    except Exception as exc:  # whatever failed, the JSONL files stay the run's record
        raise ObserverError(
            f"could not write Parquet records to {directory} ({exc}); this run's JSONL records "
            f"are kept in {directory / 'live'} (observer replay reads them)"
        ) from None
