"""Agreement with Zeek's conn.log on the traces of Zeek's own test suite.

Each trace in ../shared/captures/zeek-conn is replayed and every TCP/UDP connection of Zeek's
baseline is looked up by its endpoints: it agrees when packets and IP bytes match exactly in both
directions.  Zeek's rules, not these files, are what replay follows (docs/interop.md, "Agreement
with Zeek").
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from observer.config import TimeWindow
from observer.records import conform
from observer.sources.engine import FlowEngine, FlowSettings
from observer.sources.pcapfile import Batches

ZEEK = Path(__file__).resolve().parents[2] / "shared" / "captures" / "zeek-conn"
TARGET = 0.95
# Zeek's settings as its test suite runs them: a flow idle for udp_/tcp_inactivity_timeout (1 and
# 5 min) ends; a TCP connection is gone tcp_close_delay/tcp_reset_delay (5 s) after both FINs or a
# RST; a TCP header cut by the snap length counts no packet; checksums are not verified (most of
# its tests run with -C).  Some traces are from 1970 (PPP): the time window allows them.
ZEEK_SETTINGS = FlowSettings(udp_idle_s=60.0, tcp_idle_s=300.0, close_delay_s=5.0,
                             cut_headers=True)
ANY_TIME = TimeWindow(earliest=0.0)


def replay_zeek(path: Path) -> pd.DataFrame:
    """The connections of one trace through the flow engine with Zeek's settings."""
    parts: list[pd.DataFrame] = []
    engine = FlowEngine(ZEEK_SETTINGS, lambda name, frame: parts.append(frame)
                        if name == "connections" else None)
    for batch in Batches(path, window=ANY_TIME):
        engine.feed(batch)
    engine.flush(None)
    return conform("connections", pd.concat(parts, ignore_index=True)) if parts else \
        conform("connections", pd.DataFrame())

pytestmark = pytest.mark.skipif(not (ZEEK / "map.json").exists(), reason="no Zeek traces")


def zeek_rows(log: Path) -> list[dict[str, str]]:
    """TCP and UDP rows of a Zeek conn.log (TSV with #fields)."""
    fields: list[str] = []
    rows = []
    for line in log.read_text().splitlines():
        if line.startswith("#fields"):
            fields = line.split("\t")[1:]
        elif line and not line.startswith("#"):
            row = dict(zip(fields, line.split("\t"), strict=False))
            if row.get("proto") in ("tcp", "udp"):
                rows.append(row)
    return rows


def _ends(a: tuple, b: tuple, counts: tuple) -> tuple[tuple, tuple]:
    """A direction-free key and the counts ordered by endpoint (lower endpoint first)."""
    if a <= b:
        return (a, b), counts
    return (b, a), (counts[2], counts[3], counts[0], counts[1])


def compare(test: str, trace: str) -> tuple[int, list[str]]:
    """Zeek connections of ``test`` that replay reproduces exactly, and the differences."""
    zeek = zeek_rows(ZEEK / "baseline" / f"{test}.conn.log")
    conns = replay_zeek(ZEEK / "traces" / trace)
    ours: dict[tuple, Counter] = {}
    for r in conns.itertuples():
        proto = "tcp" if r.proto == "tcp" else "udp"
        key, counts = _ends((r.client_ip, int(r.client_port)), (r.server_ip, int(r.server_port)),
                            (int(r.packets_up), int(r.wire_bytes_up), int(r.packets_down),
                             int(r.wire_bytes_down)))
        ours.setdefault((proto, key), Counter())[counts] += 1
    agree, diffs = 0, []
    for z in zeek:
        key, counts = _ends((z["id.orig_h"], int(z["id.orig_p"])),
                            (z["id.resp_h"], int(z["id.resp_p"])),
                            tuple(int(z[f]) for f in ("orig_pkts", "orig_ip_bytes", "resp_pkts",
                                                      "resp_ip_bytes")))
        have = ours.get((z["proto"], key), Counter())
        if have[counts] > 0:
            have[counts] -= 1
            agree += 1
        else:
            diffs.append(f"{test}: {z['proto']} {z['id.orig_h']}:{z['id.orig_p']} > "
                         f"{z['id.resp_h']}:{z['id.resp_p']} zeek {counts} "
                         f"ours {sorted(c for c, n in have.items() if n > 0) or 'none'}")
    return agree, diffs


def measure() -> tuple[int, int, list[str]]:
    agree = total = 0
    diffs: list[str] = []
    for entry in json.loads((ZEEK / "map.json").read_text()):
        n, d = compare(entry["test"], entry["trace_file"])
        agree += n
        total += n + len(d)
        diffs += d
    return agree, total, diffs


def test_agreement_with_zeek(capsys) -> None:
    agree, total, diffs = measure()
    with capsys.disabled():
        print(f"\nZeek agreement: {agree}/{total} = {agree / total:.1%} of Zeek's TCP/UDP "
              "connections exact (packets and IP bytes both ways)")
        for line in diffs:
            print("  differs:", line)
    assert total > 0
    assert agree / total >= TARGET


if __name__ == "__main__":
    a, t, d = measure()
    print("\n".join(d))
    print(f"{a}/{t} = {a / t:.1%}")


def test_zeek_rules_on_written_packets(tmp_path):
    """Zeek's rules on packets written here: a SYN nobody answered ends its connection after 5 s
    (a one-sided capture splits there); 5 s after a RST a connection is gone; an IP datagram
    missing a fragment counts nothing, a complete one counts once with its whole length."""
    from scapy.layers.inet import IP, TCP, UDP, fragment
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    from scapy.utils import PcapWriter

    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    a, b = "10.0.0.2", "10.0.0.9"
    syn = [(0.0, eth / IP(src=a, dst=b) / TCP(sport=40000, dport=22, flags="S"))]
    acks = [(t, eth / IP(src=a, dst=b) / TCP(sport=40000, dport=22, flags="A") / Raw(b"x"))
            for t in (1.0, 2.0, 6.0, 7.0)]
    whole = fragment(IP(src=a, dst=b, id=1) / UDP(sport=5000, dport=9) / Raw(b"y" * 2000), 800)
    part = fragment(IP(src=a, dst=b, id=2) / UDP(sport=5001, dport=9) / Raw(b"z" * 2000), 800)
    up, down = IP(src=a, dst=b) / TCP(sport=41000, dport=80), IP(src=b, dst=a) / TCP(
        sport=80, dport=41000)
    rst = [(t, eth / p.copy()) for t, p in ((10.0, up), (10.1, down), (11.0, up), (13.0, down),
                                            (17.0, down))]
    for (_, p), flags in zip(rst, ("S", "SA", "R", "A", "A"), strict=True):
        p[TCP].flags = flags  # the ACK 2 s after the RST is the same connection, 6 s after not
    packets = [*syn, *acks, *((8.0, eth / f) for f in whole), *((9.0, eth / f) for f in part[:-1]),
               *rst]
    path = tmp_path / "rules.pcap"
    with PcapWriter(str(path), linktype=1, sync=True) as w:
        for t, p in packets:
            p.time = 1_700_000_000 + t
            w.write(p)
    conns = replay_zeek(path).sort_values("ts_start")
    tcp = conns[(conns["proto"] == "tcp") & (conns["server_port"] == 22)]
    assert list(tcp["packets_up"]) == [3, 2]  # SYN + 2 ACKs, then a new one at 6 s
    web = conns[(conns["proto"] == "tcp") & (conns["server_port"] != 22)]
    assert [(r.packets_up + r.packets_down) for r in web.itertuples()] == [4, 1]
    udp = conns[conns["proto"] != "tcp"]
    assert list(zip(udp["client_port"], udp["packets_up"], udp["wire_bytes_up"],
                    strict=True)) == [(5000, 1, 20 + 8 + 2000)]
