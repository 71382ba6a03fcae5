"""Connection tracking over batches of packets, vectorised with numpy.

Packets are grouped by their direction-free 5-tuple (a flow), and a flow is split into connections
where TCP starts again (a SYN after a FIN or RST) or a UDP flow idles longer than the timeout.
State carried between batches and files is one row per flow and one per live connection: finished
connections (``finished``) are handed out with their activity rows and dropped (``drop``), so memory
follows the connections open at a time, not the length of the capture.  Connections keep a serial
number for the whole run (what ``add`` returns), their row index changes when others are dropped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd

from observer.sources.decode import Packets

SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04
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


KEYS = ("a_hi", "a_lo", "a_port", "b_hi", "b_lo", "b_port", "udp")


class Tracker:
    """Assign every packet to a connection and keep per-connection and per-bin counters."""

    def __init__(self, *, udp_idle_s: float, bin_s: float,
                 devices: dict[tuple[int, int], str] | None = None) -> None:
        self.udp_idle_s = udp_idle_s
        self.bin_s = bin_s
        self.devices = devices or {}
        self._device_keys = np.array(
            sorted(mix(np.uint64(hi), np.uint64(lo)).item() for hi, lo in self.devices),
            np.uint64)
        self.flow_index: dict[int, int] = {}  # hash of the flow key -> flow id
        self.flow_exact: dict[tuple, int] = {}  # the rare keys whose hash was taken
        self.flows = _Table(a_hi=(np.uint64, 0), a_lo=(np.uint64, 0), a_port=(np.int64, 0),
                            b_hi=(np.uint64, 0), b_lo=(np.uint64, 0), b_port=(np.int64, 0),
                            udp=(bool, False), conn=(np.int64, -1), closed=(bool, False),
                            last_ts=(np.float64, 0.0), hash=(np.uint64, 0))
        self.conns = _Table(flow=(np.int64, 0), client_b=(bool, False),
                            ts_start=(np.float64, np.inf), ts_end=(np.float64, -np.inf),
                            packets_up=(np.int64, 0), packets_down=(np.int64, 0),
                            bytes_up=(np.int64, 0), bytes_down=(np.int64, 0),
                            wire_up=(np.int64, 0), wire_down=(np.int64, 0),
                            fin=(bool, False), rst=(bool, False), superseded=(bool, False),
                            app=(np.int64, -1), serial=(np.int64, -1), cid=(np.uint64, 0),
                            issued=(bool, False), tied=(bool, False))
        self.apps: dict[int, str] = {}
        self._activity: list[np.ndarray] = []  # rows: serial, bin, bytes up/down, packets up/down
        self._issued = np.zeros(0, np.uint64)  # every id hash handed out (8 bytes a connection)
        self._serials = 0
        self._summed = True
        self.packets = 0

    # -- per batch ---------------------------------------------------------------------------
    def add(self, pk: Packets) -> tuple[np.ndarray, np.ndarray]:
        """Account a batch; return each packet's connection id and whether it went up."""
        n = len(pk)
        if not n:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        self.packets += n
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
        gs = np.concatenate(([0], np.cumsum(counts)[:-1]))  # group starts in sorted order
        ge = gs + counts - 1
        rep = order[gs]  # first packet of each group
        fid = self._flow_ids({k: v[rep] for k, v in key.items()})

        ts = pk.ts[order]
        flags = pk.flags[order]
        udp = pk.udp[order]
        sender_a = src_first[order]
        gstart = np.repeat(gs, counts)
        ffid = np.repeat(fid, counts)
        pos = np.arange(n)
        first_in_group = np.zeros(n, bool)
        first_in_group[gs] = True

        syn = ~udp & ((flags & (SYN | ACK)) == SYN)
        close = ~udp & ((flags & (FIN | RST)) != 0)
        closed_before = self.flows["closed"][ffid]
        lc_incl = np.maximum.accumulate(np.where(close, pos, -1))
        ls_incl = np.maximum.accumulate(np.where(syn, pos, -1))
        lc_prev = np.concatenate(([-1], lc_incl[:-1]))
        ls_prev = np.concatenate(([-1], ls_incl[:-1]))
        lc_none = np.where(closed_before, -2, -3)
        ls_none = np.where(closed_before, -3, -2)
        lc = np.where(lc_prev >= gstart, lc_prev, lc_none)
        ls = np.where(ls_prev >= gstart, ls_prev, ls_none)
        boundary = syn & (lc > ls)
        prev_ts = np.concatenate(([0.0], ts[:-1]))
        prev_ts[gs] = self.flows["last_ts"][fid]
        boundary |= udp & (ts - prev_ts > self.udp_idle_s)
        existing = self.flows["conn"][fid]
        boundary[gs[existing < 0]] = True

        seg_start = boundary | first_in_group
        seg_pos = np.flatnonzero(seg_start)
        seg_of = np.cumsum(seg_start) - 1
        seg_new = boundary[seg_pos]
        seg_gid = np.empty(seg_pos.size, np.int64)
        cont = ~seg_new
        seg_gid[cont] = existing[np.searchsorted(gs, seg_pos[cont])]
        new_pos = seg_pos[seg_new]
        new_ids = self.conns.append(new_pos.size)
        self.conns["serial"][new_ids] = np.arange(self._serials, self._serials + new_ids.size)
        self._serials += new_ids.size
        seg_gid[seg_new] = new_ids
        self._open(new_ids, ffid[new_pos], flags[new_pos], udp[new_pos], sender_a[new_pos])
        # a connection replaced by a new one on the same flow ended there
        old = existing[np.searchsorted(gs, new_pos, side="right") - 1]
        prior = np.where(first_in_group[new_pos], old, -1)
        within = ~first_in_group[new_pos]
        prior[within] = seg_gid[seg_of[new_pos[within]] - 1]
        self.conns["superseded"][prior[prior >= 0]] = True

        seg_len = np.diff(np.append(seg_pos, n))
        client_b = np.repeat(self.conns["client_b"][seg_gid], seg_len)
        up = sender_a != client_b
        payload = pk.payload[order]
        wire = pk.wire[order]
        c = self.conns
        pk_up = np.add.reduceat(up.astype(np.int64), seg_pos)
        c["packets_up"][seg_gid] += pk_up
        c["packets_down"][seg_gid] += seg_len - pk_up
        by_up = np.add.reduceat(np.where(up, payload, 0), seg_pos)
        c["bytes_up"][seg_gid] += by_up
        c["bytes_down"][seg_gid] += np.add.reduceat(payload, seg_pos) - by_up
        w_up = np.add.reduceat(np.where(up, wire, 0), seg_pos)
        c["wire_up"][seg_gid] += w_up
        c["wire_down"][seg_gid] += np.add.reduceat(wire, seg_pos) - w_up
        c["ts_start"][seg_gid] = np.minimum(c["ts_start"][seg_gid],
                                            np.minimum.reduceat(ts, seg_pos))
        c["ts_end"][seg_gid] = np.maximum(c["ts_end"][seg_gid], np.maximum.reduceat(ts, seg_pos))
        c["fin"][seg_gid] |= np.logical_or.reduceat((flags & FIN) != 0, seg_pos)
        c["rst"][seg_gid] |= np.logical_or.reduceat((flags & RST) != 0, seg_pos)

        f = self.flows
        f["conn"][fid] = seg_gid[seg_of[ge]]
        lc_end = np.where(lc_incl[ge] >= gs, lc_incl[ge], lc_none[gs])
        ls_end = np.where(ls_incl[ge] >= gs, ls_incl[ge], ls_none[gs])
        f["closed"][fid] = lc_end > ls_end
        f["last_ts"][fid] = ts[ge]

        serial_sorted = c["serial"][seg_gid][seg_of]
        self._bins(ts, seg_start, serial_sorted, up, payload)
        gid = np.empty(n, np.int64)
        gid[order] = seg_gid[seg_of]
        up_out = np.empty(n, bool)
        up_out[order] = up
        if pk.apps:
            self.apps.update(pk.apps)
            tagged = pk.uid >= 0
            c["app"][gid[tagged]] = pk.uid[tagged]
        return c["serial"][gid], up_out

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

    def _open(self, ids: np.ndarray, fid: np.ndarray, flags: np.ndarray, udp: np.ndarray,
              sender_a: np.ndarray) -> None:
        """Decide the client side of new connections from their first packet and the config."""
        synack = ~udp & ((flags & (SYN | ACK)) == (SYN | ACK))
        client_a = np.where(synack, ~sender_a, sender_a)
        if self._device_keys.size:
            f = self.flows
            a_dev = np.isin(mix(f["a_hi"][fid], f["a_lo"][fid]), self._device_keys)
            b_dev = np.isin(mix(f["b_hi"][fid], f["b_lo"][fid]), self._device_keys)
            client_a = np.where(a_dev & ~b_dev, True, np.where(b_dev & ~a_dev, False, client_a))
        self.conns["flow"][ids] = fid
        self.conns["client_b"][ids] = ~client_a

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

    def _device(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        device = address_strings(hi, lo)
        for (dev_hi, dev_lo), name in self.devices.items():
            device[(hi == dev_hi) & (lo == dev_lo)] = name
        return device

    def connections(self, rows: np.ndarray, *, capture_end: float) -> pd.DataFrame:
        """Connections ``rows`` (issued) in schema column names; the caller fills in names."""
        c = self.conns
        c_hi, c_lo, c_port, s_hi, s_lo, s_port, udp = self.ends(rows)
        view = lambda name: c[name][rows]  # noqa: E731
        ts_end = view("ts_end")
        idle = udp & (view("superseded") | (capture_end - ts_end > self.udp_idle_s))
        close = np.where(view("rst"), "rst", np.where(view("fin"), "fin", "end-of-capture"))
        close = np.where(udp, np.where(idle, "idle", "end-of-capture"), close)
        app = view("app")
        known = np.unique(app)
        names = np.array([self.apps.get(u) for u in known.tolist()] + [None], object)
        return pd.DataFrame({
            "conn_id": self.id_text(rows), "source": "pcap",
            "device": self._device(c_hi, c_lo),
            "proto": np.where(udp, "udp", "tcp"),
            "client_ip": address_strings(c_hi, c_lo), "client_port": c_port,
            "server_ip": address_strings(s_hi, s_lo), "server_port": s_port,
            "ts_start": view("ts_start"), "ts_end": ts_end,
            "bytes_up": view("bytes_up"), "bytes_down": view("bytes_down"),
            "packets_up": view("packets_up"), "packets_down": view("packets_down"),
            "wire_bytes_up": view("wire_up"), "wire_bytes_down": view("wire_down"),
            "close_reason": close, "app": names[np.searchsorted(known, app)],
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
            ends = self.ends(local)
            yield pd.DataFrame({
                "conn_id": self.id_text(local), "device": self._device(ends[0], ends[1]),
                "ts_bin": part[1] * self.bin_s, "bin_s": float(self.bin_s),
                "bytes_up": part[2], "bytes_down": part[3],
                "packets_up": part[4], "packets_down": part[5],
            })


def address_strings(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Text form of 16-byte addresses (IPv4-mapped ones as dotted quads), formatted once each."""
    if not hi.size:
        return np.array([], object)
    pairs = np.stack([hi, lo], axis=1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    text = np.array([address_text(int(h), int(low)) for h, low in uniq.tolist()], object)
    return text[inverse.ravel()]


def address_text(hi: int, lo: int) -> str:
    if hi == 0 and lo >> 32 == 0xFFFF:
        return str(ipaddress.IPv4Address(lo & 0xFFFFFFFF))
    return str(ipaddress.IPv6Address((hi << 64) | lo))


def address_key(ip: str) -> tuple[int, int]:
    """The (hi, lo) pair the decoder uses for an address."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return 0, 0xFFFF00000000 | int(addr)
    value = int(addr)
    return value >> 64, value & 0xFFFFFFFFFFFFFFFF


def device_keys(devices: Iterable[tuple[str, Iterable[str]]]) -> dict[tuple[int, int], str]:
    return {address_key(ip): name for name, ips in devices for ip in ips}
