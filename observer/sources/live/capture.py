"""The capture loop: a BPF-filtered packet socket (scapy) or tcpdump, into rotating pcap files.

Both backends write the same files (``ring.RotatingPcapWriter``) and the same ``sessions`` records,
so the analysis can tell a quiet night (a session, no packets) from a night without capture (no
session).  The session row is written at start, rewritten every ``update_s`` and at stop; readers
keep the last row of each ``session_id``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import mmap
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from observer import ObserverError
from observer.config import Device
from observer.devices import DeviceMap
from observer.records.jsonl import JsonlWriter
from observer.sources.engine import FlowEngine, FlowSettings
from observer.sources.live.ring import (
    RECORD_HEADER,
    SNAPLEN,
    PcapStreamSplitter,
    RotatingPcapWriter,
)
from observer.sources.pcapfile import PAD, Batch, words

SOL_PACKET = 263
PACKET_STATISTICS = 6
PR_SET_PDEATHSIG = 1
F_SETPIPE_SZ = 1031
TCPDUMP_BLOCK_S = 1.0  # libpcap's timeout as tcpdump sets it
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
PACKET_VERSION, TPACKET_V3, PACKET_RX_RING = 10, 2, 5
TP_STATUS_KERNEL, TP_STATUS_USER = 0, 1
RING_BLOCK = 1 << 20  # bytes per ring block; the ring holds --buffer of them
RING_FRAME = 1 << 11
RING_RETIRE_MS = 100  # the kernel hands over a partly filled block after this long
BLOCK_HEADER = struct.Struct("III")  # tpacket_hdr_v1: block_status, num_pkts, offset_to_first_pkt
STATUS = struct.Struct("I")
PACKET_HEADER = struct.Struct("IIIIIIHHIIH")  # tpacket3_hdr up to tp_vlan_tpid
SLL_PKTTYPE = 48 + 10  # sockaddr_ll.sll_pkttype, after the aligned tpacket3_hdr
ARPHRD_ETHER, ARPHRD_LOOPBACK, ARPHRD_NONE = 1, 772, 0xFFFE
LINKTYPE_ETHERNET, LINKTYPE_RAW = 1, 101
LINKTYPES = {ARPHRD_ETHER: LINKTYPE_ETHERNET, ARPHRD_LOOPBACK: LINKTYPE_ETHERNET,
             ARPHRD_NONE: LINKTYPE_RAW}
LIVE_SLACK_S = 2.0  # a bin is complete this long after it ends (tcpdump hands over 1 s blocks)
TCPDUMP_DROPS = re.compile(r"(\d+) packets? dropped by kernel")  # SIGUSR1 and exit summaries


def device_filter(device: Device) -> str:
    """BPF expression that matches every packet to or from the device's addresses."""
    parts = [f"host {ip}" for ip in device.ips] + [f"net {net}" for net in device.prefixes] + [
        f"ether host {mac}" for mac in device.macs]
    return " or ".join(parts)


def interface_linktype(iface: str) -> int:
    """The pcap link type of ``iface``, with one-line errors for a missing or odd interface."""
    base = Path("/sys/class/net")
    type_file = base / iface / "type"
    if not iface or "/" in iface or not type_file.exists():
        have = ", ".join(sorted(p.name for p in base.iterdir())) if base.exists() else "none"
        raise ObserverError(f"no such network interface {iface!r} (this host has: {have})")
    arphrd = int(type_file.read_text())
    if arphrd not in LINKTYPES:
        raise ObserverError(
            f"interface {iface} has link type {arphrd} (not Ethernet or raw IP); "
            "capture it with --backend tcpdump"
        )
    return LINKTYPES[arphrd]


def check_filter(bpf: str, linktype: int) -> None:
    """Compile the filter with libpcap (through scapy) so a typo is one clear line."""
    from scapy.arch.common import compile_filter
    from scapy.error import Scapy_Exception

    try:
        compile_filter(bpf, linktype=linktype)
    except (Scapy_Exception, ImportError) as exc:
        raise ObserverError(f"bad capture filter {bpf!r}: {exc}")


