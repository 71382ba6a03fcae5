"""Pcap replay on small capture files written here with scapy (or by hand where scapy cannot write
the damage we need): formats, link types, connection tracking, names and bad input."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether, Loopback
from scapy.packet import Raw
from scapy.utils import PcapWriter

from observer.cli import main
from observer.config import Device, LabConfig
from observer.records import read_table
from observer.sources import ReplayStats, replay, replay_tables
from observer.sources.flows import Tracker

CLIENT, SERVER = "10.0.0.2", "93.184.216.34"
PHONE_MAC, GATEWAY_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"


def ether(p):
    """``p`` in an Ethernet frame from the phone (whose MAC names it without a config)."""
    return Ether(src=PHONE_MAC, dst=GATEWAY_MAC) / p
T0 = 1_700_000_000.0


def tcp_conv(c=CLIENT, s=SERVER, cport=40000, sport=443, t0=T0, up=(100, 200), down=(1000,),
             close="fin", ip=IP, isn=0) -> list:
    """A whole TCP connection: handshake, data each way, then FIN or RST."""
    out = []
    t = [t0]

    def add(p):
        p.time = t[0]
        t[0] += 0.01
        out.append(p)

    cl = lambda **kw: ip(src=c, dst=s) / TCP(sport=cport, dport=sport, seq=isn, **kw)  # noqa: E731
    sv = lambda **kw: ip(src=s, dst=c) / TCP(sport=sport, dport=cport, **kw)  # noqa: E731
    add(cl(flags="S"))
    add(sv(flags="SA"))
    add(cl(flags="A"))
    for n in up:
        add(cl(flags="PA") / Raw(b"u" * n))
    for n in down:
        add(sv(flags="PA") / Raw(b"d" * n))
    if close == "fin":
        add(cl(flags="FA"))
        add(sv(flags="FA"))
        add(cl(flags="A"))
    elif close == "rst":
        add(sv(flags="R"))
    return out


def framed(wrap, packets) -> list:
    """Packets put in a link-layer frame, keeping their timestamps."""
    out = []
    for p in packets:
        frame = wrap(p)
        frame.time = p.time
        out.append(frame)
    return out


def write(path: Path, packets, linktype=None, **kw) -> Path:
    with PcapWriter(str(path), linktype=linktype, sync=True, **kw) as w:
        for p in packets:
            w.write(p)
    return path


def only(conns, **where):
    rows = conns
    for k, v in where.items():
        rows = rows[rows[k] == v]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def check_default_conv(conns, device: str = CLIENT) -> None:
    row = only(conns, proto="tcp")
    assert (row.client_ip, row.client_port, row.server_ip, row.server_port) == (
        CLIENT, 40000, SERVER, 443)
    assert (row.packets_up, row.packets_down) == (6, 3)
    assert (row.bytes_up, row.bytes_down) == (300, 1000)
    assert row.wire_bytes_up == 6 * 40 + 300 and row.wire_bytes_down == 3 * 40 + 1000
    assert row.close_reason == "fin" and row.device == device and row.tls == "none"
    assert row.ts_start == pytest.approx(T0) and row.ts_end == pytest.approx(T0 + 0.08)


# -- link types and file formats ------------------------------------------------------------------
LINKS = {
    "ethernet": (1, ether),
    "802.1q": (1, lambda p: ether(Dot1Q(vlan=7) / p)),
    "qinq": (1, lambda p: ether(Dot1AD(vlan=3) / Dot1Q(vlan=7) / p)),
    "sll": (113, lambda p: CookedLinux(pkttype=0, lladdrtype=1, lladdrlen=6) / p),
    "sll2": (276, lambda p: CookedLinuxV2(pkttype=0, lladdrtype=1, lladdrlen=6) / p),
    "raw-12": (12, lambda p: p),
    "raw-101": (101, lambda p: p),
    "null": (0, lambda p: Loopback() / p),
}


@pytest.mark.parametrize("link", list(LINKS))
def test_link_types(tmp_path, link):
    linktype, wrap = LINKS[link]
    packets = framed(wrap, tcp_conv())
    path = write(tmp_path / f"{link}.pcap", packets, linktype=linktype)
    stats = ReplayStats()
    conns = replay_tables([path], stats=stats)["connections"]
    # the link layer names the device by the client's MAC where there is one (Ethernet)
    check_default_conv(conns, PHONE_MAC if Ether in packets[0] else CLIENT)
    assert stats.packets == 9 and not stats.errors and not stats.skipped


@pytest.mark.parametrize("nano", [False, True])
@pytest.mark.parametrize("endianness", ["<", ">"])
def test_pcap_resolution_and_byte_order(tmp_path, nano, endianness):
    packets = framed(ether, tcp_conv())
    for p in packets:
        p.time = p.time + 0.123456789  # the sub-microsecond part survives only in nano
    path = write(tmp_path / "t.pcap", packets, nano=nano, endianness=endianness)
    head = path.read_bytes()[:4]
    assert head == {("<", False): b"\xd4\xc3\xb2\xa1", (">", False): b"\xa1\xb2\xc3\xd4",
                    ("<", True): b"\x4d\x3c\xb2\xa1", (">", True): b"\xa1\xb2\x3c\x4d"}[
        (endianness, nano)]
    row = only(replay_tables([path])["connections"], proto="tcp")
    want = T0 + 0.123456789 if nano else T0 + 0.123457  # scapy rounds to microseconds
    assert row.ts_start == pytest.approx(want, abs=2e-7)
    assert (row.packets_up, row.bytes_down) == (6, 1000)


def pcapng(path: Path, interfaces, packets, order="<") -> Path:
    """pcapng by hand: interfaces are (linktype, if_tsresol byte or None); packets are
    (interface, timestamp in that interface's units, frame bytes)."""

    def block(kind, body):
        body += b"\0" * (-len(body) % 4)
        size = 12 + len(body)
        return struct.pack(order + "II", kind, size) + body + struct.pack(order + "I", size)

    out = block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))
    for linktype, resol in interfaces:
        opts = b""
        if resol is not None:
            opts = struct.pack(order + "HH", 9, 1) + bytes([resol, 0, 0, 0])
        out += block(1, struct.pack(order + "HHI", linktype, 0, 65535) + opts
                     + (struct.pack(order + "HH", 0, 0) if opts else b""))
    for iface, stamp, data in packets:
        if iface is None:  # a Simple Packet Block: no interface, no time
            out += block(3, struct.pack(order + "I", len(data)) + data)
            continue
        out += block(6, struct.pack(order + "IIIII", iface, stamp >> 32, stamp & 0xFFFFFFFF,
                                    len(data), len(data)) + data)
    path.write_bytes(out)
    return path


