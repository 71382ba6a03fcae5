"""End to end, other proxy modes: SOCKS5 (plain TCP and TLS passthrough) and reverse HTTP/3.

One real mitmdump with the addon listens in both modes on 127.0.0.1.  As in test_proxy_e2e.py,
clients reach it through counting relays (TCP, or UDP for QUIC), so each test knows the exact
bytes (and for UDP, datagrams) its client sent and received, and compares them with the record.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pytest
from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ProtocolNegotiated
from test_proxy_e2e import MITMDUMP, Mitmdump, Relay, Upstream, make_pki, pd_null, tls_request

H3_BODY = 2500  # response body size of the HTTP/3 upstream


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- an HTTP/3 upstream (aioquic) -----------------------------------------------------------

class H3Server(QuicConnectionProtocol):
    """Answers each request with H3_BODY bytes once its body (if any) has ended."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h3: H3Connection | None = None

    def quic_event_received(self, event) -> None:
        if isinstance(event, ProtocolNegotiated):
            self.h3 = H3Connection(self._quic)
        if self.h3 is None:
            return
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived | DataReceived) and ev.stream_ended:
                body = b"z" * H3_BODY
                self.h3.send_headers(ev.stream_id, [(b":status", b"200"),
                                                    (b"content-length", str(len(body)).encode())])
                self.h3.send_data(ev.stream_id, body, end_stream=True)
        self.transmit()


class H3Client(QuicConnectionProtocol):
    """Collects one response per stream."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.bodies: dict[int, bytearray] = {}
        self.done: dict[int, asyncio.Future] = {}

    def quic_event_received(self, event) -> None:
        for ev in self.h3.handle_event(event):
            if isinstance(ev, DataReceived):
                self.bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data)
            if isinstance(ev, HeadersReceived | DataReceived) and ev.stream_ended:
                self.done[ev.stream_id].set_result(bytes(self.bodies.get(ev.stream_id, b"")))

    async def post(self, authority: str, path: str, body: bytes) -> bytes:
        stream = self._quic.get_next_available_stream_id()
        self.done[stream] = asyncio.get_running_loop().create_future()
        self.h3.send_headers(stream, [
            (b":method", b"POST"), (b":scheme", b"https"), (b":authority", authority.encode()),
            (b":path", path.encode()), (b"content-length", str(len(body)).encode())])
        self.h3.send_data(stream, body, end_stream=True)
        self.transmit()
        return await asyncio.wait_for(self.done[stream], 5)


class H3Upstream:
    """The aioquic HTTP/3 server on an event loop in a thread."""

    def __init__(self, cert: Path, key: Path) -> None:
        config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
        config.load_cert_chain(cert, key)
        self.port = free_port(socket.SOCK_DGRAM)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            self.loop.run_until_complete(
                serve("127.0.0.1", self.port, configuration=config, create_protocol=H3Server))
            started.set()
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        assert started.wait(10)


class UdpRelay:
    """Forwards one client's datagrams to the proxy and back, counting bytes and datagrams."""

    def __init__(self, target_port: int) -> None:
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.connect(("127.0.0.1", target_port))
        self.port = self.front.getsockname()[1]
        self.client_port = self.back.getsockname()[1]
        self.counts = {"up": 0, "down": 0, "packets_up": 0, "packets_down": 0}
        self.stopped = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        peer = None
        while not self.stopped:
            ready, _, _ = select.select([self.front, self.back], [], [], 0.1)
            for sock in ready:
                data, addr = sock.recvfrom(65536)
                if sock is self.front:
                    peer = addr
                    self.back.send(data)
                    self.counts["up"] += len(data)
                    self.counts["packets_up"] += 1
                elif peer is not None:
                    self.front.sendto(data, peer)
                    self.counts["down"] += len(data)
                    self.counts["packets_down"] += 1

    def close(self) -> None:
        self.stopped = True
        time.sleep(0.2)
        self.front.close()
        self.back.close()


# --- mitmdump in SOCKS5 and reverse HTTP/3 modes ----------------------------------------------

