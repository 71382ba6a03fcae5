"""Replay speed and memory beside tshark and a scapy loop, on the same files, in the same run.

Pcap files of 200k, 2M and 20M packets are cut (editcap) from simulated phone traffic
(``observer.simulate``, scenario "week" stretched to enough days).  For each file it times, in
separate processes:

- ours: ``observer.sources.replay`` (read, track, name, write the Parquet records);
- tshark: ``tshark -q -n -z conv,tcp -z conv,udp`` (conversation tables, nothing written);
- scapy: a ``PcapReader`` loop that pulls the same header fields into a dict per 5-tuple; it is
  stopped after ``--scapy-seconds`` of CPU and its rate extrapolated to the file (said so below).

Rates are packets per CPU second (user + sys of that process, start-up and imports included): the
fair "one core" figure on a machine whose two cores are shared.  "in replay()" leaves out the
interpreter start-up and imports (~0.5 s of numpy, pandas, pyarrow).  Wall seconds are beside
them.  Peak RSS is each process's own maximum resident set.  Medians of ``--runs`` runs.

    .venv/bin/python benchmarks/replay.py [--sizes 200000 2000000 20000000] [--runs 3]
        [--scapy-seconds 20] [--tshark-max 2000000] [--keep] [--only-ours]

``--only-ours`` runs only our reader (speed and peak RSS; the peers' columns are left out).

tshark keeps ~600 bytes per packet (docs/performance.md), so by default it is not run on files
above ``--tshark-max`` packets (the 20M file would need ~12 GB on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data" / "replay"
PYTHON = sys.executable
PACKETS_PER_DAY = 142_000  # the "week" scenario's phone, measured

OURS = """
import json, sys, time
from pathlib import Path
from observer.sources import replay
start = time.process_time()
stats = replay([Path(sys.argv[1])], Path(sys.argv[2]), overwrite=True, progress=False)
print(json.dumps({"packets": stats.packets, "connections": stats.connections,
                  "errors": stats.errors, "inner": time.process_time() - start}))
"""

SCAPY = """
import json, sys, time
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import PcapReader
limit = float(sys.argv[2])
flows = {}
n = 0
start = time.process_time()
for pkt in PcapReader(sys.argv[1]):
    n += 1
    ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
    if ip is not None:
        l4 = ip.getlayer(TCP) or ip.getlayer(UDP)
        if l4 is not None:
            key = (ip.src, ip.dst, l4.sport, l4.dport, ip.name)
            size = len(l4.payload)
            row = flows.setdefault(key, [0, 0, float(pkt.time), 0])
            row[0] += 1
            row[1] += size
            row[3] = float(pkt.time)
            if isinstance(l4, TCP):
                _ = int(l4.flags)
    if n % 1000 == 0 and time.process_time() - start > limit:
        break
print(json.dumps({"packets": n, "cpu": time.process_time() - start}))
"""


def run(cmd: list[str], **kw) -> dict:
    """Run a process; its wall and CPU seconds, peak RSS (MB) and stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "rss": usage.ru_maxrss / 1024, "out": out.decode()}


