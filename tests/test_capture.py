"""Live capture: real packets on a veth pair between two network namespaces the test creates.

The capture runs as ``python -m observer capture`` in one namespace; the "phone" sends known TCP,
UDP and DNS traffic from the other; the files are replayed and must hold exactly that traffic.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, UDP
from scapy.utils import rdpcap

from observer.records import read_jsonl
from observer.sources.live.ring import PcapStreamSplitter, RotatingPcapWriter, ring_files

ROOT = Path(__file__).resolve().parents[1]
PHONE, SERVER, NAMED_SERVER = "10.77.0.2", "10.77.0.1", "10.77.0.10"
NAME = "upload.observer-test.example"
# TCP connections: (server ip, port, bytes up, bytes down); the server answers by what it received
TCP_PLAN = [(NAMED_SERVER, 8443, 100_000, 50), (SERVER, 8080, 12_345, 678),
            (SERVER, 8080, 3_000, 250_000)]
REPLY = {up: down for _ip, _port, up, down in TCP_PLAN}
UDP_PORT, UDP_SENDS, UDP_UP, UDP_DOWN = 5001, 5, 300, 100
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
_counter = itertools.count()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "live capture tests need root (network namespaces and packet sockets)"
    if shutil.which("ip") is None:
        return "live capture tests need iproute2's ip command"
    probe = f"obcprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"'ip netns' does not work here: {exc}"
    return None


@dataclass
class Lab:
    capture_ns: str
    phone_ns: str
    iface: str
    config: Path
    tmp: Path

    def run_in(self, ns: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in a thread that joined namespace ``ns`` (sockets it makes live there)."""
        box: dict[str, Any] = {}

        def target() -> None:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                os.setns(fd, os.CLONE_NEWNET)
            finally:
                os.close(fd)
            try:
                box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=target)
        thread.start()
        thread.join(60)
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def start_capture(self, *extra: str) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"capture-{next(_counter)}.log"
        command = [
            "ip", "netns", "exec", self.capture_ns, sys.executable, "-m", "observer", "capture",
            "--iface", self.iface, "--device", "phone", "--config", str(self.config),
            "--dir", str(self.tmp / "captures"), *extra,
        ]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(command, stderr=fh, stdout=fh, cwd=ROOT)
        deadline = time.monotonic() + 30
        while b"capturing on" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"capture did not start: {log.read_text()}")
            time.sleep(0.05)
        return proc, log


