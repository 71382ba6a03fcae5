"""Rotating pcap files, like dumpcap's ring buffer (``-b filesize``, ``-b duration``, ``-b files``).

Files are named ``<prefix>-<UTC open time>-<sequence>.pcap`` so a plain sort is time order, also
across runs that resume in the same directory.  Packets are buffered in memory and written as whole
records at least every ``flush_s`` seconds: a ``kill -9`` loses at most that much, a closed file is
always complete, and the open file ends on a record boundary except for a write cut mid-way.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Callable
from pathlib import Path

from observer import ObserverError

PCAP_HEADER = struct.Struct("<IHHiIII")
RECORD_HEADER = struct.Struct("<IIII")
MAGIC_MICROSECONDS = 0xA1B2C3D4
SNAPLEN = 262144
FILE_NAME = re.compile(r"^(?P<prefix>.+)-(?P<stamp>\d{8}T\d{6}Z)-(?P<seq>\d{4,})\.pcap$")
FLUSH_BYTES = 1 << 20  # write sooner than the timer when this much is pending


def ring_files(directory: Path, prefix: str) -> list[Path]:
    """The ring's files in time order (name order)."""
    found = []
    for path in directory.glob(f"{prefix}-*.pcap"):
        match = FILE_NAME.match(path.name)
        if match and match["prefix"] == prefix:
            found.append(path)
    return sorted(found)


class RotatingPcapWriter:
    """Write pcap records into a ring of files rotated by size and by time."""

    def __init__(
        self,
        directory: str | Path,
        prefix: str,
        linktype: int,
        *,
        filesize: int | None = None,
        duration_s: float | None = None,
        max_files: int | None = None,
        flush_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ObserverError(f"cannot create capture directory {self.directory}: {exc.strerror}")
        self.prefix = prefix
        self.linktype = linktype
        self.filesize = filesize
        self.duration_s = duration_s
        self.max_files = max_files
        self.flush_s = flush_s
        self.clock = clock
        self.packets = 0
        self.bytes_written = 0
        self.files: list[Path] = []  # opened by this run
        self.deleted = 0
        self._buf = bytearray()
        self._file = None
        existing = ring_files(self.directory, prefix)
        self._seq = int(FILE_NAME.match(existing[-1].name)["seq"]) if existing else 0
        self._open(clock())

    @property
    def path(self) -> Path:
        return self.files[-1]

    def _open(self, now: float) -> None:
        self._seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        path = self.directory / f"{self.prefix}-{stamp}-{self._seq:04d}.pcap"
        try:
            self._file = open(path, "xb")  # noqa: SIM115 - a ring file stays open until rotation
        except OSError as exc:
            raise ObserverError(f"cannot create capture file {path}: {exc.strerror}")
        self._file.write(PCAP_HEADER.pack(MAGIC_MICROSECONDS, 2, 4, 0, 0, SNAPLEN, self.linktype))
        self._file.flush()
        self._size = PCAP_HEADER.size
        self._opened = now
        self._last_flush = now
        self.files.append(path)
        self._prune()

    def _prune(self) -> None:
        if not self.max_files:
            return
        existing = ring_files(self.directory, self.prefix)
        for old in existing[: max(0, len(existing) - self.max_files)]:
            old.unlink(missing_ok=True)
            self.deleted += 1

    def write(self, ts: float, data: bytes | memoryview, wirelen: int | None = None) -> None:
        """Append one packet captured at epoch ``ts``."""
        sec = int(ts)
        usec = round((ts - sec) * 1e6)
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        caplen = min(len(data), SNAPLEN)
        self._buf += RECORD_HEADER.pack(sec, usec, caplen, wirelen or len(data))
        self._buf += data[:caplen]
        self._counted()

    def write_record(self, record: bytes | memoryview) -> None:
        """Append one record that is already in pcap form (header + data), e.g. from tcpdump."""
        self._buf += record
        self._counted()

    def write_records(self, records: bytearray, count: int) -> None:
        """Append ``count`` whole records at once (the capture loop's batches)."""
        if count:
            self._buf += records
            self._counted(count)

    def _counted(self, count: int = 1) -> None:
        self.packets += count
        if self.filesize and self._size + len(self._buf) >= self.filesize:
            self.rotate(self.clock())
        elif len(self._buf) >= FLUSH_BYTES:
            self.flush()

    def tick(self, now: float) -> None:
        """Flush when due and rotate by time; call at least every second."""
        if self.duration_s and now - self._opened >= self.duration_s:
            self.rotate(now)
        elif now - self._last_flush >= self.flush_s:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        self._last_flush = self.clock() if now is None else now
        if self._buf and self._file is not None:
            self._file.write(self._buf)
            self._file.flush()
            self._size += len(self._buf)
            self.bytes_written += len(self._buf)
            self._buf.clear()

    def rotate(self, now: float) -> None:
        self._close_file()
        self._open(now)

    def _close_file(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._close_file()


class PcapStreamSplitter:
    """Cut a pcap byte stream (``tcpdump -w -``) into whole records."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.linktype: int | None = None

    def feed(self, chunk: bytes) -> list[memoryview]:
        """Add bytes; return the records now complete (views valid until the next ``feed``)."""
        self._buf += chunk
        start = 0
        if self.linktype is None:
            if len(self._buf) < PCAP_HEADER.size:
                return []
            magic, *_rest, linktype = PCAP_HEADER.unpack_from(self._buf)
            if magic != MAGIC_MICROSECONDS:
                raise ObserverError(f"tcpdump wrote an unexpected pcap header (magic {magic:#x})")
            self.linktype = linktype
            start = PCAP_HEADER.size
        view = memoryview(bytes(self._buf))
        records = []
        end = len(view)
        unpack = RECORD_HEADER.unpack_from
        while start + 16 <= end:
            caplen = unpack(view, start)[2]
            stop = start + 16 + caplen
            if stop > end:
                break
            records.append(view[start:stop])
            start = stop
        del self._buf[:start]
        return records
