"""Streaming pcap / pcapng readers that hand out packets in batches of numpy arrays.

Only record headers are walked in Python (the one step that is inherently sequential); every field
is then gathered with numpy from one reused buffer, because allocating a fresh buffer per block
doubles the time (docs/performance.md).  A damaged file stops with ``Batches.error`` naming the file
and byte offset; every packet before it has already been handed out.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from observer import ObserverError
from observer.config import LabConfig, TimeWindow

PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6, 16),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6, 16),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9, 16),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9, 16),
    b"\x34\xcd\xb2\xa1": ("<", 1e-6, 24),  # Kuznetzov's modified pcap: longer record headers
    b"\xa1\xb2\xcd\x34": (">", 1e-6, 24),
}
PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
GZIP_MAGIC = b"\x1f\x8b"
BYTE_ORDER_MAGIC = 0x1A2B3C4D

BUFFER_BYTES = 32 << 20
PAD = 256  # slack after the data so fixed-width header windows never leave the buffer
MAX_RECORD = 1 << 24  # larger than any link type's maximum snapshot length: a damaged header
BATCH_BYTES = 8 << 20  # bytes of records per batch: bounds the per-packet temporary arrays
MAX_BATCH = 1 << 17  # pcapng blocks per batch, for the same reason
NAME = "pcap or pcapng capture (also gzip-compressed)"
PACKETS = True  # read() gives packet batches for the flow engine, not record tables


def words(buf: np.ndarray, dtype: str) -> np.ndarray:
    """``buf`` seen as integers of ``dtype`` starting at every byte (stride 1), so one gather
    reads a multi-byte field at any offset."""
    dt = np.dtype(dtype)
    return np.ndarray((buf.size - dt.itemsize + 1,), dt, buf, 0, (1,))


def windows(buf: np.ndarray, off: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` bytes at each offset as the rows of a uint8 array: one gather for every field
    of a header, where a gather per field (``words``) costs several times more.  Fields are then
    columns of ``.view(">u2")`` etc. at offsets that are multiples of their size."""
    return words(buf, f"V{size}")[off].view(np.uint8).reshape(-1, size)


@dataclass
class Batch:
    """Packets of one buffer fill; ``buf`` is only valid until the next batch is read."""

    buf: np.ndarray  # uint8 view of the reader's buffer
    data_off: np.ndarray  # int64 offset of each packet's first byte in buf
    caplen: np.ndarray  # int64 captured length
    origlen: np.ndarray  # int64 length on the wire
    ts: np.ndarray  # float64 epoch seconds
    linktype: np.ndarray  # int64 link type of each packet


def kind_of(head: bytes) -> str | None:
    """'pcap', 'pcapng' or 'gzip' from a file's first bytes, else None."""
    if head[:4] in PCAP_MAGICS:
        return "pcap"
    if head[:4] == PCAPNG_SHB:
        return "pcapng"
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    return None


def sniff(head: bytes, path: Path) -> bool:
    """A pcap or pcapng file (``head`` is already inside gzip compression)."""
    return kind_of(head) in ("pcap", "pcapng")


def read(path: Path, config: LabConfig | None = None) -> Batches:
    """The packets of a capture file, in batches, for the flow engine."""
    try:
        return Batches(path, window=TimeWindow.of(config))
    except OSError as exc:
        raise ObserverError(f"cannot read {path}: {exc.strerror or exc}") from None


class _Filler:
    """A reused byte buffer refilled from a stream, keeping the unconsumed tail."""

    def __init__(self, stream: BinaryIO, size: int = BUFFER_BYTES) -> None:
        self.stream = stream
        self.raw = bytearray(size + PAD)
        self.size = size
        self.start = 0  # stream offset of raw[0]
        self.end = 0  # valid bytes in raw
        self.eof = False
        self.broken: str | None = None  # why a compressed stream ended early

    def fill(self, consumed: int) -> None:
        """Drop ``consumed`` bytes from the front and read as much as fits."""
        tail = self.end - consumed
        if consumed:
            self.raw[:tail] = self.raw[consumed : self.end]
            self.start += consumed
        self.end = tail
        view = memoryview(self.raw)
        while self.end < self.size and not self.eof:
            got = self.stream.readinto(view[self.end : self.size])
            if not got:
                self.eof = True
                self.broken = getattr(self.stream, "error", None)
            else:
                self.end += got
        view.release()

    def grow(self, need: int) -> None:
        """Make room for one record larger than the buffer (rare: jumbo or huge snaplen)."""
        size = max(need, self.size * 2)
        raw = bytearray(size + PAD)
        raw[: self.end] = self.raw[: self.end]
        self.raw, self.size = raw, size


