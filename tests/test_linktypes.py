"""Link types and tunnels replay reads, each on a real file: public captures (Zeek's and tcpdump's
test traces) where one exists, else packets written with scapy.  Bad tunnel headers are counted
skips, never tracebacks."""

from __future__ import annotations

import struct
from pathlib import Path

import pandas as pd
import pytest
from scapy.contrib.erspan import ERSPAN_II, ERSPAN_III
from scapy.contrib.gtp import GTP_U_Header
from scapy.layers.dot11 import Dot11, Dot11QoS, RadioTap
from scapy.layers.inet import GRE, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import LLC, SNAP, Dot1AD, Dot1Q, Ether
from scapy.layers.ppp import PPP, PPPoE
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw
from scapy.utils import PcapWriter

from observer.config import LabConfig, TimeWindow
from observer.sources import ReplayStats, replay_tables
from observer.sources.decode import Decoder
from observer.sources.pcapfile import Batches

SHARED = Path(__file__).resolve().parents[2] / "shared" / "captures"
ZEEK, TCPDUMP = SHARED / "zeek-conn" / "traces", SHARED / "tcpdump-tests"
ANY_TIME = LabConfig(time_window=TimeWindow(earliest=0.0))  # some test traces are from 1970
T0 = 1_700_000_000.0
CLIENT, SERVER = "10.0.0.2", "93.184.216.34"
OUT_A, OUT_B = "192.0.2.1", "192.0.2.2"


def eth(**kw) -> Ether:
    """Ethernet with fixed addresses (scapy would otherwise look them up, slowly)."""
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", **kw)


def replay(path: Path, stats: ReplayStats | None = None) -> dict[str, pd.DataFrame]:
    if not path.exists():
        pytest.skip(f"{path} not available")
    return replay_tables([path], config=ANY_TIME, stats=stats)


def write(path: Path, packets: list, linktype: int = 1) -> Path:
    with PcapWriter(str(path), linktype=linktype, sync=True) as w:
        for i, p in enumerate(packets):
            p.time = T0 + i * 0.01
            w.write(p)
    return path


def inner_tcp(payload: bytes = b"hello") -> list:
    """A short TCP exchange client -> server: SYN, SYN-ACK, data, ACK."""
    return [IP(src=CLIENT, dst=SERVER) / TCP(sport=40000, dport=443, flags="S"),
            IP(src=SERVER, dst=CLIENT) / TCP(sport=443, dport=40000, flags="SA"),
            IP(src=CLIENT, dst=SERVER) / TCP(sport=40000, dport=443, flags="PA") / payload,
            IP(src=SERVER, dst=CLIENT) / TCP(sport=443, dport=40000, flags="A")]


def only(conns: pd.DataFrame, **match) -> pd.Series:
    rows = conns
    for k, v in match.items():
        rows = rows[rows[k] == v]
    assert len(rows) == 1, (match, conns.to_string())
    return rows.iloc[0]


def the_inner(conns: pd.DataFrame) -> pd.Series:
    row = only(conns, client_ip=CLIENT, server_port=443)
    assert (row.packets_up, row.packets_down, row.bytes_up) == (2, 2, 5)
    assert row.wire_bytes_up == 40 + 45
    return row


# -- link types -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["wlanmon.pcap", "radiotap.pcap"])
def test_80211_open_network_data_frames_decode(name):
    conns = replay(ZEEK / name)["connections"]
    dns = only(conns, client_ip="172.17.156.76", server_port=53)
    assert (dns.packets_up, dns.wire_bytes_up, dns.packets_down, dns.wire_bytes_down) == (
        1, 63, 1, 156)
    assert len(only(conns, server_ip="ff02::fb").shape) == 1


def test_ppp_link_type():
    conns = replay(ZEEK / "ppp__quic-interop-retry.pcap")["connections"]
    quic = only(conns, client_ip="193.167.0.100")
    assert (quic.packets_up, quic.wire_bytes_up, quic.packets_down, quic.wire_bytes_down) == (
        10, 4319, 12, 12332)


