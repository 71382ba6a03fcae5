"""End to end: a real mitmdump with the telemetry addon, a local TLS upstream, real clients.

Clients reach mitmdump through a counting TCP relay made here, so each test knows the exact bytes
the client sent and received on its connection and compares them with the connection record
(matched by the relay's source port, which is the record's client_port).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import ipaddress
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mitmproxy import dns
from websockets.sync.client import connect as ws_connect

from observer.records import read_table
from observer.sources import mitmflows
from observer.sources.proxy import jsonl_import

ROOT = Path(__file__).resolve().parents[1]
MITMDUMP = Path(sys.executable).with_name("mitmdump")
NAMES = ["localhost", "pinned.test", "ignored.test", "late-pin.test", "idle.test"]


# --- a throwaway PKI -------------------------------------------------------------------------

def make_pki(directory: Path) -> tuple[Path, Path, Path]:
    """CA cert, server cert and server key files (server valid for NAMES and 127.0.0.1)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "observer test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(n) for n in NAMES] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = (directory / n for n in ("ca.pem", "server.pem", "key.pem"))
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return ca_file, cert_file, key_file


# --- the upstream: HTTP/1.1 (+ WebSocket echo) and HTTP/2 over TLS, and a plain TCP echo -------

def response_size(target: str) -> int:
    m = re.search(r"size=(\d+)", target)
    return int(m.group(1)) if m else 100