@dataclass
class CaptureOptions:
    iface: str
    bpf: str
    directory: Path  # the ring's directory (captures/<device>)
    device: str
    devices: DeviceMap = field(default_factory=DeviceMap)  # names the records' devices
    backend: str = "scapy"
    filesize: int | None = 100 * 1024 * 1024
    duration_s: float | None = 3600.0
    max_files: int | None = None
    stop_after_s: float | None = None
    records_dir: Path | None = None  # also write live connections and activity here
    buffer_bytes: int = 32 * 1024 * 1024  # kernel capture ring, the same for both backends
    flow: FlowSettings = field(default_factory=FlowSettings)
    update_s: float = 10.0  # session row rewritten this often
    flush_s: float = 0.5  # with the 0.25 s housekeeping tick: a kill -9 loses under 1 s


@dataclass
class CaptureResult:
    session_id: str
    ts_start: float
    ts_end: float
    packets: int
    dropped: int | None
    files: list[Path] = field(default_factory=list)
    deleted: int = 0
    note: str = ""


class SessionLog:
    """The ``sessions`` record of one run, rewritten as it goes so a killed run still counts."""

    def __init__(self, writer: JsonlWriter, opts: CaptureOptions) -> None:
        self.writer = writer
        self.opts = opts
        self.session_id = f"live-{opts.device}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-" \
            f"{uuid.uuid4().hex[:6]}"
        self.ts_start = time.time()
        self._next = 0.0

    def update(self, now: float, packets: int, dropped: int | None, note: str, *,
               force: bool = False) -> None:
        if not force and now < self._next:
            return
        self._next = now + self.opts.update_s
        self.writer.write(
            "sessions",
            {"session_id": self.session_id, "source": "live", "device": self.opts.device,
             "ts_start": self.ts_start, "ts_end": now, "interface": self.opts.iface,
             "filter": self.opts.bpf, "packets_captured": packets, "packets_dropped": dropped,
             "note": f"{note}; backend {self.opts.backend}"},
        )
        self.writer.flush()


def records_batch(records: bytes | bytearray, linktype: int) -> Batch:
    """Pcap records as the capture writes them (16-byte little-endian headers, microseconds)
    as one batch for the flow engine, read exactly as replay reads the file."""
    size = len(records)
    buf = np.zeros(size + PAD, np.uint8)
    buf[:size] = np.frombuffer(records, np.uint8)
    offs = []
    off, caplen_at = 0, RECORD_HEADER.unpack_from
    while off + RECORD_HEADER.size <= size:
        offs.append(off)
        off += RECORD_HEADER.size + caplen_at(records, off)[2]
    idx = np.asarray(offs, np.int64)
    u32 = words(buf, "<u4")
    return Batch(buf, idx + RECORD_HEADER.size, u32[idx + 8].astype(np.int64),
                 u32[idx + 12].astype(np.int64), u32[idx] + u32[idx + 4] * 1e-6,
                 np.full(idx.size, linktype, np.int64))


class LiveRecords:
    """The flow engine (the same as replay's) over the packets the capture writes.  Finished
    connections and complete activity bins go to JSONL as the capture runs, and every
    ``update_s`` a partial row of each open connection that changed (``close_reason`` "open",
    replaced by its final row: readers keep the last row of a ``conn_id``), so a killed capture
    loses only its last seconds; the rest at the end."""

    def __init__(self, writer: JsonlWriter, opts: CaptureOptions, linktype: int) -> None:
        self.writer = writer
        self.linktype = linktype
        self.engine = FlowEngine(opts.flow, self._write, devices=opts.devices, source="live")
        self.checkpoint_s = opts.update_s
        self._next_checkpoint = 0.0

    def _write(self, table: str, frame: pd.DataFrame) -> None:
        for row in frame.to_dict("records"):
            self.writer.write(table, row)

    def feed(self, records: bytes | bytearray) -> None:
        if records:
            self.engine.feed(records_batch(records, self.linktype))

    def tick(self, now: float) -> None:
        self.engine.flush(now, slack_s=LIVE_SLACK_S)
        if now >= self._next_checkpoint:
            self._next_checkpoint = now + self.checkpoint_s
            self.engine.checkpoint()

    def close(self) -> None:
        self.engine.flush(None)


