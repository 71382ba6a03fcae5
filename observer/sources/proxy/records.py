"""What the proxy knows about a connection or an exchange, turned into schema rows.

Plain Python: the addon fills these from mitmproxy's hook data, and the flow-file importer fills
them from saved flows, so live and replayed records are built by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from observer.sources.proxy.traffic import Traffic
from observer.text import network_text

# Which name sources win over which: a TLS SNI names the server better than an HTTP Host header.
NAME_RANK = {"none": 0, "dns": 1, "http": 2, "quic": 3, "sni": 3}


def header_bytes(first_line: str, headers: list[tuple[bytes, bytes]]) -> int:
    """Size of a header block written as HTTP/1 (``name: value\\r\\n`` lines plus the blank line).

    HTTP/2 and HTTP/3 compress headers on the wire, so this is a version-independent measure of
    how much header data an exchange carried, not its exact wire size there.
    """
    return len(first_line) + 2 + sum(len(k) + len(v) + 4 for k, v in headers) + 2


@dataclass(slots=True)
class ConnRecord:
    """The facts gathered about one client connection while it is open."""

    conn_id: str
    device: str
    proto: str
    client_ip: str | None
    client_port: int | None
    proxy_mode: str
    ts_start: float | None
    traffic: Traffic
    server_ip: str | None = None
    server_port: int | None = None
    ts_tcp_setup: float | None = None
    ts_tls_setup: float | None = None
    ts_end: float | None = None
    server_name: str | None = None
    name_source: str = "none"
    alpn: str | None = None
    tls: str = "none"
    tls_error: str | None = None
    close_reason: str | None = None
    client_hello_seen: bool = False
    # Interception results of each side, kept apart so one does not hide the other.
    client_tls_error: str | None = None
    server_tls_error: str | None = None
    connect_error: str | None = None
    # For telling a certificate rejection after the handshake from an idle connection.
    used: bool = False  # the client sent a TCP message (its requests: traffic.requests)
    up_at_handshake: int | None = None
    alert: str | None = None
    counter: Any = None  # the counting layer, to release its socket at the end

    @property
    def spoke(self) -> bool:
        """Whether the client sent a request or TCP data after its handshake (then a close is
        not a certificate rejection)."""
        return self.used or self.traffic.requests > 0

    def name(self, name: str | None, source: str) -> None:
        """Adopt ``name`` unless a better-ranked source already named the server."""
        if name and NAME_RANK[source] > NAME_RANK[self.name_source]:
            self.server_name = network_text(name)
            self.name_source = source

    def settle_tls(self) -> None:
        """``tls``/``tls_error`` of an interception from both sides' results: intercepted only
        when the client's handshake completed and the upstream did not fail; else failed, with
        the upstream's and the client's result both in ``tls_error``."""
        upstream = self.server_tls_error or self.connect_error
        client_done = self.client_tls_error is None and self.ts_tls_setup is not None
        if client_done and upstream is None:
            self.tls, self.tls_error = "intercepted", None
            return
        client = self.client_tls_error or ("client: handshake completed" if client_done else None)
        self.tls = "failed"
        self.tls_error = "; ".join(x for x in (upstream, client) if x) or (
            "handshake did not complete")

    def row(self) -> dict[str, Any]:
        """The connections record (partial while the connection is open)."""
        t = self.traffic
        udp = self.proto in ("udp", "quic")
        return {
            "conn_id": self.conn_id,
            "source": "proxy",
            "device": self.device,
            "proto": self.proto,
            "client_ip": self.client_ip,
            "client_port": self.client_port,
            "server_ip": self.server_ip,
            "server_port": self.server_port,
            "ts_start": self.ts_start,
            "ts_end": self.ts_end,
            "bytes_up": t.bytes_up,
            "bytes_down": t.bytes_down,
            "packets_up": t.packets_up if udp else None,
            "packets_down": t.packets_down if udp else None,
            "server_name": self.server_name,
            "name_source": self.name_source,
            "alpn": self.alpn,
            "tls": self.tls,
            "tls_error": self.tls_error,
            "close_reason": self.close_reason or "open",
            "proxy_mode": self.proxy_mode,
            "ts_tcp_setup": self.ts_tcp_setup,
            "ts_tls_setup": self.ts_tls_setup,
        }


def close_reason(closed_by: str | None, error: str | None) -> str:
    """Who ended a connection: client | server (closed first), error, or idle (neither closed:
    mitmproxy dropped it after ``tcp_timeout``)."""
    if closed_by:
        return closed_by
    return "error" if error else "idle"