@pytest.fixture
def lab(tmp_path: Path):
    reason = _netns_usable()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}x{next(_counter)}"
    capture_ns, phone_ns = f"obcA{tag}", f"obcB{tag}"
    iface = f"oca{tag}"[:15]
    created: list[str] = []
    try:
        for ns in (capture_ns, phone_ns):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", iface, "netns", capture_ns, "type", "veth", "peer", "name", "phone0",
            "netns", phone_ns)
        _ip("-n", capture_ns, "addr", "add", f"{SERVER}/24", "dev", iface)
        _ip("-n", capture_ns, "addr", "add", f"{NAMED_SERVER}/24", "dev", iface)
        _ip("-n", phone_ns, "addr", "add", f"{PHONE}/24", "dev", "phone0")
        for ns, dev in ((capture_ns, iface), (phone_ns, "phone0")):
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        config = tmp_path / "lab.yaml"
        config.write_text(f"devices:\n  - name: phone\n    ips: [{PHONE}]\n")
        yield Lab(capture_ns, phone_ns, iface, config, tmp_path)
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _serve_tcp(listener: socket.socket, count: int) -> threading.Thread:
    """Accept ``count`` connections; read to EOF, answer with REPLY[bytes read] bytes."""

    def serve() -> None:
        for _ in range(count):
            conn, _addr = listener.accept()
            with conn:
                received = 0
                while chunk := conn.recv(65536):
                    received += len(chunk)
                conn.sendall(b"d" * REPLY[received])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def _serve_udp(
    sock: socket.socket, count: int, answer: Callable[[bytes], bytes]
) -> threading.Thread:
    def serve() -> None:
        for _ in range(count):
            data, addr = sock.recvfrom(2048)
            sock.sendto(answer(data), addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def _dns_answer(query: bytes) -> bytes:
    request = DNS(query)
    return bytes(DNS(id=request.id, qr=1, aa=1, rd=request.rd, qd=request.qd,
                     an=DNSRR(rrname=NAME, type="A", ttl=300, rdata=NAMED_SERVER)))


def _phone_traffic() -> list[tuple]:
    """Run in the phone's namespace: DNS lookup, TCP transfers, UDP exchange; return the flows."""
    flows = []
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.settimeout(5)
    query = bytes(DNS(id=4242, rd=1, qd=DNSQR(qname=NAME, qtype="A")))
    dns.sendto(query, (SERVER, 53))
    answer = dns.recv(2048)
    assert DNS(answer).an[0].rdata == NAMED_SERVER
    flows.append(("udp", dns.getsockname()[1], SERVER, 53, len(query), len(answer)))
    dns.close()
    for ip, port, up, down in TCP_PLAN:
        with socket.create_connection((ip, port), timeout=5) as conn:
            conn.sendall(b"u" * up)
            conn.shutdown(socket.SHUT_WR)
            got = 0
            while chunk := conn.recv(65536):
                got += len(chunk)
            assert got == down
            flows.append(("tcp", conn.getsockname()[1], ip, port, up, down))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(5)
    for _ in range(UDP_SENDS):
        udp.sendto(b"q" * UDP_UP, (SERVER, UDP_PORT))
        assert len(udp.recv(2048)) == UDP_DOWN
    flows.append(("udp", udp.getsockname()[1], SERVER, UDP_PORT, UDP_SENDS * UDP_UP,
                  UDP_SENDS * UDP_DOWN))
    udp.close()
    return flows


def _replay(paths: list[Path], config: Path) -> dict:
    from observer.config import load_config
    from observer.sources import replay_tables

    return replay_tables(paths, config=load_config(config))


def _sessions(directory: Path) -> dict:
    rows = read_jsonl(sorted(directory.glob("sessions-*.jsonl"))).tables["sessions"]
    return {sid: group.iloc[-1] for sid, group in rows.groupby("session_id")}


def _servers(lab: Lab) -> tuple[list[socket.socket], list[threading.Thread]]:
    """The servers of ``_phone_traffic`` in the capture namespace, each answering in a thread."""

    def bind() -> list[socket.socket]:
        socks = []
        for port in (8443, 8080):
            listener = socket.create_server(("0.0.0.0", port))
            listener.settimeout(10)
            socks.append(listener)
        for port in (53, UDP_PORT):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("0.0.0.0", port))
            udp.settimeout(10)
            socks.append(udp)
        return socks

    tls_like, plain, dns, udp = socks = lab.run_in(lab.capture_ns, bind)
    return socks, [_serve_tcp(tls_like, 1), _serve_tcp(plain, 2), _serve_udp(dns, 1, _dns_answer),
                   _serve_udp(udp, UDP_SENDS, lambda _q: b"a" * UDP_DOWN)]


@pytest.mark.parametrize("backend", ["scapy", "tcpdump"])
def test_capture_records_exactly_the_traffic_sent(lab: Lab, backend: str) -> None:
    if backend == "tcpdump" and shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed")
    (tls_like, plain, dns, udp), threads = _servers(lab)
    records = lab.tmp / "records"
    proc, log = lab.start_capture("--backend", backend, "--records", str(records))
    t_first = time.time()
    try:
        flows = lab.run_in(lab.phone_ns, _phone_traffic)
        t_last = time.time()
        for thread in threads:
            thread.join(10)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
        for sock in (tls_like, plain, dns, udp):
            sock.close()
    assert "stopped by SIGTERM" in log.read_text()

    files = ring_files(lab.tmp / "captures" / "phone", "phone")
    assert files
    tables = _replay(files, lab.config)
    conns = tables["connections"]
    got = {
        (r.proto, int(r.client_port), r.server_ip, int(r.server_port), int(r.bytes_up),
         int(r.bytes_down))
        for r in conns.itertuples() if r.client_ip == PHONE
    }
    expected = set(flows)
    assert got == expected
    named = conns[conns["server_ip"] == NAMED_SERVER]
    assert list(named["server_name"]) == [NAME]
    assert list(named["name_source"]) == ["dns"]
    assert NAME in set(tables["dns"]["query"])

    (session,) = _sessions(records).values()
    assert session["interface"] == lab.iface and session["filter"] == f"host {PHONE}"
    assert session["ts_start"] < t_first and session["ts_end"] > t_last
    assert session["packets_dropped"] == 0
    assert session["packets_captured"] == sum(len(rdpcap(str(f))) for f in files)
    assert "stopped by SIGTERM" in session["note"]

    live = _replay([records], lab.config)  # the live JSONL, last row of a connection wins
    live_got = {
        (r.proto, int(r.client_port), r.server_ip, int(r.server_port), int(r.bytes_up),
         int(r.bytes_down))
        for r in live["connections"].itertuples()
    }
    assert expected <= live_got
    sums = live["activity"].groupby("conn_id")[["bytes_up", "bytes_down"]].sum()
    for r in live["connections"].itertuples():
        assert tuple(sums.loc[r.conn_id]) == (r.bytes_up, r.bytes_down)