@pytest.mark.parametrize("order", ["<", ">"])
def test_pcapng_interfaces_with_own_link_type_and_resolution(tmp_path, order):
    """Up packets on an Ethernet interface in microseconds, down on raw IP in nanoseconds."""
    records = []
    for p in tcp_conv():
        if p[IP].src == CLIENT:
            records.append((0, round(p.time * 1e6), bytes(ether(p))))
        else:
            records.append((1, round(p.time * 1e9), bytes(p)))
    path = pcapng(tmp_path / "multi.pcapng", [(1, None), (101, 9)], records, order)
    check_default_conv(replay_tables([path])["connections"], PHONE_MAC)


def test_pcapng_simple_packet_blocks_take_the_time_before_them(tmp_path):
    conv = tcp_conv()
    records = [(0, round(p.time * 1e6), bytes(p)) for p in conv[:3]]
    records += [(None, 0, bytes(p)) for p in conv[3:]]
    path = pcapng(tmp_path / "spb.pcapng", [(101, None)], records)
    row = only(replay_tables([path])["connections"], proto="tcp")
    assert (row.packets_up, row.bytes_up, row.bytes_down) == (6, 300, 1000)
    assert row.ts_end == pytest.approx(conv[2].time)


def test_gzip_is_read_by_content_not_name(tmp_path):
    plain = write(tmp_path / "a.pcap", framed(ether, tcp_conv()))
    packed = tmp_path / "capture.bin"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    check_default_conv(replay_tables([packed])["connections"], PHONE_MAC)


def test_ipv6_extension_headers(tmp_path):
    def ip6(src, dst):
        return (IPv6(src=src, dst=dst) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
                / IPv6ExtHdrRouting())

    packets = tcp_conv(c="2001:db8::2", s="2001:db8::1", ip=ip6)
    conns = replay_tables([write(tmp_path / "v6.pcap", packets, linktype=101)])["connections"]
    row = only(conns, proto="tcp")
    assert (row.client_ip, row.server_ip, row.server_port) == ("2001:db8::2", "2001:db8::1", 443)
    assert (row.packets_up, row.bytes_up, row.bytes_down) == (6, 300, 1000)
    assert row.wire_bytes_up == 6 * (40 + 8 + 8 + 8 + 20) + 300


def test_ip_fragments_are_counted_into_their_flow(tmp_path):
    datagram = IP(src=CLIENT, dst=SERVER, id=77) / UDP(sport=5000, dport=4433) / Raw(b"x" * 3000)
    frags = fragment(datagram, fragsize=1000)
    v6 = IPv6(src="2001:db8::2", dst="2001:db8::1") / IPv6ExtHdrFragment(id=9) / UDP(
        sport=6000, dport=4433) / Raw(b"y" * 2500)
    from scapy.layers.inet6 import fragment6

    frags6 = fragment6(v6, 1280)
    answer = IP(src=SERVER, dst=CLIENT) / UDP(sport=4433, dport=5000) / Raw(b"z" * 10)
    packets = [*frags, *frags6, answer]
    for i, p in enumerate(packets):
        p.time = T0 + i
    stats = ReplayStats()
    conns = replay_tables([write(tmp_path / "frag.pcap", packets, linktype=101)],
                          stats=stats)["connections"]
    v4 = only(conns, client_port=5000)
    # one reassembled datagram, as Zeek counts it (docs/interop.md, "Agreement with Zeek")
    assert len(frags) == 4 and (v4.packets_up, v4.bytes_up) == (1, 3000)
    assert v4.wire_bytes_up == 20 + 8 + 3000
    assert (v4.packets_down, v4.bytes_down) == (1, 10)
    six = only(conns, client_port=6000)
    assert len(frags6) > 1 and (six.packets_up, six.bytes_up) == (1, 2500)
    assert six.wire_bytes_up == 40 + 8 + 2500
    assert not stats.skipped


