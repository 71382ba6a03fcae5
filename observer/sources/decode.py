"""Vectorised decoding of link, IP and transport headers for a batch of packets.

Every field is gathered with numpy from the reader's buffer at per-packet offsets; no Python runs
per packet except for IP fragments and 802.11 A-MSDU subframes, which are rare and need a little
state.  Link types: Ethernet (with VLAN/QinQ, MPLS, PPPoE, PBB, VN-tag, FabricPath), Linux cooked,
raw IP, loopback, PPP, 802.11 and radiotap, NFLOG.  Tunnels are decapsulated in further passes
over only the packets that carry one (``Decoder``); Zeek's rules decide what counts
(docs/interop.md, "Agreement with Zeek").
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from observer.sources.pcapfile import PAD, Batch, windows, words

LINK_NAMES = {
    0: "BSD loopback (NULL)", 1: "Ethernet", 12: "raw IP", 14: "raw IP", 101: "raw IP",
    108: "OpenBSD loopback", 113: "Linux cooked (SLL)", 228: "raw IPv4", 229: "raw IPv6",
    276: "Linux cooked v2 (SLL2)", 9: "PPP", 50: "PPP over serial", 105: "IEEE 802.11",
    127: "802.11 radiotap", 239: "NFLOG",
}
KNOWN_NAMES = {
    6: "Token Ring", 9: "PPP", 50: "PPP over serial", 104: "Cisco HDLC", 105: "IEEE 802.11",
    119: "Prism 802.11", 127: "802.11 radiotap", 143: "DOCSIS", 147: "user 0", 187: "Bluetooth HCI",
    192: "PPI", 195: "IEEE 802.15.4", 201: "Bluetooth HCI with direction", 220: "USB Linux mmapped",
    239: "netlink", 249: "USB pcap", 252: "Wireshark upper PDU", 253: "netlink", 258: "PKTAP",
}
VLAN_TAGS = (0x8100, 0x88A8, 0x9100)
V6_EXT = (0, 43, 60, 51, 135, 139, 140)  # hop-by-hop, routing, dest opts, AH, mobility, HIP, shim6
PCAPDROID_MAGIC = 0x01072021
V4_MAPPED = np.uint64(0xFFFF00000000)
IP_TUNNELS = (4, 41, 47)  # IP in IP (and 4in6), 6in4 (and IPv6 in IPv6), GRE
UDP_TUNNELS = {4789: "VXLAN", 6081: "Geneve", 2152: "GTP-U", 3544: "Teredo", 5072: "AYIYA",
               4754: "GRE over UDP"}
TUNNEL_PROTO = np.isin(np.arange(256), IP_TUNNELS)  # lookup tables: one gather a packet
TUNNEL_PORT = np.isin(np.arange(65536), sorted(UDP_TUNNELS))
TUNNEL_NAMES = {-4: "IP in IP", -41: "IPv6 in IP", -47: "GRE", **UDP_TUNNELS}


def link_name(linktype: int) -> str:
    name = LINK_NAMES.get(linktype) or KNOWN_NAMES.get(linktype)
    return f"link type {linktype}" + (f" ({name})" if name else "")


@dataclass
class Packets:
    """The TCP and UDP packets of one batch, in file order."""

    ts: np.ndarray
    src_hi: np.ndarray  # uint64 halves of the 16-byte address (IPv4 as ::ffff:a.b.c.d)
    src_lo: np.ndarray
    dst_hi: np.ndarray
    dst_lo: np.ndarray
    sport: np.ndarray  # int64
    dport: np.ndarray
    udp: np.ndarray  # bool: UDP, else TCP
    flags: np.ndarray  # int64 TCP flags (0 for UDP and non-first fragments)
    payload: np.ndarray  # int64 transport payload bytes
    wire: np.ndarray  # int64 IP bytes (header included)
    data: np.ndarray  # int64 offset of the transport payload in buf (-1: not available)
    captured: np.ndarray  # int64 captured payload bytes available at data
    uid: np.ndarray  # int64 PCAPdroid uid, -1 when the packet has no trailer
    src_mac: np.ndarray  # uint64 link-layer source MAC (48 bits), 0 where the link has none
    dst_mac: np.ndarray  # uint64 link-layer destination MAC, 0 where the link has none
    buf: np.ndarray
    apps: dict[int, str]  # PCAPdroid uid -> app name seen in this batch
    parent: np.ndarray | None = None  # int64: row of the outer UDP packet of a tunnelled one, -1
    tunnel: np.ndarray | None = None  # object: the outer IP tunnel ("gre 10.0.0.1 10.0.0.2")
    uncounted: np.ndarray | None = None  # bool: bad checksum (checked on request): counts nothing

    def __len__(self) -> int:
        return self.ts.size


def _u16(buf: np.ndarray, off: np.ndarray) -> np.ndarray:
    return words(buf, ">u2")[off].astype(np.int64)


def _u32(buf: np.ndarray, off: np.ndarray) -> np.ndarray:
    return words(buf, ">u4")[off].astype(np.int64)


def _mac(buf: np.ndarray, off: np.ndarray) -> np.ndarray:
    """The 6-byte MAC address at ``off`` as a uint64 (one 8-byte gather, shifted)."""
    return words(buf, ">u8")[off] >> np.uint64(16)



def _le16(buf: np.ndarray, off: np.ndarray) -> np.ndarray:
    return words(buf, "<u2")[off].astype(np.int64)


def mac_text(mac: int) -> str:
    return ":".join(f"{(mac >> s) & 0xFF:02x}" for s in range(40, -8, -8))


PPP_ETHERTYPE = {0x0021: 0x0800, 0x0057: 0x86DD, 0x0281: 0x8847}  # PPP protocol -> ethertype


def _ppp_type(proto: np.ndarray) -> np.ndarray:
    out = np.zeros(proto.size, np.int64)
    for ppp, et in PPP_ETHERTYPE.items():
        out[proto == ppp] = et
    return out


def _ppp(buf: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A PPP frame at ``at`` (HDLC address and control optional, protocol field compressible):
    the equivalent ethertype and the offset of the payload."""
    hdlc = (buf[at] == 0xFF) & (buf[at + 1] == 0x03)
    p = at + 2 * hdlc
    short = (buf[p] & 1) == 1  # protocol field compression: one byte
    proto = np.where(short, buf[p].astype(np.int64), _u16(buf, p))
    return _ppp_type(proto), p + np.where(short, 1, 2)