def test_nflog_link_type():
    stats = ReplayStats()
    conns = replay(TCPDUMP / "nflog.pcap", stats)["connections"]
    assert len(conns) >= 1 and not stats.errors
    assert not any("unsupported" in k for k in stats.skipped)


@pytest.mark.parametrize("name, conns_expected", [
    ("pppoe.pcap", 2), ("mpls-in-vlan.pcap", 3), ("mixed-vlan-mpls.pcap", 3),
    ("cisco-fabric-path.pcap", 32), ("vntag_vlan_sandwich_clean.pcap", 1)])
def test_encapsulated_ethernet_public(name, conns_expected):
    conns = replay(ZEEK / name)["connections"]
    assert len(conns) == conns_expected


def test_pppoe_in_qinq_and_pbb(tmp_path):
    ppp = [eth() / Dot1AD(vlan=10) / Dot1Q(vlan=20) / PPPoE(sessionid=7) / PPP(proto=0x0021) / p
           for p in inner_tcp()]
    # 802.1ah: B-tag, I-tag (0x88E7, 4 bytes), customer addresses, then the customer's frame
    pbb = [eth(type=0x8100) / Dot1Q(vlan=5, type=0x88E7)
           / Raw(struct.pack(">I", 0x00012345) + b"\x02" * 12 + b"\x08\x00") / p
           for p in inner_tcp()]
    the_inner(replay(write(tmp_path / "pppoe-qinq.pcap", ppp))["connections"])
    the_inner(replay(write(tmp_path / "pbb.pcap", pbb))["connections"])


def test_protected_80211_frames_are_counted_per_station(tmp_path):
    station, ap = "02:00:00:00:00:01", "02:00:00:00:00:aa"
    up = RadioTap() / Dot11(type=2, subtype=8, FCfield=0x41, addr1=ap, addr2=station,
                            addr3=ap) / Dot11QoS() / Raw(b"\x00" * 100)
    down = RadioTap() / Dot11(type=2, subtype=0, FCfield=0x42, addr1=station,
                              addr2=ap, addr3=ap) / Raw(b"\x00" * 60)
    open_frame = RadioTap() / Dot11(type=2, subtype=0, FCfield=0x01, addr1=ap, addr2=station,
                                    addr3=ap) / LLC() / SNAP(code=0x0800) / inner_tcp()[0]
    stats = ReplayStats()
    tables = replay(write(tmp_path / "wpa.pcap", [up, up, down, open_frame], linktype=127),
                    stats)
    link = tables["link_activity"]
    row = only(link, station=station)
    assert (row.bssid, row.frames_up, row.frames_down) == (ap, 2, 1)
    assert row.bytes_up == 2 * len(up[Dot11]) and row.bytes_down == len(down[Dot11])
    assert only(tables["connections"], client_ip=CLIENT).packets_up == 1
    assert stats.skipped["802.11 protected (counted in link_activity)"] == 3
    assert not stats.skipped["not IP"]  # counted once, as protected


# -- tunnels --------------------------------------------------------------------------------------
def outer_row(conns: pd.DataFrame, port: int) -> pd.Series:
    return only(conns, server_port=port, client_ip=OUT_A)


@pytest.mark.parametrize("name, inner_port", [
    ("tunnels__gre-pptp.pcap", 53), ("tunnels__gre-within-gre.pcap", 520),
    ("tunnels__gre-aruba-amsdu.pcap", 49392), ("tunnels__geneve-47101.pcap", 443),
    ("tunnels__geneve-vxlan-dns-truncated.pcap", 53),
    ("tunnels__gtp__gtp1_gn_normal_incl_fragmentation.pcap", 80),
    ("tunnels__gtp__gtp7_ipv6.pcap", 5355), ("tunnels__teredo_bubble_with_payload.pcap", 80),
    ("tunnels__ayiya-large-identity.pcap", 40001)])
def test_zeek_tunnel_traces_give_inner_connections(name, inner_port):
    conns = replay(ZEEK / name)["connections"]
    inner = conns[(conns["server_port"] == inner_port) | (conns["client_port"] == inner_port)]
    assert len(inner) and inner["tunnel"].notna().all(), conns.to_string()
    for outer in inner["tunnel"]:
        for part in outer.split(","):  # an outer UDP connection is a row of its own
            assert part.startswith(("gre ", "ipip ", "ip6 ")) or part in set(conns["conn_id"])