class Batches:
    """A capture file's packets in batches; ``error``, ``packets`` and ``skipped`` are set as it
    goes.  Packets whose time lies outside ``window`` are dropped and counted in ``skipped``."""

    def __init__(self, path: Path, *, compressed: bool | None = None,
                 window: TimeWindow | None = None) -> None:
        self.path = path
        self.stream: BinaryIO | _Prefixed
        if compressed is None:
            with open(path, "rb") as raw:
                compressed = raw.read(2) == GZIP_MAGIC
        self.compressed = compressed
        self.error: str | None = None
        self.packets = 0
        self.skipped: Counter[str] = Counter()
        self.window = (window or TimeWindow()).bounds()
        # a small file gets a small buffer: zeroing 32 MiB costs more than reading a tiny file
        size = path.stat().st_size * (8 if compressed else 1)
        self.buffer_bytes = max(1 << 16, min(BUFFER_BYTES, size + 4096))

    def fail(self, offset: int, what: str) -> None:
        where = "decompressed byte offset" if self.compressed else "byte offset"
        self.error = f"{self.path}: {what} at {where} {offset}"

    def __iter__(self) -> Iterator[Batch]:
        try:
            with open(self.path, "rb") as raw:
                stream = _Gunzip(raw) if self.compressed else raw
                head = stream.read(4)
                self.stream = _Prefixed(head, stream)
                batches = self._pcap() if head in PCAP_MAGICS else self._pcapng()
                for batch in batches:
                    batch = self._in_window(batch)
                    if batch.ts.size:
                        yield batch
        except OSError as exc:  # a disk error or a file gone: what was read stays
            self.error = f"{self.path}: cannot read: {exc.strerror or exc}"

    def _in_window(self, batch: Batch) -> Batch:
        """The batch without packets timed outside the window (counted as skipped)."""
        lo, hi = self.window
        keep = (batch.ts >= lo) & (batch.ts <= hi)
        if keep.all():
            return batch
        self.skipped["timestamp outside the time window"] += int(keep.size - keep.sum())
        return Batch(batch.buf, batch.data_off[keep], batch.caplen[keep], batch.origlen[keep],
                     batch.ts[keep], batch.linktype[keep])

    # -- pcap ---------------------------------------------------------------------------------
    def _pcap(self) -> Iterator[Batch]:
        filler = _Filler(self.stream, self.buffer_bytes)
        filler.fill(0)
        if filler.end < 24:
            self._truncated(filler, 0, "truncated pcap file header")
            return
        order, unit, hdr = PCAP_MAGICS[bytes(filler.raw[:4])]
        snaplen, network = struct.unpack_from(order + "II", filler.raw, 16)
        linktype = network & 0x03FFFFFF
        limit = max(262144, min(snaplen, MAX_RECORD))
        caplen_at = struct.Struct(order + "8xI").unpack_from  # a record header's caplen
        pos = 24
        while True:
            raw, end = filler.raw, filler.end
            # bounds the batch (raw has PAD bytes past end); a record larger than a batch (a
            # snap length over BATCH_BYTES) is a batch of its own
            window = min(end, max(pos + BATCH_BYTES, pos + hdr + caplen_at(raw, pos)[0]))
            last = window - hdr  # a record at off fits while off + caplen <= last
            offs: list[int] = []
            add = offs.append
            off = pos
            while True:  # the one Python loop per packet: kept to the fewest operations
                nxt = off + caplen_at(raw, off)[0]
                if nxt > last:
                    break
                add(off)
                off = nxt + hdr
            nxt += hdr
            if offs:
                buf = np.frombuffer(raw, np.uint8)
                idx = np.asarray(offs, np.int64)
                # the 16 header bytes of every record in one gather (four gathers of one field
                # each cost ~7x more), then its fields
                head = windows(buf, idx, 16).view(order + "u4")
                caplen = head[:, 2].astype(np.int64)
                bad = np.flatnonzero(caplen > limit)
                if bad.size:
                    b = int(bad[0])
                    self.fail(filler.start + offs[b], f"absurd record length {caplen[b]}")
                    idx, caplen, head = idx[:b], caplen[:b], head[:b]
                if idx.size:
                    self.packets += idx.size
                    ts = head[:, 0] + head[:, 1] * unit
                    yield Batch(buf, idx + hdr, caplen, head[:, 3].astype(np.int64), ts,
                                np.full(idx.size, linktype, np.int64))
                if self.error:
                    return
                if window < end and off + hdr <= end and nxt <= end:
                    pos = off  # the batch is full, not the buffer
                    continue
            if off + hdr > end:
                if filler.eof:
                    if off < end or filler.broken:
                        self._truncated(filler, off, "truncated record header")
                    return
            else:
                caplen = caplen_at(raw, off)[0]
                if caplen > limit:
                    self.fail(filler.start + off, f"absurd record length {caplen}")
                    return
                if filler.eof:
                    self._truncated(filler, off, f"truncated record ({caplen} bytes announced)")
                    return
                if hdr + caplen > filler.size:
                    filler.grow(hdr + caplen)
            filler.fill(off)
            pos = 0

    def _truncated(self, filler: _Filler, off: int, what: str) -> None:
        self.fail(filler.start + off, filler.broken or what)

    # -- pcapng -------------------------------------------------------------------------------
    def _pcapng(self) -> Iterator[Batch]:
        filler = _Filler(self.stream, self.buffer_bytes)
        filler.fill(0)
        section = _Section()
        pos = 0
        while True:
            raw, end = filler.raw, filler.end
            epbs: list[int] = []
            extra: list[tuple[int, ...]] = []  # offset, data, caplen, origlen, iface, stamp
            off, why = self._walk_blocks(raw, pos, end, filler.start, section, epbs, extra)
            if epbs or extra:
                batch = self._pcapng_batch(raw, epbs, extra, section, filler.start)
                if batch is not None:
                    self.packets += batch.ts.size
                    yield batch
            if why == "stop" or self.error:
                return
            if why == "section":
                pos = off
                continue
            if filler.eof:
                if off < end or filler.broken:
                    self._truncated(filler, off, "truncated block (file ends inside it)")
                return
            if off + 8 <= end:
                need = struct.unpack_from(section.order + "I", raw, off + 4)[0]
                if need > filler.size:
                    filler.grow(need)
            filler.fill(off)
            pos = 0

    def _walk_blocks(self, raw: bytearray, off: int, end: int, base: int, section: _Section,
                     epbs: list[int], extra: list) -> tuple[int, str]:
        """Walk blocks from ``off``; return where it stopped and why: more, section or stop.

        Runs of Enhanced Packet Blocks take a fast path; their lengths are checked afterwards,
        vectorised, in ``_pcapng_batch``.
        """
        add = epbs.append
        window = min(end, off + BATCH_BYTES)
        head = section.block_head if section.order else None
        while off + 12 <= end:
            if head is not None:
                while True:
                    btype, length = head(raw, off)
                    nxt = off + length
                    if btype != 6 or length < 32 or nxt > window:
                        break
                    add(off)
                    off = nxt
                if btype == 6 and length >= 32 and window < nxt <= end:
                    return off, "section"  # the batch is full, not the buffer
                if off + 12 > end:
                    break
            if raw[off : off + 4] == PCAPNG_SHB:
                if epbs or extra:
                    return off, "section"  # hand out this section's packets before the next one
                if off + 12 > end:
                    break
                bom = raw[off + 8 : off + 12]
                if bom == b"\x1a\x2b\x3c\x4d":
                    order = ">"
                elif bom == b"\x4d\x3c\x2b\x1a":
                    order = "<"
                else:
                    self.fail(base + off, "corrupt pcapng section header (bad byte-order magic)")
                    return off, "stop"
                length = struct.unpack_from(order + "I", raw, off + 4)[0]
                if length < 28 or length % 4 or length > MAX_RECORD:
                    self.fail(base + off, f"corrupt pcapng section header (length {length})")
                    return off, "stop"
                if off + length > end:
                    break
                section.reset(order)
                head = section.block_head
                off += length
                continue
            if section.order is None:
                self.fail(base + off, "pcapng block before any section header")
                return off, "stop"
            btype, length = section.block_head(raw, off)
            if length < 12 or length % 4 or length > MAX_RECORD:
                self.fail(base + off, f"corrupt pcapng block (type {btype:#x}, length {length})")
                return off, "stop"
            nxt = off + length
            if nxt > end:
                break
            if section.block_tail(raw, nxt - 4) != length:
                why = f"type {btype:#x}, trailing length differs"
                self.fail(base + off, f"corrupt pcapng block ({why})")
                return off, "stop"
            if btype == 6:
                add(off)
            elif btype == 1:
                section.add_interface(raw, off, length)
            elif btype in (2, 3):
                packet = section.simple_packet(raw, off, length, btype)
                if packet is not None:
                    extra.append(packet)
            off = nxt
        return off, "more"

    def _pcapng_batch(self, raw: bytearray, epbs: list[int], extra: list, section: _Section,
                      base: int) -> Batch | None:
        buf = np.frombuffer(raw, np.uint8)
        u32 = words(buf, section.order + "u4")
        idx = np.asarray(epbs, np.int64)
        length = u32[idx + 4].astype(np.int64)
        iface = u32[idx + 8].astype(np.int64)
        stamp = (u32[idx + 12].astype(np.uint64) << np.uint64(32)) | u32[idx + 16]
        caplen = u32[idx + 20].astype(np.int64)
        origlen = u32[idx + 24].astype(np.int64)
        tail = (length % 4 == 0) & (u32[np.minimum(idx + length - 4, buf.size - PAD)] == length)
        data = idx + 28
        offsets = idx
        if extra:
            ex = np.asarray(extra, np.int64)
            offsets = np.concatenate([idx, ex[:, 0]])
            data = np.concatenate([data, ex[:, 1]])
            caplen = np.concatenate([caplen, ex[:, 2]])
            origlen = np.concatenate([origlen, ex[:, 3]])
            iface = np.concatenate([iface, ex[:, 4]])
            stamp = np.concatenate([stamp, ex[:, 5].astype(np.uint64)])  # -1 wraps to the max
            length = np.concatenate([length, ex[:, 2] + 32])
            tail = np.concatenate([tail, np.ones(len(extra), bool)])  # checked in the walk
            order = np.argsort(offsets, kind="stable")
            offsets, data, caplen, origlen, iface, stamp, length, tail = (
                a[order] for a in (offsets, data, caplen, origlen, iface, stamp, length, tail))
        known = iface < len(section.linktypes)
        bad = ~tail | ~known | (caplen > length - 32)
        if bad.any():
            b = int(np.flatnonzero(bad)[0])
            why = ("trailing length differs" if not tail[b] else
                   "unknown interface" if not known[b] else "packet longer than its block")
            self.fail(base + int(offsets[b]), f"corrupt pcapng packet block ({why})")
            data, caplen, origlen, iface, stamp = (
                a[:b] for a in (data, caplen, origlen, iface, stamp))
            if not data.size:
                return None
        linktypes = np.asarray(section.linktypes, np.int64)[iface]
        units = np.asarray(section.units, np.float64)[iface]
        shifts = np.asarray(section.offsets, np.float64)[iface]
        ts = stamp.astype(np.float64) * units + shifts
        if extra:  # Simple Packet Blocks carry no time: give them the time of the packet before
            timed = stamp != np.uint64(2**64 - 1)
            if not timed.all():
                before = np.maximum.accumulate(np.where(timed, np.arange(ts.size), 0))
                ts = np.where(timed, ts, np.where(timed[before], ts[before], 0.0))
        return Batch(buf, data, caplen, origlen, ts, linktypes)


