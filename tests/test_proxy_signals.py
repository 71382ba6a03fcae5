"""Stopping `observer proxy`: SIGINT and SIGTERM under load end it cleanly every time, and a
`kill -9` of the command takes its mitmdump down with it.

Each run is the real command (`python -m observer proxy`) in regular mode on 127.0.0.1, with
clients making plain-HTTP requests through it to a local upstream while the signal arrives.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from observer.records import read_table

MITMDUMP = Path(sys.executable).with_name("mitmdump")

pytestmark = pytest.mark.skipif(not MITMDUMP.exists(), reason="mitmdump is not installed")


class Upstream(http.server.ThreadingHTTPServer):
    """Keep-alive HTTP/1.1 server answering every GET with 200 bytes."""

    daemon_threads = True

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "200")
            self.end_headers()
            self.wfile.write(b"u" * 200)

        def log_message(self, *args) -> None:
            pass

    def handle_error(self, request, client_address) -> None:
        pass  # clients cut off by the stopping proxy

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), self.Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def upstream():
    server = Upstream()
    yield server
    server.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Command:
    """`observer proxy` as a user runs it, its stdout read until mitmdump listens."""

    def __init__(self, tmp: Path, out: Path) -> None:
        self.port = free_port()
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "observer", "proxy", "--mode", "regular",
             "--listen-host", "127.0.0.1", "--listen-port", str(self.port), "--out", str(out),
             "--", "--set", f"confdir={tmp / 'conf'}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.log: list[str] = []
        for line in self.proc.stdout:
            self.log.append(line)
            if "listening at" in line:
                break
        else:
            raise AssertionError("observer proxy did not start:\n" + "".join(self.log)
                                 + self.proc.stderr.read())
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()

    def mitmdump_pid(self) -> int:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        (pid,) = [int(p) for p in children.split()]
        return pid


class Load:
    """Clients requesting through the proxy: some keep-alive, some a connection per request.
    ``done`` holds (client port, responses received) per connection, updated as they arrive."""

    def __init__(self, proxy_port: int, upstream_port: int, clients: int = 3) -> None:
        self.request = (f"GET http://127.0.0.1:{upstream_port}/x?secret=1 HTTP/1.1\r\n"
                        f"Host: 127.0.0.1:{upstream_port}\r\n\r\n").encode()
        self.proxy_port = proxy_port
        self.responses = 0
        self.ports: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(per,), daemon=True)
                        for per in (1, 5, 1000)[:clients]]
        for t in self.threads:
            t.start()

    def _client(self, per_connection: int) -> None:
        while not self.stopped.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.proxy_port), timeout=5) as s:
                    with self.lock:
                        self.ports.add(s.getsockname()[1])
                    for _ in range(per_connection):
                        s.sendall(self.request)
                        buf = b""
                        while not (b"\r\n\r\n" in buf and buf.endswith(b"u" * 200)):
                            chunk = s.recv(65536)
                            if not chunk:
                                return
                            buf += chunk
                        with self.lock:
                            self.responses += 1
                        if self.stopped.is_set():
                            return
            except OSError:
                return

    def snapshot(self) -> tuple[int, set[int]]:
        with self.lock:
            return self.responses, set(self.ports)

    def stop(self) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(5)


def stop_under_load(tmp: Path, upstream: Upstream, i: int) -> None:
    """One run stopped by SIGINT (even i) or SIGTERM (odd i) while clients are busy."""
    signum = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
    out = tmp / f"run{i}"
    cmd = Command(tmp, out)
    load = Load(cmd.port, upstream.port)
    deadline = time.monotonic() + 10
    while load.snapshot()[0] < 20 + 5 * i and time.monotonic() < deadline:
        time.sleep(0.01)
    responses, ports = load.snapshot()
    cmd.proc.send_signal(signum)
    status = cmd.proc.wait(60)
    load.stop()
    stderr = cmd.proc.stderr.read()
    assert status == (130 if signum == signal.SIGINT else 0), (i, status, stderr)
    name = signal.Signals(signum).name
    assert stderr.startswith(f"observer proxy: stopped by {name}; wrote "), (i, stderr)
    assert stderr.count("\n") == 1, (i, stderr)
    http = read_table(out, "http")
    conns = read_table(out, "connections")
    assert responses > 0 and len(http) >= responses, (i, len(http), responses)
    assert ports <= set(conns.client_port), (i, ports - set(conns.client_port))
    assert set(http.path) == {"/x?secret=*"}
    sessions = read_table(out, "sessions")
    assert len(sessions) == 1 and sessions.ts_end.notna().all()
    assert not any("secret=1" in line for line in cmd.log)
    assert os.stat(out).st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o077 == 0 for p in out.rglob("*") if p.is_file())


def test_signals_under_load_stop_cleanly_every_time(tmp_path, upstream):
    """Ten stops (SIGINT and SIGTERM alternately; a few at a time, to keep the test short):
    exit status 130 / 0, only the summary on stderr, every response and connection from before
    the signal in the Parquet tables, redacted console lines, private files."""
    (tmp_path / "conf").mkdir()
    Command(tmp_path, tmp_path / "warm").proc.terminate()  # one mitmproxy CA for all runs
    with ThreadPoolExecutor(max_workers=5) as pool:
        for future in [pool.submit(stop_under_load, tmp_path, upstream, i) for i in range(10)]:
            future.result()


def state_of(pid: int) -> str:
    """The process's state letter ("Z": exited, waiting to be reaped), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_mitmdump_dies_with_a_killed_command(tmp_path):
    cmd = Command(tmp_path, tmp_path / "records")
    child = cmd.mitmdump_pid()
    cmd.proc.kill()
    cmd.proc.wait(10)
    deadline = time.monotonic() + 15
    while not (state_of(child) in ("Z", "gone") and refused(cmd.port)):
        assert time.monotonic() < deadline, f"mitmdump {child} still running ({state_of(child)})"
        time.sleep(0.1)
    # It stopped cleanly on its SIGTERM: the JSONL run is complete and closed.
    from observer.sources.proxy import jsonl_import

    sessions = jsonl_import.read(tmp_path / "records" / "live")["sessions"]
    assert sessions.ts_end.notna().all()