class ModesProxy(Mitmdump):
    def __init__(self, tmp: Path, ca: Path, h3_upstream: int) -> None:
        self.socks_port = free_port(socket.SOCK_STREAM)
        self.h3_port = free_port(socket.SOCK_DGRAM)
        super().__init__(tmp, ca, [
            f"socks5@{self.socks_port}",
            f"reverse:http3://127.0.0.1:{h3_upstream}@{self.h3_port}",
        ])


@pytest.fixture(scope="module")
def modes(tmp_path_factory):
    if not MITMDUMP.exists():
        pytest.skip("mitmdump is not installed next to this Python")
    tmp = tmp_path_factory.mktemp("modes")
    ca, cert, key = make_pki(tmp)
    upstream = Upstream(cert, key)
    h3 = H3Upstream(cert, key)
    proxy = ModesProxy(tmp, ca, h3.port)
    yield proxy, upstream, h3, ca
    proxy.stop()
    assert not any("Traceback" in line for line in proxy.log), "".join(proxy.log)
    for loop in (upstream.loop, h3.loop):
        loop.call_soon_threadsafe(loop.stop)


def socks5_connect(relay: Relay, port: int) -> socket.socket:
    """A SOCKS5 CONNECT to 127.0.0.1:port (no authentication), by hand."""
    sock = socket.create_connection(("127.0.0.1", relay.port))
    sock.sendall(b"\x05\x01\x00")
    assert sock.recv(2) == b"\x05\x00"
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
    reply = b""
    while len(reply) < 10:
        reply += sock.recv(10 - len(reply))
    assert reply[:2] == b"\x05\x00", reply
    return sock


def check_socks(proxy: ModesProxy, counts: dict[str, int], server_port: int) -> dict:
    rec = proxy.conn(counts["client_port"])
    assert rec["bytes_down"] == counts["down"]
    # A TLS close_notify the client sends after the proxy closed is never read by the proxy
    # (as in test_proxy_e2e.check_counts): the record has all bytes, or all but those.
    assert rec["bytes_up"] in (counts["up"], counts["up"] - counts["late_up"])
    act = proxy.tables()["activity"]
    mine = act[act.conn_id == rec["conn_id"]]
    assert (mine.bytes_up.sum(), mine.bytes_down.sum()) == (rec["bytes_up"], rec["bytes_down"])
    assert (rec["proxy_mode"], rec["proto"], rec["server_port"]) == (
        "socks5", "tcp", server_port)
    return rec


# --- the tests ---------------------------------------------------------------------------------

def test_socks5_plain_tcp(modes):
    proxy, upstream, _, _ = modes
    relay = Relay(proxy.socks_port)
    sock = socks5_connect(relay, upstream.echo_port)
    payload = bytes(range(256)) * 30
    sock.sendall(payload)
    echoed = b""
    while len(echoed) < len(payload) and (chunk := sock.recv(65536)):
        echoed += chunk
    sock.close()
    assert echoed == payload[::-1]
    (counts,) = relay.finished(1)
    # SOCKS greeting (3) + CONNECT (10) up, method choice (2) + reply (10) down, then the echo.
    assert (counts["up"], counts["down"]) == (13 + len(payload), 12 + len(payload))
    rec = check_socks(proxy, counts, upstream.echo_port)
    assert rec["bytes_up"] == counts["up"]  # no TLS close_notify here: exact, not just close
    assert (rec["tls"], rec["name_source"]) == ("none", "none") and pd_null(rec["server_name"])
    relay.close()


def test_socks5_ignored_host_passes_through(modes):
    proxy, upstream, _, ca = modes
    relay = Relay(proxy.socks_port)
    sock = socks5_connect(relay, upstream.tls_port)
    assert tls_request(sock, ca, "ignored.test").endswith(b"x" * 777)
    (counts,) = relay.finished(1)
    rec = check_socks(proxy, counts, upstream.tls_port)
    assert (rec["tls"], rec["server_name"], rec["name_source"]) == (
        "passthrough", "ignored.test", "sni")
    assert pd_null(rec["tls_error"]) and pd_null(rec["alpn"])
    http = proxy.tables()["http"]
    assert not (http.conn_id == rec["conn_id"]).any()
    relay.close()