class _Section:
    """Interfaces and byte order of the current pcapng section."""

    def __init__(self) -> None:
        self.order: str | None = None
        self.reset(None)

    def reset(self, order: str | None) -> None:
        self.order = order
        self.linktypes: list[int] = []
        self.snaplens: list[int] = []
        self.units: list[float] = []
        self.offsets: list[float] = []
        if order:
            self._head = struct.Struct(order + "II").unpack_from
            self._u32 = struct.Struct(order + "I").unpack_from

    def block_head(self, raw: bytearray, off: int) -> tuple[int, int]:
        return self._head(raw, off)

    def block_tail(self, raw: bytearray, off: int) -> int:
        return self._u32(raw, off)[0]

    def add_interface(self, raw: bytearray, off: int, length: int) -> None:
        o = self.order
        linktype, snaplen = struct.unpack_from(o + "HxxI", raw, off + 8)
        unit, shift = 1e-6, 0.0
        pos, end = off + 16, off + length - 4
        while pos + 4 <= end:
            code, size = struct.unpack_from(o + "HH", raw, pos)
            if code == 0:
                break
            value = bytes(raw[pos + 4 : pos + 4 + size])
            if code == 9 and size >= 1:
                v = value[0]
                unit = 2.0 ** -(v & 0x7F) if v & 0x80 else 10.0 ** -v
            elif code == 14 and size >= 8:
                shift = float(struct.unpack(o + "q", value[:8])[0])
            pos += 4 + ((size + 3) & ~3)
        self.linktypes.append(linktype)
        self.snaplens.append(snaplen)
        self.units.append(unit)
        self.offsets.append(shift)

    def simple_packet(self, raw: bytearray, off: int, length: int, btype: int):
        """A Simple Packet Block (3) or obsolete Packet Block (2) as an ``extra`` tuple."""
        o = self.order
        if btype == 3:
            if not self.linktypes or length < 16:
                return None
            origlen = self._u32(raw, off + 8)[0]
            caplen = min(origlen, length - 16, self.snaplens[0] or origlen)
            return (off, off + 12, caplen, origlen, 0, -1)  # no timestamp: see _pcapng_batch
        if length < 32:
            return None
        iface, _drops, hi, lo, caplen, origlen = struct.unpack_from(o + "HHIIII", raw, off + 8)
        return (off, off + 28, caplen, origlen, iface, (hi << 32) | lo)


