"""Connection tracking over batches of packets, vectorised with numpy.

Packets are grouped by their direction-free 5-tuple (a flow), and a flow is split into connections
where TCP starts again (a SYN after a FIN or RST) or a UDP flow idles longer than the timeout.
State carried between batches and files is one row per flow and one per live connection: finished
connections (``finished``) are handed out with their activity rows and dropped (``drop``), so memory
follows the connections open at a time, not the length of the capture.  Connections keep a serial
number for the whole run (what ``add`` returns), their row index changes when others are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from observer.devices import DeviceMap, address_strings
from observer.sources.decode import Packets

SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04
ATTEMPT_S = 5.0  # Zeek's tcp_attempt_delay: an unanswered SYN's connection ends after this
_K = [np.uint64(k) for k in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                             0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53)]


def mix(*parts: np.ndarray) -> np.ndarray:
    """A deterministic 64-bit hash of equal-length integer arrays (for grouping and ids)."""
    with np.errstate(over="ignore"):
        h = np.zeros(np.shape(parts[0]), np.uint64)
        for i, part in enumerate(parts):
            h = (h ^ np.asarray(part).astype(np.uint64)) * _K[i % len(_K)]
            h ^= h >> np.uint64(31)
        h *= _K[4]
        h ^= h >> np.uint64(33)
    return h


class _Table:
    """Growable columns of numpy arrays (flow and connection state)."""

    def __init__(self, **dtypes: tuple[type | str, object]) -> None:
        self.fill = {name: fill for name, (_, fill) in dtypes.items()}
        self.cols = {name: np.full(1024, fill, dtype) for name, (dtype, fill) in dtypes.items()}
        self.n = 0

    def append(self, count: int) -> np.ndarray:
        need = self.n + count
        size = next(iter(self.cols.values())).size
        if need > size:
            size = max(need, size * 2)
            for name, col in self.cols.items():
                grown = np.full(size, self.fill[name], col.dtype)
                grown[: self.n] = col[: self.n]
                self.cols[name] = grown
        ids = np.arange(self.n, need)
        self.n = need
        return ids

    def keep(self, rows: np.ndarray) -> None:
        """Keep only ``rows`` (in order), shrinking the arrays."""
        size = max(1024, rows.size + rows.size // 2)
        for name, col in self.cols.items():
            kept = np.full(size, self.fill[name], col.dtype)
            kept[: rows.size] = col[rows]
            self.cols[name] = kept
        self.n = rows.size

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]

    def view(self, name: str) -> np.ndarray:
        return self.cols[name][: self.n]


@dataclass
class _Sorted:
    """A batch sorted by flow (stably: a flow's packets stay in file order), with its groups."""

    order: np.ndarray  # batch position of each sorted packet
    gs: np.ndarray  # sorted position of each flow's first packet
    ge: np.ndarray  # ... and of its last
    fid: np.ndarray  # flow id of each group
    ffid: np.ndarray  # flow id of each sorted packet
    gstart: np.ndarray  # group start of each sorted packet
    first: np.ndarray  # bool: the first packet of its flow in this batch
    ts: np.ndarray
    flags: np.ndarray
    udp: np.ndarray
    sender_a: np.ndarray  # bool: sent by the flow's side a


@dataclass
class _Segments:
    """Runs of sorted packets that belong to one connection."""

    start: np.ndarray  # bool per sorted packet: starts a run
    pos: np.ndarray  # sorted position of each run's first packet
    of: np.ndarray  # run of each sorted packet
    gid: np.ndarray  # connection row of each run


KEYS = ("a_hi", "a_lo", "a_port", "b_hi", "b_lo", "b_port", "udp")


class Tracker:
    """Assign every packet to a connection and keep per-connection and per-bin counters."""

    def __init__(self, *, udp_idle_s: float, bin_s: float,
                 devices: DeviceMap | None = None, tcp_idle_s: float | None = None,
                 close_delay_s: float | None = None) -> None:
        self.udp_idle_s = udp_idle_s
        self.tcp_idle_s = tcp_idle_s  # Zeek's tcp_inactivity_timeout, when set
        self.close_delay_s = close_delay_s  # Zeek's tcp_close_delay / tcp_reset_delay, when set
        self.bin_s = bin_s
        self.devices = devices or DeviceMap()
        self.flow_index: dict[int, int] = {}  # hash of the flow key -> flow id
        self.flow_exact: dict[tuple, int] = {}  # the rare keys whose hash was taken
        self.flows = _Table(a_hi=(np.uint64, 0), a_lo=(np.uint64, 0), a_port=(np.int64, 0),
                            b_hi=(np.uint64, 0), b_lo=(np.uint64, 0), b_port=(np.int64, 0),
                            udp=(bool, False), conn=(np.int64, -1), closed=(bool, False),
                            last_ts=(np.float64, 0.0), hash=(np.uint64, 0),
                            waiting=(bool, False), syn_a=(bool, False), t0=(np.float64, 0.0),
                            rst_at=(np.float64, np.inf), fin_a_at=(np.float64, np.inf),
                            fin_b_at=(np.float64, np.inf))
        self.conns = _Table(flow=(np.int64, 0), client_b=(bool, False),
                            ts_start=(np.float64, np.inf), ts_end=(np.float64, -np.inf),
                            packets_up=(np.int64, 0), packets_down=(np.int64, 0),
                            bytes_up=(np.int64, 0), bytes_down=(np.int64, 0),
                            wire_up=(np.int64, 0), wire_down=(np.int64, 0),
                            fin=(bool, False), rst=(bool, False), superseded=(bool, False),
                            mac=(np.uint64, 0), serial=(np.int64, -1), cid=(np.uint64, 0),
                            issued=(bool, False), tied=(bool, False),
                            shown=(np.float64, -np.inf))  # ts_end of its last partial row
        self._activity: list[np.ndarray] = []  # rows: serial, bin, bytes up/down, packets up/down
        self._tunnels: dict[int, set[int | str]] = {}  # inner serial -> outer serials, IP labels
        self._outer_ids: dict[int, str] = {}  # outer serial -> its conn_id, once fixed
        self._issued = np.zeros(0, np.uint64)  # every id hash handed out (8 bytes a connection)
        self._serials = 0
        self._summed = True
        self.packets = 0

    # -- per batch ---------------------------------------------------------------------------
    def add(self, pk: Packets) -> tuple[np.ndarray, np.ndarray]:
        """Account a batch; return each packet's connection serial and whether it went up."""
        n = len(pk)
        if not n:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        self.packets += n
        b = self._sort(pk)
        seg = self._segments(b, self._boundaries(b), pk)
        up = self._count(b, seg, pk)
        serial = self.conns["serial"][seg.gid][seg.of]
        self._bins(b.ts, seg.start, serial, up, pk.payload[b.order])
        gid = np.empty(n, np.int64)
        gid[b.order] = seg.gid[seg.of]
        up_out = np.empty(n, bool)
        up_out[b.order] = up
        serials = self.conns["serial"][gid]
        if pk.parent is not None:
            self._note_tunnels(serials, pk)
        return serials, up_out

    def _sort(self, pk: Packets) -> _Sorted:
        """Group the batch by flow (direction-free 5-tuple) and find or add each flow."""
        src_first = (pk.src_hi < pk.dst_hi) | ((pk.src_hi == pk.dst_hi) & (
            (pk.src_lo < pk.dst_lo) | ((pk.src_lo == pk.dst_lo) & (pk.sport <= pk.dport))))
        key = {
            "a_hi": np.where(src_first, pk.src_hi, pk.dst_hi),
            "a_lo": np.where(src_first, pk.src_lo, pk.dst_lo),
            "a_port": np.where(src_first, pk.sport, pk.dport),
            "b_hi": np.where(src_first, pk.dst_hi, pk.src_hi),
            "b_lo": np.where(src_first, pk.dst_lo, pk.src_lo),
            "b_port": np.where(src_first, pk.dport, pk.sport),
            "udp": pk.udp,
        }
        codes = self._group(key)
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes)
        gs = np.concatenate(([0], np.cumsum(counts)[:-1]))
        fid = self._flow_ids({k: v[order[gs]] for k, v in key.items()})
        first = np.zeros(order.size, bool)
        first[gs] = True
        return _Sorted(order=order, gs=gs, ge=gs + counts - 1, fid=fid,
                       ffid=np.repeat(fid, counts), gstart=np.repeat(gs, counts), first=first,
                       ts=pk.ts[order], flags=pk.flags[order], udp=pk.udp[order],
                       sender_a=src_first[order])

    def _boundaries(self, b: _Sorted) -> np.ndarray:
        """Which packets start a new connection on their flow: the flow's first packet, a TCP
        SYN after a FIN or RST, a UDP packet after an idle gap.  Updates the flows' TCP state
        (closed or not) and last packet time."""
        udp, flags, gs, ge, fid = b.udp, b.flags, b.gs, b.ge, b.fid
        pos = np.arange(b.ts.size)
        syn = ~udp & ((flags & (SYN | ACK)) == SYN)
        close = ~udp & ((flags & (FIN | RST)) != 0)
        f = self.flows
        closed_before = f["closed"][b.ffid]
        # position of the last close and last SYN before each packet, on its flow
        lc_incl = np.maximum.accumulate(np.where(close, pos, -1))
        ls_incl = np.maximum.accumulate(np.where(syn, pos, -1))
        lc_prev = np.concatenate(([-1], lc_incl[:-1]))
        ls_prev = np.concatenate(([-1], ls_incl[:-1]))
        lc_none = np.where(closed_before, -2, -3)  # none in this batch: the flow's prior state
        ls_none = np.where(closed_before, -3, -2)
        lc = np.where(lc_prev >= b.gstart, lc_prev, lc_none)
        ls = np.where(ls_prev >= b.gstart, ls_prev, ls_none)
        boundary = syn & (lc > ls)
        prev_ts = np.concatenate(([0.0], b.ts[:-1]))
        prev_ts[gs] = f["last_ts"][fid]
        boundary |= udp & (b.ts - prev_ts > self.udp_idle_s)
        if self.tcp_idle_s is not None:
            boundary |= ~udp & (b.ts - prev_ts > self.tcp_idle_s)
        boundary[gs[f["conn"][fid] < 0]] = True
        boundary |= self._attempts(b, boundary, syn)
        if self.close_delay_s is not None:
            boundary |= self._closes(b, boundary)
        lc_end = np.where(lc_incl[ge] >= gs, lc_incl[ge], lc_none[gs])
        ls_end = np.where(ls_incl[ge] >= gs, ls_incl[ge], ls_none[gs])
        f["closed"][fid] = lc_end > ls_end
        f["last_ts"][fid] = b.ts[ge]
        return boundary

    def _attempts(self, b: _Sorted, boundary: np.ndarray, syn: np.ndarray) -> np.ndarray:
        """Zeek's connection attempt: a TCP connection opened by a SYN that the other side has not
        answered within ATTEMPT_S ends there, and the next packet opens a new one (a one-sided
        capture splits like Zeek's).  Keeps each flow's state: waiting, SYN side, start."""
        f, n = self.flows, b.ts.size
        added = np.zeros(n, bool)
        for _ in range(8):
            start = boundary | added | b.first
            seg = np.cumsum(start) - 1
            sp = np.flatnonzero(start)
            new = (boundary | added)[sp]
            fid = b.ffid[sp]
            t0 = np.where(new, b.ts[sp], f["t0"][fid])
            waiting = np.where(new, syn[sp], f["waiting"][fid])
            syn_a = np.where(new, b.sender_a[sp], f["syn_a"][fid])
            other = (b.sender_a != syn_a[seg]).astype(np.int64)
            before = np.cumsum(other) - other
            answered = before - before[sp][seg] > 0
            late = ~b.udp & waiting[seg] & ~answered & ~start & (b.ts > t0[seg] + ATTEMPT_S)
            if not late.any():
                break
            at = np.flatnonzero(late)
            added[at[np.concatenate(([True], seg[at[1:]] != seg[at[:-1]]))]] = True
        last = seg[b.ge]
        other_all = np.cumsum(other)
        heard = other_all[b.ge] - before[sp][last] > 0
        f["waiting"][b.fid] = waiting[last] & ~heard
        f["syn_a"][b.fid], f["t0"][b.fid] = syn_a[last], t0[last]
        return added

    def _closes(self, b: _Sorted, boundary: np.ndarray) -> np.ndarray:
        """Zeek's close delay: ``close_delay_s`` after a RST, or after both sides' FINs, a TCP
        connection is gone, and any later packet opens a new one.  Keeps each flow's RST and FIN
        times for the next batch."""
        f, n = self.flows, b.ts.size
        pos = np.arange(n)
        tcp, fin = ~b.udp, (b.flags & FIN) != 0
        marks = (tcp & ((b.flags & RST) != 0), tcp & fin & b.sender_a, tcp & fin & ~b.sender_a)
        names = ("rst_at", "fin_a_at", "fin_b_at")
        last = [np.maximum.accumulate(np.where(m, pos, -1)) for m in marks]
        added = np.zeros(n, bool)
        for _ in range(8):
            start = boundary | added | b.first
            seg = np.cumsum(start) - 1
            sp = np.flatnonzero(start)
            new = (boundary | added)[sp]
            times = []
            for name, lp in zip(names, last, strict=True):
                before = np.concatenate(([-1], lp[:-1]))
                carried = np.where(new, np.inf, f[name][b.ffid[sp]])[seg]
                times.append(np.where(before >= sp[seg], b.ts[np.maximum(before, 0)], carried))
            closed_at = np.minimum(times[0], np.maximum(times[1], times[2]))
            late = tcp & ~start & (b.ts > closed_at + self.close_delay_s)
            if not late.any():
                break
            at = np.flatnonzero(late)
            added[at[np.concatenate(([True], seg[at[1:]] != seg[at[:-1]]))]] = True
        end_seg = seg[b.ge]
        for name, lp in zip(names, last, strict=True):
            carried = np.where(new[end_seg], np.inf, f[name][b.fid])
            f[name][b.fid] = np.where(lp[b.ge] >= sp[end_seg], b.ts[np.maximum(lp[b.ge], 0)],
                                      carried)
        return added

    def _segments(self, b: _Sorted, boundary: np.ndarray, pk: Packets) -> _Segments:
        """Cut each flow's packets into runs of one connection, opening the new connections and
        marking those they replace as superseded."""
        gs, first = b.gs, b.first
        existing = self.flows["conn"][b.fid]
        start = boundary | first
        seg_pos = np.flatnonzero(start)
        seg_of = np.cumsum(start) - 1
        seg_new = boundary[seg_pos]
        seg_gid = np.empty(seg_pos.size, np.int64)
        cont = ~seg_new
        seg_gid[cont] = existing[np.searchsorted(gs, seg_pos[cont])]
        new_pos = seg_pos[seg_new]
        new_ids = self.conns.append(new_pos.size)
        self.conns["serial"][new_ids] = np.arange(self._serials, self._serials + new_ids.size)
        self._serials += new_ids.size
        seg_gid[seg_new] = new_ids
        self._open(new_ids, b, new_pos, pk)
        # a connection replaced by a new one on the same flow ended there
        old = existing[np.searchsorted(gs, new_pos, side="right") - 1]
        prior = np.where(first[new_pos], old, -1)
        within = ~first[new_pos]
        prior[within] = seg_gid[seg_of[new_pos[within]] - 1]
        self.conns["superseded"][prior[prior >= 0]] = True
        self.flows["conn"][b.fid] = seg_gid[seg_of[b.ge]]
        return _Segments(start=start, pos=seg_pos, of=seg_of, gid=seg_gid)

    def _count(self, b: _Sorted, seg: _Segments, pk: Packets) -> np.ndarray:
        """Add each run's packets, bytes and times to its connection; return which sorted
        packets went up (client to server)."""
        c, gid, at = self.conns, seg.gid, seg.pos
        seg_len = np.diff(np.append(at, b.ts.size))
        up = b.sender_a != np.repeat(c["client_b"][gid], seg_len)
        payload = pk.payload[b.order]
        wire = pk.wire[b.order]
        counted = up if pk.uncounted is None else up & ~pk.uncounted[b.order]
        pk_up = np.add.reduceat(counted.astype(np.int64), at)
        total = seg_len if pk.uncounted is None else np.add.reduceat(
            (~pk.uncounted[b.order]).astype(np.int64), at)  # a bad checksum counts nothing
        c["packets_up"][gid] += pk_up
        c["packets_down"][gid] += total - pk_up
        by_up = np.add.reduceat(np.where(up, payload, 0), at)
        c["bytes_up"][gid] += by_up
        c["bytes_down"][gid] += np.add.reduceat(payload, at) - by_up
        w_up = np.add.reduceat(np.where(up, wire, 0), at)
        c["wire_up"][gid] += w_up
        c["wire_down"][gid] += np.add.reduceat(wire, at) - w_up
        ts, flags = b.ts, b.flags
        c["ts_start"][gid] = np.minimum(c["ts_start"][gid], np.minimum.reduceat(ts, at))
        c["ts_end"][gid] = np.maximum(c["ts_end"][gid], np.maximum.reduceat(ts, at))
        c["fin"][gid] |= np.logical_or.reduceat((flags & FIN) != 0, at)
        c["rst"][gid] |= np.logical_or.reduceat((flags & RST) != 0, at)
        return up

    def _group(self, key: dict[str, np.ndarray]) -> np.ndarray:
        """Dense group codes of equal keys; a hash, checked exactly, with a slow exact fallback."""
        codes, _ = pd.factorize(mix(*key.values()))
        codes = codes.astype(np.int64)
        first = np.full(codes.max() + 1, -1, np.int64)
        first[codes[::-1]] = np.arange(codes.size - 1, -1, -1)
        if all(np.array_equal(v, v[first][codes]) for v in key.values()):
            return codes
        table = np.rec.fromarrays(list(key.values()))
        return np.unique(table, return_inverse=True)[1].astype(np.int64).ravel()

    def _flow_ids(self, rep: dict[str, np.ndarray]) -> np.ndarray:
        """Flow ids of each group's key, adding new flows.  Indexed by a 64-bit hash of the key
        (a tuple per flow would take ~450 bytes); a hash that matches a different stored key is
        resolved through a second, exact index."""
        hashes = mix(*rep.values()).tolist()
        index, exact = self.flow_index, self.flow_exact
        fid = np.array([index.get(h, -1) for h in hashes], np.int64)
        seen = np.flatnonzero(fid >= 0)
        if seen.size:
            same = np.ones(seen.size, bool)
            for name, values in rep.items():
                same &= self.flows[name][fid[seen]] == values[seen]
            for j in seen[~same].tolist():
                fid[j] = exact.get(tuple(int(v[j]) for v in rep.values()), -1)
        new = np.flatnonzero(fid < 0)
        if new.size:
            ids = self.flows.append(new.size)
            fid[new] = ids
            for name, values in rep.items():
                self.flows[name][ids] = values[new]
            self.flows["hash"][ids] = np.array(hashes, np.uint64)[new]
            for i, j in zip(ids.tolist(), new.tolist(), strict=True):
                if index.setdefault(hashes[j], i) != i:
                    exact[tuple(int(v[j]) for v in rep.values())] = i
        return fid

    def _open(self, ids: np.ndarray, b: _Sorted, first: np.ndarray, pk: Packets) -> None:
        """Decide the client side of new connections ``ids`` from their first packets (sorted
        positions ``first``) and the device map (a configured device is the client), and keep
        the client's MAC."""
        fid, sender_a, at = b.ffid[first], b.sender_a[first], b.order[first]
        synack = ~b.udp[first] & ((b.flags[first] & (SYN | ACK)) == (SYN | ACK))
        client_a = np.where(synack, ~sender_a, sender_a)
        a_mac = np.where(sender_a, pk.src_mac[at], pk.dst_mac[at])
        b_mac = np.where(sender_a, pk.dst_mac[at], pk.src_mac[at])
        if self.devices.configured:
            f = self.flows
            a_dev = self.devices.owned(f["a_hi"][fid], f["a_lo"][fid], a_mac)
            b_dev = self.devices.owned(f["b_hi"][fid], f["b_lo"][fid], b_mac)
            client_a = np.where(a_dev & ~b_dev, True, np.where(b_dev & ~a_dev, False, client_a))
        self.conns["flow"][ids] = fid
        self.conns["client_b"][ids] = ~client_a
        self.conns["mac"][ids] = np.where(client_a, a_mac, b_mac)

    def _bins(self, ts: np.ndarray, seg_start: np.ndarray, gid: np.ndarray, up: np.ndarray,
              payload: np.ndarray) -> None:
        bins = np.floor(ts / self.bin_s).astype(np.int64)
        run = seg_start.copy()
        run[1:] |= bins[1:] != bins[:-1]
        at = np.flatnonzero(run)
        length = np.diff(np.append(at, ts.size))
        p_up = np.add.reduceat(up.astype(np.int64), at)
        b_up = np.add.reduceat(np.where(up, payload, 0), at)
        b_all = np.add.reduceat(payload, at)
        self._activity.append(
            np.stack([gid[at], bins[at], b_up, b_all - b_up, p_up, length - p_up]))
        self._summed = False

    # -- results -----------------------------------------------------------------------------
    def ends(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """Client and server address, port and protocol of connections ``rows``."""
        c, f = self.conns, self.flows
        fid = c["flow"][rows]
        cb = c["client_b"][rows]
        pick = lambda a, b: np.where(cb, f[b][fid], f[a][fid])  # noqa: E731
        return (pick("a_hi", "b_hi"), pick("a_lo", "b_lo"), pick("a_port", "b_port"),
                pick("b_hi", "a_hi"), pick("b_lo", "a_lo"), pick("b_port", "a_port"),
                f["udp"][fid])

    # -- finished connections ------------------------------------------------------------------
    def finished(self, now: float, tcp_quiet_s: float) -> np.ndarray:
        """Rows of connections that can take no more packets by ``now``: replaced on their flow,
        UDP idle past the timeout, TCP closed (FIN or RST) and quiet for ``tcp_quiet_s``."""
        c = self.conns
        quiet = now - c.view("ts_end")
        udp = self.flows["udp"][c.view("flow")]
        closed = c.view("fin") | c.view("rst")
        done = c.view("superseded") | np.where(udp, quiet > self.udp_idle_s,
                                                closed & (quiet > tcp_quiet_s))
        return np.flatnonzero(done)

    def serials(self, rows: np.ndarray) -> np.ndarray:
        return self.conns["serial"][rows]

    def drop(self, rows: np.ndarray) -> None:
        """Forget connections ``rows`` (already handed out), and the flows they were last on."""
        c, f = self.conns, self.flows
        if self._tunnels:
            self._forget_tunnels(rows)
        keep = np.ones(c.n, bool)
        keep[rows] = False
        flow_gone = np.zeros(f.n, bool)
        flows = c["flow"][rows]
        flow_gone[flows[f["conn"][flows] == rows]] = True
        conn_at = np.cumsum(keep) - 1
        flow_at = np.cumsum(~flow_gone) - 1
        c.keep(np.flatnonzero(keep))
        f.keep(np.flatnonzero(~flow_gone))
        c.view("flow")[:] = flow_at[c.view("flow")]
        f.view("conn")[:] = conn_at[f.view("conn")]
        index = dict(zip(f.view("hash").tolist(), range(f.n), strict=True))
        self.flow_exact = {}
        if len(index) < f.n:  # a hash shared by two live flows: the later ones go exact
            index = {}
            for i, h in enumerate(f.view("hash").tolist()):
                if index.setdefault(h, i) != i:
                    self.flow_exact[tuple(int(f[k][i]) for k in KEYS)] = i
        self.flow_index = index

    def issue(self, rows: np.ndarray) -> None:
        """Fix the ids of connections ``rows``: a 64-bit hash of the 5-tuple and the start in
        microseconds; a hash already handed out in this run gets the serial appended."""
        c = self.conns
        rows = rows[~c["issued"][rows]]
        if not rows.size:
            return
        stamp = np.round(c["ts_start"][rows] * 1e6).astype(np.int64)
        ids = mix(*self.ends(rows), stamp)
        uniq, first = np.unique(ids, return_index=True)
        tied = np.ones(rows.size, bool)
        tied[first] = False
        tied |= np.isin(ids, self._issued)
        self._issued = np.union1d(self._issued, uniq)
        c["cid"][rows], c["tied"][rows], c["issued"][rows] = ids, tied, True

    def id_text(self, rows: np.ndarray) -> np.ndarray:
        """``pcap-<hash>`` (``-<serial>`` after it for a repeated hash) of issued ``rows``."""
        c = self.conns
        text = np.array([f"pcap-{h:016x}" for h in c["cid"][rows].tolist()], object)
        for i in np.flatnonzero(c["tied"][rows]).tolist():
            text[i] = f"{text[i]}-{c['serial'][rows[i]]}"
        return text

    def _device(self, rows: np.ndarray) -> np.ndarray:
        """Device names of the clients of connections ``rows``, each connection named once."""
        uniq, inverse = np.unique(rows, return_inverse=True)
        hi, lo = self.ends(uniq)[:2]
        return self.devices.names(hi, lo, self.conns["mac"][uniq])[inverse]

    def connections(self, rows: np.ndarray, *, capture_end: float) -> pd.DataFrame:
        """Connections ``rows`` (issued) in schema column names; the caller fills in names."""
        c = self.conns
        c_hi, c_lo, c_port, s_hi, s_lo, s_port, udp = self.ends(rows)
        view = lambda name: c[name][rows]  # noqa: E731
        ts_end = view("ts_end")
        idle = udp & (view("superseded") | (capture_end - ts_end > self.udp_idle_s))
        close = np.where(view("rst"), "rst", np.where(view("fin"), "fin", "end-of-capture"))
        close = np.where(udp, np.where(idle, "idle", "end-of-capture"), close)
        self.devices.learn(c_hi, c_lo, view("mac"))  # the link layer: address -> MAC
        return pd.DataFrame({
            "conn_id": self.id_text(rows), "source": "pcap",
            "device": self._device(rows),
            "proto": np.where(udp, "udp", "tcp"),
            "client_ip": address_strings(c_hi, c_lo), "client_port": c_port,
            "server_ip": address_strings(s_hi, s_lo), "server_port": s_port,
            "ts_start": view("ts_start"), "ts_end": ts_end,
            "bytes_up": view("bytes_up"), "bytes_down": view("bytes_down"),
            "packets_up": view("packets_up"), "packets_down": view("packets_down"),
            "wire_bytes_up": view("wire_up"), "wire_bytes_down": view("wire_down"),
            "close_reason": close, "tunnel": self._tunnel_text(view("serial")),
        })

    def pending_activity(self) -> int:
        """Activity rows held, after summing each connection's bin into one row."""
        if len(self._activity) > 1 or (self._activity and not self._summed):
            rows = np.concatenate(self._activity, axis=1)
            rows = rows[:, np.lexsort((rows[1], rows[0]))]
            start = np.flatnonzero(np.concatenate(
                ([True], (rows[0, 1:] != rows[0, :-1]) | (rows[1, 1:] != rows[1, :-1]))))
            self._activity = [np.concatenate([rows[:2, start],
                                              np.add.reduceat(rows[2:], start, axis=1)])]
            self._summed = True
        return self._activity[0].shape[1] if self._activity else 0

    def activity(self, done: np.ndarray, before_bin: float, size: int) -> Iterator[pd.DataFrame]:
        """Activity rows of connections ``done`` (serials) and, for the others, of bins that
        start before ``before_bin`` (a bin number); ``size`` rows at a time.  The rest is kept."""
        if not self.pending_activity():
            return
        rows = self._activity[0]
        out = np.isin(rows[0], done) | (rows[1] < before_bin)
        self._activity = [rows[:, ~out]] if not out.all() else []
        rows = rows[:, out]
        rows = rows[:, np.argsort(rows[1], kind="stable")]  # in time order: few days a slice
        at = np.searchsorted(self.conns.view("serial"), rows[0])
        self.issue(np.unique(at))
        for start in range(0, rows.shape[1], size):
            part, local = rows[:, start : start + size], at[start : start + size]
            uniq, inverse = np.unique(local, return_inverse=True)  # an id text per connection
            yield pd.DataFrame({
                "conn_id": self.id_text(uniq)[inverse.ravel()], "device": self._device(local),
                "ts_bin": part[1] * self.bin_s, "bin_s": float(self.bin_s),
                "bytes_up": part[2], "bytes_down": part[3],
                "packets_up": part[4], "packets_down": part[5],
            })

    # -- tunnels -------------------------------------------------------------------------------
    def _note_tunnels(self, serials: np.ndarray, pk: Packets) -> None:
        """Remember the outer connection (or IP tunnel) of each tunnelled packet's connection."""
        parent = pk.parent
        inner = np.flatnonzero((parent >= 0) | ~np.equal(pk.tunnel, None))
        outer = np.where(parent[inner] >= 0, serials[np.maximum(parent[inner], 0)], -1)
        pairs = set(zip(serials[inner].tolist(), outer.tolist(), pk.tunnel[inner].tolist(),
                        strict=True))
        for serial, out, label in pairs:
            self._tunnels.setdefault(serial, set()).add(out if out >= 0 else label)

    def _outer_id(self, serial: int) -> str:
        """The conn_id of an outer connection, fixing it now if it is still open."""
        text = self._outer_ids.get(serial)
        if text is None:
            serials = self.conns.view("serial")
            at = int(np.searchsorted(serials, serial))
            if at >= serials.size or serials[at] != serial:
                return f"pcap-serial-{serial}"
            rows = np.array([at])
            self.issue(rows)
            text = self._outer_ids[serial] = str(self.id_text(rows)[0])
        return text

    def _tunnel_text(self, serials: np.ndarray) -> np.ndarray:
        """The ``tunnel`` column: outer conn_ids and IP tunnels, comma-separated, else null."""
        out = np.full(serials.size, None, object)
        if self._tunnels:
            for i, serial in enumerate(serials.tolist()):
                outer = self._tunnels.get(serial)
                if outer:
                    out[i] = ",".join(sorted(self._outer_id(o) if isinstance(o, int) else o
                                             for o in outer))
        return out

    def _forget_tunnels(self, rows: np.ndarray) -> None:
        """Drop the tunnels of connections ``rows``; keep the ids of those that are outer ones."""
        serials = self.conns["serial"][rows]
        outer = {o for links in self._tunnels.values() for o in links if isinstance(o, int)}
        for i, serial in enumerate(serials.tolist()):
            self._tunnels.pop(serial, None)
            if serial in outer and serial not in self._outer_ids:
                self._outer_ids[serial] = str(self.id_text(rows[i : i + 1])[0])