async def serve_h1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        lines = head.decode().split("\r\n")
        target = lines[0].split(" ")[1]
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
        if headers.get("upgrade", "").lower() == "websocket":
            accept = base64.b64encode(hashlib.sha1(
                (headers["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()
            ).digest()).decode()
            writer.write(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n".encode())
            await ws_echo(reader, writer)
            return
        await reader.readexactly(int(headers.get("content-length", 0)))
        body = b"x" * response_size(target)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        if headers.get("connection", "").lower() == "close":
            return


async def ws_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo each client frame back twice as long (so up and down sizes differ)."""
    while True:
        b0, b1 = await reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2), "big")
        mask = await reader.readexactly(4)
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(await reader.readexactly(n)))
        opcode = b0 & 0x0F
        if opcode == 8:
            writer.write(bytes([0x88, len(data)]) + data)
            await writer.drain()
            return
        out = data * 2
        size = bytes([len(out)]) if len(out) < 126 else bytes([126]) + len(out).to_bytes(2, "big")
        writer.write(bytes([0x80 | opcode]) + size + out)
        await writer.drain()


async def serve_h2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    paths: dict[int, str] = {}
    while data := await reader.read(65536):
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                paths[event.stream_id] = dict(event.headers)[b":path"].decode()
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                body = b"y" * response_size(paths[event.stream_id])
                conn.send_headers(event.stream_id, [(":status", "200"),
                                                    ("content-length", str(len(body)))])
                conn.send_data(event.stream_id, body, end_stream=True)
        writer.write(conn.data_to_send())
        await writer.drain()


class FakeDns(asyncio.DatagramProtocol):
    """Answers every A query with 10.1.2.3 (the upstream of mitmdump's DNS mode)."""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        query = dns.DNSMessage.unpack(data)
        answer = dns.ResourceRecord.A(query.questions[0].name,
                                      ipaddress.IPv4Address("10.1.2.3"), ttl=60)
        self.transport.sendto(query.succeed([answer]).packed, addr)


class Upstream:
    """The servers, on an event loop in a thread."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(cert, key)
        self.tls.set_alpn_protocols(["h2", "http/1.1"])
        # WebSocket needs HTTP/1.1 upstream; mitmproxy may open the upstream TLS connection
        # before the client's ClientHello tells it which ALPN the client wants.
        self.tls_h1 = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls_h1.load_cert_chain(cert, key)
        self.tls_h1.set_alpn_protocols(["http/1.1"])
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)

    async def _tls_conn(self, reader, writer) -> None:
        try:
            alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
            await (serve_h2 if alpn == "h2" else serve_h1)(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _plain_http(self, reader, writer) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await serve_h1(reader, writer)
        writer.close()

    async def _echo(self, reader, writer) -> None:
        while data := await reader.read(65536):
            writer.write(data[::-1])
            await writer.drain()
        writer.close()

    async def _start(self) -> None:
        tls = await asyncio.start_server(self._tls_conn, "127.0.0.1", 0, ssl=self.tls)
        http = await asyncio.start_server(self._plain_http, "127.0.0.1", 0)
        self.http_port = http.sockets[0].getsockname()[1]
        echo = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        ws = await asyncio.start_server(self._tls_conn, "127.0.0.1", 0, ssl=self.tls_h1)
        self.ws_port = ws.sockets[0].getsockname()[1]
        transport, _ = await self.loop.create_datagram_endpoint(
            FakeDns, local_addr=("127.0.0.1", 0))
        self.tls_port = tls.sockets[0].getsockname()[1]
        self.echo_port = echo.sockets[0].getsockname()[1]
        self.dns_port = transport.get_extra_info("sockname")[1]
        self.ready.set()

    def _run(self) -> None:
        self.loop.run_until_complete(self._start())
        self.loop.run_forever()


# --- a counting relay in front of mitmdump -----------------------------------------------------

class Relay:
    """Forwards each client connection to the proxy and counts its bytes in each direction."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.done: list[dict[str, int]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        proxy = socket.create_connection(self.target)
        counts = {"client_port": proxy.getsockname()[1], "up": 0, "down": 0, "late_up": 0}
        proxy_closed = threading.Event()

        def pump(src: socket.socket, dst: socket.socket, key: str) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
                    counts[key] += len(data)
                    if key == "up" and proxy_closed.is_set():
                        counts["late_up"] += len(data)
            if key == "down":
                proxy_closed.set()
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        up = threading.Thread(target=pump, args=(client, proxy, "up"))
        up.start()
        pump(proxy, client, "down")
        up.join()
        client.close()
        proxy.close()
        with self.lock:
            self.done.append(counts)

    def finished(self, n: int, timeout: float = 10) -> list[dict[str, int]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.done) >= n:
                    return sorted(self.done, key=lambda c: c["client_port"])
            time.sleep(0.05)
        raise AssertionError(f"relay saw {len(self.done)} finished connections, wanted {n}")

    def close(self) -> None:
        self.server.close()


# --- mitmdump with the addon, once per module --------------------------------------------------

def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mitmdump:
    """A real mitmdump with the telemetry addon on 127.0.0.1, in the given modes; its log is kept
    and its JSONL records read back. Test modules subclass it for their modes."""

    def __init__(self, tmp: Path, ca: Path, modes: list[str], extra: tuple[str, ...] = ()) -> None:
        self.dir = tmp / "records"
        self.mitm_ca = tmp / "conf" / "mitmproxy-ca-cert.pem"
        args = [str(MITMDUMP), "-s", str(ROOT / "addons" / "telemetry.py"),
                "--listen-host", "127.0.0.1"]
        for mode in modes:
            args += ["--mode", mode]
        args += ["--set", f"confdir={tmp / 'conf'}",
                 "--set", f"ssl_verify_upstream_trusted_ca={ca}",
                 "--set", r"ignore_hosts=^ignored\.test:",
                 "--set", f"observer_dir={self.dir}",
                 "--set", "observer_bin_s=1",
                 "--set", "observer_checkpoint_s=1",
                 "--set", "flow_detail=0", *extra]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp
        )
        self.log: list[str] = []
        deadline = time.monotonic() + 30
        while self._listening() < len(modes) and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log.append(line)
        assert self._listening() == len(modes), "mitmdump did not start:\n" + "".join(self.log)
        threading.Thread(target=self._drain, daemon=True).start()

    def _listening(self) -> int:
        return sum("listening at" in line for line in self.log)

    def listening_port(self, pattern: str) -> int:
        """The port of the server whose start-up line matches ``pattern`` (one group)."""
        for line in self.log:
            if m := re.search(pattern, line):
                return int(m.group(1))
        raise AssertionError(f"no line matches {pattern!r}:\n" + "".join(self.log))

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)

    def tables(self) -> dict:
        return jsonl_import.read(self.dir / "live")

    def conn(self, client_port: int, timeout: float = 10, final: bool = True) -> dict:
        """The (final) connection record of a client port (waits for the JSONL flush)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.dir / "live").exists():
                conns = self.tables()["connections"]
                hit = conns[(conns.client_port == client_port)
                            & ((conns.close_reason != "open") | (not final))]
                if len(hit):
                    return hit.iloc[-1].to_dict()
            time.sleep(0.1)
        raise AssertionError(f"no final record for client port {client_port}:\n"
                             + "".join(self.log[-20:]))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Proxy(Mitmdump):
    """mitmdump in regular mode, plus a DNS mode (as WireGuard mode handles DNS) to FakeDns."""

    def __init__(self, tmp: Path, ca: Path, dns_upstream: int) -> None:
        self.flows = tmp / "flows.mitm"
        self.dns_port = free_udp_port()
        super().__init__(
            tmp, ca,
            ["regular@0", f"reverse:dns://127.0.0.1:{dns_upstream}@{self.dns_port}"],
            ("-w", str(self.flows), "--set", "stream_large_bodies=1m"),
        )
        self.port = self.listening_port(r"HTTP\(S\) proxy listening at 127\.0\.0\.1:(\d+)")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not MITMDUMP.exists():
        pytest.skip("mitmdump is not installed next to this Python")
    tmp = tmp_path_factory.mktemp("proxy")
    ca, cert, key = make_pki(tmp)
    upstream = Upstream(cert, key)
    proxy = Proxy(tmp, ca, upstream.dns_port)
    yield proxy, upstream, ca
    proxy.stop()
    upstream.loop.call_soon_threadsafe(upstream.loop.stop)


def client_tls(cafile: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    return ctx


def check_counts(proxy: Proxy, counts: dict[str, int]) -> dict:
    """The record of a relayed connection has exactly the relay's byte counts, and its activity
    bins add up to them."""
    rec = proxy.conn(counts["client_port"])
    assert rec["bytes_down"] == counts["down"]
    # Bytes a client sends after the proxy closed (a TLS close_notify racing the close) are
    # never read by the proxy: the record has all bytes, or all but those.
    assert rec["bytes_up"] in (counts["up"], counts["up"] - counts["late_up"])
    act = proxy.tables()["activity"]
    mine = act[act.conn_id == rec["conn_id"]]
    assert (mine.bytes_up.sum(), mine.bytes_down.sum()) == (rec["bytes_up"], rec["bytes_down"])
    assert rec["proxy_mode"] == "regular" and rec["source"] == "proxy"
    return rec


def connect_tunnel(relay: Relay, host: str, port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", relay.port))
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return sock


# --- the tests ---------------------------------------------------------------------------------

def test_intercepted_http1_counts_bytes_and_redacts_queries(lab):
    proxy, upstream, _ = lab
    relay = Relay(proxy.port)
    base = f"https://localhost:{upstream.tls_port}"
    with httpx.Client(proxy=relay.url, verify=client_tls(proxy.mitm_ca)) as client:
        assert client.get(f"{base}/h1?token=secret&size=1234").content == b"x" * 1234
        assert client.post(f"{base}/up?size=10", content=b"u" * 5000).status_code == 200
        # Bodies over stream_large_bodies (1m) are streamed, and counted as they pass.
        assert len(client.get(f"{base}/big?size=2500000").content) == 2_500_000
        assert client.post(f"{base}/up?size=10", content=b"u" * 3_000_000).status_code == 200
    (counts,) = relay.finished(1)
    rec = check_counts(proxy, counts)
    assert rec["tls"] == "intercepted" and pd_null(rec["tls_error"])
    assert (rec["server_name"], rec["name_source"], rec["alpn"]) == ("localhost", "sni", "http/1.1")
    assert rec["server_port"] == upstream.tls_port and rec["ts_tls_setup"] >= rec["ts_start"]
    http = proxy.tables()["http"]
    rows = http[http.conn_id == rec["conn_id"]].sort_values("ts_request")
    assert list(rows.path) == ["/h1?token=*&size=*", "/up?size=*", "/big?size=*", "/up?size=*"]
    assert list(rows.method) == ["GET", "POST", "GET", "POST"]
    assert list(rows.status) == [200] * 4
    assert list(rows.request_body_bytes) == [0, 5000, 0, 3_000_000]
    assert list(rows.response_body_bytes) == [1234, 10, 2_500_000, 10]
    assert "secret" not in (proxy.dir / "live").joinpath(
        next((proxy.dir / "live").glob("*.jsonl")).name).read_text()


def test_intercepted_http2(lab):
    proxy, upstream, _ = lab
    relay = Relay(proxy.port)
    with httpx.Client(proxy=relay.url, verify=client_tls(proxy.mitm_ca), http2=True) as client:
        r = client.get(f"https://localhost:{upstream.tls_port}/two?size=3000")
        assert r.http_version == "HTTP/2" and len(r.content) == 3000
    (counts,) = relay.finished(1)
    rec = check_counts(proxy, counts)
    assert (rec["tls"], rec["alpn"], rec["server_name"]) == ("intercepted", "h2", "localhost")
    http = proxy.tables()["http"]
    row = http[http.conn_id == rec["conn_id"]].iloc[0]
    assert (row.http_version, row.path, row.response_body_bytes) == (
        "HTTP/2.0", "/two?size=*", 3000)


def test_websocket_messages(lab):
    proxy, upstream, _ = lab
    relay = Relay(proxy.port)
    with ws_connect(f"wss://localhost:{upstream.ws_port}/ws", proxy=relay.url,
                    ssl=client_tls(proxy.mitm_ca), compression=None, open_timeout=30) as ws:
        for size in (5, 50, 300):
            ws.send("m" * size)
            assert len(ws.recv(timeout=30)) == 2 * size  # a lost message fails, never hangs
    (counts,) = relay.finished(1)
    rec = check_counts(proxy, counts)
    assert rec["tls"] == "intercepted"
    ws_rows = proxy.tables()["websocket"]
    mine = ws_rows[ws_rows.conn_id == rec["conn_id"]].sort_values("ts")
    assert list(mine[mine.direction == "up"].bytes) == [5, 50, 300]
    assert list(mine[mine.direction == "down"].bytes) == [10, 100, 600]


def tls_request(sock: socket.socket, ca: Path, sni: str) -> bytes:
    """One HTTP/1.1 request over TLS that trusts only the test CA (a pinning client)."""
    with client_tls(ca).wrap_socket(sock, server_hostname=sni) as tls:
        tls.sendall(f"GET /pinned?size=777 HTTP/1.1\r\nHost: {sni}\r\n"
                    "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        return data


def test_pinned_client_fails_then_passes_through(lab):
    proxy, upstream, ca = lab
    relay = Relay(proxy.port)
    sock = connect_tunnel(relay, "127.0.0.1", upstream.tls_port)
    with pytest.raises(ssl.SSLError):
        tls_request(sock, ca, "pinned.test")
    sock.close()
    (failed,) = relay.finished(1)
    rec = check_counts(proxy, failed)
    assert rec["tls"] == "failed" and "client" in rec["tls_error"]
    assert rec["server_name"] == "pinned.test"
    sock = connect_tunnel(relay, "127.0.0.1", upstream.tls_port)
    reply = tls_request(sock, ca, "pinned.test")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"x" * 777)
    second = next(c for c in relay.finished(2) if c["client_port"] != failed["client_port"])
    rec = check_counts(proxy, second)
    assert (rec["tls"], rec["server_name"], rec["name_source"]) == (
        "passthrough", "pinned.test", "sni")
    http = proxy.tables()["http"]
    assert not (http.conn_id == rec["conn_id"]).any()


def test_ignored_host_passes_through(lab):
    proxy, upstream, ca = lab
    relay = Relay(proxy.port)
    sock = connect_tunnel(relay, "127.0.0.1", upstream.tls_port)
    assert tls_request(sock, ca, "ignored.test").endswith(b"x" * 777)
    (counts,) = relay.finished(1)
    rec = check_counts(proxy, counts)
    assert (rec["tls"], rec["server_name"]) == ("passthrough", "ignored.test")
    assert rec["server_port"] == upstream.tls_port and rec["ts_tcp_setup"] >= rec["ts_start"]


def test_plain_tcp(lab):
    proxy, upstream, _ = lab
    relay = Relay(proxy.port)
    sock = connect_tunnel(relay, "127.0.0.1", upstream.echo_port)
    payload = bytes(range(256)) * 40
    sock.sendall(payload)
    echoed = b""
    while len(echoed) < len(payload) and (chunk := sock.recv(65536)):
        echoed += chunk
    sock.close()
    assert echoed == payload[::-1]
    (counts,) = relay.finished(1)
    rec = check_counts(proxy, counts)
    assert (rec["tls"], rec["server_port"], rec["name_source"]) == (
        "none", upstream.echo_port, "none")


def test_dns_answers_and_udp_counts(lab):
    proxy, _, _ = lab
    query = dns.DNSMessage(
        id=7, query=True, op_code=0, authoritative_answer=False, truncation=False,
        recursion_desired=True, recursion_available=False, reserved=0, response_code=0,
        questions=[dns.Question("backup.example.test", 1, 1)], answers=[], authorities=[],
        additionals=[]).packed
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(query, ("127.0.0.1", proxy.dns_port))
        reply = s.recv(4096)
        port = s.getsockname()[1]
    assert [str(a.ipv4_address) for a in dns.DNSMessage.unpack(reply).answers] == ["10.1.2.3"]
    rec = proxy.conn(port, final=False)
    assert (rec["proto"], rec["tls"], rec["proxy_mode"]) == ("udp", "none", "reverse")
    assert (rec["bytes_up"], rec["bytes_down"]) == (len(query), len(reply))
    assert (rec["packets_up"], rec["packets_down"]) == (1, 1)
    answers = proxy.tables()["dns"]
    assert answers[["query", "answer_type", "answer", "ttl"]].values.tolist() == [
        ["backup.example.test", "A", "10.1.2.3", 60]]


def pinning_client(sock: socket.socket, cas: list[Path], sni: str, pin: bytes) -> bytes | None:
    """A client that trusts ``cas`` (the lab's and the public one) and pins the server
    certificate ``pin`` (DER), checked after the handshake as OkHttp's CertificatePinner does:
    on a mismatch it closes at once, without a request; else it makes one request and returns
    the reply."""
    ctx = client_tls(cas[0])
    for ca in cas[1:]:
        ctx.load_verify_locations(cafile=str(ca))
    ctx.set_alpn_protocols(["x-observer-test", "http/1.1"])
    tls = ctx.wrap_socket(sock, server_hostname=sni)
    if tls.getpeercert(binary_form=True) != pin:
        tls.close()
        return None
    with tls:
        tls.sendall(f"GET /p?size=321 HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n"
                    .encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        return data


def test_pinning_after_the_handshake_fails_then_passes_through(lab):
    """The client trusts the proxy's CA but pins the real certificate: its first connection is
    failed ('pinned after handshake'), the next ones pass through, counted exactly, with the
    ALPN list the client offered."""
    proxy, upstream, ca = lab
    pin = ssl.PEM_cert_to_DER_cert((ca.parent / "server.pem").read_text())
    relay = Relay(proxy.port)
    cas = [proxy.mitm_ca, ca]
    assert pinning_client(connect_tunnel(relay, "127.0.0.1", upstream.tls_port), cas,
                          "late-pin.test", pin) is None
    (first,) = relay.finished(1)
    rec = check_counts(proxy, first)
    assert (rec["tls"], rec["tls_error"], rec["server_name"]) == (
        "failed", "pinned after handshake", "late-pin.test")
    seen = {first["client_port"]}
    for n in (2, 3):
        reply = pinning_client(connect_tunnel(relay, "127.0.0.1", upstream.tls_port),
                               cas, "late-pin.test", pin)
        assert reply is not None and reply.endswith(b"x" * 321)
        (counts,) = [c for c in relay.finished(n) if c["client_port"] not in seen]
        seen.add(counts["client_port"])
        rec = check_counts(proxy, counts)
        assert (rec["tls"], rec["server_name"], rec["alpn"]) == (
            "passthrough", "late-pin.test", "x-observer-test,http/1.1")
        assert pd_null(rec["tls_error"])


def test_idle_connections_are_not_taken_for_pinning(lab):
    """A client that opens a connection, leaves it idle past the pinning window and closes it
    stays intercepted, and so do its later connections."""
    proxy, upstream, _ = lab
    relay = Relay(proxy.port)
    sock = connect_tunnel(relay, "127.0.0.1", upstream.tls_port)
    tls = client_tls(proxy.mitm_ca).wrap_socket(sock, server_hostname="idle.test")
    time.sleep(1.3)  # the addon's observer_pin_window_s is 1 s
    tls.close()
    (idle,) = relay.finished(1)
    rec = check_counts(proxy, idle)
    assert (rec["tls"], rec["server_name"]) == ("intercepted", "idle.test")
    sock = connect_tunnel(relay, "127.0.0.1", upstream.tls_port)
    assert tls_request(sock, proxy.mitm_ca, "idle.test").endswith(b"x" * 777)
    (later,) = [c for c in relay.finished(2) if c["client_port"] != idle["client_port"]]
    assert check_counts(proxy, later)["tls"] == "intercepted"


def test_upstream_tls_failure_is_failed_with_both_sides(lab):
    """The upstream's certificate does not match the name: failed with the upstream's reason,
    and the client side's result kept next to it."""
    proxy, upstream, _ = lab
    relay = Relay(proxy.port)
    sock = connect_tunnel(relay, "127.0.0.1", upstream.tls_port)
    reply = tls_request(sock, proxy.mitm_ca, "wrong-name.test")
    assert reply.startswith(b"HTTP/1.1 502")
    (counts,) = relay.finished(1)
    rec = check_counts(proxy, counts)
    assert rec["tls"] == "failed", rec
    assert rec["tls_error"].startswith("server: ") and "verify failed" in rec["tls_error"]
    assert rec["tls_error"].endswith("; client: handshake completed")


def test_failed_connect_keeps_host_port_and_error(lab):
    proxy, _, _ = lab
    closed = free_udp_port()  # nothing listens on this TCP port either, most likely
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(f"CONNECT localhost:{closed} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        reply = sock.recv(4096)
        port = sock.getsockname()[1]
    assert reply.startswith(b"HTTP/1.1 502"), reply
    rec = proxy.conn(port)
    assert (rec["server_name"], rec["server_port"]) == ("localhost", closed)
    assert rec["tls_error"].startswith("connect: ") and len(rec["tls_error"]) > 12


def test_aborted_download_counts_what_the_client_received(lab):
    """A client reads part of a 40 MB download, stops reading until the transfer stalls, and
    resets the connection: bytes_down and the body size are what reached its socket."""
    proxy, upstream, _ = lab
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    host = f"127.0.0.1:{upstream.http_port}"
    sock.sendall(f"GET http://{host}/big?size=40000000 HTTP/1.1\r\nHost: {host}\r\n\r\n"
                 .encode())
    data = b""
    while len(data) < 3_000_000:
        data += sock.recv(1 << 20)
    queued, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 0.5:  # until the proxy cannot send more
        now = struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]
        if now != queued:
            queued, stable_since = now, time.monotonic()
        time.sleep(0.05)
    received = len(data) + queued
    port = sock.getsockname()[1]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset: the queued bytes reached the socket, the rest never did
    rec = proxy.conn(port)
    assert received < 40_000_000 and rec["bytes_down"] == received
    act = proxy.tables()["activity"]
    assert act[act.conn_id == rec["conn_id"]].bytes_down.sum() == received
    http = proxy.tables()["http"]
    (row,) = http[http.conn_id == rec["conn_id"]].itertuples()
    assert row.response_body_bytes == received - (data.index(b"\r\n\r\n") + 4)


def test_stop_writes_parquet_and_flow_file_replays(lab):
    """Runs last: stopping mitmdump converts the run to Parquet and saves the flow file."""
    proxy, upstream, _ = lab
    live = proxy.tables()
    assert proxy.stop() == 0, "".join(proxy.log[-20:])
    assert not any("Traceback" in line for line in proxy.log), "".join(proxy.log)
    conns = read_table(proxy.dir, "connections")
    final = live["connections"]
    assert set(conns.conn_id) == set(final.conn_id)
    merged = conns.merge(final, on="conn_id", suffixes=("", "_live"))
    assert (merged.bytes_up == merged.bytes_up_live).all()
    assert len(read_table(proxy.dir, "http")) == len(live["http"]) >= 4
    sessions = read_table(proxy.dir, "sessions")
    assert len(sessions) == 1 and sessions.ts_end.notna().all()

    head = proxy.flows.read_bytes()[:4096]
    assert mitmflows.sniff(head, proxy.flows)
    replayed = mitmflows.read(proxy.flows, None)
    http_cols = ["conn_id", "method", "host", "path", "status", "request_body_bytes",
                 "response_body_bytes", "request_header_bytes", "response_header_bytes"]
    key = ["conn_id", "path"]
    assert (replayed["http"][http_cols].sort_values(key).reset_index(drop=True)
            .equals(live["http"][http_cols].sort_values(key).reset_index(drop=True)))
    ws_live = live["websocket"].sort_values("ts").reset_index(drop=True)
    ws_replayed = replayed["websocket"].sort_values("ts").reset_index(drop=True)
    assert ws_replayed[["conn_id", "direction", "bytes"]].equals(
        ws_live[["conn_id", "direction", "bytes"]])
    # The plain TCP flow was saved at its end: its connection replays exactly.
    dns_cols = ["query", "answer_type", "answer", "ttl"]
    assert replayed["dns"][dns_cols].equals(live["dns"][dns_cols])
    tcp_live = final[final.server_port == upstream.echo_port]
    tcp_replayed = replayed["connections"].set_index("conn_id")
    (tcp_conn,) = tcp_live.itertuples()
    replayed_tcp = tcp_replayed.loc[tcp_conn.conn_id]
    assert (replayed_tcp.bytes_up, replayed_tcp.bytes_down) == (
        tcp_conn.bytes_up, tcp_conn.bytes_down)


def pd_null(value) -> bool:
    return value is None or value != value or str(value) == "<NA>"