class _Gunzip:
    """A gzip file as a stream that keeps everything before a damaged or missing end (unlike
    ``gzip.GzipFile``, which loses the data of the read that hits the damage).  Zero bytes after
    the last member are padding (tape blocks, preallocated files), as ``gzip -d`` reads them."""

    STEP = 1 << 20
    SALVAGE = 256  # input bytes per step when a damaged piece is decompressed again

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.z = zlib.decompressobj(31)
        self.out = b""
        self.done = False
        self.error: str | None = None

    def readinto(self, view: memoryview) -> int:
        while not self.out and not self.done:
            data = self.z.unconsumed_tail or self.raw.read(self.STEP)
            if not data:
                if not self.z.eof:
                    self.error = "compressed stream ends early"
                self.done = True
                break
            before = self.z.copy()
            try:
                self.out = self.z.decompress(data, self.STEP * 4)
            except zlib.error as exc:
                self.out = self._salvage(before, data)
                self.error = f"corrupt compressed stream ({exc})"
                self.done = True
                break
            rest = self.z.unused_data
            if self.z.eof and rest.strip(b"\0"):  # a further gzip member follows
                self.z = zlib.decompressobj(31)
                try:
                    self.out += self.z.decompress(rest, self.STEP * 4)
                except zlib.error as exc:
                    self.error = f"corrupt compressed stream after a member ({exc})"
                    self.done = True
        n = min(len(self.out), len(view))
        view[:n] = self.out[:n]
        self.out = self.out[n:]
        return n

    def _salvage(self, z: Any, data: bytes) -> bytes:
        """What ``data`` decompresses to before the damage, fed in small steps."""
        out = bytearray()
        for start in range(0, len(data), self.SALVAGE):
            try:
                out += z.decompress(data[start : start + self.SALVAGE])
            except zlib.error:
                break
        return bytes(out)

    def read(self, n: int) -> bytes:
        out = bytearray(n)
        got = 0
        while got < n:
            step = self.readinto(memoryview(out)[got:])
            if not step:
                break
            got += step
        return bytes(out[:got])


class _Prefixed:
    """A stream with a few already-read bytes put back in front."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head = head
        self.stream = stream

    def readinto(self, view: memoryview) -> int:
        if self.head:
            n = min(len(self.head), len(view))
            view[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        return self.stream.readinto(view)

    @property
    def error(self) -> str | None:
        return getattr(self.stream, "error", None)

    def read(self, n: int) -> bytes:
        out = bytearray(n)
        got = self.readinto(memoryview(out))
        return bytes(out[:got])


def gunzip(path: Path) -> tuple[bytes, str | None]:
    """A whole gzip file's content, and if it is damaged, the bytes before the damage and why."""
    with open(path, "rb") as raw:
        stream = _Gunzip(raw)
        parts = []
        while chunk := stream.read(_Gunzip.STEP * 4):
            parts.append(chunk)
        return b"".join(parts), stream.error


def gunzip_head(path: Path, size: int) -> bytes:
    """The first bytes inside a gzip file (as many as survive damage)."""
    with open(path, "rb") as raw:
        return _Gunzip(raw).read(size)