def _keyed(conns: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with their connection's 5-tuple in place of ``conn_id``, sorted: ids aside."""
    key = ["proto", "client_ip", "client_port", "server_ip", "server_port", "ts_start"]
    out = rows if rows is conns else rows.merge(conns[["conn_id", *key]], on="conn_id",
                                                how="left", validate="many_to_one")
    assert out["ts_start"].notna().all()
    out = out.drop(columns=["conn_id", "source"], errors="ignore")
    return out.sort_values(list(out.columns)).reset_index(drop=True)


@pytest.mark.parametrize("backend", ["scapy", "tcpdump"])
def test_live_records_equal_the_replay_of_the_rotated_files(lab: Lab, backend: str) -> None:
    """One flow engine: what the capture writes as it runs is what replay makes of its files."""
    if backend == "tcpdump" and shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed")
    socks, threads = _servers(lab)
    records = lab.tmp / "records"
    proc, log = lab.start_capture("--backend", backend, "--records", str(records),
                                  "--filesize", "0.02", "--duration", "1")
    try:
        flows = lab.run_in(lab.phone_ns, _phone_traffic)
        for thread in threads:
            thread.join(10)
        time.sleep(1.2)  # a rotation by time too
        lab.run_in(lab.phone_ns, _phone_traffic_tail)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
        for sock in socks:
            sock.close()
    files = ring_files(lab.tmp / "captures" / "phone", "phone")
    assert len(files) >= 3
    replayed = _replay(files, lab.config)
    live = _replay([records], lab.config)  # the live JSONL, last row of a connection wins
    got = {(r.proto, int(r.client_port), r.server_ip, int(r.server_port), int(r.bytes_up),
            int(r.bytes_down)) for r in live["connections"].itertuples()}
    assert set(flows) <= got
    assert set(live["connections"]["source"]) == {"live"}
    assert set(live["connections"]["device"]) == {"phone"}
    assert (live["connections"]["server_name"] == NAME).sum() == 1
    for name in ("connections", "activity"):
        a = _keyed(live["connections"], live[name])
        b = _keyed(replayed["connections"], replayed[name])
        pd.testing.assert_frame_equal(a, b, check_dtype=False)
    assert len(live["activity"]) >= len(live["connections"])


def _phone_traffic_tail() -> None:
    """A last UDP exchange, after the capture has rotated by time."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"t" * 99, (SERVER, 7001))


def new_flow_trickle(seconds: float, sent: list[tuple[int, float]]) -> None:
    """One new UDP flow every 50 ms, so each flow's presence dates a moment of the run."""
    end = time.time() + seconds
    while time.time() < end:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"k" * 64, (SERVER, 6000))
            sent.append((sock.getsockname()[1], time.time()))
        time.sleep(0.05)


