"""Live activity bins: bytes per connection per time bin, written while a long capture runs.

A deliberately small flow table (5-tuple, a new connection after FIN/RST or a UDP idle gap) so a
run can be looked at before it ends; ``observer replay`` of the files stays the complete record
(names from SNI and DNS are only there).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

from observer.records.jsonl import JsonlWriter

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
TCP, UDP = 6, 17
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
TCP_CLOSED_LINGER_S = 5.0  # keep a closed connection this long so its last ACKs count with it

Key = tuple[int, bytes, int, bytes, int]


@dataclass
class _Conn:
    conn_id: str
    key: Key  # (proto, client ip, client port, server ip, server port)
    ts_start: float
    ts_end: float
    totals: list[int] = field(default_factory=lambda: [0] * 6)  # bytes, packets, wire: up, down
    bins: dict[float, list[int]] = field(default_factory=dict)
    fins: int = 0
    rst: bool = False

    @property
    def closed(self) -> bool:
        return self.rst or self.fins == 3


def parse_ip(frame: bytes | memoryview, linktype: int) -> tuple | None:
    """(proto, src, sport, dst, dport, payload bytes, wire bytes, tcp flags) of a TCP/UDP packet."""
    off = 0
    if linktype == LINKTYPE_ETHERNET:
        if len(frame) < 14:
            return None
        ethertype = (frame[12] << 8) | frame[13]
        off = 14
        while ethertype in (0x8100, 0x88A8) and len(frame) >= off + 4:
            ethertype = (frame[off + 2] << 8) | frame[off + 3]
            off += 4
        if ethertype not in (0x0800, 0x86DD):
            return None
    elif linktype != LINKTYPE_RAW:
        return None
    if len(frame) < off + 20:
        return None
    version = frame[off] >> 4
    if version == 4:
        ihl = (frame[off] & 0x0F) * 4
        wire = (frame[off + 2] << 8) | frame[off + 3]
        proto = frame[off + 9]
        if (frame[off + 6] & 0x1F) or frame[off + 7]:  # a later fragment has no ports
            return None
        src, dst = bytes(frame[off + 12 : off + 16]), bytes(frame[off + 16 : off + 20])
        l4 = off + ihl
        payload = wire - ihl
    elif version == 6 and len(frame) >= off + 40:
        proto = frame[off + 6]
        payload = (frame[off + 4] << 8) | frame[off + 5]
        wire = payload + 40
        src, dst = bytes(frame[off + 8 : off + 24]), bytes(frame[off + 24 : off + 40])
        l4 = off + 40
    else:
        return None
    if proto == TCP and len(frame) >= l4 + 14:
        sport, dport = struct.unpack_from("!HH", frame, l4)
        payload -= (frame[l4 + 12] >> 4) * 4
        return TCP, src, sport, dst, dport, max(payload, 0), wire, frame[l4 + 13]
    if proto == UDP and len(frame) >= l4 + 8:
        sport, dport, length = struct.unpack_from("!HHH", frame, l4)
        return UDP, src, sport, dst, dport, max(length - 8, 0), wire, 0
    return None


def _ip(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


class LiveActivity:
    """Fold captured packets into per-connection bins and write the finished ones as JSONL."""

    def __init__(
        self,
        writer: JsonlWriter,
        *,
        device: str,
        device_ips: tuple[str, ...],
        linktype: int,
        session_id: str,
        bin_s: float = 10.0,
        udp_idle_s: float = 120.0,
    ) -> None:
        self.writer = writer
        self.device = device
        self.device_ips = {socket.inet_pton(_family(ip), ip) for ip in device_ips}
        self.linktype = linktype
        self.session_id = session_id
        self.bin_s = bin_s
        self.udp_idle_s = udp_idle_s
        self.conns: dict[Key, _Conn] = {}
        self.bins_written = 0
        self.connections_written = 0
        self._next_id = 0

    def packet(self, ts: float, frame: bytes | memoryview) -> None:
        parsed = parse_ip(frame, self.linktype)
        if parsed is None:
            return
        proto, src, sport, dst, dport, payload, wire, flags = parsed
        conn = self.conns.get((proto, src, sport, dst, dport))
        up = True
        if conn is None:
            conn = self.conns.get((proto, dst, dport, src, sport))
            up = False
        if conn is not None and self._ended(conn, ts, proto, flags, up):
            self._finish(conn)
            conn = None
        if conn is None:
            up = self._src_is_client(src, dst, proto, flags)
            key = (proto, src, sport, dst, dport) if up else (proto, dst, dport, src, sport)
            self._next_id += 1
            conn = _Conn(f"live-{self.session_id}-{self._next_id}", key, ts, ts)
            self.conns[key] = conn
        conn.ts_end = max(conn.ts_end, ts)
        side = 0 if up else 1
        totals = conn.totals
        totals[side] += payload
        totals[2 + side] += 1
        totals[4 + side] += wire
        start = ts - ts % self.bin_s
        counts = conn.bins.get(start)
        if counts is None:
            counts = conn.bins[start] = [0, 0, 0, 0]
        counts[side] += payload
        counts[2 + side] += 1
        if flags & RST:
            conn.rst = True
        elif flags & FIN:
            conn.fins |= 1 if up else 2

    def _ended(self, conn: _Conn, ts: float, proto: int, flags: int, up: bool) -> bool:
        """A port reused by a new connection: SYN after close, or UDP after an idle gap."""
        if proto == UDP:
            return ts - conn.ts_end > self.udp_idle_s
        return bool(conn.closed and up and flags & SYN and not flags & ACK)

    def _src_is_client(self, src: bytes, dst: bytes, proto: int, flags: int) -> bool:
        if proto == TCP and flags & SYN:
            return not flags & ACK
        if src in self.device_ips or dst in self.device_ips:
            return src in self.device_ips
        return True

    def tick(self, now: float) -> None:
        """Write bins that are complete, and connections that ended."""
        horizon = now - self.bin_s - 1.0
        for conn in list(self.conns.values()):
            self._write_bins(conn, horizon)
            idle = now - conn.ts_end
            proto = conn.key[0]
            if (proto == UDP and idle > self.udp_idle_s) or (
                proto == TCP and conn.closed and idle > TCP_CLOSED_LINGER_S
            ):
                self._finish(conn)

    def close(self) -> None:
        """Write everything still open (the capture is ending)."""
        for conn in list(self.conns.values()):
            self._finish(conn, "end-of-capture")

    def _write_bins(self, conn: _Conn, horizon: float) -> None:
        for start in [s for s in conn.bins if s <= horizon]:
            bytes_up, bytes_down, packets_up, packets_down = conn.bins.pop(start)
            self.writer.write(
                "activity",
                {"conn_id": conn.conn_id, "device": self.device, "ts_bin": start,
                 "bin_s": self.bin_s, "bytes_up": bytes_up, "bytes_down": bytes_down,
                 "packets_up": packets_up, "packets_down": packets_down},
            )
            self.bins_written += 1

    def _finish(self, conn: _Conn, reason: str | None = None) -> None:
        self._write_bins(conn, float("inf"))
        del self.conns[conn.key]
        proto, client, client_port, server, server_port = conn.key
        if reason is None:
            reason = "rst" if conn.rst else "fin" if conn.closed else "idle"
        totals = conn.totals
        self.writer.write(
            "connections",
            {"conn_id": conn.conn_id, "source": "live", "device": self.device,
             "proto": "tcp" if proto == TCP else "udp", "client_ip": _ip(client),
             "client_port": client_port, "server_ip": _ip(server), "server_port": server_port,
             "ts_start": conn.ts_start, "ts_end": conn.ts_end,
             "bytes_up": totals[0], "bytes_down": totals[1],
             "packets_up": totals[2], "packets_down": totals[3],
             "wire_bytes_up": totals[4], "wire_bytes_down": totals[5],
             "name_source": "none", "close_reason": reason},
        )
        self.connections_written += 1


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET
