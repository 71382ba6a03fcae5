"""Replay against tshark, exactly: per-connection packets and payload bytes in each direction,
TLS/QUIC server names and DNS answers, on scapy-written fixtures, the simulator's output and public
captures.

tshark's ``-z conv`` rounds byte totals, so the reference sums per-packet fields per stream.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw
from test_replay import LINKS, T0, client_hello, framed, tcp_conv, write

from observer.config import LabConfig, TimeWindow
from observer.sources import ReplayStats, replay_tables

TSHARK = shutil.which("tshark")
CAPTURES = Path(__file__).parents[2] / "shared" / "captures"
pytestmark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")

FIELDS = ["tcp.stream", "udp.stream", "ip.src", "ipv6.src", "tcp.srcport", "udp.srcport",
          "tcp.len", "udp.length", "ip.dst", "ipv6.dst", "tcp.dstport", "udp.dstport", "icmp.type",
          "icmpv6.type", "tls.handshake.type", "tls.handshake.extensions_server_name",
          "dns.flags.response", "dns.a", "dns.aaaa", "dns.cname"]

# Public captures where tshark and replay count the same packets.  Left out on purpose: tunnels
# (tshark follows the inner flow), IP fragments (tshark reassembles them into one frame, replay
# counts each fragment as a packet of its flow), link types replay does not read, and TLS on a
# port tshark does not dissect as TLS (ssl-to-http-server.pcap).
# file -> also compare names: not where DNS travels over TCP (replay reads DNS over UDP) or where
# tshark's dns.a also lists the additional section's glue records (replay keeps answers only)
TCPDUMP = {
    "ssh.pcap": True, "mptcp-v0.pcap": True, "bgp-4byte-asn.pcap": True, "dns_tcp.pcap": False,
    "edns-opts.pcap": True, "dnssec.pcap": False, "pptp.pcap": True, "quic_handshake.pcap": True,
    "ikev2four.pcap": True, "babel_rtt.pcap": True, "LINKTYPE_RAW_ipv6.pcap": True,
    "resp_1_benchmark.pcap": True, "mptcp-v1.pcap": True, "tcp-handshake-nano.pcap": True,
    "LINKTYPE_IPV4.pcap": True, "bgp-role.pcapng": True, "ahcp.pcapng": True,
    "of10_7050q.pcapng": True, "hoobr_nfs_printfh.pcap": True, "ipv4_tcp_http_xml_tso.pcap": True,
    "bigtcp-ipv6-hbh.pcap": True, "ipv6-routing-header.pcap": True,
}
ZEEK_SKIP = {"ssl-to-http-server.pcap"}


def tshark_rows(path: Path) -> list[dict[str, str]]:
    """tshark's per-packet fields (all occurrences, joined by '|'), one dict per frame."""
    cmd = [TSHARK, "-n", "-r", str(path), "-T", "fields", "-E", "separator=\t",
           "-E", "occurrence=a", "-E", "aggregator=|"]
    for f in FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return [dict(zip(FIELDS, (line.split("\t") + [""] * len(FIELDS))[: len(FIELDS)],
                     strict=True)) for line in out.splitlines()]


def tshark_connections(rows: list[dict[str, str]]) -> Counter:
    """Multiset of (proto, (endpoint, packets sent, payload bytes sent) per side) per stream.

    Frames of ICMP errors (which quote a UDP/TCP header) and of tunnels (several IP layers) are
    left out: replay gives them to no flow.
    """
    streams: dict[tuple, dict] = {}
    for r in rows:
        src, dst = r["ip.src"] or r["ipv6.src"], r["ip.dst"] or r["ipv6.dst"]
        if r["icmp.type"] or r["icmpv6.type"] or not src or "|" in src + dst:
            continue
        if r["tcp.stream"] and "|" not in r["tcp.stream"]:
            key = ("tcp", r["tcp.stream"])
            sport, dport, size = r["tcp.srcport"], r["tcp.dstport"], int(r["tcp.len"] or 0)
        elif r["udp.stream"] and "|" not in r["udp.stream"]:
            key = ("udp", r["udp.stream"])
            sport, dport, size = r["udp.srcport"], r["udp.dstport"], int(r["udp.length"]) - 8
        else:
            continue
        sides = streams.setdefault(key, {})
        sides.setdefault((dst, int(dport)), [0, 0])
        side = sides.setdefault((src, int(sport)), [0, 0])
        side[0] += 1
        side[1] += size
    return Counter((k[0], *sorted((ep, *v) for ep, v in sides.items()))
                   for k, sides in streams.items())


def replay_connections(conns: pd.DataFrame) -> Counter:
    """The same multiset from replay's connections table (QUIC counted as UDP)."""
    out: Counter = Counter()
    for r in conns.itertuples():
        client = ((r.client_ip, int(r.client_port)), int(r.packets_up), int(r.bytes_up))
        server = ((r.server_ip, int(r.server_port)), int(r.packets_down), int(r.bytes_down))
        out[("tcp" if r.proto == "tcp" else "udp", *sorted([client, server]))] += 1
    return out


def tshark_names(rows: list[dict[str, str]]) -> Counter:
    """Server names of ClientHellos (TLS and QUIC), the first of each stream."""
    first: dict[tuple, str] = {}
    for r in rows:
        name = r["tls.handshake.extensions_server_name"]
        if name and "1" in r["tls.handshake.type"].split("|"):
            first.setdefault((r["tcp.stream"], r["udp.stream"]), name.split("|")[0].lower())
    return Counter(first.values())


def tshark_dns(rows: list[dict[str, str]]) -> Counter:
    out: Counter = Counter()
    for r in rows:
        if r["dns.flags.response"] == "1":
            for kind, field in (("A", "dns.a"), ("AAAA", "dns.aaaa"), ("CNAME", "dns.cname")):
                out.update((kind, v.lower()) for v in r[field].split("|") if v)
    return out


def assert_same_as_tshark(path: Path, *, names: bool = True) -> pd.DataFrame:
    stats = ReplayStats()
    # tshark never splits UDP flows, and reads the old traces' 1970s times too
    tables = replay_tables([path], config=LabConfig(time_window=TimeWindow(earliest=0)),
                           udp_idle_s=1e9, stats=stats)
    conns = tables["connections"]
    rows = tshark_rows(path)
    ours, ref = replay_connections(conns), tshark_connections(rows)
    assert ours == ref, f"{path.name}: replay only {ours - ref}, tshark only {ref - ours}"
    if names:
        named = conns[conns["name_source"].isin(["sni", "quic"])]
        assert Counter(named["server_name"]) == tshark_names(rows), path.name
        dns = tables["dns"]
        assert Counter(zip(dns["answer_type"], dns["answer"].str.lower(), strict=True)) == \
            tshark_dns(rows), path.name
    return conns


def test_fixtures_of_every_link_type_and_version(tmp_path):
    """One file mixing IPv4/IPv6, TCP/UDP, VLAN tags, a reused port and a split ClientHello."""
    packets = framed(lambda p: Ether() / p, tcp_conv(up=(10, 1460, 3), down=(1460, 1460)))
    packets += framed(lambda p: Ether() / Dot1Q(vlan=9) / p,
                      tcp_conv(c="2001:db8::5", s="2001:db8::1", ip=IPv6, t0=T0 + 5,
                               close="rst"))
    hello = client_hello("mail.example.org")
    conv = tcp_conv(t0=T0 + 7, up=(), down=(99,), cport=40000, isn=7777)  # the first's 5-tuple
    for i, data in enumerate([hello[:20], hello[20:]]):
        seg = IP(src="10.0.0.2", dst="93.184.216.34") / TCP(sport=40000, dport=443, flags="PA",
                                                           seq=7778 + 20 * i) / Raw(data)
        seg.time = conv[2].time + 0.001 * (i + 1)
        conv.insert(3 + i, seg)
    packets += framed(lambda p: Ether() / p, conv)
    for i in range(5):
        p = Ether() / IP(src="10.0.0.2", dst="9.9.9.9") / UDP(sport=5555, dport=53) / Raw(
            b"\x12" * (20 + i))
        p.time = T0 + 10 + i
        packets.append(p)
    path = write(tmp_path / "mix.pcap", packets)
    conns = assert_same_as_tshark(path)
    assert len(conns) == 4 and set(conns["server_name"].dropna()) == {"mail.example.org"}


def test_simulated_day_matches_tshark(tmp_path):
    simulate = pytest.importorskip("observer.simulate")
    scenario = simulate.load_scenario("week").with_days(1)
    path = tmp_path / "day.pcap"
    simulate.simulate(scenario, path, progress=False)
    conns = assert_same_as_tshark(path)
    assert (conns["proto"] == "quic").any() and (conns["name_source"] == "sni").any()


def zeek_files() -> list[Path]:
    folder = CAPTURES / "zeek-tls"
    return sorted(p for p in folder.glob("*.pcap*") if p.name not in ZEEK_SKIP)


@pytest.mark.slow
@pytest.mark.skipif(not (CAPTURES / "zeek-tls").is_dir(), reason="public captures are absent")
def test_zeek_tls_traces_match_tshark():
    files = zeek_files()
    assert len(files) > 60
    named = 0
    for path in files:
        named += int(assert_same_as_tshark(path)["server_name"].notna().sum())
    assert named > 20


@pytest.mark.skipif(not (CAPTURES / "tcpdump-tests").is_dir(), reason="public captures absent")
@pytest.mark.parametrize("name", list(TCPDUMP))
def test_tcpdump_captures_match_tshark(name):
    """Link types NULL, Ethernet, SLL, raw IPv4/IPv6; big-endian, nanosecond and pcapng files;
    TSO (IP length 0), an IPv6 jumbogram, a routing header, QUIC, DNS."""
    assert_same_as_tshark(CAPTURES / "tcpdump-tests" / name, names=TCPDUMP[name])


@pytest.mark.parametrize("link", list(LINKS))
def test_every_link_type_fixture_matches_tshark(tmp_path, link):
    linktype, wrap = LINKS[link]
    packets = tcp_conv(c="192.168.1.7", up=(1, 1400), down=(1400, 1400, 3), close="rst")
    path = write(tmp_path / f"{link}.pcap", framed(wrap, packets), linktype=linktype)
    assert len(assert_same_as_tshark(path)) == 1