def test_reused_five_tuple_after_fin_is_a_new_connection(tmp_path):
    first = tcp_conv(close="fin")
    second = tcp_conv(t0=T0 + 60, up=(5,), down=(7,), close="rst")
    retransmit = second[0].copy()
    retransmit.time = second[0].time + 0.001
    packets = [*first, second[0], retransmit, *second[1:]]
    conns = replay_tables([write(tmp_path / "reuse.pcap", packets, linktype=101)])["connections"]
    conns = conns.sort_values("ts_start")
    assert len(conns) == 2 and conns["conn_id"].is_unique
    assert list(conns["close_reason"]) == ["fin", "rst"]
    assert list(conns["bytes_up"]) == [300, 5] and list(conns["packets_up"]) == [6, 4]


def test_udp_idle_timeout_splits_a_flow(tmp_path):
    packets = []
    for i, t in enumerate([0, 10, 20, 200, 205]):
        p = IP(src=CLIENT, dst=SERVER) / UDP(sport=5353, dport=9999) / Raw(b"q" * (i + 1))
        p.time = T0 + t
        packets.append(p)
    path = write(tmp_path / "udp.pcap", packets, linktype=101)
    conns = replay_tables([path], udp_idle_s=120)["connections"].sort_values("ts_start")
    assert list(conns["packets_up"]) == [3, 2] and list(conns["bytes_up"]) == [6, 9]
    assert list(conns["close_reason"]) == ["idle", "end-of-capture"]
    assert len(replay_tables([path], udp_idle_s=500)["connections"]) == 1


def test_connection_spanning_two_files_stays_one(tmp_path):
    packets = tcp_conv(up=(100, 200, 300), down=(1000, 50))
    a = write(tmp_path / "rot-0.pcap", packets[:5], linktype=101)
    b = write(tmp_path / "rot-1.pcap", packets[5:], linktype=101)
    tables = replay_tables([a, b])
    row = only(tables["connections"], proto="tcp")
    assert (row.packets_up, row.bytes_up, row.bytes_down) == (7, 600, 1050)
    sessions = tables["sessions"].sort_values("ts_start")
    assert list(sessions["interface"]) == ["rot-0.pcap", "rot-1.pcap"]
    assert list(sessions["packets_captured"]) == [5, len(packets) - 5]
    assert sessions["ts_start"].iloc[1] == pytest.approx(packets[5].time)


def test_activity_bins_and_config_device(tmp_path):
    """The device named in the config is the client even when the server spoke first."""
    packets = []
    for t, src, n in [(0, SERVER, 10), (3, CLIENT, 1000), (12, CLIENT, 500), (25, SERVER, 7)]:
        dst = CLIENT if src == SERVER else SERVER
        sp, dp = (5222, 41000) if src == SERVER else (41000, 5222)
        p = IP(src=src, dst=dst) / TCP(sport=sp, dport=dp, flags="PA") / Raw(b"a" * n)
        p.time = T0 + t
        packets.append(p)
    config = LabConfig(bin_seconds=10.0, devices=(Device("phone", (CLIENT,)),))
    path = write(tmp_path / "bins.pcap", packets, linktype=101)
    tables = replay_tables([path], config=config)
    row = only(tables["connections"], proto="tcp")
    assert (row.device, row.client_ip, row.bytes_up, row.bytes_down) == (
        "phone", CLIENT, 1500, 17)
    act = tables["activity"].sort_values("ts_bin")
    assert list(act["ts_bin"] - T0) == [0, 10, 20]
    assert list(act["bytes_up"]) == [1000, 500, 0] and list(act["bytes_down"]) == [10, 0, 7]
    assert set(act["conn_id"]) == {row.conn_id} and set(act["device"]) == {"phone"}
    without = only(replay_tables([path])["connections"], proto="tcp")
    assert without.client_ip == SERVER  # no config: the first sender is the client


# -- names -----------------------------------------------------------------------------------------
def client_hello(name: str) -> bytes:
    from scapy.layers.tls.all import (
        TLS,
        ProtocolName,
        ServerName,
        TLS_Ext_ALPN,
        TLS_Ext_ServerName,
        TLSClientHello,
    )

    hello = TLSClientHello(ext=[TLS_Ext_ServerName(servernames=[ServerName(servername=name)]),
                                TLS_Ext_ALPN(protocols=[ProtocolName(protocol=b"h2")])])
    return bytes(TLS(msg=[hello]))