@pytest.mark.parametrize("name", ["erspan-type-i-1.pcap", "erspan-type-ii-1.pcap",
                                  "erspan-type-iii-ft-0.pcap", "vxlan.pcap", "geneve.pcap"])
def test_tcpdump_tunnel_traces_decapsulate(name):
    """Their inner packets are ICMP or ARP: decapsulated, then counted as not TCP/UDP."""
    stats = ReplayStats()
    replay(TCPDUMP / name, stats)
    assert not stats.errors and stats.skipped["not TCP or UDP"] > 0


def test_erspan_vxlan_gtp_gre_udp_ip_tunnels(tmp_path):
    framed = [eth() / p for p in inner_tcp()]
    outer = IP(src=OUT_A, dst=OUT_B)
    cases = {
        "erspan2": [eth() / outer / GRE(seqnum_present=1, proto=0x88BE) / ERSPAN_II() / e
                    for e in framed],
        "erspan3": [eth() / outer / GRE(proto=0x22EB) / ERSPAN_III() / e for e in framed],
        "vxlan": [eth() / outer / UDP(sport=5555, dport=4789) / VXLAN(vni=7) / e for e in framed],
        "gtp": [eth() / outer / UDP(sport=2152, dport=2152) / GTP_U_Header(teid=1) / p
                for p in inner_tcp()],
        "gre-udp": [eth() / outer / UDP(sport=5555, dport=4754) / GRE(proto=0x0800) / p
                    for p in inner_tcp()],
        "ipip": [eth() / IP(src=OUT_A, dst=OUT_B, proto=4) / p for p in inner_tcp()],
        "4in6": [eth() / IPv6(src="2001:db8::a", dst="2001:db8::b", nh=4) / p
                 for p in inner_tcp()],
    }
    for name, packets in cases.items():
        conns = replay(write(tmp_path / f"{name}.pcap", packets))["connections"]
        inner = the_inner(conns)
        if name in ("vxlan", "gtp", "gre-udp"):
            outer_conn = only(conns, client_ip=OUT_A)
            assert inner.tunnel == outer_conn.conn_id and outer_conn.packets_up == 4
        else:
            assert inner.tunnel.split()[0] in ("gre", "ipip", "ip6"), name
    six = [eth() / IP(src=OUT_A, dst=OUT_B, proto=41) / IPv6(src="2001:db8::2",
                                                                dst="2001:db8::1") / TCP(
        sport=1000, dport=80, flags="S")]
    conns = replay(write(tmp_path / "6in4.pcap", six))["connections"]
    assert only(conns, client_ip="2001:db8::2").tunnel == f"ip6 {OUT_A} {OUT_B}"


def test_tunnel_depth_is_bounded(tmp_path):
    path = ZEEK / "tunnels__gre-within-gre.pcap"
    if not path.exists():
        pytest.skip("no Zeek traces")
    inner = 0
    for depth, expected in ((0, 0), (1, 0), (2, 2)):
        decoder = Decoder(tunnel_depth=depth)
        pk = [decoder.decode(b) for b in Batches(path)]
        inner = sum(int((p.parent >= 0).sum() + (p.tunnel != None).sum())  # noqa: E711
                    if p.parent is not None else 0 for p in pk)
        assert (inner > 0) == (expected > 0), depth
        if depth < 2:
            assert decoder.skipped["tunnel deeper than the tunnel depth"] > 0