def test_socks5_intercepted_tls(modes):
    proxy, upstream, _, _ = modes
    relay = Relay(proxy.socks_port)
    sock = socks5_connect(relay, upstream.tls_port)
    reply = tls_request(sock, proxy.dir.parent / "conf" / "mitmproxy-ca-cert.pem", "localhost")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"x" * 777)
    (counts,) = relay.finished(1)
    rec = check_socks(proxy, counts, upstream.tls_port)
    assert (rec["tls"], rec["server_name"], rec["name_source"]) == (
        "intercepted", "localhost", "sni")
    assert rec["ts_start"] <= rec["ts_tcp_setup"] and rec["ts_start"] <= rec["ts_tls_setup"]
    http = proxy.tables()["http"]
    (row,) = http[http.conn_id == rec["conn_id"]].itertuples()
    assert (row.method, row.path, row.http_version, row.response_body_bytes) == (
        "GET", "/pinned?size=*", "HTTP/1.1", 777)
    relay.close()


def test_socks5_pinned_client_fails_then_passes_through(modes):
    proxy, upstream, _, ca = modes
    relay = Relay(proxy.socks_port)
    sock = socks5_connect(relay, upstream.tls_port)
    with pytest.raises(ssl.SSLError):
        tls_request(sock, ca, "pinned.test")
    sock.close()
    (failed,) = relay.finished(1)
    rec = check_socks(proxy, failed, upstream.tls_port)
    assert (rec["tls"], rec["server_name"]) == ("failed", "pinned.test")
    assert rec["tls_error"].startswith("client: ")
    sock = socks5_connect(relay, upstream.tls_port)
    assert tls_request(sock, ca, "pinned.test").endswith(b"x" * 777)
    second = next(c for c in relay.finished(2) if c["client_port"] != failed["client_port"])
    rec = check_socks(proxy, second, upstream.tls_port)
    assert (rec["tls"], rec["server_name"], rec["name_source"]) == (
        "passthrough", "pinned.test", "sni")
    relay.close()


def test_reverse_http3(modes):
    proxy, _, h3, _ = modes
    relay = UdpRelay(proxy.h3_port)
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN,
                               verify_mode=ssl.CERT_NONE, server_name="localhost")

    async def exchange() -> bytes:
        async with connect("127.0.0.1", relay.port, configuration=config,
                           create_protocol=H3Client) as client:
            body = await client.post("localhost", "/h3?token=secret", b"q" * 3000)
            client.close()
            await client.wait_closed()
            return body

    assert asyncio.run(exchange()) == b"z" * H3_BODY
    proxy.conn(relay.client_port)  # the final record: the proxy has seen the close
    time.sleep(0.3)  # let the last datagrams of the close reach the relay
    relay.close()
    counts = relay.counts
    rec = proxy.conn(relay.client_port)
    assert (rec["bytes_up"], rec["bytes_down"]) == (counts["up"], counts["down"])
    assert (rec["packets_up"], rec["packets_down"]) == (
        counts["packets_up"], counts["packets_down"])
    assert (rec["proto"], rec["proxy_mode"], rec["tls"]) == ("quic", "reverse", "intercepted")
    assert (rec["server_name"], rec["alpn"], rec["server_port"]) == ("localhost", "h3", h3.port)
    assert rec["ts_start"] <= rec["ts_tls_setup"] <= rec["ts_end"]
    act = proxy.tables()["activity"]
    mine = act[act.conn_id == rec["conn_id"]]
    assert (mine.bytes_up.sum(), mine.bytes_down.sum()) == (counts["up"], counts["down"])
    http = proxy.tables()["http"]
    (row,) = http[http.conn_id == rec["conn_id"]].itertuples()
    # Reverse mode rewrites the request to the upstream's address.
    assert (row.http_version, row.method, row.host, row.path, row.status) == (
        "HTTP/3", "POST", "127.0.0.1", "/h3?token=*", 200)
    assert (row.request_body_bytes, row.response_body_bytes) == (3000, H3_BODY)


def test_no_stray_addon_failures(modes):
    """Runs last: the addon logged no failure in these modes."""
    proxy = modes[0]
    assert not any("observer:" in line and "failed" in line for line in proxy.log), (
        "".join(proxy.log))
