"""Live capture: the highest packet rate each backend records without a drop, side by side.

On a veth pair between two network namespaces made here (root needed), a sender in one namespace
blasts pre-built Ethernet frames (``sendmmsg`` batches on an AF_PACKET socket) at a target
rate; ``observer capture``
runs in the other with ``--backend scapy`` and then ``--backend tcpdump``.  Each step compares the
frames sent (less any the veth itself dropped), the frames in the pcap files and the kernel drops
of the sessions record; a step is drop-free when they agree.  The rate doubles until a step loses
packets, then bisects between the last good and first bad rate.  The capture's CPU time per packet
(with tcpdump's) is printed too: it is steadier than the rates on a shared machine.

    sudo .venv/bin/python benchmarks/capture.py [--size 1514] [--seconds 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILTER = "udp dst port 9"


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=30).stdout


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(_IoVec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]


def send(iface: str, rate: float, seconds: float, size: int) -> None:
    """Sender mode (run inside the sender namespace): print how many frames went out, how fast.

    One ``sendmmsg`` system call sends a batch of the same pre-built frame: a Python loop of
    ``send`` calls tops out below what the capture can take.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((iface, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    payload = size - 42
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size - 14, 0, 0x4000, 64, 17, 0,
                     socket.inet_aton("10.78.0.2"), socket.inet_aton("10.78.0.1"))
    frame = ctypes.create_string_buffer(
        b"\x02\x00\x00\x00\x00\x99" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00" + ip
        + struct.pack("!HHHH", 40000, 9, payload + 8, 0) + b"p" * payload, size)
    batch = 256
    iov = _IoVec(ctypes.cast(frame, ctypes.c_void_p), size)
    msgs = (_MMsgHdr * batch)()
    for msg in msgs:
        msg.hdr.iov = ctypes.pointer(iov)
        msg.hdr.iovlen = 1
    sendmmsg = ctypes.CDLL(None, use_errno=True).sendmmsg
    fd = sock.fileno()
    sent = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        if rate and sent > (now - start) * rate:
            time.sleep(min(batch / rate, end - now))
            continue
        done = sendmmsg(fd, msgs, batch, 0)
        if done > 0:
            sent += done
    elapsed = time.perf_counter() - start
    print(json.dumps({"sent": sent, "seconds": elapsed}))


class Pair:
    """Two namespaces joined by a veth pair; removed on exit."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.cap, self.snd = f"obbA{tag}", f"obbB{tag}"
        self.iface = f"obb{tag}"[:15]

    def __enter__(self) -> Pair:
        sh("ip", "netns", "add", self.cap)
        sh("ip", "netns", "add", self.snd)
        sh("ip", "link", "add", self.iface, "netns", self.cap, "type", "veth", "peer", "name",
           "snd0", "netns", self.snd)
        sh("ip", "-n", self.cap, "addr", "add", "10.78.0.1/24", "dev", self.iface)
        sh("ip", "-n", self.snd, "addr", "add", "10.78.0.2/24", "dev", "snd0")
        sh("ip", "-n", self.cap, "link", "set", self.iface, "up")
        sh("ip", "-n", self.snd, "link", "set", "snd0", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.cap, self.snd):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def rx_dropped(self) -> int:
        """Frames the veth itself dropped (before any capture could see them)."""
        info = json.loads(sh("ip", "-n", self.cap, "-s", "-j", "link", "show", self.iface))
        return int(info[0]["stats64"]["rx"]["dropped"])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live children (tcpdump under the tcpdump backend)."""
    total = 0.0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        pids += [int(c) for c in children]
    return total


def count_records(paths: list[Path]) -> int:
    """Walk pcap record headers (no parsing): the number of packets in the files."""
    total = 0
    for path in paths:
        data = path.read_bytes()
        off = 24
        while off + 16 <= len(data):
            caplen = struct.unpack_from("<I", data, off + 8)[0]
            if off + 16 + caplen > len(data):
                break
            off += 16 + caplen
            total += 1
    return total


def step(pair: Pair, backend: str, rate: float, seconds: float, size: int, buffer_mb: float,
         workdir: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=workdir))
    log = out / "capture.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", pair.cap, sys.executable, "-m", "observer", "capture",
             "--iface", pair.iface, "--filter", FILTER, "--dir", str(out), "--backend", backend,
             "--buffer", str(buffer_mb), "--filesize", "0", "--duration", "0"],
            stdout=fh, stderr=fh, cwd=ROOT,
        )
    while b"capturing on" not in log.read_bytes():
        if proc.poll() is not None:
            raise SystemExit(f"capture failed: {log.read_text()}")
        time.sleep(0.05)
    before = pair.rx_dropped()
    cpu_before = cpu_seconds(proc.pid)
    result = json.loads(sh("ip", "netns", "exec", pair.snd, sys.executable, __file__, "--send",
                           "snd0", str(rate), str(seconds), str(size)))
    time.sleep(1.0)
    arrived = result["sent"] - (pair.rx_dropped() - before)
    cpu = cpu_seconds(proc.pid) - cpu_before
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    files = sorted((out / pair.iface).glob("*.pcap"))
    captured = count_records(files)
    rows = [json.loads(line) for f in (out / pair.iface).glob("sessions-*.jsonl")
            for line in f.read_text().splitlines()]
    dropped = rows[-1]["packets_dropped"] if rows else None
    sh("rm", "-rf", str(out))
    return {"backend": backend, "target": rate, "sent_rate": result["sent"] / result["seconds"],
            "arrived": arrived, "captured": captured, "kernel_drops": dropped,
            "lost": arrived - captured, "ok": captured == arrived and not dropped,
            "cpu_us_per_packet": cpu * 1e6 / max(captured, 1)}


