"""Replay speed and memory beside tshark and a scapy loop, on the same files, in the same run.

Pcap files of 200k, 2M and 20M packets are cut (editcap) from simulated phone traffic
(``observer.simulate``, scenario "week" stretched to enough days).  For each file it times, in
separate processes:

- ours: ``observer.sources.replay`` (read, track, name, write the Parquet records);
- tshark: ``tshark -q -n -z conv,tcp -z conv,udp`` (conversation tables, nothing written);
- nfstream 6.6 (a C engine with nDPI; not a project dependency): ``NFStreamer`` with one meter
  process and idle/active timeouts of 10^9 s, so that its flows are our connections (with its
  default 120 s idle timeout it splits long-lived quiet connections); flows counted, nothing
  written.  It runs under ``--nfstream-python`` (default: this Python if it imports nfstream),
  e.g. a separate venv: ``python3 -m venv /tmp/nf && /tmp/nf/bin/pip install nfstream==6.6.0``;
- scapy: a ``PcapReader`` loop that pulls the same header fields into a dict per 5-tuple; it is
  stopped after ``--scapy-seconds`` of CPU and its rate extrapolated to the file (said so below).

Rates are packets per CPU second (user + sys of that process, start-up, imports and exit
included): the fair "one core" figure on a machine whose two cores are shared.  "in replay()"
leaves out the interpreter start-up and imports (~0.35 s of numpy, pandas, pyarrow).  Wall seconds
are beside them.  Peak RSS is each process's own maximum resident set.  Medians of ``--runs``
runs; run i of every reader on a file comes before run i + 1 of any (ours, tshark, nfstream, ours,
...), so a shared machine's load hits all of them alike.  Our process runs with its bytecode cached
(in a temporary ``PYTHONPYCACHEPREFIX``, compiled by one untimed import first), as after an
installation, even where the environment says ``PYTHONDONTWRITEBYTECODE``: else every run would
compile our modules from source (~0.07 s); the peers' Python modules are installed compiled.

    .venv/bin/python benchmarks/replay.py [--sizes 200000 2000000 20000000] [--runs 3]
        [--scapy-seconds 20] [--tshark-max 20000000] [--keep] [--only-ours]
        [--nfstream-python PYTHON]

``--only-ours`` runs only our reader (speed and peak RSS; the peers' columns are left out).
Beside each file up to ``--tunnel-max`` packets, ours also reads the same packets wrapped in VXLAN
(every packet decapsulated: the outer UDP flows and the inner connections), so the cost of
decapsulation shows next to the plain rate.

tshark keeps ~600 bytes per packet (docs/performance.md): it is not run on files above
``--tshark-max`` packets, nor where the machine has less memory available than it would take
(~12 GB for the 20M file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data" / "replay"
PYTHON = sys.executable
PACKETS_PER_DAY = 142_000  # the "week" scenario's phone, measured
TSHARK_BYTES = 700  # per packet, with headroom: tshark's conversation tables keep ~590

OURS = """
import json, sys, time
from pathlib import Path
from observer.sources import replay
from observer.sources.pipeline import tune_process
start = time.process_time()
tune_process()  # as `observer replay` does
stats = replay([Path(sys.argv[1])], Path(sys.argv[2]), overwrite=True, progress=False)
print(json.dumps({"packets": stats.packets, "connections": stats.connections,
                  "errors": stats.errors, "inner": time.process_time() - start}))
"""

NFSTREAM = """
import json, sys, time
from nfstream import NFStreamer
start = time.process_time()
flows = packets = 0
for flow in NFStreamer(source=sys.argv[1], idle_timeout=10**9, active_timeout=10**9, n_meters=1,
                       statistical_analysis=False):
    flows += 1
    packets += flow.bidirectional_packets
print(json.dumps({"flows": flows, "packets": packets, "inner": time.process_time() - start}))
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


def tunnelled(path: Path) -> Path:
    """The same packets, each inside VXLAN (outer Ethernet, IPv4, UDP 4789, VXLAN: 50 bytes more):
    what a cloud VPC mirror delivers (cached)."""
    out = path.with_name(path.stem + "-vxlan.pcap")
    if out.exists():
        return out
    outer = bytes.fromhex("020000000002020000000001" "0800")  # Ethernet
    with open(path, "rb") as src, open(out.with_suffix(".tmp"), "wb") as dst:
        head = src.read(24)
        order = "<" if head[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        dst.write(head)
        rec = struct.Struct(order + "IIII")
        while len(hdr := src.read(16)) == 16:
            sec, frac, caplen, length = rec.unpack(hdr)
            frame = src.read(caplen)
            size = 20 + 8 + 8 + length
            ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, 17, 0,
                             bytes((192, 0, 2, 1)), bytes((192, 0, 2, 2)))
            udp = struct.pack(">HHHH", 49152 + (sec & 0xFFF), 4789, size - 20, 0)
            dst.write(rec.pack(sec, frac, caplen + 50, length + 50) + outer + ip + udp
                      + b"\x08\0\0\0\0\0\x07\0" + frame)
    out.with_suffix(".tmp").rename(out)
    return out