def test_names_from_sni_split_hello_http_and_dns(tmp_path):
    hello = client_hello("chat.example.net")
    split = client_hello("backup.example.com")
    dns = IP(src="10.0.0.1", dst=CLIENT) / UDP(sport=53, dport=3333) / DNS(
        id=1, qr=1, qd=DNSQR(qname="media.example.org"),
        an=[DNSRR(rrname="media.example.org", type="CNAME", rdata="edge.cdn.example"),
            DNSRR(rrname="edge.cdn.example", type="A", rdata="203.0.113.9", ttl=30)])
    dns.time = T0 - 1
    packets = [dns]
    packets += tcp_conv(cport=40001, up=(), down=(10,))
    packets += tcp_conv(cport=40002, up=(), down=(10,), t0=T0 + 1)
    packets += tcp_conv(cport=40003, sport=80, up=(), down=(10,), t0=T0 + 2)
    packets += tcp_conv(cport=40004, s="203.0.113.9", up=(20,), down=(10,), t0=T0 + 3)
    by_port = {}
    for p in packets:
        if TCP in p and p[TCP].flags == "A" and p[IP].src == CLIENT and p[TCP].ack == 0:
            by_port.setdefault(p[TCP].sport, p)
    payloads = {40001: [hello], 40002: [split[:40], split[40:]],
                40003: [b"GET /x?secret=1 HTTP/1.1\r\nHost: plain.example:8080\r\n\r\n"]}
    out = []
    for p in packets:
        out.append(p)
        if p is by_port.get(p[TCP].sport if TCP in p else None):
            for i, data in enumerate(payloads.get(p[TCP].sport, [])):
                q = IP(src=CLIENT, dst=SERVER) / TCP(sport=p[TCP].sport, dport=p[TCP].dport,
                                                     flags="PA") / Raw(data)
                q.time = p.time + 0.001 * (i + 1)
                out.append(q)
    tables = replay_tables([write(tmp_path / "names.pcap", out, linktype=101)])
    conns = tables["connections"].set_index("client_port")
    assert conns.loc[40001, ["server_name", "name_source", "alpn", "tls"]].tolist() == [
        "chat.example.net", "sni", "h2", "unknown"]
    assert conns.loc[40002, ["server_name", "name_source"]].tolist() == [
        "backup.example.com", "sni"]
    assert conns.loc[40003, ["server_name", "name_source", "tls"]].tolist() == [
        "plain.example", "http", "none"]
    assert conns.loc[40004, ["server_name", "name_source"]].tolist() == [
        "media.example.org", "dns"]
    dns_rows = tables["dns"].sort_values("answer_type")
    assert dns_rows[["answer_type", "answer"]].values.tolist() == [
        ["A", "203.0.113.9"], ["CNAME", "edge.cdn.example"]]
    assert set(dns_rows["query"]) == {"media.example.org"} and set(dns_rows["client_ip"]) == {
        CLIENT}


def test_pcapdroid_trailer_gives_the_app(tmp_path):
    """PCAPdroid: zero MACs, padding to 4 bytes, magic, uid, app name, CRC; not payload."""
    frames = []
    for p in tcp_conv(up=(101,), down=(30,)):
        frame = bytes(Ether(src="00:00:00:00:00:00", dst="00:00:00:00:00:00") / p)
        frame += b"\0" * (-len(frame) % 4)
        frame += struct.pack(">Ii", 0x01072021, 10123) + b"org.example.chat".ljust(20, b"\0")
        frame += b"\x12\x34\x56\x78"
        raw = Raw(frame)
        raw.time = p.time
        frames.append(raw)
    path = write(tmp_path / "pcapdroid.pcap", frames, linktype=1)
    row = only(replay_tables([path])["connections"], proto="tcp")
    assert row.app == "org.example.chat"
    assert (row.bytes_up, row.bytes_down, row.packets_up) == (101, 30, 5)
    assert row.wire_bytes_up == 5 * 40 + 101


# -- bad input -------------------------------------------------------------------------------------
def pcap_bytes(records, linktype=101, snaplen=65535) -> bytes:
    """A pcap by hand: records are (timestamp, frame bytes, original length or None)."""
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype)
    for ts, data, orig in records:
        out += struct.pack("<IIII", int(ts), 0, len(data), orig or len(data)) + data
    return out


def conv_records():
    return [(p.time, bytes(p), None) for p in tcp_conv()]


def test_truncated_last_record_keeps_what_came_before(tmp_path):
    data = pcap_bytes(conv_records())
    path = tmp_path / "cut.pcap"
    path.write_bytes(data[:-10])
    stats = ReplayStats()
    conns = replay_tables([path], stats=stats)["connections"]
    assert stats.packets == 8 and len(stats.errors) == 1
    last = len(data) - (16 + len(bytes(tcp_conv()[-1])))
    assert stats.errors[0] == f"{path}: truncated record (40 bytes announced) at byte offset {last}"
    assert only(conns, proto="tcp").packets_up == 5


def test_absurd_record_length_and_corrupt_pcapng_block(tmp_path):
    records = conv_records()
    data = bytearray(pcap_bytes(records))
    at = 24 + sum(16 + len(d) for _, d, _ in records[:4])
    struct.pack_into("<I", data, at + 8, 0x7FFFFFF0)
    bad = tmp_path / "absurd.pcap"
    bad.write_bytes(bytes(data))
    stats = ReplayStats()
    conns = replay_tables([bad], stats=stats)["connections"]
    assert stats.errors == [f"{bad}: absurd record length 2147483632 at byte offset {at}"]
    assert stats.packets == 4 and int(conns["packets_up"].sum() + conns["packets_down"].sum()) == 4

    good = pcapng(tmp_path / "x.pcapng", [(101, None)],
                  [(0, round(p.time * 1e6), bytes(p)) for p in tcp_conv()])
    raw = bytearray(good.read_bytes())
    blocks, pos = [], 0
    while pos < len(raw):
        blocks.append(pos)
        pos += struct.unpack_from("<I", raw, pos + 4)[0]
    struct.pack_into("<I", raw, blocks[5] + 4, 13)  # length not a multiple of 4
    corrupt = tmp_path / "corrupt.pcapng"
    corrupt.write_bytes(bytes(raw))
    stats = ReplayStats()
    replay_tables([corrupt], stats=stats)
    assert stats.packets == 3
    assert stats.errors == [f"{corrupt}: corrupt pcapng block (type 0x6, length 13) at byte "
                            f"offset {blocks[5]}"]