def test_bad_tunnel_headers_are_counted_skips(tmp_path):
    outer = eth() / IP(src=OUT_A, dst=OUT_B)
    bad = [
        outer / GRE(proto=0x0800, routing_present=1) / inner_tcp()[0],  # source routing
        outer / Raw(b"\x00\x07\x08\x00"),  # GRE version 7 (IP proto 47 set below)
        outer / UDP(sport=40000, dport=4789) / Raw(b"\x00" * 8 + b"\x01" * 20),  # no VNI flag
        outer / UDP(sport=40000, dport=2152) / Raw(b"\x50\xff\x00\x05abcdefgh"),  # GTP version 2
        outer / UDP(sport=40000, dport=5072) / Raw(b"\x41\x52\x02\x29" + b"\x00" * 4),  # opcode 2
        outer / UDP(sport=40000, dport=6081) / Raw(b"\xc0\x00\x65\x58"),  # Geneve version 3
        outer / UDP(sport=40000, dport=4789) / Raw(b"\x08"),  # truncated
    ]
    bad[1][IP].proto = 47
    stats = ReplayStats()
    conns = replay(write(tmp_path / "bad.pcap", bad), stats)["connections"]
    assert not stats.errors
    skipped = {k: v for k, v in stats.skipped.items() if "not decapsulated" in k}
    assert sum(skipped.values()) == 7, stats.skipped
    assert conns["tunnel"].isna().all() and len(conns) == 4  # the outer UDP flows stay


def test_zeek_packet_rejections_are_opt_in(tmp_path):
    """A bad checksum, or a TCP header the snap length cut, opens the connection but counts no
    packet under Zeek's settings; by default both count (offloading, headers-only captures)."""
    from observer.sources.engine import FlowEngine, FlowSettings

    good = eth() / IP(src=CLIENT, dst=SERVER) / UDP(sport=5000, dport=53) / Raw(b"q" * 20)
    broken = eth() / IP(src=CLIENT, dst=SERVER) / UDP(sport=5001, dport=53, chksum=0x1234) / Raw(
        b"q" * 20)
    syn = eth() / IP(src=CLIENT, dst=SERVER) / TCP(sport=40001, dport=443, flags="S", options=[
        ("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)])
    path = write(tmp_path / "z.pcap", [good, broken, syn])
    cut = tmp_path / "cut.pcap"  # the same packets with a 60-byte snap length: SYN options cut
    records = [struct.pack("<IIII", int(T0) + i, 0, min(len(p), 60), len(p)) + bytes(p)[:60]
               for i, p in enumerate([good, broken, syn])]
    cut.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 60, 1) + b"".join(records))

    def counts(settings, file):
        parts = []
        engine = FlowEngine(settings, lambda name, f: parts.append(f) if name == "connections"
                            else None)
        for batch in Batches(file):
            engine.feed(batch)
        engine.flush(None)
        conns = pd.concat(parts)
        return dict(zip(conns["client_port"], conns["packets_up"], strict=True))

    assert counts(FlowSettings(), path) == {5000: 1, 5001: 1, 40001: 1}
    assert counts(FlowSettings(checksums=True), path) == {5000: 1, 5001: 0, 40001: 1}
    assert counts(FlowSettings(), cut)[40001] == 1
    assert counts(FlowSettings(cut_headers=True), cut)[40001] == 0


def test_a_service_port_outranks_a_tunnel_port(tmp_path):
    """DNS from a random port that happens to be AYIYA's or Teredo's is DNS (Zeek looks at the
    responder's port), not a tunnel with a bad header."""
    dns = [eth() / IP(src=CLIENT, dst=SERVER) / UDP(sport=port, dport=53) / Raw(b"\x12\x34" * 10)
           for port in (5072, 3544, 4789)]
    stats = ReplayStats()
    conns = replay(write(tmp_path / "dns.pcap", dns), stats)["connections"]
    assert len(conns) == 3 and conns["tunnel"].isna().all()
    assert not any("decapsulated" in k for k in stats.skipped)


def test_inner_packets_carry_the_inner_frame_macs(tmp_path):
    """Behind VXLAN the inner Ethernet names the hosts; the outer MACs are the tunnel's ends."""
    inner = Ether(src="02:11:22:33:44:55", dst="02:66:77:88:99:aa") / inner_tcp()[0]
    outer = eth() / IP(src=OUT_A, dst=OUT_B) / UDP(sport=40000, dport=4789) / VXLAN(vni=1)
    decoder = Decoder()
    (pk,) = [decoder.decode(b) for b in Batches(write(tmp_path / "vx.pcap", [outer / inner]))]
    assert pk.parent.tolist() == [-1, 0]
    assert [hex(m) for m in pk.src_mac] == ["0x20000000001", "0x21122334455"]