@pytest.mark.parametrize("backend", ["scapy", "tcpdump"])
def test_sigkill_loses_at_most_the_last_second(lab: Lab, backend: str) -> None:
    if backend == "tcpdump" and shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed")
    proc, _log = lab.start_capture("--backend", backend)
    sent: list[tuple[int, float]] = []
    try:
        lab.run_in(lab.phone_ns, lambda: new_flow_trickle(2.5, sent))
    finally:
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    files = ring_files(lab.tmp / "captures" / "phone", "phone")
    for path in files:
        rdpcap(str(path))  # every file on disk parses to its last record
    tables = _replay(files, lab.config)
    ports = {int(p) for p in tables["connections"]["client_port"].dropna()}
    newest = max((at for port, at in sent if port in ports), default=0.0)
    print(f"{backend}: newest flow on disk was sent {killed_at - newest:.2f} s before the kill")
    old_enough = {port for port, at in sent if at < killed_at - 1.0}
    assert len(old_enough) >= 20
    assert old_enough <= ports, f"lost flows older than 1 s: {sorted(old_enough - ports)}"
    assert ports <= {port for port, _at in sent}
    (session,) = _sessions(lab.tmp / "captures" / "phone").values()
    assert session["note"].startswith("running")  # killed: no stop row, coverage ends earlier
    deadline = time.monotonic() + 5
    while _processes_naming(lab.iface) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_naming(lab.iface), "a capture process outlived the kill"


@pytest.mark.parametrize("backend", ["scapy", "tcpdump"])
def test_sigkill_keeps_the_live_records_of_all_but_the_last_seconds(lab: Lab, backend: str) -> None:
    """Complete activity bins are on disk within ~3 s of their end, as replay has them."""
    if backend == "tcpdump" and shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed")
    config = lab.tmp / "fine.yaml"
    config.write_text(f"bin_seconds: 1\ndevices:\n  - name: phone\n    ips: [{PHONE}]\n")
    records = lab.tmp / "records"
    proc, _log = lab.start_capture("--backend", backend, "--records", str(records),
                                   "--config", str(config))

    def trickle() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            end = time.time() + 6.0
            while time.time() < end:
                sock.sendto(b"k" * 64, (SERVER, 6000))
                time.sleep(0.05)

    try:
        lab.run_in(lab.phone_ns, trickle)
    finally:
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    replayed = _replay(ring_files(lab.tmp / "captures" / "phone", "phone"), config)["activity"]
    live = read_jsonl(sorted(records.glob("live-phone-*.jsonl"))).tables["activity"]
    rows = lambda t: {(r.conn_id, float(r.ts_bin), int(r.bytes_up), int(r.packets_up))  # noqa: E731
                      for r in t.itertuples()}
    assert rows(live) <= rows(replayed)  # a bin is written once, complete
    cutoff = killed_at - 4.0  # the 2 s margin, the 0.25 s tick, the JSONL writer's 0.5 s
    old = {r for r in rows(replayed) if r[1] + 1.0 <= cutoff}
    assert len(old) >= 2
    assert old <= rows(live)


def _processes_naming(iface: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if iface.encode() in args:
            found.append(cmdline.parent.name)
    return found


@pytest.mark.parametrize("backend", ["scapy", "tcpdump"])
def test_raw_ip_interface_like_wireguard(lab: Lab, backend: str) -> None:
    """wg0 and tun devices carry raw IP (no Ethernet header): the files must say so and replay."""
    if backend == "tcpdump" and shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed")
    tun_name = f"otn{lab.iface[3:]}"[:15]

    def setup() -> tuple[int, socket.socket]:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tun_name.encode(), IFF_TUN | IFF_NO_PI))
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("0.0.0.0", UDP_PORT))
        server.settimeout(10)
        return fd, server

    try:
        fd, server = lab.run_in(lab.capture_ns, setup)
    except OSError as exc:
        pytest.skip(f"no tun devices here: {exc}")
    try:
        _ip("-n", lab.capture_ns, "addr", "add", "10.99.0.1/24", "dev", tun_name)
        _ip("-n", lab.capture_ns, "link", "set", tun_name, "up")
        answering = _serve_udp(server, 3, lambda _q: b"a" * UDP_DOWN)
        proc, log = lab.start_capture("--backend", backend, "--iface", tun_name, "--filter",
                                      "host 10.99.0.2")
        for _ in range(3):  # the "phone" at the far end of the tunnel
            os.write(fd, bytes(IP(src="10.99.0.2", dst="10.99.0.1")
                               / UDP(sport=40000, dport=UDP_PORT) / (b"q" * UDP_UP)))
        answering.join(10)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
    finally:
        os.close(fd)
        server.close()
    files = ring_files(lab.tmp / "captures" / "phone", "phone")  # --filter wins, --device names
    assert {f.read_bytes()[20:24] for f in files} == {(101).to_bytes(4, "little")}  # LINKTYPE_RAW
    conns = _replay(files, lab.config)["connections"]
    got = {(r.proto, r.client_ip, int(r.client_port), int(r.server_port), int(r.bytes_up),
            int(r.bytes_down)) for r in conns.itertuples()}
    assert got == {("udp", "10.99.0.2", 40000, UDP_PORT, 3 * UDP_UP, 3 * UDP_DOWN)}