def nfstream_python(choice: str | None) -> str | None:
    """The Python that runs nfstream: ``choice``, else this one if it imports nfstream."""
    if choice:
        return choice
    found = subprocess.run([PYTHON, "-c", "import nfstream"], capture_output=True)
    return PYTHON if found.returncode == 0 else None


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def available_bytes() -> int:
    """Memory the machine has available now (Linux), else 0."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def bytecode_env(env: dict[str, str], cache: str) -> dict[str, str]:
    """``env`` for our process with its bytecode cached in ``cache`` (see the module text)."""
    ours = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    ours["PYTHONPYCACHEPREFIX"] = cache
    subprocess.run([PYTHON, "-c", "import observer.sources.pipeline"], env=ours, check=True)
    return ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 2_000_000, 20_000_000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scapy-seconds", type=float, default=20.0)
    parser.add_argument("--tshark-max", type=int, default=20_000_000)
    parser.add_argument("--keep", action="store_true", help="keep the large capture files")
    parser.add_argument("--tunnel-max", type=int, default=2_000_000,
                        help="also time the same packets inside VXLAN up to this many packets")
    parser.add_argument("--only-ours", action="store_true",
                        help="run only our reader (no tshark, no nfstream, no scapy loop)")
    parser.add_argument("--nfstream-python", metavar="PYTHON",
                        help="a Python with nfstream 6.6 installed (default: this one, if it has "
                        "it; else nfstream is not run)")
    args = parser.parse_args()
    nf_python = None if args.only_ours else nfstream_python(args.nfstream_python)
    if nf_python is None and not args.only_ours:
        print("nfstream not found: not run (see --nfstream-python)", flush=True)
    if not shutil.which("editcap"):
        raise SystemExit("editcap (part of tshark/wireshark-common) is needed to cut the files")
    tshark = shutil.which("tshark")
    pycache = tempfile.TemporaryDirectory()
    env = bytecode_env(dict(os.environ, PYTHONPATH=str(ROOT)), pycache.name)
    rows = []
    source = simulated(max(args.sizes))
    for size in sorted(args.sizes):
        path = build(size, source)
        mb = path.stat().st_size / 1e6
        runs = args.runs if size < 10_000_000 else max(1, args.runs - 2)
        use_tshark = tshark and size <= args.tshark_max and not args.only_ours
        if use_tshark and available_bytes() < TSHARK_BYTES * size:
            print(f"tshark not run on {size:,} packets: it would need ~"
                  f"{TSHARK_BYTES * size / 1e9:.0f} GB, {available_bytes() / 1e9:.0f} GB are "
                  "available", flush=True)
            use_tshark = False
        ours, shark, nf = [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(runs):  # interleaved: load on the machine hits every reader alike
                r = run([PYTHON, "-c", OURS, str(path), tmp], env=env)
                r.update(json.loads(r["out"]))
                ours.append(r)
                if use_tshark:
                    shark.append(run([tshark, "-q", "-n", "-z", "conv,tcp", "-z", "conv,udp",
                                      "-r", str(path)], env=dict(os.environ, LC_ALL="C")))
                if nf_python:
                    r = run([nf_python, "-c", NFSTREAM, str(path)])
                    r.update(json.loads(r["out"]))
                    nf.append(r)
        packets = ours[0]["packets"]
        tunnel = []
        if size <= args.tunnel_max:
            with tempfile.TemporaryDirectory() as tmp:
                for _ in range(runs):
                    tunnel.append(run([PYTHON, "-c", OURS, str(tunnelled(path)), tmp], env=env))
        scapy = {"packets": 0, "cpu": 0.0, "rss": 0.0}
        if not args.only_ours:
            scapy = run([PYTHON, "-c", SCAPY, str(path), str(args.scapy_seconds)], env=env)
            scapy.update(json.loads(scapy["out"]))
        row = {
            "packets": packets, "mb": mb, "connections": ours[0]["connections"],
            "ours_cpu": median(ours, "cpu"), "ours_wall": median(ours, "wall"),
            "ours_inner": median(ours, "inner"),
            "ours_rss": max(r["rss"] for r in ours), "ours_runs": len(ours),
            "each": {name: [round(r["cpu"], 2) for r in runs]
                     for name, runs in (("ours", ours), ("tshark", shark), ("nfstream", nf))},
            "tunnel_cpu": median(tunnel, "cpu") if tunnel else None,
            "tshark_cpu": median(shark, "cpu") if shark else None,
            "tshark_wall": median(shark, "wall") if shark else None,
            "tshark_rss": max(r["rss"] for r in shark) if shark else None,
            "nf_cpu": median(nf, "cpu") if nf else None,
            "nf_wall": median(nf, "wall") if nf else None,
            "nf_rss": max(r["rss"] for r in nf) if nf else None,
            "nf_flows": nf[0]["flows"] if nf else None,
            "nf_packets": nf[0]["packets"] if nf else None,
            "scapy_rate": scapy["packets"] / scapy["cpu"] if scapy["cpu"] else None,
            "scapy_prefix": scapy["packets"],
            "scapy_rss": scapy["rss"],
        }
        rows.append(row)
        print_row(row, flush=True)
        if size >= 10_000_000 and not args.keep:
            path.unlink()
    pycache.cleanup()
    print()
    print(table(rows))
    print()
    for r in rows:
        print(ratios(r))
    if not args.keep:
        for big in DATA.glob("week-*d.pcap"):
            if big.stat().st_size > 500e6:
                big.unlink()
    return 0


def rate(packets: int, seconds: float | None) -> str:
    return f"{packets / seconds / 1e6:.2f}M" if seconds else "-"


def ratios(r: dict) -> str:
    """The targets' line: ours against nfstream and tshark, packets per CPU second."""
    ours = r["packets"] / r["ours_cpu"]
    parts = [f"{r['packets']:,} packets: ours {ours:,.0f} pkts/s (CPU, whole process, median of "
             f"{r['ours_runs']}), peak {r['ours_rss']:.0f} MB"]
    for name, key in (("nfstream", "nf_cpu"), ("tshark", "tshark_cpu")):
        if r[key]:
            parts.append(f"{ours / (r['packets'] / r[key]):.2f}x {name}")
        else:
            parts.append(f"{name} not run")
    return "; ".join(parts)


