"""Count every byte of a client connection by wrapping the top of mitmproxy's layer stack.

mitmproxy keeps no byte counters and passes ignored (passthrough) connections through below all
flow hooks.  Every event of a connection enters its handler's top layer and every command leaves
through it, so a thin wrapper there sees the exact bytes the client sent (``DataReceived`` from
the client) and was sent (``SendData`` to the client), whatever the layers below decide: HTTP,
TLS interception, passthrough, raw TCP, UDP.  It costs one generator step per event.  When the
client resets a TCP connection, the kernel's count of the bytes it acknowledged corrects the
bytes sent down to the bytes delivered (``settle_delivery``).

This uses mitmproxy's internal layer API (``Proxyserver.connections``, ``ConnectionHandler.layer``,
proxy events and commands); pyproject pins mitmproxy to a range the tests exercise.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Generator
from typing import Any

from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpResponseHeadersHook

from observer.sources.proxy.traffic import Traffic

DataReceived = events.DataReceived
ConnectionClosed = events.ConnectionClosed
SendData = commands.SendData
RequestHeaders = HttpRequestHeadersHook
ResponseHeaders = HttpResponseHeadersHook
# struct tcp_info (linux/tcp.h): tcpi_state is the first byte, tcpi_bytes_acked a u64 at 120.
TCP_CLOSE = 7
BYTES_ACKED = struct.Struct("=Q")
BYTES_ACKED_AT = 120


def bytes_acked(sock: Any) -> tuple[int, int] | None:
    """(TCP state, payload bytes the peer acknowledged) of a socket, or None where the kernel
    cannot tell (not Linux TCP, or a userspace stack such as WireGuard mode's)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError):
        return None
    if len(info) < BYTES_ACKED_AT + 8:
        return None
    return info[0], BYTES_ACKED.unpack_from(info, BYTES_ACKED_AT)[0]


class BodyCounter:
    """A ``stream`` callable that counts a streamed body's bytes and passes them on unchanged."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.n += len(chunk)
        return chunk


def count_streamed(message: Any) -> None:
    """Count the body of a message mitmproxy streams instead of buffering (``stream_large_bodies``
    set ``stream`` to True just before its headers hook); a buffered body is counted from the
    flow at its end, so small bodies keep mitmproxy's usual path."""
    if message is not None and message.stream is True:
        message.stream = BodyCounter()


class CountingLayer:
    """Stands in for a handler's top layer, counting the client's bytes and forwarding the rest.

    The headers hooks of HTTP messages pass through it on their way to the addons too: there it
    counts the client's requests and wraps streamed bodies in a ``BodyCounter``, which saves two
    hook calls per request (mitmproxy dispatches each hook to every addon).
    """

    def __init__(self, inner: Any, traffic: Traffic, sock: Any = None) -> None:
        self.inner = inner
        self.context = inner.context
        self.client = inner.context.client
        self.traffic = traffic
        self.sock = sock

    def __repr__(self) -> str:
        return f"CountingLayer({self.inner!r})"

    def handle_event(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        kind = type(event)
        if kind is DataReceived:
            if event.connection is self.client:
                self.traffic.up(len(event.data), time.time())
        elif kind is ConnectionClosed:
            if event.connection is self.client:
                self.traffic.closed("client")
                self.settle_delivery()
            else:
                self.traffic.closed("server")
        for command in self.inner.handle_event(event):
            kind = type(command)
            if kind is SendData:
                if command.connection is self.client:
                    self.traffic.down(len(command.data), time.time())
            elif kind is RequestHeaders:
                self.traffic.requests += 1
                count_streamed(command.flow.request)
            elif kind is ResponseHeaders:
                count_streamed(command.flow.response)
            yield command

    def settle_delivery(self) -> None:
        """When the client aborted (reset) its TCP connection, the bytes it never acknowledged
        were not delivered: the kernel's own count of acknowledged bytes says how many."""
        sock, self.sock = self.sock, None
        if sock is None:
            return
        acked = bytes_acked(sock)
        sock.close()
        if acked is not None and acked[0] == TCP_CLOSE:
            self.traffic.not_delivered(self.traffic.bytes_down - acked[1])


def attach(master: Any, client: Any, traffic: Traffic) -> CountingLayer | None:
    """Wrap the top layer of ``client``'s connection handler; None if it cannot be found."""
    proxyserver = master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(client.id)
    if handler is None or not hasattr(handler, "layer"):
        return None
    if not isinstance(handler.layer, CountingLayer):
        io = getattr(handler, "transports", {}).get(client)
        writer = getattr(io, "writer", None)
        sock = None
        if client.transport_protocol == "tcp" and isinstance(writer, asyncio.StreamWriter):
            # A second descriptor of the client's socket: asyncio closes its own as soon as a
            # reset arrives, before the layer hears of it; this one keeps the kernel's counts
            # readable until settle_delivery closes it (the socket closes with the last one).
            own = writer.get_extra_info("socket")
            sock = socket.fromfd(own.fileno(), own.family, own.type)
        handler.layer = CountingLayer(handler.layer, traffic, sock)
    return handler.layer