def test_full_disk_stops_with_one_line_and_keeps_what_was_written(lab: Lab) -> None:
    full = lab.tmp / "full"
    full.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)]
    if subprocess.run(mount, capture_output=True, timeout=10).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        proc, log = lab.start_capture("--dir", str(full))

        def flood() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for _ in range(400):  # ~560 kB: more than the disk holds
                    sock.sendto(b"f" * 1400, (SERVER, 7000))
                    time.sleep(0.002)

        lab.run_in(lab.phone_ns, flood)
        assert proc.wait(timeout=20) == 2
        last = log.read_text().strip().splitlines()[-1]
        assert last.startswith("observer capture: error: capture stopped after ")
        assert last.endswith("No space left on device")
        files = ring_files(full / "phone", "phone")
        conns = _replay(files, lab.config)["connections"]
        kept = conns[(conns["server_port"] == 7000)]
        assert len(kept) == 1 and 50 < int(kept["packets_up"].iloc[0]) < 400
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True, timeout=10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--iface", "no-such-if0", "--filter", "tcp"], "no such network interface 'no-such-if0'"),
        (["--iface", "lo", "--filter", "host and"], "bad capture filter 'host and'"),
        (["--iface", "lo", "--device", "nope", "--config", "docs/lab.example.yaml"],
         "no device 'nope' in docs/lab.example.yaml (devices: pixel7, iphone13)"),
        (["--iface", "lo"], "give --device NAME with --config LAB.yaml, or --filter BPF"),
    ],
)
def test_clear_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "observer", "capture", "--dir", str(tmp_path), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"observer capture: error: {message}")
    assert not list(tmp_path.rglob("*.pcap"))


