"""Vectorised decoding of link, IP and transport headers for a batch of packets.

Every field is gathered with numpy from the reader's buffer at per-packet offsets; no Python runs
per packet except for IP fragments, which are rare and need a little state to find their flow.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from observer.sources.pcapfile import PAD, Batch, words

LINK_NAMES = {
    0: "BSD loopback (NULL)", 1: "Ethernet", 12: "raw IP", 14: "raw IP", 101: "raw IP",
    108: "OpenBSD loopback", 113: "Linux cooked (SLL)", 228: "raw IPv4", 229: "raw IPv6",
    276: "Linux cooked v2 (SLL2)",
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
    buf: np.ndarray
    apps: dict[int, str]  # PCAPdroid uid -> app name seen in this batch

    def __len__(self) -> int:
        return self.ts.size


def _u16(buf: np.ndarray, off: np.ndarray) -> np.ndarray:
    return words(buf, ">u2")[off].astype(np.int64)


def _u32(buf: np.ndarray, off: np.ndarray) -> np.ndarray:
    return words(buf, ">u4")[off].astype(np.int64)


class Decoder:
    """Turn batches into ``Packets``; counts every packet it cannot use in ``skipped``."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        self.fragments: dict[tuple, tuple[int, int]] = {}  # (src, dst, id, proto) -> ports
        self.unsupported: Counter[int] = Counter()

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
        unsupported = np.zeros(d.size, bool)
        apps: dict[int, str] = {}
        for lt in lts.tolist():
            sel = None if lts.size == 1 else np.flatnonzero(batch.linktype == lt)
            ds = d if sel is None else d[sel]
            out = self._link(buf, ds, caplen if sel is None else caplen[sel], int(lt), apps)
            if out is None:
                self.unsupported[int(lt)] += ds.size
                self.skip(f"unsupported {link_name(int(lt))}", ds.size)
                unsupported[slice(None) if sel is None else sel] = True
                continue
            lo, fam, uids = out
            if sel is None:
                l3, family, uid = lo, fam, uids
            else:
                l3[sel], family[sel], uid[sel] = lo, fam, uids
        non_ip = family == 0
        self.skip("not IP", np.count_nonzero(non_ip & ~unsupported))
        keep = np.flatnonzero(~non_ip)
        if keep.size < d.size:
            d, end, l3, family, uid = d[keep], end[keep], l3[keep], family[keep], uid[keep]
            ts, origlen = batch.ts[keep], batch.origlen[keep]
        else:
            ts, origlen = batch.ts, batch.origlen
        return self._ip(buf, limit, d, end, l3, family, uid, ts, origlen, apps)

    # -- link layer -------------------------------------------------------------------------------
    def _link(self, buf: np.ndarray, d: np.ndarray, caplen: np.ndarray, lt: int,
              apps: dict[int, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Offset of the IP header, IP family and PCAPdroid uid of each packet, or None."""
        uid = np.full(d.size, -1, np.int64)
        if lt == 1:
            et = _u16(buf, d + 12)
            l3 = d + 14
            for _ in range(2):
                tagged = np.isin(et, VLAN_TAGS)
                if not tagged.any():
                    break
                et = np.where(tagged, _u16(buf, l3 + 2), et)
                l3 = l3 + 4 * tagged
            fam = np.where(et == 0x0800, 4, np.where(et == 0x86DD, 6, 0))
            self._pcapdroid(buf, d, caplen, uid, apps)
        elif lt == 113:
            et = _u16(buf, d + 14)
            l3 = d + 16
            fam = np.where(et == 0x0800, 4, np.where(et == 0x86DD, 6, 0))
        elif lt == 276:
            et = _u16(buf, d)
            l3 = d + 20
            fam = np.where(et == 0x0800, 4, np.where(et == 0x86DD, 6, 0))
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
        else:
            return None
        fam = np.where(l3 + 1 <= d + caplen, fam, 0)
        return l3, fam, uid

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
    def _ip(self, buf, limit, d, end, l3, family, uid, ts, origlen, apps) -> Packets:
        n = d.size
        l3c = np.minimum(l3, limit)
        v4 = family == 4
        v6 = ~v4
        rows6 = np.flatnonzero(v6)
        b0 = buf[l3c].astype(np.int64)
        ihl = (b0 & 15) * 4
        tot4 = _u16(buf, l3c + 2)
        tot4 = np.where(tot4 == 0, origlen - (l3 - d), tot4)  # TSO captures write 0
        frag4 = _u16(buf, l3c + 6)
        frag_off = (frag4 & 0x1FFF) * 8
        more = (frag4 & 0x2000) != 0
        frag_id = _u16(buf, l3c + 4)
        proto = buf[l3c + 9].astype(np.int64)
        wire = tot4
        src_hi = np.zeros(n, np.uint64)
        dst_hi = np.zeros(n, np.uint64)
        u32, u64 = words(buf, ">u4"), words(buf, ">u8")
        src_lo = V4_MAPPED | u32[l3c + 12].astype(np.uint64)
        dst_lo = V4_MAPPED | u32[l3c + 16].astype(np.uint64)
        if rows6.size:
            at = l3c[rows6]
            plen6 = _u16(buf, at + 4)
            jumbo = (plen6 == 0) & (buf[at + 6] == 0)
            if jumbo.any():  # RFC 2675 jumbogram: the length is in a hop-by-hop option
                j = at[jumbo] + 42
                plen6[jumbo] = np.where(buf[j] == 0xC2, _u32(buf, j + 2), 0)
            wire[rows6] = plen6 + 40
            proto[rows6] = buf[at + 6]
            frag_off[rows6], more[rows6], frag_id[rows6] = 0, False, 0
            src_hi[rows6], src_lo[rows6] = u64[at + 8], u64[at + 16]
            dst_hi[rows6], dst_lo[rows6] = u64[at + 24], u64[at + 32]
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
        sport = _u16(buf, l4c)
        dport = _u16(buf, l4c + 2)
        tcp = proto == 6
        doff = np.where(tcp, (buf[l4c + 12] >> 4).astype(np.int64) * 4, 8)
        flags = np.where(tcp, buf[l4c + 13], 0).astype(np.int64)
        need = np.where(tcp, 14, 4)
        cut = first & (l4 + need > end)
        ip_payload = l3 + wire - l4
        payload = ip_payload - np.where(first, doff, 0)
        ulen = _u16(buf, l4c + 4)
        whole = ~tcp & first & ~more & (ulen >= 8) & (ulen <= ip_payload)
        payload = np.where(whole, ulen - 8, payload)  # the UDP length, as tshark counts it
        broken = first & ~cut & ((tcp & (doff < 20)) | (payload < 0))
        self.skip("truncated TCP/UDP header", np.count_nonzero(cut))
        self.skip("malformed TCP/UDP header", np.count_nonzero(broken))
        use = transport & ~cut & ~broken
        if fragment.any():
            use &= self._fragments(fragment & use, first, src_hi, src_lo, dst_hi, dst_lo, frag_id,
                                   proto, sport, dport, flags)
        rows = np.flatnonzero(use)
        data = l4 + np.where(first, doff, 0)
        captured = np.clip(np.minimum(end, l3 + wire) - data, 0, None)
        data = np.where(first & (frag_off == 0), data, -1)
        pick = (lambda a: a[rows]) if rows.size < n else (lambda a: a)
        return Packets(
            ts=pick(ts), src_hi=pick(src_hi), src_lo=pick(src_lo), dst_hi=pick(dst_hi),
            dst_lo=pick(dst_lo), sport=pick(sport), dport=pick(dport), udp=pick(proto == 17),
            flags=pick(flags), payload=pick(payload), wire=pick(wire), data=pick(data),
            captured=pick(captured), uid=pick(uid), buf=buf, apps=apps,
        )

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
                   dport, flags) -> np.ndarray:
        """Give non-first fragments the ports of their first fragment; False where none was seen."""
        found = np.ones(fragment.size, bool)
        table = self.fragments
        heads = np.flatnonzero(fragment & first)
        for i in heads.tolist():
            key = (int(src_hi[i]), int(src_lo[i]), int(dst_hi[i]), int(dst_lo[i]),
                   int(frag_id[i]), int(proto[i]))
            table[key] = (int(sport[i]), int(dport[i]))
        tails = np.flatnonzero(fragment & ~first)
        for i in tails.tolist():
            key = (int(src_hi[i]), int(src_lo[i]), int(dst_hi[i]), int(dst_lo[i]),
                   int(frag_id[i]), int(proto[i]))
            ports = table.get(key)
            if ports is None:
                found[i] = False
                self.skip("IP fragment without its first fragment", 1)
            else:
                sport[i], dport[i] = ports
                flags[i] = 0
        if len(table) > 65536:
            table.clear()
        return found
