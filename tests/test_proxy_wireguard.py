"""WireGuard mode end to end: `observer proxy --mode wireguard` and a real WireGuard client.

The "phone" is a network namespace made here, joined to the host by a veth pair, running
Debian's userspace `wireguard-go` with the client configuration the proxy printed.  Inside it a
client sends plain TCP, UDP, a DNS query and a TLS connection to an ignored host (passthrough)
to servers on the host side of the veth pair; tcpdump on the client's WireGuard interface is the
ground truth.  Every record must match it byte for byte (transport payload; retransmissions
counted once) and, for UDP, datagram for datagram.  All traffic stays in the namespace, the veth
pair and loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_proxy_e2e import FakeDns, make_pki, serve_h1

from observer.records import read_table

MITMDUMP = Path(sys.executable).with_name("mitmdump")
TOOLS = ("ip", "wireguard-go", "wg", "tcpdump")
ID = os.getpid() % 100_000
NS, VETH_HOST, VETH_PHONE, WG = (f"obsE{ID}", f"veE{ID}h", f"veE{ID}p", f"wgE{ID}")
NET = f"10.213.{ID % 250}.{(ID // 250 % 60) * 4}"  # a /30 for the veth pair
HOST_IP = NET.rsplit(".", 1)[0] + f".{int(NET.rsplit('.', 1)[1]) + 1}"
PHONE_IP = NET.rsplit(".", 1)[0] + f".{int(NET.rsplit('.', 1)[1]) + 2}"
SERVICE_IP = f"10.214.{ID % 250}.{ID // 250 % 250 + 1}"  # the servers, reached through the tunnel


def missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, wireguard-go)"
    if not MITMDUMP.exists():
        return "mitmdump is not installed next to this Python"
    if absent := [t for t in TOOLS if not shutil.which(t)]:
        return f"missing {', '.join(absent)} (scripts/system-tools installs them)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun for wireguard-go"
    return None


pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


def in_phone(*cmd: str) -> list[str]:
    return ["ip", "netns", "exec", NS, *cmd]


class Servers:
    """TCP echo, UDP echo (doubled), DNS and TLS HTTP/1.1 on SERVICE_IP."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(cert, key)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def echo(reader, writer) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        async def tls_conn(reader, writer) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                await serve_h1(reader, writer)
            writer.close()

        class UdpEcho(asyncio.DatagramProtocol):
            def connection_made(self, transport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr) -> None:
                self.transport.sendto(data * 2, addr)

        async def start() -> None:
            tcp = await asyncio.start_server(echo, SERVICE_IP, 0)
            tls = await asyncio.start_server(tls_conn, SERVICE_IP, 0, ssl=self.tls)
            udp, _ = await self.loop.create_datagram_endpoint(UdpEcho, local_addr=(SERVICE_IP, 0))
            await self.loop.create_datagram_endpoint(FakeDns, local_addr=(SERVICE_IP, 53))
            self.tcp_port = tcp.sockets[0].getsockname()[1]
            self.tls_port = tls.sockets[0].getsockname()[1]
            self.udp_port = udp.get_extra_info("sockname")[1]
            ready.set()

        def run() -> None:
            self.loop.run_until_complete(start())
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        assert ready.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


CLIENT = r"""
import json, socket, ssl, sys
svc, ca = sys.argv[1], sys.argv[5]
tcp, udp, tls_port = (int(a) for a in sys.argv[2:5])
ports = {}
with socket.create_connection((svc, tcp), timeout=10) as s:
    ports["tcp"] = s.getsockname()[1]
    payload = bytes(range(256)) * 300
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        got += s.recv(65536)
    assert got == payload
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
    u.settimeout(10)
    u.connect((svc, udp))
    ports["udp"] = u.getsockname()[1]
    for n in (10, 700, 1200):
        u.send(b"d" * n)
        assert u.recv(4096) == b"d" * 2 * n
query = bytes.fromhex("000701000001000000000000066261636b7570"
                      "076578616d706c6504746573740000010001")
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as d:
    d.settimeout(10)
    d.connect((svc, 53))
    ports["dns"] = d.getsockname()[1]
    d.send(query)
    assert d.recv(4096)[:2] == query[:2]
ctx = ssl.create_default_context(cafile=ca)
with socket.create_connection((svc, tls_port), timeout=10) as raw:
    ports["tls"] = raw.getsockname()[1]
    with ctx.wrap_socket(raw, server_hostname="ignored.test") as t:
        t.sendall(b"GET /w?size=4321 HTTP/1.1\r\nHost: ignored.test\r\nConnection: close\r\n\r\n")
        body = b""
        while chunk := t.recv(65536):
            body += chunk
        assert body.endswith(b"x" * 4321)
print(json.dumps(ports))
"""