def ladder(pair: Pair, backend: str, args: argparse.Namespace, workdir: Path) -> tuple[float, bool]:
    """Highest drop-free rate (frames/s that arrived), doubling then bisecting; and whether the
    sender, not the capture, was the limit."""
    best = 0.0
    good, bad = 0.0, None
    rate = args.start
    while True:
        r = step(pair, backend, rate, args.seconds, args.size, args.buffer, workdir)
        achieved = r["arrived"] / args.seconds
        print(f"  {backend:8s} target {rate:>9,.0f}/s  sent {r['sent_rate']:>9,.0f}/s  "
              f"arrived {r['arrived']:>8,}  captured {r['captured']:>8,}  kernel drops "
              f"{r['kernel_drops']}  cpu {r['cpu_us_per_packet']:.1f} us/packet  "
              f"{'ok' if r['ok'] else 'LOSS'}", flush=True)
        if r["ok"]:
            best = max(best, achieved)
            good = rate
            if r["sent_rate"] < 0.9 * rate:  # the sender is the limit: the capture kept up
                return best, True
        else:
            bad = rate
        if bad is None:
            rate *= 2
        elif bad - good <= max(args.start, 0.1 * bad):
            return best, False
        else:
            rate = (good + bad) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1514, help="frame size in bytes")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds of sending per step")
    parser.add_argument("--start", type=float, default=10_000, help="first rate (frames/s)")
    parser.add_argument("--buffer", type=float, default=32.0, help="capture buffer (MB), both")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--send", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        iface, rate, seconds, size = args.send
        send(iface, float(rate), float(seconds), int(size))
        return
    if os.geteuid() != 0:
        raise SystemExit("benchmarks/capture.py needs root (network namespaces, packet sockets)")
    results: dict[str, list[float]] = {"scapy": [], "tcpdump": []}
    limited: dict[str, list[bool]] = {"scapy": [], "tcpdump": []}
    with Pair() as pair, tempfile.TemporaryDirectory() as tmp:
        ceiling = step(pair, "scapy", 0, args.seconds, args.size, args.buffer, Path(tmp))
        print(f"sender ceiling (unthrottled): {ceiling['sent_rate']:,.0f} frames/s of "
              f"{args.size} bytes", flush=True)
        for _ in range(args.repeat):
            for backend in results:
                best, sender_limited = ladder(pair, backend, args, Path(tmp))
                results[backend].append(best)
                limited[backend].append(sender_limited)
    print(f"\nhighest drop-free rate, {args.size}-byte frames, {args.buffer:g} MB buffer, "
          f"median of {args.repeat}:")
    print(f"{'backend':10s} {'frames/s':>12s} {'MB/s':>8s}   runs")
    for backend, rates in results.items():
        median = statistics.median(rates)
        print(f"{backend:10s} {median:>12,.0f} {median * args.size / 1e6:>8.1f}   "
              + ", ".join(f"{'>=' if lim else ''}{r:,.0f}"
                          for r, lim in zip(rates, limited[backend], strict=True)))
    ratio = statistics.median(results["scapy"]) / max(statistics.median(results["tcpdump"]), 1)
    print(f"scapy / tcpdump: {ratio:.2f}   (>= : the sender's ceiling was reached without a drop)")


if __name__ == "__main__":
    main()