def simulated(packets: int) -> Path:
    """Simulated phone traffic with at least ``packets`` packets (cached)."""
    days = packets // PACKETS_PER_DAY + 2
    source = DATA / f"week-{days}d.pcap"
    if not source.exists():
        # in a child process: this one must stay small, because a child started by fork starts
        # with its parent's peak RSS on Linux, and the figures below are the children's peaks
        DATA.mkdir(parents=True, exist_ok=True)
        print(f"simulating {days} days of the 'week' scenario -> {source}", flush=True)
        code = ("import sys; from pathlib import Path; from observer.simulate import "
                "load_scenario, simulate; scenario = load_scenario('week').with_days("
                "int(sys.argv[1])); simulate(scenario, Path(sys.argv[2]), progress=False)")
        subprocess.run([PYTHON, "-c", code, str(days), str(source)], check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return source


def build(packets: int, source: Path) -> Path:
    """A capture of exactly ``packets`` packets cut from the front of ``source`` (cached)."""
    path = DATA / f"sim-{packets}.pcap"
    if path.exists():
        return path
    subprocess.run(["editcap", "-F", "pcap", "-r", str(source), str(path), f"1-{packets}"],
                   check=True, capture_output=True)
    return path


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 2_000_000, 20_000_000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scapy-seconds", type=float, default=20.0)
    parser.add_argument("--tshark-max", type=int, default=2_000_000)
    parser.add_argument("--keep", action="store_true", help="keep the large capture files")
    parser.add_argument("--only-ours", action="store_true",
                        help="run only our reader (no tshark, no scapy loop)")
    args = parser.parse_args()
    if not shutil.which("editcap"):
        raise SystemExit("editcap (part of tshark/wireshark-common) is needed to cut the files")
    tshark = shutil.which("tshark")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows = []
    source = simulated(max(args.sizes))
    for size in sorted(args.sizes):
        path = build(size, source)
        mb = path.stat().st_size / 1e6
        runs = args.runs if size < 10_000_000 else max(1, args.runs - 2)
        ours = []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(runs):
                r = run([PYTHON, "-c", OURS, str(path), tmp], env=env)
                r.update(json.loads(r["out"]))
                ours.append(r)
        packets = ours[0]["packets"]
        shark = []
        if tshark and size <= args.tshark_max and not args.only_ours:
            for _ in range(runs):
                shark.append(run([tshark, "-q", "-n", "-z", "conv,tcp", "-z", "conv,udp", "-r",
                                  str(path)], env=dict(os.environ, LC_ALL="C")))
        scapy = {"packets": 0, "cpu": 0.0, "rss": 0.0}
        if not args.only_ours:
            scapy = run([PYTHON, "-c", SCAPY, str(path), str(args.scapy_seconds)], env=env)
            scapy.update(json.loads(scapy["out"]))
        row = {
            "packets": packets, "mb": mb, "connections": ours[0]["connections"],
            "ours_cpu": median(ours, "cpu"), "ours_wall": median(ours, "wall"),
            "ours_inner": median(ours, "inner"),
            "ours_rss": max(r["rss"] for r in ours), "ours_runs": len(ours),
            "tshark_cpu": median(shark, "cpu") if shark else None,
            "tshark_wall": median(shark, "wall") if shark else None,
            "tshark_rss": max(r["rss"] for r in shark) if shark else None,
            "scapy_rate": scapy["packets"] / scapy["cpu"] if scapy["cpu"] else None,
            "scapy_prefix": scapy["packets"],
            "scapy_rss": scapy["rss"],
        }
        rows.append(row)
        print_row(row, flush=True)
        if size >= 10_000_000 and not args.keep:
            path.unlink()
    print()
    print(table(rows))
    if not args.keep:
        for big in DATA.glob("week-*d.pcap"):
            if big.stat().st_size > 500e6:
                big.unlink()
    return 0


def rate(packets: int, seconds: float | None) -> str:
    return f"{packets / seconds / 1e6:.2f}M" if seconds else "-"


def print_row(r: dict, **kw) -> None:
    print(f"{r['packets']:>11,} pkts {r['mb']:8.0f} MB | ours {r['ours_cpu']:.2f} cpu-s "
          f"{r['ours_wall']:.2f} wall-s {r['ours_rss']:.0f} MB | tshark "
          f"{r['tshark_cpu'] or 0:.2f} cpu-s {r['tshark_rss'] or 0:.0f} MB | scapy "
          f"{r['scapy_rate'] or 0:,.0f}/s", **kw)


def table(rows: list[dict]) -> str:
    head = ("| packets | MB | ours pkts/s (CPU) | ours MB/s | ours pkts/s in replay() "
            "| ours wall s | ours peak RSS | "
            "tshark pkts/s (CPU) | tshark wall s | tshark peak RSS | scapy pkts/s (CPU, prefix) "
            "| scapy peak RSS | ours / tshark | ours / scapy |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        ours_rate = r["packets"] / r["ours_cpu"]
        t_rate = r["packets"] / r["tshark_cpu"] if r["tshark_cpu"] else None
        lines.append(
            f"| {r['packets']:,} | {r['mb']:.0f} | {ours_rate:,.0f} | {r['mb'] / r['ours_cpu']:.0f}"
            f" | {r['packets'] / r['ours_inner']:,.0f} | {r['ours_wall']:.1f} | "
            f"{r['ours_rss']:.0f} MB | "
            + (f"{t_rate:,.0f} | {r['tshark_wall']:.1f} | {r['tshark_rss']:.0f} MB | "
               if t_rate else "not run | - | - | ")
            + (f"{r['scapy_rate']:,.0f} ({r['scapy_prefix']:,} pkts) | {r['scapy_rss']:.0f} MB | "
               if r["scapy_rate"] else "not run | - | ")
            + (f"{ours_rate / t_rate:.1f}x | " if t_rate else "- | ")
            + (f"{ours_rate / r['scapy_rate']:.0f}x |" if r["scapy_rate"] else "- |"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