def _ether(buf: np.ndarray, limit: int, et: np.ndarray, nxt: np.ndarray, end: np.ndarray,
           ) -> tuple[np.ndarray, np.ndarray]:
    """From an ethertype and the offset after it, through VLAN tags (also QinQ), MPLS labels,
    PPPoE, 802.1ah PBB, Cisco VN-tag and FabricPath, and bridged Ethernet, to an IP header:
    its offset and family (0: not IP)."""
    ip4 = et == 0x0800
    plain = ip4 | (et == 0x86DD)
    if plain.all():  # no tags: the common case, in one pass
        return nxt, np.where(nxt <= end, np.where(ip4, 4, 6), 0)
    et, nxt = et.copy(), nxt.copy()
    fam = np.zeros(et.size, np.int64)
    rows = np.arange(et.size)
    for _ in range(16):
        e = et[rows]
        ip = (e == 0x0800) | (e == 0x86DD)
        fam[rows[ip]] = np.where(e[ip] == 0x0800, 4, 6)
        rows = rows[~ip & (nxt[rows] < end[rows])]
        if not rows.size:
            break
        e, at = et[rows], np.minimum(nxt[rows], limit)
        step = np.zeros(rows.size, np.int64)  # bytes to the next ethertype (0: stop)
        step[np.isin(e, VLAN_TAGS)] = 2  # tag control, then the next ethertype
        step[e == 0x8926] = 4  # VN-tag
        step[e == 0x88E7] = 16  # PBB I-tag, customer addresses
        step[e == 0x8903] = 14  # FabricPath: FTag/TTL, inner addresses
        step[e == 0x6558] = 12  # bridged Ethernet (GRE, Geneve): addresses
        new = np.where(step > 0, _u16(buf, at + step), 0)
        adv = np.where(step > 0, step + 2, 0)
        pppoe = e == 0x8864  # session header (6), then PPP protocol (2)
        if pppoe.any():
            new[pppoe] = _ppp_type(_u16(buf, at[pppoe] + 6))
            adv[pppoe] = 8
        mpls = (e == 0x8847) | (e == 0x8848)
        if mpls.any():  # one label a round; after the bottom one, IP by its version
            bottom = (buf[at[mpls] + 2] & 1) == 1
            version = buf[np.minimum(at[mpls] + 4, limit)] >> 4
            new[mpls] = np.where(bottom, np.where(version == 4, 0x0800, np.where(
                version == 6, 0x86DD, 0)), e[mpls])
            adv[mpls] = 4
        keep = adv > 0
        rows = rows[keep]
        et[rows] = new[keep]
        nxt[rows] += adv[keep]
    fam = np.where(nxt <= end, fam, 0)
    return nxt, fam


def _subframes(buf, limit, at: int, stop: int, row: int) -> list[tuple[int, int, int]]:
    """The A-MSDU subframes after the first one at ``at`` (addresses, length, LLC/SNAP, data;
    padded to 4 bytes): (row, ethertype, offset of the data) of each."""
    out = []
    for _ in range(64):
        length = int(buf[min(at + 12, limit)]) << 8 | int(buf[min(at + 13, limit)])
        at += 14 + length + (-(14 + length) % 4)
        if at + 22 > stop:
            break
        snap = bytes(buf[at + 14 : at + 17]) == b"\xaa\xaa\x03"
        et = int(buf[at + 20]) << 8 | int(buf[at + 21])
        out.append((row, et if snap else 0, at + 22))
    return out


def _nflog(buf: np.ndarray, limit: int, d: np.ndarray, end: np.ndarray,
           ) -> tuple[np.ndarray, np.ndarray]:
    """Linux NFLOG: a 4-byte header, then TLVs (host byte order, padded to 4); the packet is
    the payload TLV (type 9), an IP header."""
    at = d + 4
    l3 = np.full(d.size, -1, np.int64)
    rows = np.arange(d.size)
    for _ in range(32):
        rows = rows[at[rows] + 4 <= end[rows]]
        if not rows.size:
            break
        a = np.minimum(at[rows], limit)
        length, kind = _le16(buf, a), _le16(buf, a + 2) & 0x7FFF
        payload = (kind == 9) & (length > 4)
        l3[rows[payload]] = at[rows[payload]] + 4
        go = ~payload & (length >= 4)
        rows = rows[go]
        at[rows] += (length[go] + 3) & ~3
    version = (buf[np.clip(l3, 0, limit)] >> 4).astype(np.int64)
    fam = np.where((l3 >= 0) & ((version == 4) | (version == 6)), version, 0)
    return np.where(l3 >= 0, l3, d), fam


def _wifi(buf: np.ndarray, limit: int, w: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, ...]:
    """IEEE 802.11 frames at ``w``: data frames of an open network through LLC/SNAP (ethertype,
    offset after it), the source and destination MACs, and for protected data frames the mask,
    station, BSSID and direction (station -> access point)."""
    w = np.minimum(w, limit)
    fc0, fc1 = buf[w].astype(np.int64), buf[w + 1].astype(np.int64)
    data = ((fc0 >> 2) & 3) == 2
    null = (fc0 & 0x40) != 0  # no payload (null function, CF-ack/poll only)
    qos = data & ((fc0 & 0x80) != 0)
    tods, fromds = (fc1 & 1) == 1, (fc1 & 2) == 2
    wds = tods & fromds
    hdr = 24 + 6 * wds + 2 * qos + 4 * (qos & ((fc1 & 0x80) != 0))
    amsdu = qos & ((buf[np.minimum(w + 24 + 6 * wds, limit)] & 0x80) != 0)
    payload = np.minimum(w + hdr + 14 * amsdu, limit)  # A-MSDU: the first subframe
    snap = (buf[payload] == 0xAA) & (buf[payload + 1] == 0xAA) & (buf[payload + 2] == 0x03)
    protected = data & ~null & ((fc1 & 0x40) != 0) & (w + hdr <= end)
    ok = data & ~null & ~protected & snap & (payload + 8 <= end)
    et = np.where(ok, _u16(buf, payload + 6), 0)
    a1, a2 = _mac(buf, w + 4), _mac(buf, w + 10)
    a3, a4 = _mac(buf, w + 16), _mac(buf, w + 24)
    src = np.where(wds, a4, np.where(fromds, a3, a2))
    dst = np.where(tods, a3, a1)
    station = np.where(fromds & ~tods, a1, a2)
    bssid = np.where(tods & ~fromds, a1, np.where(fromds & ~tods, a2, a3))
    up = (tods & ~fromds).astype(np.float64)
    first_sub = np.where(ok & amsdu, w + hdr, -1)
    return et, payload + 8, (src, dst), protected, station, bssid, up, first_sub