def test_unknown_link_type_and_unknown_format_are_one_line_errors(tmp_path):
    usb = tmp_path / "usb.pcap"
    usb.write_bytes(pcap_bytes([(T0, b"\x01" * 30, None)], linktype=220))
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    stats = ReplayStats()
    replay_tables([usb, text], stats=stats)
    assert stats.errors[0].startswith(f"{usb}: unsupported link type 220 (USB Linux mmapped)")
    assert stats.errors[1].startswith(f"{text}: unknown file format")
    assert all("\n" not in e for e in stats.errors)


def test_malformed_packets_are_counted_and_skipped(tmp_path):
    good = conv_records()
    ihl = bytearray(bytes(IP(src=CLIENT, dst=SERVER) / TCP()))
    ihl[0] = 0x43  # header length 12 bytes
    doff = bytearray(bytes(IP(src=CLIENT, dst=SERVER) / TCP()))
    doff[20 + 12] = 0x20  # data offset 8 bytes
    short = bytes(IP(src=CLIENT, dst=SERVER) / TCP())[:30]
    arp = bytes(Ether() / Raw(b"\0" * 28))
    path = tmp_path / "mixed.pcap"
    path.write_bytes(pcap_bytes([*good, (T0, bytes(ihl), None), (T0, bytes(doff), None),
                                 (T0, short, 40), (T0, b"\x00" * 20, None)]))
    stats = ReplayStats()
    conns = replay_tables([path], stats=stats)["connections"]
    assert dict(stats.skipped) == {"malformed IP header": 1, "malformed TCP/UDP header": 1,
                                   "truncated TCP/UDP header": 1, "not IP": 1}
    check_default_conv(conns)
    ether = tmp_path / "arp.pcap"
    ether.write_bytes(pcap_bytes([(T0, arp, None)], linktype=1))
    stats = ReplayStats()
    replay_tables([ether], stats=stats)
    assert dict(stats.skipped) == {"not IP": 1} and not stats.errors


