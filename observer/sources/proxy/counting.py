"""Count every byte of a client connection by wrapping the top of mitmproxy's layer stack.

mitmproxy keeps no byte counters and passes ignored (passthrough) connections through below all
flow hooks.  Every event of a connection enters its handler's top layer and every command leaves
through it, so a thin wrapper there sees the exact bytes the client sent (``DataReceived`` from
the client) and was sent (``SendData`` to the client), whatever the layers below decide: HTTP,
TLS interception, passthrough, raw TCP, UDP.  It costs one generator step per event.

This uses mitmproxy's internal layer API (``Proxyserver.connections``, ``ConnectionHandler.layer``,
proxy events and commands); pyproject pins mitmproxy to a range the tests exercise.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

from mitmproxy.proxy import commands, events

from observer.sources.proxy.traffic import Traffic

DataReceived = events.DataReceived
ConnectionClosed = events.ConnectionClosed
SendData = commands.SendData


class CountingLayer:
    """Stands in for a handler's top layer, counting the client's bytes and forwarding the rest."""

    def __init__(self, inner: Any, traffic: Traffic) -> None:
        self.inner = inner
        self.context = inner.context
        self.client = inner.context.client
        self.traffic = traffic

    def __repr__(self) -> str:
        return f"CountingLayer({self.inner!r})"

    def handle_event(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        kind = type(event)
        if kind is DataReceived:
            if event.connection is self.client:
                self.traffic.up(len(event.data), time.time())
        elif kind is ConnectionClosed:
            self.traffic.closed("client" if event.connection is self.client else "server")
        for command in self.inner.handle_event(event):
            if type(command) is SendData and command.connection is self.client:
                self.traffic.down(len(command.data), time.time())
            yield command


def attach(master: Any, client: Any, traffic: Traffic) -> bool:
    """Wrap the top layer of ``client``'s connection handler; False if it cannot be found."""
    proxyserver = master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(client.id)
    if handler is None or not hasattr(handler, "layer"):
        return False
    if not isinstance(handler.layer, CountingLayer):
        handler.layer = CountingLayer(handler.layer, traffic)
    return True