@pytest.mark.parametrize("backend", ["scapy", "tcpdump"])
def test_without_capture_rights_says_so(tmp_path: Path, backend: str) -> None:
    missing = shutil.which("capsh") is None or (backend == "tcpdump" and not shutil.which(backend))
    if os.geteuid() != 0 or missing:
        pytest.skip("needs root, capsh (to drop CAP_NET_RAW) and the backend's program")
    command = (f"{sys.executable} -m observer capture --iface lo --filter tcp "
               f"--dir {tmp_path} --backend {backend}")
    result = subprocess.run(["capsh", "--drop=cap_net_raw", "--", "-c", command],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("observer capture: error: capturing on lo needs root or the "
                           "CAP_NET_RAW and CAP_NET_ADMIN capabilities")
    assert not list(tmp_path.rglob("*.pcap"))


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _frame(i: int, size: int = 100) -> bytes:
    return bytes(12) + b"\x08\x00" + i.to_bytes(4, "big") * (size // 4)


def test_ring_rotates_by_size_and_time_keeps_n_files_and_resumes(tmp_path: Path) -> None:
    clock = FakeClock(1_795_000_000.0)
    ring = RotatingPcapWriter(tmp_path, "phone", 1, filesize=1000, duration_s=60, max_files=3,
                              clock=clock)
    for i in range(20):  # 20 x 130-byte records: a new file about every 7 packets
        clock.now += 0.1
        ring.write(clock.now, _frame(i))
    clock.now += 61
    ring.tick(clock.now)  # time rotation: a fresh, empty file
    clock.now += 1
    ring.write(clock.now, _frame(99))
    ring.close()
    files = ring_files(tmp_path, "phone")
    assert len(files) == 3 and ring.deleted == len(ring.files) - 3
    assert files == ring.files[-3:]  # the oldest were removed, name order is time order
    assert [len(rdpcap(str(f))) for f in files][-1] == 1
    assert all(f.stat().st_size <= 1000 + 130 for f in files)

    clock.now += 5
    resumed = RotatingPcapWriter(tmp_path, "phone", 1, clock=clock)
    resumed.write(clock.now, _frame(7))
    resumed.close()
    after = ring_files(tmp_path, "phone")
    assert after[:-1] == files and after[-1] == resumed.path
    assert after[-1].name.endswith(f"-{len(ring.files) + 1:04d}.pcap")
    (packet,) = rdpcap(str(after[-1]))
    assert float(packet.time) == pytest.approx(clock.now, abs=1e-6)


def test_ring_flushes_whole_records_on_time(tmp_path: Path) -> None:
    clock = FakeClock(1_795_000_000.0)
    ring = RotatingPcapWriter(tmp_path, "phone", 1, flush_s=0.5, clock=clock)
    ring.write(clock.now, _frame(1))
    ring.tick(clock.now + 0.2)
    assert len(rdpcap(str(ring.path))) == 0  # still buffered
    ring.write(clock.now + 0.3, _frame(2))
    ring.tick(clock.now + 0.6)
    assert [bytes(p) for p in rdpcap(str(ring.path))] == [_frame(1), _frame(2)]
    ring.close()


def test_pcap_stream_splitter_cuts_whole_records(tmp_path: Path) -> None:
    ring = RotatingPcapWriter(tmp_path, "x", 1)
    for i in range(5):
        ring.write(1_795_000_000.0 + i, _frame(i, 40 + 20 * i))
    ring.close()
    stream = ring.path.read_bytes()
    splitter = PcapStreamSplitter()
    records = []
    for start in range(0, len(stream), 7):  # arbitrary pipe reads
        records += [bytes(r) for r in splitter.feed(stream[start : start + 7])]
    assert splitter.linktype == 1
    assert [r[16:] for r in records] == [_frame(i, 40 + 20 * i) for i in range(5)]


def test_open_connections_survive_a_kill_as_partial_rows(tmp_path: Path) -> None:
    """The live engine writes an open connection's row as it stands every ``update_s``; the row
    written when it finishes replaces it (last row of a conn_id wins)."""
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether

    from observer.records.jsonl import JsonlWriter
    from observer.sources.live.capture import CaptureOptions, LiveRecords
    from observer.sources.live.ring import RECORD_HEADER

    t0 = 1_795_000_000.0
    frame = lambda up, **kw: Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / (  # noqa: E731
        IP(src=PHONE, dst=SERVER) / TCP(sport=40000, dport=443, **kw) if up else
        IP(src=SERVER, dst=PHONE) / TCP(sport=443, dport=40000, **kw))
    packets = [(0.0, frame(True, flags="S")), (0.01, frame(False, flags="SA")),
               (0.02, frame(True, flags="A"))]
    packets += [(1.0 + k, frame(True, flags="PA") / (b"u" * 1000)) for k in range(30)]
    packets += [(40.0, frame(True, flags="FA")), (40.01, frame(False, flags="FA"))]

    def records(part: list) -> bytes:
        return b"".join(RECORD_HEADER.pack(int(t0 + t), round((t0 + t) % 1 * 1e6), len(p),
                                           len(p)) + bytes(p) for t, p in part)

    def run(directory: Path, *, finish: bool) -> pd.DataFrame:
        opts = CaptureOptions(iface="x", bpf="", directory=directory, device="phone",
                              update_s=5.0)
        live = LiveRecords(JsonlWriter(directory, "live-phone"), opts, linktype=1)
        for second in range(0, 45):
            live.feed(records([p for p in packets if second <= p[0] < second + 1]))
            live.tick(t0 + second + 1)
            if not finish and second == 20:
                break  # killed: no close
        if finish:
            live.close()
        live.writer.close()
        raw = read_jsonl(sorted(directory.glob("live-*.jsonl"))).tables["connections"]
        assert len(raw) >= 2  # partial rows went out as it ran
        return _replay_live(directory)["connections"]

    (killed,) = run(tmp_path / "killed", finish=False).itertuples()
    assert (killed.close_reason, killed.bytes_up, killed.device) == ("open", 20_000,
                                                                    "02:00:00:00:00:01")
    (done,) = run(tmp_path / "done", finish=True).itertuples()
    assert (done.close_reason, done.bytes_up, done.conn_id) == ("fin", 30_000, killed.conn_id)


def _replay_live(directory: Path) -> dict:
    from observer.sources import replay_tables

    return replay_tables([directory])