def payload_by_connection(pcap: Path) -> dict[tuple[str, int], list[int]]:
    """(proto, client port) -> [bytes up, bytes down, datagrams up, datagrams down] from the
    client-side capture; TCP bytes are the sequence space covered, so a retransmission counts
    once."""
    from scapy.all import IP, TCP, UDP, rdpcap

    spans: dict[tuple[str, int, int], set[tuple[int, int]]] = {}
    out: dict[tuple[str, int], list[int]] = {}
    for pkt in rdpcap(str(pcap)):
        ip = pkt.getlayer(IP)
        if ip is None:
            continue
        up = ip.src == "10.0.0.1"
        if (seg := ip.getlayer(TCP)) is not None:
            key = ("tcp", seg.sport if up else seg.dport)
            size = len(bytes(seg.payload))
            if size:
                spans.setdefault((*key, up), set()).add((seg.seq, seg.seq + size))
            out.setdefault(key, [0, 0, 0, 0])
        elif (dgram := ip.getlayer(UDP)) is not None:
            key = ("udp", dgram.sport if up else dgram.dport)
            counts = out.setdefault(key, [0, 0, 0, 0])
            counts[0 if up else 1] += len(bytes(dgram.payload))
            counts[2 if up else 3] += 1
    for (proto, port, up), ranges in spans.items():
        covered, end = 0, None
        for start, stop in sorted(ranges):
            start = max(start, end) if end is not None else start
            if stop > start:
                covered += stop - start
                end = stop
        out[(proto, port)][0 if up else 1] = covered
    return out


@pytest.fixture
def phone(tmp_path):
    """The namespace, the veth pair and the service address; removed again afterwards."""
    try:
        sh("ip", "netns", "add", NS)
        sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_PHONE)
        sh("ip", "link", "set", VETH_PHONE, "netns", NS)
        sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", VETH_HOST)
        sh("ip", "addr", "add", f"{SERVICE_IP}/32", "dev", VETH_HOST)
        sh("ip", "link", "set", VETH_HOST, "up")
        sh("ip", "-n", NS, "addr", "add", f"{PHONE_IP}/30", "dev", VETH_PHONE)
        sh("ip", "-n", NS, "link", "set", VETH_PHONE, "up")
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        yield tmp_path
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
        subprocess.run(["ip", "link", "del", VETH_HOST], capture_output=True)


def client_config(log: str, endpoint: str) -> str:
    """The wg(8) part of the configuration mitmproxy printed, pointed at ``endpoint``."""
    private = re.search(r"PrivateKey = (\S+)", log).group(1)
    public = re.search(r"\[Peer\]\s+PublicKey = (\S+)", log).group(1)
    return (f"[Interface]\nPrivateKey = {private}\n\n[Peer]\nPublicKey = {public}\n"
            f"AllowedIPs = 0.0.0.0/0\nEndpoint = {endpoint}\n")


def test_wireguard_records_match_the_client_capture(phone):
    tmp = phone
    ca, cert, key = make_pki(tmp)
    servers = Servers(cert, key)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST_IP, 0))
        port = s.getsockname()[1]
    out = tmp / "records"
    proxy = subprocess.Popen(
        [sys.executable, "-m", "observer", "proxy", "--mode", "wireguard",
         "--listen-host", HOST_IP, "--listen-port", str(port), "--out", str(out), "--",
         "--set", f"confdir={tmp / 'conf'}", "--set", r"ignore_hosts=^ignored\.test:",
         "--set", "observer_bin_s=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wg = dump = None
    try:
        log = ""
        for line in proxy.stdout:
            log += line
            if "listening at" in line:
                break
        assert "WireGuard server listening" in log, log + proxy.stderr.read()
        threading.Thread(target=lambda: [None for _ in proxy.stdout], daemon=True).start()
        conf = tmp / "wg.conf"
        conf.write_text(client_config(log, f"{HOST_IP}:{port}"))
        wg = subprocess.Popen(in_phone("wireguard-go", "-f", WG), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run(in_phone("ip", "link", "show", WG), capture_output=True).returncode:
            assert time.monotonic() < deadline, "wireguard-go made no interface"
            time.sleep(0.1)
        sh(*in_phone("wg", "setconf", WG, str(conf)))
        sh("ip", "-n", NS, "addr", "add", "10.0.0.1/32", "dev", WG)
        sh("ip", "-n", NS, "link", "set", WG, "up")
        sh("ip", "-n", NS, "route", "add", "default", "dev", WG)
        pcap = tmp / "phone.pcap"
        dump = subprocess.Popen(in_phone("tcpdump", "-i", WG, "-U", "-n", "-w", str(pcap)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while "listening" not in dump.stderr.readline():
            pass
        client = subprocess.run(
            in_phone(sys.executable, "-c", CLIENT, SERVICE_IP, str(servers.tcp_port),
                     str(servers.udp_port), str(servers.tls_port), str(ca)),
            capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stderr
        ports = json.loads(client.stdout)
        time.sleep(1.0)  # the last ACKs reach the capture
        dump.send_signal(signal.SIGINT)
        dump.wait(10)
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(60) == 0, proxy.stderr.read()
    finally:
        for p in (dump, wg, proxy):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        servers.stop()
    truth = payload_by_connection(pcap)
    conns = read_table(out, "connections")
    conns = conns[conns.proxy_mode == "wireguard"]
    checked = 0
    for name, proto in (("tcp", "tcp"), ("udp", "udp"), ("dns", "udp"), ("tls", "tcp")):
        (rec,) = conns[(conns.client_port == ports[name]) & (conns.proto == proto)].itertuples()
        up, down, pk_up, pk_down = truth[(proto, ports[name])]
        assert (rec.bytes_up, rec.bytes_down) == (up, down), (name, rec, truth)
        if proto == "udp":
            assert (rec.packets_up, rec.packets_down) == (pk_up, pk_down), name
        checked += 1
    (tls,) = conns[conns.client_port == ports["tls"]].itertuples()
    assert (tls.tls, tls.server_name) == ("passthrough", "ignored.test")
    dns = read_table(out, "dns")
    assert "backup.example.test" in set(dns["query"])
    assert checked == 4 and len(conns) >= 4
