"""What the telemetry addon costs mitmdump, side by side in one run, on three workloads.

    .venv/bin/python benchmarks/proxy.py [--rounds 5] [--connections 200] [--requests 2000]
                                         [--upload-mb 200]

Everything runs on loopback: an upstream (HTTPS keep-alive server and a TCP sink) in its own
process, mitmdump in regular mode with and without the addon (a fresh one per round and
configuration, alternating), clients here.  The workloads:
  * new HTTPS connection per request (intercepted): CONNECT, TLS handshake with mitmproxy's
    certificate, one GET, close; the ClientHello is parsed once (by mitmproxy);
  * keep-alive HTTPS requests: GETs over 4 intercepted TLS connections;
  * passthrough bulk transfer: a 200 MB upload through a CONNECT tunnel to an ignored host.
mitmdump's CPU seconds for each workload (steady on a shared machine) and the clients' rates
are medians over rounds; cost = addon / plain - 1.  The addon's record of each passthrough
upload is checked against the bytes sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MITMDUMP = Path(sys.executable).with_name("mitmdump")
CHUNK = bytes(range(256)) * 1024


# --- upstream (run in a child process with --serve) ---------------------------------------------

async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.search(rb"content-length:\s*(\d+)", head, re.I)
            left = int(m.group(1)) if m else 0
            while left:
                left -= len(await reader.read(min(left, 1 << 20)))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"r" * 100)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read an 8-byte length, then that many bytes; answer with the count received.

    (No half-close: mitmproxy closes a CONNECT tunnel outright when the client half-closes.)
    """
    left = int.from_bytes(await reader.readexactly(8), "big")
    n = 0
    while left > n and (data := await reader.read(1 << 20)):
        n += len(data)
    writer.write(n.to_bytes(8, "big"))
    await writer.drain()
    writer.close()


def _self_signed(directory: Path) -> ssl.SSLContext:
    """A TLS server context with a throwaway self-signed certificate (mitmdump runs with
    ssl_insecure, as the benchmark is about the proxy, not about verifying the upstream)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def _serve() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tls = _self_signed(Path(tmp))
    https = await asyncio.start_server(_http, "127.0.0.1", 0, ssl=tls)
    sink = await asyncio.start_server(_sink, "127.0.0.1", 0)
    print(json.dumps({"https": https.sockets[0].getsockname()[1],
                      "sink": sink.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.Event().wait()


# --- mitmdump ------------------------------------------------------------------------------------

class Mitmdump:
    def __init__(self, tmp: Path, sink_port: int, addon: bool) -> None:
        self.records = tmp / f"records-{time.monotonic_ns()}"
        self.ca = tmp / "conf" / "mitmproxy-ca-cert.pem"
        cmd = [str(MITMDUMP), "--listen-host", "127.0.0.1", "--listen-port", "0",
               "--set", f"confdir={tmp / 'conf'}", "--set", "flow_detail=0",
               "--set", "stream_large_bodies=1m", "--set", "ssl_insecure=true",
               "--set", f"ignore_hosts=^127\\.0\\.0\\.1:{sink_port}$"]
        if addon:
            cmd += ["-s", str(ROOT / "addons" / "telemetry.py"),
                    "--set", f"observer_dir={self.records}", "--set", "observer_parquet=false"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        for line in self.proc.stdout:
            if m := re.search(r"listening at 127\.0\.0\.1:(\d+)", line):
                self.port = int(m.group(1))
                break
        else:
            raise SystemExit("mitmdump did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def cpu_s(self) -> float:
        """CPU seconds (user + system) mitmdump has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


# --- clients -------------------------------------------------------------------------------------

def _tunnel(proxy: int, port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy))
    s.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += s.recv(4096)
    return s