def _labels(src_hi, src_lo, dst_hi, dst_lo, proto) -> np.ndarray:
    """Text naming each IP-level tunnel by protocol and outer addresses (lower address first:
    one name both ways), formatted once each."""
    swap = (src_hi > dst_hi) | ((src_hi == dst_hi) & (src_lo > dst_lo))
    src_hi, dst_hi = np.where(swap, dst_hi, src_hi), np.where(swap, src_hi, dst_hi)
    src_lo, dst_lo = np.where(swap, dst_lo, src_lo), np.where(swap, src_lo, dst_lo)
    keys = np.stack([src_hi, src_lo, dst_hi, dst_lo, proto.astype(np.uint64)], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    names = {4: "ipip", 41: "ip6", 47: "gre"}
    text = np.array([f"{names.get(int(p), p)} {_addr(sh, sl)} {_addr(dh, dl)}"
                     for sh, sl, dh, dl, p in uniq.tolist()], object)
    return text[inverse.ravel()]


def _addr(hi: int, lo: int) -> str:
    if hi == 0 and lo >> 32 == 0xFFFF:
        return str(ipaddress.IPv4Address(lo & 0xFFFFFFFF))
    return str(ipaddress.IPv6Address((hi << 64) | lo))


def _join(out: Packets, inner: Packets, parent: np.ndarray, labels: np.ndarray) -> Packets:
    """``out`` followed by the packets decapsulated from it: those directly inside get
    ``parent`` (a row of ``out``) or ``labels``; deeper ones keep theirs, shifted."""
    n, m = len(out), len(inner)
    own_parent = inner.parent if inner.parent is not None else np.full(m, -1, np.int64)
    own_label = inner.tunnel if inner.tunnel is not None else np.full(m, None, object)
    direct = (own_parent < 0) & np.equal(own_label, None)
    joined = {f.name: np.concatenate([getattr(out, f.name), getattr(inner, f.name)])
              for f in fields(Packets)
              if f.name not in ("buf", "apps", "parent", "tunnel", "uncounted")}
    if out.uncounted is not None or inner.uncounted is not None:
        joined["uncounted"] = np.concatenate([
            np.zeros(n, bool) if out.uncounted is None else out.uncounted,
            np.zeros(m, bool) if inner.uncounted is None else inner.uncounted])
    first_parent = out.parent if out.parent is not None else np.full(n, -1, np.int64)
    first_label = out.tunnel if out.tunnel is not None else np.full(n, None, object)
    return Packets(
        **joined, buf=out.buf, apps=out.apps,
        parent=np.concatenate([first_parent, np.where(
            direct, parent, np.where(own_parent >= 0, own_parent + n, -1))]),
        tunnel=np.concatenate([first_label, np.where(direct, labels, own_label)]))



def _gtp(buf, limit, s, wire_end) -> tuple[np.ndarray, np.ndarray]:
    """GTP-U version 1 G-PDU (message 255): 8 bytes, 4 more with any optional field, then the
    extension headers; the user's IP packet after them."""
    sc = np.minimum(s, limit)
    flags = buf[sc].astype(np.int64)
    ok = ((flags >> 5) == 1) & ((flags & 0x10) != 0) & (buf[sc + 1] == 0xFF)
    ok &= _u16(buf, sc + 2) + 8 >= wire_end - s  # a fragment carries less than the whole
    p = s + 8 + 4 * ((flags & 7) != 0)
    ext = ok & ((flags & 4) != 0)
    nxt_type = np.where(ext, buf[np.minimum(s + 11, limit)], 0).astype(np.int64)
    for _ in range(8):  # extension headers: length in 4-byte units, next type last
        rows = np.flatnonzero(nxt_type != 0)
        if not rows.size:
            break
        length = buf[np.minimum(p[rows], limit)].astype(np.int64) * 4
        ok[rows[length == 0]] = False
        nxt_type[rows] = np.where(length > 0, buf[np.minimum(p[rows] + length - 1, limit)], 0)
        p[rows] += length
    return _ip_type(buf, limit, p, ok), p


def _teredo(buf, limit, s, wire_end) -> tuple[np.ndarray, np.ndarray]:
    """Teredo (RFC 4380): optional authentication and origin indication, then IPv6 whose
    length fills the datagram (bubbles too: IPv6 without a next header)."""
    p = s.copy()
    auth = _u16(buf, np.minimum(p, limit)) == 0x0001
    pa = np.minimum(p, limit)
    p = np.where(auth, p + 13 + buf[pa + 2].astype(np.int64) + buf[pa + 3], p)
    origin = _u16(buf, np.minimum(p, limit)) == 0x0000
    p = np.where(origin, p + 8, p)
    pc = np.minimum(p, limit)
    plen = _u16(buf, pc + 4)
    bubble = (plen == 0) & (buf[pc + 6] == 59) & (p + 40 <= wire_end)  # may carry data after
    ok = ((buf[pc] >> 4) == 6) & ((plen + 40 == wire_end - p) | bubble)
    return np.where(ok, 0x86DD, 0), p


def _ayiya(buf, limit, s, wire_end) -> tuple[np.ndarray, np.ndarray]:
    """AYIYA: identity (2^n bytes) and signature (4n bytes) after 8 bytes; opcode 1 forwards
    the packet named by the next-header byte."""
    sc = np.minimum(s, limit)
    b0, b1 = buf[sc].astype(np.int64), buf[sc + 1].astype(np.int64)
    p = s + 8 + (1 << (b0 >> 4)) + (b1 >> 4) * 4
    nh = buf[sc + 3].astype(np.int64)
    ok = ((buf[sc + 2] & 0x0F) == 1) & np.isin(nh, (4, 41)) & (p < wire_end)
    return np.where(ok, _ip_type(buf, limit, p, ok), 0), p


def _ip_type(buf, limit, p, ok) -> np.ndarray:
    """The ethertype of an IP header at ``p`` by its version (0 where not ``ok`` or not IP)."""
    version = buf[np.minimum(p, limit)] >> 4
    return np.where(ok & (version == 4), 0x0800, np.where(ok & (version == 6), 0x86DD, 0))



def _bad_checksums(buf, limit, rows_mask, v4, l3, l4, wire, proto) -> np.ndarray:
    """TCP and UDP checksums that do not verify, over whole captured segments (``rows_mask``);
    an IPv4 UDP checksum of 0 means none.  Costs a pass over the bytes: only on request."""
    bad = np.zeros(rows_mask.size, bool)
    rows = np.flatnonzero(rows_mask & ((proto == 6) | (proto == 17)))
    if not rows.size:
        return bad
    length = (l3 + wire - l4)[rows]
    v4r = v4[rows]
    # pseudo-header: addresses (IPv4 at 12, IPv6 at 8), protocol, transport length
    spans = [(np.where(v4r, l3[rows] + 12, l3[rows] + 8), np.where(v4r, 8, 32)),
             (l4[rows], length)]
    total = proto[rows] + length
    w16 = words(buf, ">u2")
    for start, size in spans:
        n = size // 2
        idx = np.repeat(start - np.concatenate(([0], np.cumsum(n)[:-1])) * 2, n) + np.arange(
            n.sum()) * 2
        offsets = np.minimum(np.concatenate(([0], np.cumsum(n)[:-1])), max(n.sum() - 1, 0))
        sums = np.add.reduceat(w16[np.minimum(idx, limit)].astype(np.int64),
                               offsets) if n.sum() else 0
        total = total + np.where(n > 0, sums, 0)
        odd = (size % 2) == 1
        total = total + np.where(odd, buf[np.minimum(start + size - 1, limit)].astype(
            np.int64) << 8, 0)
    for _ in range(4):
        total = (total & 0xFFFF) + (total >> 16)
    stored = _u16(buf, np.minimum(l4[rows] + np.where(proto[rows] == 6, 16, 6), limit))
    none = (proto[rows] == 17) & v4r & (stored == 0)
    bad[rows] = (total != 0xFFFF) & ~none
    return bad


class Decoder:
    """Turn batches into ``Packets``; counts every packet it cannot use in ``skipped``.

    Tunnels (GRE with ERSPAN, PPTP and Aruba, VXLAN, Geneve, GTP-U, Teredo, AYIYA, IP in IP, 6in4,
    4in6) are decapsulated up to ``tunnel_depth`` levels: the outer UDP packet stays a packet of
    its own (as in Zeek), the inner one follows it with ``parent`` or ``tunnel`` naming the outer.
    Only packets that carry a tunnel take the extra passes.
    """

    def __init__(self, tunnel_depth: int = 2, checksums: bool = False,
                 cut_headers: bool = False) -> None:
        self.tunnel_depth = tunnel_depth
        # Zeek's rules, on request: a packet whose checksum fails, or whose TCP header (options)
        # the snap length cut, opens its connection but counts nothing
        self.checksums = checksums
        self.cut_headers = cut_headers
        self.skipped: Counter[str] = Counter()
        self.fragments: dict[tuple, list[int]] = {}  # (src, dst, id, proto) -> datagram
        self.unsupported: Counter[int] = Counter()
        self._protected: list[np.ndarray] = []  # rows: ts, station, bssid, up, bytes

    def skip(self, what: str, count: int) -> None:
        if count:
            self.skipped[what] += int(count)

    def decode(self, batch: Batch) -> Packets:
        buf = batch.buf
        limit = buf.size - PAD
        d, caplen = batch.data_off, batch.caplen
        end = d + caplen  # first byte after the captured packet
        lt = batch.linktype
        lts = lt[:1] if not lt.size or (lt == lt[0]).all() else np.unique(lt)
        l3 = np.zeros(d.size, np.int64)
        family = np.zeros(d.size, np.int64)  # 4, 6 or 0 (not IP)
        uid = np.full(d.size, -1, np.int64)
        macs: tuple | None = None  # source and destination MACs, where the link has them
        unsupported = np.zeros(d.size, bool)
        apps: dict[int, str] = {}
        for lt in lts.tolist():
            sel = None if lts.size == 1 else np.flatnonzero(batch.linktype == lt)
            part = [a if sel is None else a[sel] for a in (d, caplen, batch.ts, batch.origlen)]
            out = self._link(buf, part[0], part[1], int(lt), apps, part[2], part[3])
            if out is None:
                n = d.size if sel is None else sel.size
                self.unsupported[int(lt)] += n
                self.skip(f"unsupported {link_name(int(lt))}", n)
                unsupported[slice(None) if sel is None else sel] = True
                continue
            lo, fam, uids, mac = out
            if sel is None:
                l3, family, uid, macs = lo, fam, uids, mac
            else:
                l3[sel], family[sel], uid[sel] = lo, fam, uids
                if mac is not None:
                    if macs is None:
                        macs = (np.zeros(d.size, np.uint64), np.zeros(d.size, np.uint64))
                    macs[0][sel], macs[1][sel] = mac
        non_ip = family <= 0
        self.skip("not IP", np.count_nonzero((family == 0) & ~unsupported))
        keep = np.flatnonzero(~non_ip)
        if keep.size < d.size:
            d, end, l3, family, uid = d[keep], end[keep], l3[keep], family[keep], uid[keep]
            ts, origlen = batch.ts[keep], batch.origlen[keep]
            macs = None if macs is None else (macs[0][keep], macs[1][keep])
        else:
            ts, origlen = batch.ts, batch.origlen
        return self._ip(buf, limit, d, end, l3, family, uid, ts, origlen, apps, macs,
                        self.tunnel_depth)[0]

    # -- link layer -------------------------------------------------------------------------------
    def _link(self, buf: np.ndarray, d: np.ndarray, caplen: np.ndarray, lt: int,
              apps: dict[int, str], ts: np.ndarray, origlen: np.ndarray,
              ) -> tuple[np.ndarray, ...] | None:
        """Offset of the IP header, IP family, PCAPdroid uid and MACs (source, destination; or
        None) of each packet, or None for a link type not read."""
        uid = np.full(d.size, -1, np.int64)
        end = d + caplen
        limit = buf.size - PAD
        mac = None
        if lt == 1:  # a frame under 14 bytes is not IP anyway
            head = windows(buf, d, 16)
            h16 = head.view(">u2")
            src = (h16[:, 3].astype(np.uint64) << np.uint64(32)) | (
                h16[:, 4].astype(np.uint64) << np.uint64(16)) | h16[:, 5]
            mac = (src, head.view(">u8")[:, 0] >> np.uint64(16))
            l3, fam = _ether(buf, limit, h16[:, 6].astype(np.int64), d + 14, end)
            self._pcapdroid(buf, d, caplen, uid, apps)
        elif lt == 113:
            mac = (np.where(_u16(buf, d + 4) == 6, _mac(buf, d + 6), 0).astype(np.uint64),
                   np.zeros(d.size, np.uint64))
            l3, fam = _ether(buf, limit, _u16(buf, d + 14), d + 16, end)
        elif lt == 276:
            mac = (np.where(buf[d + 11] == 6, _mac(buf, d + 12), 0).astype(np.uint64),
                   np.zeros(d.size, np.uint64))
            l3, fam = _ether(buf, limit, _u16(buf, d), d + 20, end)
        elif lt in (12, 14, 101, 228, 229):
            l3 = d
            version = (buf[d] >> 4).astype(np.int64)
            fam = np.where((version == 4) | (version == 6), version, 0)
            if lt in (228, 229):
                fam = np.where(fam == lt - 224, fam, 0)  # the link type fixes the version
        elif lt in (0, 108):
            first, last = buf[d].astype(np.int64), buf[d + 3].astype(np.int64)
            af = np.where(first == 0, last, first) if lt == 0 else last
            l3 = d + 4
            fam = np.where(af == 2, 4, np.where(np.isin(af, (24, 28, 30)), 6, 0))
        elif lt in (9, 50):
            et, nxt = _ppp(buf, d)
            l3, fam = _ether(buf, limit, et, nxt, end)
        elif lt == 239:
            l3, fam = _nflog(buf, limit, d, end)
        elif lt in (105, 127):
            w = d + (_le16(buf, d + 2) if lt == 127 else 0)  # radiotap: its own length first
            et, nxt, mac, prot, station, bssid, up, _ = _wifi(buf, limit, w, end)
            if prot.any():
                rows = np.flatnonzero(prot)
                self._protected.append(np.stack([
                    ts[rows], station[rows].astype(np.float64), bssid[rows].astype(np.float64),
                    up[rows], (origlen - (w - d))[rows]]))
            self.skip("802.11 protected (counted in link_activity)", np.count_nonzero(prot))
            l3, fam = _ether(buf, limit, et, nxt, end)
            fam[prot] = -1  # counted above, not again as "not IP"
        else:
            return None
        fam = np.where((l3 + 1 <= end) | (fam < 0), fam, 0)
        return l3, fam, uid, mac

    def link_activity(self, bin_s: float, before_bin: float = np.inf) -> pd.DataFrame:
        """Protected 802.11 frames per station and bin (schema table ``link_activity``) for bins
        before ``before_bin`` (a bin number); later ones are kept for the next call."""
        if not self._protected:
            return pd.DataFrame(columns=["station", "bssid", "ts_bin", "bin_s", "frames_up",
                                         "frames_down", "bytes_up", "bytes_down"])
        rows = np.concatenate(self._protected, axis=1)
        bins = np.floor(rows[0] / bin_s)
        out = bins < before_bin
        self._protected = [rows[:, ~out]] if not out.all() else []
        rows, bins = rows[:, out], bins[out]
        frame = pd.DataFrame({
            "station": rows[1].astype(np.uint64), "bssid": rows[2].astype(np.uint64),
            "ts_bin": bins * bin_s, "up": rows[3] > 0, "bytes": rows[4].astype(np.int64)})
        frame["frames_up"] = frame["up"].astype(np.int64)
        frame["frames_down"] = 1 - frame["frames_up"]
        frame["bytes_up"] = np.where(frame["up"], frame["bytes"], 0)
        frame["bytes_down"] = frame["bytes"] - frame["bytes_up"]
        frame = frame.groupby(["station", "bssid", "ts_bin"], as_index=False, sort=True)[
            ["frames_up", "frames_down", "bytes_up", "bytes_down"]].sum()
        frame["station"] = [mac_text(m) for m in frame["station"].tolist()]
        frame["bssid"] = [mac_text(m) for m in frame["bssid"].tolist()]
        frame.insert(3, "bin_s", float(bin_s))
        return frame

    def _pcapdroid(self, buf: np.ndarray, d: np.ndarray, caplen: np.ndarray, uid: np.ndarray,
                   apps: dict[int, str]) -> None:
        """PCAPdroid's trailer: fake Ethernet, padding, magic, uid, app name, CRC (32 bytes)."""
        has = caplen >= 14 + 20 + 32
        if not has.any():
            return
        at = np.where(has, d + caplen - 32, d)
        has &= _u32(buf, at) == PCAPDROID_MAGIC
        if not has.any():
            return
        rows = np.flatnonzero(has)
        ids = _u32(buf, at[rows] + 4)
        ids = np.where(ids >= 1 << 31, ids - (1 << 32), ids)
        uid[rows] = ids
        for value, first in zip(*np.unique(ids, return_index=True), strict=True):
            start = int(at[rows[first]]) + 8
            name = bytes(buf[start : start + 20]).split(b"\0", 1)[0]
            apps[int(value)] = name.decode("utf-8", "replace")

    # -- IP and transport -----------------------------------------------------------------------
    def _ip(self, buf, limit, d, end, l3, family, uid, ts, origlen, apps, macs,
            depth: int) -> tuple[Packets, np.ndarray]:
        """The TCP and UDP packets among IP headers at ``l3`` (and those tunnelled in them, up to
        ``depth`` levels), with the input row each came from."""
        n = d.size
        l3c = np.minimum(l3, limit)
        head = windows(buf, l3c, 40)  # the IPv4 header and the fixed IPv6 header
        h16, h32, h64 = head.view(">u2"), head.view(">u4"), head.view(">u8")
        v4 = family == 4
        v6 = ~v4
        rows6 = np.flatnonzero(v6)
        b0 = head[:, 0].astype(np.int64)
        ihl = (b0 & 15) * 4
        tot4 = h16[:, 1].astype(np.int64)
        tot4 = np.where(tot4 == 0, origlen - (l3 - d), tot4)  # TSO captures write 0
        frag4 = h16[:, 3].astype(np.int64)
        frag_off = (frag4 & 0x1FFF) * 8
        more = (frag4 & 0x2000) != 0
        frag_id = h16[:, 2].astype(np.int64)
        proto = head[:, 9].astype(np.int64)
        wire = tot4
        src_hi = np.zeros(n, np.uint64)
        dst_hi = np.zeros(n, np.uint64)
        src_lo = V4_MAPPED | h32[:, 3].astype(np.uint64)
        dst_lo = V4_MAPPED | h32[:, 4].astype(np.uint64)
        if rows6.size:
            at = l3c[rows6]
            plen6 = h16[rows6, 2].astype(np.int64)
            jumbo = (plen6 == 0) & (head[rows6, 6] == 0)
            if jumbo.any():  # RFC 2675 jumbogram: the length is in a hop-by-hop option
                j = at[jumbo] + 42
                plen6[jumbo] = np.where(buf[j] == 0xC2, _u32(buf, j + 2), 0)
            wire[rows6] = plen6 + 40
            proto[rows6] = head[rows6, 6]
            frag_off[rows6], more[rows6], frag_id[rows6] = 0, False, 0
            src_hi[rows6], src_lo[rows6] = h64[rows6, 1], h64[rows6, 2]
            dst_hi[rows6], dst_lo[rows6] = h64[rows6, 3], h64[rows6, 4]
        del head, h16, h32, h64  # a batch's worth of bytes: not held through the rest
        avail = end - l3
        ok = (b0 >> 4) == family
        short = ok & (avail < np.where(v4, 20, 40))
        ok &= ~short
        ok &= ~(v4 & ((ihl < 20) | (tot4 < ihl)))
        l4 = l3 + np.where(v4, ihl, 40)
        if v6.any():
            self._v6_ext(buf, limit, end, ok, v6, proto, l4, frag_off, more, frag_id)
        ok &= l4 <= l3 + wire
        bad = ~ok & ~short
        transport = ok & ((proto == 6) | (proto == 17))
        self.skip("truncated IP header", np.count_nonzero(short))
        self.skip("malformed IP header", np.count_nonzero(bad))
        self.skip("not TCP or UDP", np.count_nonzero(ok & ~transport))
        fragment = transport & ((frag_off > 0) | more)
        first = transport & (frag_off == 0)
        l4c = np.minimum(l4, limit)
        top = windows(buf, l4c, 14)  # ports, UDP length, TCP data offset and flags
        t16 = top.view(">u2")
        sport = t16[:, 0].astype(np.int64)
        dport = t16[:, 1].astype(np.int64)
        tcp = proto == 6
        doff = np.where(tcp, (top[:, 12] >> 4).astype(np.int64) * 4, 8)
        flags = np.where(tcp, top[:, 13], 0).astype(np.int64)
        need = np.where(tcp, 14, 4)
        cut = first & (l4 + need > end)
        ip_payload = l3 + wire - l4
        payload = ip_payload - np.where(first, doff, 0)
        ulen = t16[:, 2].astype(np.int64)
        del top, t16
        whole = ~tcp & first & ~more & (ulen >= 8) & (ulen <= ip_payload)
        payload = np.where(whole, ulen - 8, payload)  # the UDP length, as tshark counts it
        broken = first & ~cut & ((tcp & (doff < 20)) | (payload < 0))
        self.skip("truncated TCP/UDP header", np.count_nonzero(cut))
        self.skip("malformed TCP/UDP header", np.count_nonzero(broken))
        use = transport & ~cut & ~broken
        if fragment.any():
            use &= self._fragments(fragment & use, first, src_hi, src_lo, dst_hi, dst_lo, frag_id,
                                   proto, sport, dport, flags,
                                   (frag_off, more, l3, l4, wire, payload, v6))
        rows = np.flatnonzero(use)
        data = l4 + np.where(first, doff, 0)
        captured = np.clip(np.minimum(end, l3 + wire) - data, 0, None)
        data = np.where(first & (frag_off == 0), data, -1)
        # Zeek's rules: a TCP header cut short by the capture (options) and, when asked, a bad
        # checksum open the connection but count no packet
        bad = use & tcp & first & (l4 + doff > end) if self.cut_headers else None
        if self.checksums:
            checked = _bad_checksums(buf, limit, use & first & (end >= l3 + wire), v4, l3, l4,
                                     wire, proto)
            bad = checked if bad is None else bad | checked
        if bad is not None and bad.any():
            self.skip("TCP header cut short or bad checksum (counted as no packet)",
                      np.count_nonzero(bad))
            payload, wire = np.where(bad, 0, payload), np.where(bad, 0, wire)
            flags, data = np.where(bad, 0, flags), np.where(bad, -1, data)
        else:
            bad = None
        whole_batch = rows.size == n
        pick = (lambda a: a) if whole_batch else (lambda a: a[rows])
        out = Packets(
            ts=pick(ts), src_hi=pick(src_hi), src_lo=pick(src_lo), dst_hi=pick(dst_hi),
            dst_lo=pick(dst_lo), sport=pick(sport), dport=pick(dport), udp=pick(proto == 17),
            flags=pick(flags), payload=pick(payload), wire=pick(wire), data=pick(data),
            captured=pick(captured), uid=pick(uid),
            src_mac=np.zeros(rows.size, np.uint64) if macs is None else pick(macs[0]),
            dst_mac=np.zeros(rows.size, np.uint64) if macs is None else pick(macs[1]),
            buf=buf, apps=apps, uncounted=None if bad is None else pick(bad),
        )
        # tunnels: IP protocols 4, 41, 47 and UDP on a tunnel port (the server's: not when the
        # other side is a well-known service, DNS from a random port 5072 is DNS) or carrying
        # Teredo; everything else is done here, in few passes over the UDP rows only
        tun_ip = TUNNEL_PROTO[proto]
        ipc = np.flatnonzero(tun_ip & ok & (frag_off == 0) & ~more) if tun_ip.any() else rows[:0]
        uc = np.flatnonzero(use & (proto == 17) & (data >= 0))
        sp, dp = sport[uc], dport[uc]
        to_port, from_port = TUNNEL_PORT[dp], TUNNEL_PORT[sp]
        to_port &= (sp >= 1024) | from_port
        from_port &= (dp >= 1024) | to_port
        on_port = to_port | from_port
        maybe = uc[~on_port & (payload[uc] >= 40)]
        teredo = maybe[self._teredo_like(buf, limit, maybe, data, l3, wire)]
        port_rows = np.flatnonzero(on_port)
        if not (ipc.size or port_rows.size or teredo.size):
            return out, rows
        cand = np.concatenate([ipc, uc[port_rows], teredo])
        if depth <= 0:
            self.skip("tunnel deeper than the tunnel depth", cand.size)
            return out, rows
        is_udp = np.arange(cand.size) >= ipc.size
        port = np.where(to_port[port_rows], dp[port_rows], sp[port_rows])
        kind = np.concatenate([-proto[ipc], port, np.full(teredo.size, 3544)])  # Teredo by content
        start = np.where(is_udp, data[cand], l4[cand])
        stop = np.minimum(end[cand], l3[cand] + wire[cand])
        wire_end = l3[cand] + wire[cand]
        parent = np.where(is_udp, cand if whole_batch else np.searchsorted(rows, cand), -1)
        labels = np.full(cand.size, None, object)
        if not is_udp.all():
            ip_rows = np.flatnonzero(~is_udp)
            c = cand[ip_rows]
            labels[ip_rows] = _labels(src_hi[c], src_lo[c], dst_hi[c], dst_lo[c], proto[c])
        which, ipl3, ipfam, inner_macs = self._decap(buf, limit, kind, start, stop, wire_end)
        good = (ipfam > 0) & (ipl3 < stop[which])
        ins, ipl3, ipfam = which[good], ipl3[good], ipfam[good]
        if not ins.size:
            return out, rows
        c = cand[ins]
        inner, origin = self._ip(buf, limit, d[c], stop[ins], ipl3, ipfam, uid[c], ts[c],
                                 origlen[c], apps, (inner_macs[0][good], inner_macs[1][good]),
                                 depth - 1)
        if not len(inner):
            return out, rows
        return _join(out, inner, parent[ins][origin], labels[ins][origin]), \
            np.concatenate([rows, c[origin]])

    @staticmethod
    def _teredo_like(buf, limit, rows, data, l3, wire) -> np.ndarray:
        """Which UDP payloads of ``rows`` are Teredo on any port (as Zeek detects it): IPv6
        filling the datagram, optionally after Teredo's authentication or origin indication."""
        found = np.zeros(rows.size, bool)
        if not rows.size:
            return found
        pos = np.arange(rows.size)
        at = np.minimum(data[rows], limit)
        first = buf[at]
        # Teredo's authentication / origin indication header first, or bare IPv6 from or to a
        # Teredo address (2001:0::/32), as Zeek's signature has it
        keep = first == 0
        six = np.flatnonzero((first >> 4) == 6)
        if six.size:
            u32, a6 = words(buf, ">u4"), at[six]
            keep[six] = (u32[np.minimum(a6 + 8, limit)] == 0x20010000) | (
                u32[np.minimum(a6 + 24, limit)] == 0x20010000)
        rows, pos = rows[keep], pos[keep]
        if rows.size:
            found[pos] = _teredo(buf, limit, data[rows], (l3 + wire)[rows])[0] > 0
        return found

    def _decap(self, buf, limit, kind, s, stop, wire_end) -> tuple[np.ndarray, ...]:
        """The IP packets inside tunnel payloads at ``s``: the payload each is in (one each, more
        for an A-MSDU), the offset and family of its IP header (family 0 where the header is not
        valid or carries no IP: a counted skip)."""
        n = kind.size
        et, nxt = np.zeros(n, np.int64), s.copy()
        sc = np.minimum(s, limit)
        b0 = buf[sc].astype(np.int64)
        version = b0 >> 4
        ipip = (kind == -4) | (kind == -41)
        et[ipip] = np.where(version[ipip] == 4, 0x0800, np.where(version[ipip] == 6, 0x86DD, 0))
        gre = np.flatnonzero((kind == -47) | (kind == 4754))
        extra: list[tuple[int, int, int]] = []
        framed = np.zeros(n, bool)  # entered an Ethernet frame (its header ends at nxt)
        if gre.size:
            et[gre], nxt[gre], framed[gre], extra = self._gre(buf, limit, s[gre], stop[gre])
            extra = [(int(gre[r]), e, x) for r, e, x in extra]
        vx = np.flatnonzero((kind == 4789) & ((b0 & 0x08) != 0))  # the I flag: a valid VNI
        et[vx], nxt[vx] = _u16(buf, sc[vx] + 20), s[vx] + 22  # 8 bytes, then Ethernet
        framed[vx] = True
        gen = np.flatnonzero((kind == 6081) & ((b0 >> 6) == 0))
        et[gen], nxt[gen] = _u16(buf, sc[gen] + 2), s[gen] + 8 + (b0[gen] & 0x3F) * 4
        for port, how in ((2152, _gtp), (3544, _teredo), (5072, _ayiya)):
            rows = np.flatnonzero(kind == port)
            if rows.size:
                et[rows], nxt[rows] = how(buf, limit, s[rows], wire_end[rows])
        # the inner frame's MACs name the inner hosts (the outer ones are the tunnel's ends)
        eth_at = np.where(framed, nxt - 14, np.where(et == 0x6558, nxt, -1))
        l3, fam = _ether(buf, limit, et, nxt, stop)
        for k in np.unique(kind[fam == 0]).tolist():
            self.skip(f"{TUNNEL_NAMES[k]}: not decapsulated (bad header or not IP inside)",
                      np.count_nonzero((kind == k) & (fam == 0)))
        idx = np.arange(n)
        if extra:
            more_idx, more_et, more_nxt = (np.array(v, np.int64) for v in zip(*extra, strict=True))
            more_l3, more_fam = _ether(buf, limit, more_et, more_nxt, stop[more_idx])
            idx = np.concatenate([idx, more_idx])
            l3, fam = np.concatenate([l3, more_l3]), np.concatenate([fam, more_fam])
            eth_at = np.concatenate([eth_at, more_nxt - 22])  # subframe: DA, SA like Ethernet
        at = np.clip(eth_at, 0, limit)
        framed = eth_at >= 0
        return idx, l3, fam, (np.where(framed, _mac(buf, at + 6), np.uint64(0)),
                              np.where(framed, _mac(buf, at), np.uint64(0)))

    def _gre(self, buf, limit, s, stop) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """GRE (RFC 2784/2890), PPTP's enhanced GRE (version 1), ERSPAN I/II/III and Aruba's
        802.11 in GRE: the ethertype of the payload and its offset, whether that entered an
        Ethernet frame (ERSPAN), and (row, ethertype, offset) of further A-MSDU subframes."""
        sc = np.minimum(s, limit)
        f0, f1 = buf[sc].astype(np.int64), buf[sc + 1].astype(np.int64)
        version, proto = f1 & 7, _u16(buf, sc + 2)
        hdr = 4 + 4 * ((f0 >> 7) & 1) + 4 * ((f0 >> 5) & 1) + 4 * ((f0 >> 4) & 1) + 4 * (f1 >> 7)
        valid = ((f0 & 0x40) == 0) & ((f1 & 0x78) == 0)  # no source routing, no reserved flags
        et = np.where(valid & (version == 0), proto, 0)
        nxt = s + hdr
        pptp = valid & (version == 1) & (proto == 0x880B)
        if pptp.any():  # PPTP: PPP inside (payload length and call id are the key)
            et[pptp], nxt[pptp] = _ppp(buf, np.minimum(nxt[pptp], limit))
        at = np.minimum(nxt, limit)
        erspan2 = et == 0x88BE  # type II has a sequence number and an 8-byte header; I neither
        erspan3 = et == 0x22EB  # 12 bytes, 8 more with the platform sub-header (O flag)
        skip = np.where(erspan2, 8 * ((f0 >> 4) & 1), 0) + np.where(
            erspan3, 12 + 8 * (buf[np.minimum(at + 11, limit)] & 1), 0)
        eth = erspan2 | erspan3
        et[eth] = _u16(buf, np.minimum(at[eth] + skip[eth] + 12, limit))
        nxt[eth] += skip[eth] + 14
        low = (et & 0xF) == 0  # Aruba's 802.11 in GRE, as Zeek recognises it
        aruba = low & (((et & 0x8200) == 0x8200) | (((et & 0x8300) == 0x8300) & (et <= 0x8370)))
        aruba |= et == 0x9000
        extra: list[tuple[int, int, int]] = []  # A-MSDU subframes after the first
        if aruba.any():
            rows = np.flatnonzero(aruba)
            wet, wnxt, *_, first_sub = _wifi(buf, limit, nxt[rows], stop[rows])
            et[rows], nxt[rows] = wet, wnxt
            for r, at in zip(rows[first_sub >= 0].tolist(), first_sub[first_sub >= 0].tolist(),
                             strict=True):
                extra += _subframes(buf, limit, at, int(stop[r]), r)
        return et, nxt, eth, extra

    def _v6_ext(self, buf, limit, end, ok, v6, proto, l4, frag_off, more, frag_id) -> None:
        """Follow IPv6 extension headers (in place) to the transport header."""
        rows = np.flatnonzero(v6 & ok)
        for _ in range(8):
            if not rows.size:
                return
            nh = proto[rows]
            ext = np.isin(nh, V6_EXT) | (nh == 44)
            rows = rows[ext]
            if not rows.size:
                return
            at = l4[rows]
            inside = at + 8 <= end[rows]
            ok[rows[~inside]] = False
            rows, at = rows[inside], at[inside]
            at_c = np.minimum(at, limit)
            kind = proto[rows]
            hdr_len = np.where(kind == 51, (buf[at_c + 1].astype(np.int64) + 2) * 4,
                               (buf[at_c + 1].astype(np.int64) + 1) * 8)
            frag = kind == 44
            if frag.any():
                fr = rows[frag]
                fo = _u16(buf, at_c[frag] + 2)
                frag_off[fr] = fo & 0xFFF8
                more[fr] = (fo & 1) == 1
                frag_id[fr] = _u32(buf, at_c[frag] + 4)
                hdr_len = np.where(frag, 8, hdr_len)
            proto[rows] = buf[at_c]
            l4[rows] = at + hdr_len
        if rows.size:
            ok[rows[np.isin(proto[rows], V6_EXT)]] = False

    def _fragments(self, fragment, first, src_hi, src_lo, dst_hi, dst_lo, frag_id, proto, sport,
                   dport, flags, layout) -> np.ndarray:
        """Reassemble as Zeek counts: a datagram is one packet of its whole length once all its
        fragments are in, on its first fragment's row when they all came in one batch (else on
        the row that completed it); the other fragments are dropped, and a datagram that never
        completes is not counted.  Returns which rows to keep."""
        frag_off, more, l3, l4, wire, payload, v6 = layout
        found = np.ones(fragment.size, bool)
        table = self.fragments  # key -> [sport, dport, bytes in, total, header, transport hdr]
        groups: dict[tuple, list[int]] = {}
        for i in np.flatnonzero(fragment).tolist():
            key = (int(src_hi[i]), int(src_lo[i]), int(dst_hi[i]), int(dst_lo[i]),
                   int(frag_id[i]), int(proto[i]))
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            st = table.pop(key, None) or [0, 0, 0, -1, -1, 0]
            head = -1
            for i in idx:
                size = int(l3[i] + wire[i] - l4[i])
                st[2] += size
                if first[i]:
                    head = i
                    st[0], st[1] = int(sport[i]), int(dport[i])
                    st[4] = int(wire[i]) - size - 8 * bool(v6[i])  # IPv6 drops the fragment hdr
                    st[5] = size - int(payload[i])
                if not more[i]:
                    st[3] = int(frag_off[i]) + size
                found[i] = False
            if st[3] < 0 or st[4] < 0 or st[2] < st[3]:
                table[key] = st  # not complete yet
                continue
            if st[2] > st[3]:
                self.skip("IP fragments overlapping or repeated", len(idx))
                continue
            row = head if head >= 0 else idx[-1]
            found[row] = True
            wire[row], payload[row] = st[4] + st[3], st[3] - st[5]
            sport[row], dport[row] = st[0], st[1]
            more[row] = False
            if head < 0:
                flags[row] = 0
        if len(table) > 65536:
            self.skip("IP datagrams never completed", len(table))
            table.clear()
        return found
