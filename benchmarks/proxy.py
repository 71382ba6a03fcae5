"""What the telemetry addon costs mitmdump, side by side in one run, on three workloads.

    .venv/bin/python benchmarks/proxy.py [--rounds 5] [--connections 200] [--requests 2000]
        [--upload-mb 200] [--workloads new,keepalive,passthrough] [--script FILE ...]

Everything runs on loopback: an upstream (HTTPS keep-alive server and a TCP sink) in its own
process, mitmdump in regular mode without a script and with each ``--script`` (default
addons/telemetry.py; repeat it to compare versions side by side), a fresh mitmdump per round and
configuration in rotating order, clients here.  Each mitmdump is warmed up first (its certificate
for the host, the first records file).  The workloads:
  * new HTTPS connection per request (intercepted): CONNECT, TLS handshake with mitmproxy's
    certificate, one GET, close; the ClientHello is parsed once (by mitmproxy);
  * keep-alive HTTPS requests: GETs over 4 intercepted TLS connections;
  * passthrough bulk transfer: a 200 MB upload through a CONNECT tunnel to an ignored host.
The measure is the CPU time of mitmdump's threads during each workload (the scheduler's
nanosecond count: on a shared machine it moves far less than the clients' rates), median over
rounds; cost = with script / without - 1 within each round (the configurations of a round ran
within a minute of each other), its median over rounds, also in microseconds per item.  Rates
are printed beside it.  The addon's record of each passthrough upload is checked against the
bytes sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
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
    def __init__(self, tmp: Path, sink_port: int, script: Path | None) -> None:
        self.records = tmp / f"records-{time.monotonic_ns()}"
        self.ca = tmp / "conf" / "mitmproxy-ca-cert.pem"
        cmd = [str(MITMDUMP), "--listen-host", "127.0.0.1", "--listen-port", "0",
               "--set", f"confdir={tmp / 'conf'}", "--set", "flow_detail=0",
               "--set", "stream_large_bodies=1m", "--set", "ssl_insecure=true",
               "--set", f"ignore_hosts=^127\\.0\\.0\\.1:{sink_port}$"]
        if script is not None:
            cmd += ["-s", str(script),
                    "--set", f"observer_dir={self.records}", "--set", "observer_parquet=false"]
        # The same hash seed and no address randomisation in every mitmdump: a process's CPU for
        # the same work otherwise varies by several percent with its layout alone.
        setarch = shutil.which("setarch")
        if setarch:
            cmd = [setarch, os.uname().machine, "-R", *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        for line in self.proc.stdout:
            if m := re.search(r"listening at 127\.0\.0\.1:(\d+)", line):
                self.port = int(m.group(1))
                break
        else:
            raise SystemExit("mitmdump did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def cpu_s(self) -> float:
        """CPU seconds mitmdump's threads have run so far (the scheduler's nanosecond count:
        clock ticks are too coarse for a workload of a fraction of a second)."""
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9

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
KEYS = dict(zip(WORKLOADS, ("new", "keepalive", "passthrough"), strict=True))


def run_workloads(m: Mitmdump, ports: dict[str, int], args: argparse.Namespace,
                  chosen: set[str]) -> dict[str, tuple[float, float, bool | None]]:
    """(CPU seconds, rate, passthrough bytes exact) of each chosen workload on one mitmdump."""
    size = args.upload_mb * 2**20
    # Warm up first (certificate for the host, first records file, lazy imports): the same for
    # every configuration, and not what a long run costs per request.
    keepalive_requests_per_s(m.port, ports["https"], 40, m.ca)
    new_connections_per_s(m.port, ports["https"], 8, m.ca)
    out = {}
    for label, fn, fargs in (
        (WORKLOADS[0], new_connections_per_s, (m.port, ports["https"], args.connections, m.ca)),
        (WORKLOADS[1], keepalive_requests_per_s, (m.port, ports["https"], args.requests, m.ca)),
        (WORKLOADS[2], tunnel_upload, (m.port, ports["sink"], size)),
    ):
        if KEYS[label] not in chosen:
            continue
        before = m.cpu_s()
        value = fn(*fargs)
        cpu = m.cpu_s() - before
        exact = None
        if isinstance(value, tuple):
            value, sent, port = value
            if m.records.is_dir():
                exact = counted_up(m.records, port) == sent
        out[label] = (cpu, value, exact)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21,
                        help="rounds per configuration (default 21: runs of 11 still scatter by "
                        "2-3 points; about 4 minutes)")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--upload-mb", type=int, default=1000,
                        help="MB of the passthrough upload (default 1000: a shorter one is a "
                        "CPU measure of under a second, and noisy)")
    parser.add_argument("--workloads", default="new,keepalive,passthrough",
                        help="comma-separated subset of new,keepalive,passthrough to run")
    parser.add_argument("--script", type=Path, action="append",
                        help="a mitmdump -s file to measure (default: addons/telemetry.py); "
                             "repeat to compare several side by side")
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
    chosen = set(args.workloads.split(","))
    if not chosen <= set(KEYS.values()):
        parser.error(f"--workloads: choose from {','.join(KEYS.values())}")
    scripts = args.script or [ROOT / "addons" / "telemetry.py"]
    configs: dict[str, Path | None] = {"mitmdump": None}
    for script in scripts:
        configs[f"+ {script.name}" if len(scripts) == 1 else f"+ {script}"] = script
    upstream = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE,
                                text=True)
    ports = json.loads(upstream.stdout.readline())
    cpu: dict[str, dict[str, list[float]]] = {c: {w: [] for w in WORKLOADS} for c in configs}
    rate: dict[str, dict[str, list[float]]] = {c: {w: [] for w in WORKLOADS} for c in configs}
    exact = []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):
            # A fresh mitmdump per round and configuration, in rotating order, so a drift in
            # the machine's load hits every configuration alike.
            order = list(configs.items())
            order = order[n % len(order):] + order[:n % len(order)]
            for name, script in order:
                m = Mitmdump(Path(tmp), ports["sink"], script)
                try:
                    for label, (c, r, ok) in run_workloads(m, ports, args, chosen).items():
                        cpu[name][label].append(c)
                        rate[name][label].append(r)
                        if ok is not None:
                            exact.append(ok)
                finally:
                    m.stop()
    upstream.terminate()
    load = max(load, os.getloadavg()[0])
    print(f"median of {args.rounds} rounds; {args.connections} new connections, "
          f"{args.requests} keep-alive requests, {args.upload_mb} MB passthrough upload; "
          f"load average up to {load:.1f} on {os.cpu_count()} CPUs")
    print("CPU s and rate: medians; cost: median over rounds of the CPU against the same "
          "round's mitmdump")
    print(f"{'workload':30} {'configuration':24} {'CPU s':>7} {'cost':>7} {'per item':>11}"
          f" {'rate':>8} {'rate':>7}")
    items = {WORKLOADS[0]: args.connections, WORKLOADS[1]: args.requests,
             WORKLOADS[2]: args.upload_mb}
    for label in (w for w in WORKLOADS if KEYS[w] in chosen):
        base = cpu["mitmdump"][label]
        base_rate = rate["mitmdump"][label]
        for name in configs:
            # Each round's configurations ran minutes apart at most: compare within rounds.
            cost = statistics.median(c / b - 1 for c, b in zip(cpu[name][label], base,
                                                               strict=True))
            per_item = statistics.median(c - b for c, b in zip(cpu[name][label], base,
                                                               strict=True))
            rate_cost = statistics.median(r / b - 1 for r, b in zip(rate[name][label],
                                                                    base_rate, strict=True))
            unit = "us/MB" if label == WORKLOADS[2] else "us"
            print(f"{label:30} {name[-24:]:24} {statistics.median(cpu[name][label]):7.3f} "
                  f"{100 * cost:+6.1f}% {1e6 * per_item / items[label]:+6.0f}{unit:5} "
                  f"{statistics.median(rate[name][label]):8.1f} {100 * rate_cost:+6.1f}%")
    if exact:
        print(f"addon counted every passthrough upload byte exactly: {all(exact)} "
              f"({len(exact)} runs)")
    plain, counted = layer_overhead_ns()
    print(f"counting layer: {counted - plain:.0f} ns per event ({plain:.0f} -> {counted:.0f})")


if __name__ == "__main__":
    main()