def _get(tls: ssl.SSLSocket, buf: bytes) -> bytes:
    tls.sendall(b"GET /ping?i=1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0 and len(buf) >= end + 4 + 100:
            return buf[end + 104:]
        buf += tls.recv(65536)


def _parallel(work, total: int, clients: int = 4) -> float:
    """Run ``work(n)`` in ``clients`` threads sharing ``total``; items per second."""
    threads = [threading.Thread(target=work, args=(total // clients,)) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total // clients * clients / (time.perf_counter() - start)


def new_connections_per_s(proxy: int, port: int, total: int, ca: Path) -> float:
    """HTTPS requests/s, each on a new intercepted connection (CONNECT, handshake, GET)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["http/1.1"])

    def work(n: int) -> None:
        for _ in range(n):
            with ctx.wrap_socket(_tunnel(proxy, port), server_hostname="localhost") as tls:
                _get(tls, b"")

    return _parallel(work, total)


def keepalive_requests_per_s(proxy: int, port: int, total: int, ca: Path) -> float:
    """HTTPS requests/s over 4 intercepted keep-alive connections."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["http/1.1"])

    def work(n: int) -> None:
        with ctx.wrap_socket(_tunnel(proxy, port), server_hostname="localhost") as tls:
            buf = b""
            for _ in range(n):
                buf = _get(tls, buf)

    return _parallel(work, total)


def tunnel_upload(proxy: int, sink_port: int, size: int) -> tuple[float, int, int]:
    """MiB/s, bytes the client sent, and the relay's client port."""
    with socket.create_connection(("127.0.0.1", proxy)) as s:
        connect = f"CONNECT 127.0.0.1:{sink_port} HTTP/1.1\r\n\r\n".encode()
        start = time.perf_counter()
        s.sendall(connect)
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += s.recv(4096)
        # The payload must not start with letters: mitmproxy's next_layer looks for an HTTP
        # request line with a regex that is quadratic on a long run of letters.
        s.sendall(size.to_bytes(8, "big"))
        for _ in range(size // len(CHUNK)):
            s.sendall(CHUNK)
        got = b""
        while len(got) < 8 and (chunk := s.recv(8)):
            got += chunk
        elapsed = time.perf_counter() - start
        assert int.from_bytes(got, "big") == size, f"the sink got {got!r}, not {size} bytes"
        return size / elapsed / 2**20, len(connect) + 8 + size, s.getsockname()[1]


def counted_up(records: Path, client_port: int, timeout: float = 10) -> int | None:
    """bytes_up of the addon's final record for a client port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for f in sorted((records / "live").glob("*.jsonl")):
            for line in f.read_text().splitlines():
                row = json.loads(line)
                if (row["table"] == "connections" and row["client_port"] == client_port
                        and row["close_reason"] != "open"):
                    return row["bytes_up"]
        time.sleep(0.2)
    return None


def layer_overhead_ns(events: int = 200_000) -> tuple[float, float]:
    """ns per DataReceived event through a minimal relaying layer, without and with the
    addon's CountingLayer around it (the whole per-chunk cost of the addon on passthrough)."""
    from types import SimpleNamespace

    from mitmproxy.proxy import commands
    from mitmproxy.proxy import events as ev

    from observer.sources.proxy.counting import CountingLayer
    from observer.sources.proxy.traffic import Traffic

    client, server = object(), object()

    class Relay:
        context = SimpleNamespace(client=client)

        def handle_event(self, event):
            yield commands.SendData(client, event.data)

    def run(layer) -> float:
        event = ev.DataReceived(server, CHUNK[:65536])
        start = time.perf_counter_ns()
        for _ in range(events):
            for _ in layer.handle_event(event):
                pass
        return (time.perf_counter_ns() - start) / events

    plain = min(run(Relay()) for _ in range(3))
    counted = min(run(CountingLayer(Relay(), Traffic(10.0))) for _ in range(3))
    return plain, counted


WORKLOADS = ("new HTTPS connection/s", "keep-alive HTTPS requests/s", "passthrough MiB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--upload-mb", type=int, default=200)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layer-only", action="store_true",
                        help="only measure the counting layer's cost per event")
    args = parser.parse_args()
    if args.layer_only:
        plain, counted = layer_overhead_ns()
        print(f"counting layer: {plain:.0f} -> {counted:.0f} ns per event")
        return
    if args.serve:
        asyncio.run(_serve())
        return
    size = args.upload_mb * 2**20
    upstream = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE,
                                text=True)
    ports = json.loads(upstream.stdout.readline())
    configs = {"mitmdump": False, "mitmdump + addon": True}
    rate: dict[str, dict[str, list[float]]] = {c: {w: [] for w in WORKLOADS} for c in configs}
    cpu: dict[str, dict[str, list[float]]] = {c: {w: [] for w in WORKLOADS} for c in configs}
    exact = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, addon in configs.items():
                m = Mitmdump(Path(tmp), ports["sink"], addon)
                try:
                    for label, fn, fargs in (
                        (WORKLOADS[0], new_connections_per_s,
                         (m.port, ports["https"], args.connections, m.ca)),
                        (WORKLOADS[1], keepalive_requests_per_s,
                         (m.port, ports["https"], args.requests, m.ca)),
                        (WORKLOADS[2], tunnel_upload, (m.port, ports["sink"], size)),
                    ):
                        before = m.cpu_s()
                        value = fn(*fargs)
                        cpu[name][label].append(m.cpu_s() - before)
                        rate[name][label].append(value[0] if isinstance(value, tuple) else value)
                        if addon and label == WORKLOADS[2]:
                            exact.append(counted_up(m.records, value[2]) == value[1])
                finally:
                    m.stop()
    upstream.terminate()
    print(f"median of {args.rounds} rounds; {args.connections} new connections, "
          f"{args.requests} keep-alive requests, {args.upload_mb} MB passthrough upload")
    print(f"{'workload':30} {'CPU s plain':>11} {'+ addon':>9} {'cost':>7}   "
          f"{'rate plain':>10} {'+ addon':>9}")
    for label in WORKLOADS:
        cb, ca_ = (statistics.median(cpu[c][label]) for c in configs)
        rb, ra = (statistics.median(rate[c][label]) for c in configs)
        print(f"{label:30} {cb:11.2f} {ca_:9.2f} {100 * (ca_ / cb - 1):6.1f}%   "
              f"{rb:10.1f} {ra:9.1f}")
    print(f"addon counted every passthrough upload byte exactly: {all(exact)} ({len(exact)} runs)")
    plain, counted = layer_overhead_ns()
    print(f"counting layer: {counted - plain:.0f} ns per event ({plain:.0f} -> {counted:.0f})")


if __name__ == "__main__":
    main()