class StopFlag:
    """Set by SIGINT/SIGTERM (or by the caller) to end the loop cleanly."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = "stopped"

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.reason = f"stopped by {signal.Signals(signum).name}"
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


def run_capture(
    opts: CaptureOptions, stop: StopFlag, on_start: Callable[[], None] | None = None
) -> CaptureResult:
    """Capture until ``stop`` is set or ``stop_after_s`` passes; return what was captured.

    ``on_start`` is called once the capture is running (after every check has passed).
    """
    linktype = interface_linktype(opts.iface)
    check_filter(opts.bpf, linktype)
    if opts.backend == "tcpdump" and shutil.which("tcpdump") is None:
        raise ObserverError("--backend tcpdump: tcpdump is not installed (apt-get install tcpdump)")
    # the backend starts first: tcpdump is forked before any of our threads exist
    backend = ScapyBackend(opts, linktype) if opts.backend == "scapy" else \
        TcpdumpBackend(opts, linktype)
    sessions = writer = activity = None
    try:
        sessions = JsonlWriter(opts.records_dir or opts.directory, f"sessions-{opts.device}",
                               flush_s=opts.flush_s)
        session = SessionLog(sessions, opts)
        writer = RotatingPcapWriter(
            opts.directory, opts.device, linktype, filesize=opts.filesize,
            duration_s=opts.duration_s, max_files=opts.max_files, flush_s=opts.flush_s,
        )
        if opts.records_dir is not None:
            activity = LiveRecords(
                JsonlWriter(opts.records_dir, f"live-{opts.device}", flush_s=opts.flush_s),
                opts, linktype)
        session.update(time.time(), 0, 0, "running", force=True)
        if on_start is not None:
            on_start()
        try:
            backend.loop(writer, activity, session, stop)
            backend.close()
            writer.close()
        except OSError as exc:  # e.g. the disk is full: keep what is written, say so, stop
            problem = f"{exc.filename or writer.path}: {exc.strerror or exc}"
            session.update(time.time(), writer.packets, backend.dropped, f"error: {problem}",
                           force=True)
            raise ObserverError(f"capture stopped after {writer.packets} packets: {problem}")
        now = time.time()
        session.update(now, writer.packets, backend.dropped, stop.reason, force=True)
        return CaptureResult(session.session_id, session.ts_start, now, writer.packets,
                             backend.dropped, writer.files, writer.deleted, stop.reason)
    finally:
        with contextlib.suppress(OSError):  # after an error: close what can still be closed
            backend.close()
            if writer is not None:
                writer.close()
        if activity is not None:
            activity.close()
            activity.writer.close()
        if sessions is not None:
            sessions.close()


class ScapyBackend:
    """Scapy's ``L2ListenSocket`` (its BPF compiled and attached by scapy), read through the
    kernel's TPACKET_V3 ring: one wake-up per block of packets instead of one system call per
    packet, and no dissection.  Measured: a quarter of the CPU per packet of one ``recvmsg`` per
    packet (docs/performance.md)."""

    def __init__(self, opts: CaptureOptions, linktype: int) -> None:
        from scapy.arch.linux import L2ListenSocket
        from scapy.error import Scapy_Exception

        self.opts = opts
        self.dropped = 0
        # scapy warns that it cannot dissect raw-IP links; we never dissect, so keep it quiet
        logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
        try:
            self.sock = L2ListenSocket(iface=opts.iface, filter=opts.bpf, promisc=True)
        except PermissionError:
            raise ObserverError(
                f"capturing on {opts.iface} needs root or the CAP_NET_RAW and CAP_NET_ADMIN "
                "capabilities (see docs/capture.md)"
            )
        except (Scapy_Exception, OSError) as exc:
            raise ObserverError(f"cannot capture on {opts.iface} with filter {opts.bpf!r}: {exc}")
        raw = self.sock.ins
        self.raw = raw
        self.skip_outgoing = int(Path(f"/sys/class/net/{opts.iface}/type").read_text()) == \
            ARPHRD_LOOPBACK  # loopback shows each packet twice, like libpcap we keep one
        self.blocks = max(2, opts.buffer_bytes // RING_BLOCK)
        try:
            raw.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            raw.setsockopt(SOL_PACKET, PACKET_RX_RING, struct.pack(
                "7I", RING_BLOCK, self.blocks, RING_FRAME, RING_BLOCK // RING_FRAME * self.blocks,
                RING_RETIRE_MS, 0, 0))
            self.ring = mmap.mmap(raw.fileno(), RING_BLOCK * self.blocks, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
            self.view = memoryview(self.ring)
        except OSError as exc:
            self.sock.close()
            raise ObserverError(f"cannot set up the capture ring on {opts.iface}: {exc}")

    def _read_drops(self) -> int:
        """Kernel drops since the socket opened (PACKET_STATISTICS resets on each read)."""
        _packets, drops = struct.unpack("II", self.raw.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.dropped += drops
        return self.dropped

    def _block(self, index: int) -> tuple[bytearray, int] | None:
        """The records of ring block ``index`` if the kernel has handed it over, else None."""
        ring = self.ring
        base = index * RING_BLOCK
        status, count, first = BLOCK_HEADER.unpack_from(ring, base + 8)
        if not status & TP_STATUS_USER:
            return None
        view = self.view
        header = RECORD_HEADER.pack
        unpack = PACKET_HEADER.unpack_from
        records = bytearray()
        kept = 0
        offset = base + first
        for _ in range(count):
            step, sec, nsec, caplen, wirelen, pstatus, mac, _net, _hash, tci, tpid = \
                unpack(ring, offset)
            start = offset + mac
            data = view[start:start + caplen]
            if self.skip_outgoing and ring[offset + SLL_PKTTYPE] == PACKET_OUTGOING:
                offset += step
                continue
            if pstatus & TP_STATUS_VLAN_VALID:
                data = _with_vlan_tag(data, pstatus, tci, tpid)
                caplen += 4
                wirelen += 4
            records += header(sec, nsec // 1000, caplen, wirelen)
            records += data
            kept += 1
            offset += step
        STATUS.pack_into(ring, base + 8, TP_STATUS_KERNEL)  # hand the block back
        return records, kept

    def loop(self, writer: RotatingPcapWriter, activity: LiveRecords | None,
             session: SessionLog, stop: StopFlag) -> None:
        index = 0
        deadline = time.time() + self.opts.stop_after_s if self.opts.stop_after_s else None
        next_tick = 0.0
        poller = select.poll()
        poller.register(self.raw, select.POLLIN | select.POLLERR)
        while True:
            block = self._block(index)
            if block is not None:
                writer.write_records(*block)
                if activity is not None:
                    activity.feed(block[0])
                index = (index + 1) % self.blocks
            now = time.time()
            if now >= next_tick:
                writer.tick(now)
                if activity is not None:
                    activity.tick(now)
                session.update(now, writer.packets, self._read_drops(), "running")
                next_tick = now + 0.25
            if deadline is not None and now >= deadline:
                stop.reason = "stopped after --stop-after"
                stop.event.set()
            if stop.is_set():
                break
            if block is None:
                poller.poll(200)
        # what the kernel already handed over; it retires a partly filled block within 0.1 s
        time.sleep(RING_RETIRE_MS / 1000 * 1.5)
        for _ in range(self.blocks):
            block = self._block(index)
            if block is None:
                break
            writer.write_records(*block)
            if activity is not None:
                activity.feed(block[0])
            index = (index + 1) % self.blocks
        self._read_drops()

    def close(self) -> None:
        if not self.ring.closed:
            with contextlib.suppress(BufferError):  # a view still held by an error's traceback
                self.view.release()
                self.ring.close()
        self.sock.close()


def _with_vlan_tag(frame: memoryview, status: int, tci: int, tpid: int) -> bytes:
    """Put back the 802.1Q tag the kernel moved into the packet's metadata."""
    tpid = tpid if status & TP_STATUS_VLAN_TPID_VALID else 0x8100
    return bytes(frame[:12]) + struct.pack("!HH", tpid, tci) + bytes(frame[12:])