def print_row(r: dict, **kw) -> None:
    print(f"{r['packets']:>11,} pkts {r['mb']:8.0f} MB | ours {r['ours_cpu']:.2f} cpu-s "
          f"{r['ours_wall']:.2f} wall-s {r['ours_rss']:.0f} MB | in VXLAN "
          f"{r['tunnel_cpu'] or 0:.2f} cpu-s | tshark "
          f"{r['tshark_cpu'] or 0:.2f} cpu-s {r['tshark_rss'] or 0:.0f} MB | nfstream "
          f"{r['nf_cpu'] or 0:.2f} cpu-s {r['nf_rss'] or 0:.0f} MB {r['nf_flows'] or 0:,} flows "
          f"(ours {r['connections']:,}) | scapy "
          f"{r['scapy_rate'] or 0:,.0f}/s | cpu-s of each run {r['each']}", **kw)


def table(rows: list[dict]) -> str:
    head = ("| packets | MB | ours pkts/s (CPU) | ours MB/s | ours pkts/s in replay() "
            "| ours wall s | ours peak RSS | nfstream pkts/s (CPU) | nfstream peak RSS "
            "| nfstream flows / ours | "
            "tshark pkts/s (CPU) | tshark wall s | tshark peak RSS | scapy pkts/s (CPU, prefix) "
            "| scapy peak RSS | ours / nfstream | ours / tshark | ours / scapy "
            "| ours in VXLAN pkts/s (CPU) |")
    lines = [head, "|" + "---|" * 19]
    for r in rows:
        ours_rate = r["packets"] / r["ours_cpu"]
        t_rate = r["packets"] / r["tshark_cpu"] if r["tshark_cpu"] else None
        n_rate = r["packets"] / r["nf_cpu"] if r["nf_cpu"] else None
        lines.append(
            f"| {r['packets']:,} | {r['mb']:.0f} | {ours_rate:,.0f} | {r['mb'] / r['ours_cpu']:.0f}"
            f" | {r['packets'] / r['ours_inner']:,.0f} | {r['ours_wall']:.1f} | "
            f"{r['ours_rss']:.0f} MB | "
            + (f"{n_rate:,.0f} | {r['nf_rss']:.0f} MB | {r['nf_flows']:,} / {r['connections']:,} | "
               if n_rate else "not run | - | - | ")
            + (f"{t_rate:,.0f} | {r['tshark_wall']:.1f} | {r['tshark_rss']:.0f} MB | "
               if t_rate else "not run | - | - | ")
            + (f"{r['scapy_rate']:,.0f} ({r['scapy_prefix']:,} pkts) | {r['scapy_rss']:.0f} MB | "
               if r["scapy_rate"] else "not run | - | ")
            + (f"{ours_rate / n_rate:.2f}x | " if n_rate else "- | ")
            + (f"{ours_rate / t_rate:.2f}x | " if t_rate else "- | ")
            + (f"{ours_rate / r['scapy_rate']:.0f}x |" if r["scapy_rate"] else "- |")
            + (f" {r['packets'] / r['tunnel_cpu']:,.0f} |" if r["tunnel_cpu"] else " - |"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
