"""What the telemetry addon costs mitmdump: requests/s and 200 MB uploads, with and without it.

    .venv/bin/python benchmarks/proxy.py [--rounds 3] [--requests 2000] [--upload-mb 200]

Everything runs on loopback: an upstream (HTTP/1.1 keep-alive server and a TCP sink) in its own
process, mitmdump in regular mode, and clients here.  Each round starts a fresh mitmdump per
configuration, alternating them, and the table shows medians over rounds:
  * requests/s: plain HTTP GETs over 4 keep-alive connections (every request decoded by mitmproxy);
  * HTTP upload: one 200 MB POST, streamed by mitmproxy (stream_large_bodies);
  * passthrough upload: 200 MB through a CONNECT tunnel to an ignored host (what a pinned app's
    traffic looks like): counted by the addon's layer, mitmproxy itself sees no flow;
  * the same passthrough with mitmproxy's own show_ignored_hosts (TCP flows), for comparison.
The addon's records of the passthrough upload are checked against the bytes sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
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


async def _serve() -> None:
    http = await asyncio.start_server(_http, "127.0.0.1", 0)
    sink = await asyncio.start_server(_sink, "127.0.0.1", 0)
    print(json.dumps({"http": http.sockets[0].getsockname()[1],
                      "sink": sink.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.Event().wait()


# --- mitmdump ------------------------------------------------------------------------------------

class Mitmdump:
    def __init__(self, tmp: Path, sink_port: int, addon: bool, show_ignored: bool) -> None:
        self.records = tmp / f"records-{time.monotonic_ns()}"
        cmd = [str(MITMDUMP), "--listen-host", "127.0.0.1", "--listen-port", "0",
               "--set", f"confdir={tmp / 'conf'}", "--set", "flow_detail=0",
               "--set", "stream_large_bodies=1m",
               "--set", f"ignore_hosts=^127\\.0\\.0\\.1:{sink_port}$"]
        if show_ignored:
            cmd += ["--set", "show_ignored_hosts=true"]
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

def requests_per_s(proxy: int, http_port: int, total: int, conns: int = 4) -> float:
    request = (f"GET http://127.0.0.1:{http_port}/ping?i=1 HTTP/1.1\r\n"
               f"Host: 127.0.0.1:{http_port}\r\n\r\n").encode()

    def worker(n: int) -> None:
        with socket.create_connection(("127.0.0.1", proxy)) as s:
            buf = b""
            for _ in range(n):
                s.sendall(request)
                while True:
                    end = buf.find(b"\r\n\r\n")
                    if end >= 0 and len(buf) >= end + 4 + 100:
                        buf = buf[end + 104:]
                        break
                    buf += s.recv(65536)

    threads = [threading.Thread(target=worker, args=(total // conns,)) for _ in range(conns)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total // conns * conns / (time.perf_counter() - start)


def http_upload(proxy: int, http_port: int, size: int) -> float:
    with socket.create_connection(("127.0.0.1", proxy)) as s:
        start = time.perf_counter()
        s.sendall(f"POST http://127.0.0.1:{http_port}/up HTTP/1.1\r\nHost: 127.0.0.1:{http_port}"
                  f"\r\nContent-Length: {size}\r\n\r\n".encode())
        for _ in range(size // len(CHUNK)):
            s.sendall(CHUNK)
        reply = b""
        while b"r" * 100 not in reply:
            reply += s.recv(65536)
        return size / (time.perf_counter() - start) / 2**20


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
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
    configs = {"mitmdump": (False, False), "mitmdump + addon": (True, False),
               "mitmdump show_ignored_hosts": (False, True)}
    results: dict[str, dict[str, list[float]]] = {c: {} for c in configs}
    cpu: dict[str, dict[str, list[float]]] = {c: {} for c in configs}
    exact = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, (addon, show_ignored) in configs.items():
                m = Mitmdump(Path(tmp), ports["sink"], addon, show_ignored)
                r, c = results[name], cpu[name]

                def measure(label: str, fn, *fargs, m=m, r=r, c=c):
                    before = m.cpu_s()
                    value = fn(*fargs)
                    c.setdefault(label, []).append(m.cpu_s() - before)
                    r.setdefault(label, []).append(value[0] if isinstance(value, tuple) else value)
                    return value

                try:
                    if not show_ignored:
                        measure("requests/s", requests_per_s, m.port, ports["http"], args.requests)
                        measure("HTTP upload MiB/s", http_upload, m.port, ports["http"], size)
                    _, sent, port = measure("passthrough upload MiB/s", tunnel_upload, m.port,
                                            ports["sink"], size)
                    if addon:
                        exact.append(counted_up(m.records, port) == sent)
                finally:
                    m.stop()
    upstream.terminate()
    base = results["mitmdump"]
    print(f"median of {args.rounds} rounds; {args.requests} requests, {args.upload_mb} MB uploads")
    print("throughput (higher is better); cost = 1 - addon / plain")
    print(f"{'measure':28} {'mitmdump':>10} {'+ addon':>10} {'cost':>7} "
          f"{'show_ignored_hosts':>19}")
    for label in ("requests/s", "HTTP upload MiB/s", "passthrough upload MiB/s"):
        b = statistics.median(base[label])
        a = statistics.median(results["mitmdump + addon"][label])
        s = results["mitmdump show_ignored_hosts"].get(label)
        shown = f"{statistics.median(s):19.1f}" if s else f"{'':19}"
        print(f"{label:28} {b:10.1f} {a:10.1f} {100 * (1 - a / b):6.1f}% {shown}")
    print("mitmdump CPU seconds for the same work (lower is better; steadier on a busy machine)")
    for label in ("requests/s", "HTTP upload MiB/s", "passthrough upload MiB/s"):
        b = statistics.median(cpu["mitmdump"][label])
        a = statistics.median(cpu["mitmdump + addon"][label])
        s = cpu["mitmdump show_ignored_hosts"].get(label)
        shown = f"{statistics.median(s):19.2f}" if s else f"{'':19}"
        name = label.split(" MiB/s")[0].replace("requests/s", f"{args.requests} requests")
        print(f"{name:28} {b:10.2f} {a:10.2f} {100 * (a / b - 1):6.1f}% {shown}")
    print(f"addon counted every passthrough upload byte exactly: {all(exact)} ({len(exact)} runs)")
    plain, counted = layer_overhead_ns()
    chunks_per_s = statistics.median(base["passthrough upload MiB/s"]) * 2**20 / 65536
    print(f"counting layer: {counted - plain:.0f} ns per event ({plain:.0f} -> {counted:.0f}); "
          f"at {chunks_per_s:,.0f} 64 KiB reads/s that is "
          f"{100 * (counted - plain) * chunks_per_s / 1e9:.2f}% of one core")


if __name__ == "__main__":
    main()