def _die_with_parent() -> None:
    """In the tcpdump child: end when the observer dies, even by kill -9."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class TcpdumpBackend:
    """Run ``tcpdump -w -`` and cut its pcap stream into the same rotating files."""

    def __init__(self, opts: CaptureOptions, linktype: int) -> None:
        self.opts = opts
        self.linktype = linktype
        self.dropped: int | None = None
        self._stderr: deque[str] = deque(maxlen=20)
        self._listening = threading.Event()
        command = [
            "tcpdump", "-i", opts.iface, "-w", "-", "-U", "-n", "-s", str(SNAPLEN),
            "-B", str(max(1, opts.buffer_bytes // 1024)), "-Z", "root", "--", opts.bpf,
        ]
        # not --immediate-mode: it cut tcpdump's drop-free rate by more than half (measured).  So
        # libpcap hands packets over in blocks at most TCPDUMP_BLOCK_S old, and tcpdump drops the
        # block still open when it stops: the loop waits that long after a stop request.  Its own
        # session keeps a terminal's Ctrl-C from reaching it before that.
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=_die_with_parent, start_new_session=True)
        with contextlib.suppress(OSError):  # a larger pipe absorbs our pauses (1 MiB: default max)
            fcntl.fcntl(self.proc.stdout, F_SETPIPE_SZ, 1 << 20)
        self._err_thread = threading.Thread(target=self._read_stderr, daemon=True)
        self._err_thread.start()
        deadline = time.monotonic() + 10
        while not self._listening.wait(0.05):
            if self.proc.poll() is not None:
                raise self._failure()
            if time.monotonic() > deadline:
                self.close()
                raise ObserverError(f"tcpdump did not start capturing on {opts.iface} in 10 s")

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            text = line.decode(errors="replace").strip()
            self._stderr.append(text)
            if "listening on" in text:
                self._listening.set()
            match = TCPDUMP_DROPS.search(text)
            if match:
                self.dropped = int(match[1])

    def _failure(self) -> ObserverError:
        self._err_thread.join(timeout=2)
        lines = [s for s in self._stderr if s and "listening on" not in s]
        message = lines[-1] if lines else f"exit status {self.proc.returncode}"
        if "permission" in message.lower() or "not permitted" in message.lower():
            return ObserverError(
                f"capturing on {self.opts.iface} needs root or the CAP_NET_RAW and CAP_NET_ADMIN "
                f"capabilities (tcpdump: {message})"
            )
        return ObserverError(f"tcpdump stopped: {message}")

    def loop(self, writer: RotatingPcapWriter, activity: LiveRecords | None,
             session: SessionLog, stop: StopFlag) -> None:
        fd = self.proc.stdout.fileno()
        splitter = PcapStreamSplitter()
        deadline = time.time() + self.opts.stop_after_s if self.opts.stop_after_s else None
        next_stats = 0.0
        stopping = 0.0  # when to stop tcpdump, once a stop was requested
        interrupted = False
        while True:
            ready, _, _ = select.select([fd], [], [], 0.2)
            chunk = os.read(fd, 1 << 20) if ready else b""
            if ready and not chunk:
                break  # tcpdump exited and its output is drained
            records = splitter.feed(chunk)
            for record in records:
                writer.write_record(record)
            if activity is not None:
                activity.feed(b"".join(records))
            if chunk:
                writer.flush()  # the data is already up to a second old (libpcap's blocks)
            if splitter.linktype is not None and splitter.linktype != self.linktype:
                raise ObserverError(f"tcpdump wrote link type {splitter.linktype}, expected "
                                    f"{self.linktype}")
            now = time.time()
            writer.tick(now)
            if activity is not None:
                activity.tick(now)
            session.update(now, writer.packets, self.dropped, "running")
            alive = self._listening.is_set() and self.proc.poll() is None
            if not stopping and alive and now >= next_stats:
                self.proc.send_signal(signal.SIGUSR1)  # tcpdump prints its counters
                next_stats = now + self.opts.update_s / 2
            if not stopping and deadline is not None and now >= deadline:
                stop.reason = "stopped after --stop-after"
                stop.event.set()
            if not stopping and stop.is_set():
                stopping = now + TCPDUMP_BLOCK_S + 0.2
            if stopping and now >= stopping and not interrupted and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                interrupted = True
        self.proc.wait()
        self._err_thread.join(timeout=5)
        if not stopping:
            if not writer.packets:
                raise self._failure()
            stop.reason = f"tcpdump exited: {self._failure()}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