def test_cli_writes_records_and_reports_errors_last(tmp_path, capsys):
    good = write(tmp_path / "good.pcap", tcp_conv(), linktype=101)
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(good.read_bytes()[:-5])
    later = write(tmp_path / "later.pcap", tcp_conv(cport=40100, t0=T0 + 100), linktype=101)
    out = tmp_path / "records"
    status = main(["replay", str(cut), str(later), "-o", str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert status == 1
    assert "17 packets, 2 connections" in printed.out
    assert printed.err.strip().startswith(f"error: {cut}: truncated record")
    assert len(printed.err.strip().splitlines()) == 1
    conns = read_table(out, "connections")
    assert sorted(conns["client_port"]) == [40000, 40100]
    assert len(read_table(out, "sessions")) == 2 and len(read_table(out, "activity")) == 2
    stats = replay([good], out, overwrite=True, progress=False)
    assert not stats.errors and "9 packets, 1 connections" in stats.summary()
    assert len(read_table(out, "connections")) == 1


def test_damaged_gzip_keeps_the_packets_before_the_damage(tmp_path):
    packets = []
    for i in range(300):
        packets += tcp_conv(cport=20000 + i, t0=T0 + i, up=((i * 37) % 200 + 1,), down=())
    whole = gzip.compress(pcap_bytes([(p.time, bytes(p), None) for p in packets]))
    path = tmp_path / "cut.pcap.gz"
    path.write_bytes(whole[: len(whole) // 2])
    stats = ReplayStats()
    conns = replay_tables([path], stats=stats)["connections"]
    assert 0 < stats.packets < len(packets) and 50 < len(conns) < 300
    assert len(stats.errors) == 1 and stats.errors[0].startswith(
        f"{path}: compressed stream ends early at decompressed byte offset")


def test_directory_stands_for_its_captures_in_name_order(tmp_path):
    """A capture directory (rotated files, one gzipped, a sessions JSONL and a dotfile beside them)
    replays its captures in name order: a connection spanning them stays one."""
    ring = tmp_path / "captures" / "phone"
    ring.mkdir(parents=True)
    packets = tcp_conv(up=(100, 200, 300), down=(1000, 50))
    write(ring / "phone-20231114T221320Z-0002.pcap", packets[5:], linktype=101)
    first = write(tmp_path / "first.pcap", packets[:5], linktype=101)
    (ring / "phone-20231114T221320Z-0001.pcap.gz").write_bytes(gzip.compress(first.read_bytes()))
    (ring / "sessions-phone.jsonl").write_text('{"table": "sessions"}\n')
    (ring / ".partial.pcap").write_bytes(b"\x00" * 10)
    stats = ReplayStats()
    tables = replay_tables([tmp_path / "captures"], stats=stats)
    assert stats.errors == [] and stats.files == 2
    row = only(tables["connections"], proto="tcp")
    assert (row.packets_up, row.bytes_up, row.bytes_down) == (7, 600, 1050)
    assert list(tables["sessions"]["interface"]) == [
        "phone-20231114T221320Z-0001.pcap.gz", "phone-20231114T221320Z-0002.pcap"]


def test_directory_without_captures_or_logs_is_a_one_line_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("hello\n")
    assert main(["replay", str(empty), "-o", str(tmp_path / "rec"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {empty}: directory holds no capture files (pcap, pcapng, gzip) "
                   "and no Zeek logs or JSONL records"]


def test_finished_connections_written_during_the_run_equal_one_pass(tmp_path, monkeypatch):
    """Handing out finished connections, complete bins and DNS rows every batch (tiny batches)
    gives the same tables as holding everything to the end: closed TCP, a reused 5-tuple, UDP
    split by idle time, a long-lived connection, a DNS name used much later, two files."""
    import observer.sources.pcapfile as pcapfile
    import observer.sources.pipeline as pipeline

    dns = IP(src="10.0.0.1", dst=CLIENT) / UDP(sport=53, dport=3333) / DNS(
        id=1, qr=1, qd=DNSQR(qname="media.example.org"),
        an=[DNSRR(rrname="media.example.org", type="A", rdata="203.0.113.9", ttl=30)])
    dns.time = T0 - 1
    packets = [dns]
    for i in range(40):
        packets += tcp_conv(cport=41000 + i, s="203.0.113.9" if i % 2 else SERVER,
                            t0=T0 + i * 200, close="rst" if i % 5 == 0 else "fin")
    packets += tcp_conv(cport=42000, t0=T0) + tcp_conv(cport=42000, t0=T0 + 1000)
    for k, t in enumerate([*range(0, 600, 50), *range(3000, 3300, 50)]):
        p = IP(src=CLIENT, dst="192.0.2.7") / UDP(sport=5000, dport=443) / Raw(b"q" * (k + 1))
        p.time = T0 + t
        packets.append(p)
    long_lived = tcp_conv(cport=43000, up=(), down=(), close=None)
    for k in range(1, 140):
        p = IP(src=SERVER, dst=CLIENT) / TCP(sport=443, dport=43000, flags="PA") / Raw(b"h" * k)
        p.time = T0 + 60 * k
        long_lived.append(p)
    packets = sorted(packets + long_lived, key=lambda p: float(p.time))
    half = len(packets) // 2
    files = [write(tmp_path / "a.pcap", packets[:half], linktype=101),
             write(tmp_path / "b.pcap", packets[half:], linktype=101)]
    whole = replay_tables(files)

    drops = []
    drop = Tracker.drop
    monkeypatch.setattr(Tracker, "drop", lambda self, rows: (
        drops.append(rows.size), drop(self, rows)))
    monkeypatch.setattr(pipeline, "FLUSH_ROWS", 0)
    monkeypatch.setattr(pipeline, "CHECK_BATCHES", 1)
    monkeypatch.setattr(pcapfile, "BATCH_BYTES", 2048)
    parts = replay_tables(files)
    assert len(drops) > 20 and sum(n > 0 for n in drops[:-1]) > 10  # flushed during the run
    keys = {"connections": ["conn_id"], "activity": ["conn_id", "ts_bin"],
            "dns": ["ts", "answer"], "sessions": ["session_id"]}
    for name, key in keys.items():
        a = whole[name].sort_values(key).reset_index(drop=True)
        b = parts[name].sort_values(key).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b)
    conns = whole["connections"]
    assert len(conns) == 40 + 2 + 2 + 1 + 1 and conns["conn_id"].is_unique  # + the DNS flow
    assert (conns["server_name"] == "media.example.org").sum() == 20
    assert only(conns, client_port=43000).close_reason == "end-of-capture"
    assert len(whole["activity"][whole["activity"]["conn_id"] == only(
        conns, client_port=43000).conn_id]) > 100


# -- device identity ---------------------------------------------------------------------------
PHONE_ADDRESSES = ["10.0.0.2", "2001:db8:7::23",  # IPv4, stable IPv6, two temporary IPv6
                   "2001:db8:7:0:a1b2:c3d4:e5f6:1", "2001:db8:7::99:2"]


def dual_stack_phone(path: Path) -> Path:
    """One phone (one MAC) over three days: IPv4, a stable IPv6 global address and a temporary
    (privacy) IPv6 address that rotates each day; a second phone beside it on IPv4."""
    packets = []
    for day, client in enumerate(PHONE_ADDRESSES):
        ip = IPv6 if ":" in client else IP
        server = "2001:db8:ff::1" if ip is IPv6 else SERVER
        conv = tcp_conv(c=client, s=server, cport=40000 + day, t0=T0 + day * 86_400, ip=ip)
        packets += [Ether(src=PHONE_MAC if p[ip].src == client else GATEWAY_MAC,
                          dst=GATEWAY_MAC if p[ip].src == client else PHONE_MAC) / p for p in conv]
    other = tcp_conv(c="10.0.0.3", cport=41000, t0=T0 + 10)
    packets += [Ether(src="02:00:00:00:00:03" if p[IP].src == "10.0.0.3" else GATEWAY_MAC,
                      dst=GATEWAY_MAC if p[IP].src == "10.0.0.3" else "02:00:00:00:00:03") / p
                for p in other]
    for p in packets:
        p.time = p[IP].time if IP in p else p[IPv6].time
    return write(path, sorted(packets, key=lambda p: float(p.time)))


def test_a_dual_stack_phone_with_rotating_addresses_is_one_device(tmp_path):
    path = dual_stack_phone(tmp_path / "phone.pcap")
    tables = replay_tables([path])
    conns = tables["connections"]
    phone = conns[conns["client_port"] < 41000]
    assert sorted(phone["client_ip"]) == sorted(PHONE_ADDRESSES)  # the address actually used
    assert set(phone["device"]) == {PHONE_MAC}
    assert set(conns.loc[conns["client_port"] == 41000, "device"]) == {"02:00:00:00:00:03"}
    assert set(tables["activity"]["device"]) == {PHONE_MAC, "02:00:00:00:00:03"}


def test_config_macs_and_addresses_name_devices(tmp_path):
    path = dual_stack_phone(tmp_path / "phone.pcap")
    config = tmp_path / "lab.yaml"
    config.write_text(f"devices:\n  - name: pixel\n    macs: ['{PHONE_MAC.upper()}']\n"
                      "  - name: tablet\n    prefixes: [10.0.0.0/29]\n")
    from observer.config import load_config

    conns = replay_tables([path], config=load_config(config))["connections"]
    by_port = dict(zip(conns["client_port"], conns["device"], strict=True))
    # the MAC names every address of the phone, even its IPv4 inside the tablet's prefix
    assert {by_port[40000 + day] for day in range(4)} == {"pixel"}
    assert by_port[41000] == "tablet"
    config.write_text("devices:\n  - name: other\n    ips: [10.0.0.3]\n")
    conns = replay_tables([path], config=load_config(config))["connections"]
    assert set(conns["device"]) == {PHONE_MAC, "other"}


def test_device_map_order_config_link_layer_peer_address():
    from observer.devices import DeviceMap, address_key

    config = LabConfig(devices=(Device("pixel", ips=("10.0.0.2",)),
                                Device("tab", prefixes=("fd00:7::/64",)),
                                Device("watch", macs=("02:00:00:00:00:09",))))
    devices = DeviceMap.from_config(config)
    assert devices.name("10.0.0.2") == "pixel"
    assert devices.name("fd00:7::1234") == "tab" == config.device_of("fd00:7::1")
    assert devices.name("10.0.0.9", mac="02:00:00:00:00:09") == "watch"
    assert config.device_of("10.0.0.9") is None
    hi, lo = address_key("2001:db8::5")
    devices.learn(np.array([hi], np.uint64), np.array([lo], np.uint64),
                  np.array([0x02000000000A], np.uint64))
    assert devices.name("2001:db8::5") == "02:00:00:00:00:0a"  # seen with that MAC before
    assert devices.name("10.0.0.77", peer="wg-phone") == "wg-phone"
    assert devices.name("2001:0db8:0::0007") == "2001:db8::7"  # the usual text form


def nightly_dual_stack(path: Path, nights: int = 7) -> Path:
    """A phone (one MAC) that uploads 3 MB to backup.example.com at 02:00 every night, over IPv4
    on even nights and over a new temporary IPv6 address on odd ones, and sends a little to Meta
    every 3 hours."""
    frames = []
    day0 = T0 // 86_400 * 86_400

    def add(packet, up: bool, t: float) -> None:
        frame = Ether(src=PHONE_MAC if up else GATEWAY_MAC, dst=GATEWAY_MAC if up else PHONE_MAC)
        frame = frame / packet
        frame.time = t
        frames.append(frame)

    def conv(c: str, s: str, port: int, t: float, up: list[bytes], down: bytes = b"") -> None:
        ip = IPv6 if ":" in c else IP
        add(ip(src=c, dst=s) / TCP(sport=port, dport=443, flags="S"), True, t)
        add(ip(src=s, dst=c) / TCP(sport=443, dport=port, flags="SA"), False, t + 0.01)
        for k, data in enumerate(up):
            add(ip(src=c, dst=s) / TCP(sport=port, dport=443, flags="PA") / Raw(data), True,
                t + 0.1 + k * 0.5)
        if down:
            add(ip(src=s, dst=c) / TCP(sport=443, dport=port, flags="PA") / Raw(down), False,
                t + 0.05)
        add(ip(src=c, dst=s) / TCP(sport=port, dport=443, flags="FA"), True, t + 40)
        add(ip(src=s, dst=c) / TCP(sport=443, dport=port, flags="FA"), False, t + 40.01)

    for night in range(nights):
        v6 = night % 2 == 1
        conv(f"2001:db8:7::{night + 10:x}" if v6 else CLIENT, "2001:db8:ff::1" if v6 else SERVER,
             50_000 + night, day0 + night * 86_400 + 7200 + 37 * (night % 3),
             [client_hello("backup.example.com")] + [b"u" * 50_000] * 60)
        for hour in range(0, 24, 3):
            conv(CLIENT, "157.240.0.1", 30_000 + night * 24 + hour,
                 day0 + night * 86_400 + hour * 3600 + 500, [b"c" * 300], b"d" * 900)
    return write(path, sorted(frames, key=lambda p: float(p.time)))


def test_dual_stack_nightly_upload_end_to_end_is_one_device_one_schedule(tmp_path, capsys):
    """replay -> analyze -> report: a phone's nightly upload that alternates between IPv4 and
    rotating IPv6 addresses is one device and one daily schedule, not several devices."""
    import json

    records, report = tmp_path / "records", tmp_path / "report"
    assert main(["replay", str(nightly_dual_stack(tmp_path / "n.pcap")), "-o", str(records)]) == 0
    conns = read_table(records, "connections")
    assert set(conns["device"]) == {PHONE_MAC}
    assert conns["client_ip"].nunique() == 1 + 3  # IPv4 and three temporary IPv6 addresses
    assert main(["analyze", str(records), "-o", str(tmp_path / "findings.json")]) == 0
    findings = json.loads((tmp_path / "findings.json").read_text())["findings"]
    upload = [f for f in findings if f["verdict"] == "periodic bulk upload"]
    assert [(f["device"], f["group"], f["period_s"], f["occurrences"]) for f in upload] == [
        (PHONE_MAC, "example.com", 86_400.0, 7)]
    assert {f["device"] for f in findings} == {PHONE_MAC}
    assert main(["report", str(records), "-o", str(report)]) == 0
    assert not (report / "index.html").exists()  # one device: one report
    assert "example.com" in (report / "report.md").read_text()
    capsys.readouterr()


TABLE_KEYS = {"connections": ["conn_id"], "activity": ["conn_id", "ts_bin"],
              "dns": ["ts", "client_ip", "query", "answer"], "sessions": ["session_id"]}


def sorted_table(records: Path, name: str) -> pd.DataFrame:
    frame = read_table(records, name)
    return frame.sort_values(TABLE_KEYS[name], ignore_index=True)[sorted(frame.columns)]


def test_jobs_replay_a_rotated_capture_into_the_same_records(tmp_path, capsys):
    from observer.simulate import load_scenario, simulate

    capture = tmp_path / "fleet"
    simulate(load_scenario("fleet").with_days(1), capture, progress=False)
    files = sorted(capture.glob("*.pcap"))
    one, three = tmp_path / "one", tmp_path / "three"
    assert main(["replay", str(capture), "-o", str(one), "--jobs", "1", "--no-progress"]) == 0
    assert main(["replay", *map(str, files), "-o", str(three), "-j", "3", "--no-progress"]) == 0
    assert "24 file(s)" in capsys.readouterr().out
    conns = sorted_table(one, "connections")
    bounds = [float(read_table(one, "sessions")["ts_start"].sort_values().iloc[i]) for i in (1, 2)]
    spanning = conns[(conns["ts_start"] < bounds[0]) & (conns["ts_end"] > bounds[1])]
    assert len(files) == 24 and len(spanning) > 0  # connections run on across rotations
    for name in TABLE_KEYS:
        a, b = sorted_table(one, name), sorted_table(three, name)
        assert len(a) > 0
        pd.testing.assert_frame_equal(a, b)


def files_across_boundaries(directory: Path) -> list[Path]:
    """Rotated files with the cases a parallel reader must keep: IP fragments waiting across a
    file boundary (a-0 -> a-1), a missing file, a truncated one (a-3), a file given twice."""
    datagram = IP(src=CLIENT, dst=SERVER, id=78) / UDP(sport=5001, dport=4433) / Raw(b"x" * 3000)
    frags = fragment(datagram, fragsize=1000)
    for i, p in enumerate(frags):
        p.time = T0 + i
    first = write(directory / "a-0.pcap", frags[:2], linktype=101)
    second = write(directory / "a-1.pcap", [*frags[2:], *tcp_conv(t0=T0 + 10)], linktype=101)
    third = write(directory / "a-2.pcap", tcp_conv(cport=40100, t0=T0 + 20), linktype=101)
    cut = directory / "a-3.pcap"
    cut.write_bytes(third.read_bytes()[:-5])
    return [first, second, directory / "missing.pcap", third, cut, third]


def test_jobs_keep_fragments_that_span_files_and_errors_per_file(tmp_path):
    paths = files_across_boundaries(tmp_path)
    runs = []
    for jobs in (1, 2, 3):
        stats = ReplayStats()
        tables = replay_tables(paths, stats=stats, jobs=jobs)
        runs.append((tables, stats))
    for tables, stats in runs:
        udp = only(tables["connections"], client_port=5001)
        assert (udp.packets_up, udp.bytes_up) == (1, 3000)  # reassembled across the two files
        assert stats.packets == runs[0][1].packets and stats.errors == runs[0][1].errors
        assert len(stats.errors) == 2 and stats.files == 6
        for name, frame in tables.items():
            pd.testing.assert_frame_equal(frame, runs[0][0][name])


@pytest.mark.parametrize("magic", ["d4c3b2a1", "a1b2c3d4", "4d3cb2a1", "a1b23c4d", "34cdb2a1",
                                   "a1b2cd34"])
@pytest.mark.parametrize("batch", [64, 256, 1 << 23])
def test_record_walk_gives_every_record_field_whatever_the_batch(tmp_path, monkeypatch, magic,
                                                                 batch):
    """The record-header walk and its one gather of the header fields, for every pcap variant
    (byte order, micro/nanoseconds, the 24-byte headers of the modified format), with batches
    that end after every record (smaller than most records), every one or two, and with one
    batch."""
    from observer.sources import pcapfile

    order, unit, hdr = pcapfile.PCAP_MAGICS[bytes.fromhex(magic)]
    rng = np.random.default_rng(7)
    records = []
    out = bytes.fromhex(magic) + struct.pack(order + "HHiIII", 2, 4, 0, 0, 65535, 1)
    for i in range(300):
        caplen = int(rng.integers(0, 90))
        frame = rng.integers(0, 256, caplen, dtype=np.uint8).tobytes()
        sec, frac, origlen = 1_700_000_000 + i, int(rng.integers(0, 999_999)), caplen + i % 3
        out += struct.pack(order + "IIII", sec, frac, caplen, origlen) + b"\xee" * (hdr - 16)
        out += frame
        records.append((sec + frac * unit, caplen, origlen, frame))
    path = tmp_path / "walk.pcap"
    path.write_bytes(out)
    monkeypatch.setattr(pcapfile, "BATCH_BYTES", batch)
    got = []
    batches = pcapfile.Batches(path)
    for b in batches:
        got += [(t, c, o, bytes(b.buf[d : d + c])) for t, c, o, d in zip(
            b.ts.tolist(), b.caplen.tolist(), b.origlen.tolist(), b.data_off.tolist(),
            strict=True)]
    assert batches.error is None and batches.packets == 300
    assert got == records
