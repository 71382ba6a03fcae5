"""Replay saved captures into record tables: choose a reader by content, track, name, write.

Capture files (pcap, pcapng, gzip) go through the vectorised reader, decoder and tracker; other
formats go to importer modules (``observer.sources.mitmflows``, ``observer.sources.imports``), each
with ``sniff(head, path) -> bool`` and ``read(path, config) -> dict[str, DataFrame]``.  A damaged
file ends with one error line; what was read before it is kept and the other files still run.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa

from observer import ObserverError
from observer.records import TABLES, TIME_COLUMN, conform, write_table
from observer.sources.decode import Decoder, link_name
from observer.sources.flows import Tracker, address_key, device_keys
from observer.sources.names import Namer
from observer.sources.pcapfile import Batches, gunzip_head, kind_of

if TYPE_CHECKING:
    from observer.config import LabConfig

IMPORTERS = ("observer.sources.mitmflows", "observer.sources.imports")
HEAD_BYTES = 4096
WRITE_ROWS = 1 << 14  # rows per table slice: bounds the memory of building and writing one
CHECK_BATCHES = 4  # look for finished connections every this many batches (<= 8 MB each)
FLUSH_ROWS = 1 << 14  # hand out finished rows once this many are ready (bounds what is held)
TCP_QUIET_S = 300.0  # a closed TCP connection is finished after this long without a packet
WRITE_DAYS = 1  # days (partitions) per Parquet write at most
ACTIVITY_SLACK_S = 60.0  # a live connection's bin is complete this long after it ends


@dataclass
class ReplayStats:
    """What a replay read, skipped and could not read."""

    files: int = 0
    packets: int = 0
    connections: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        rate = f", {self.packets / self.seconds:,.0f} packets/s" if self.seconds > 0 else ""
        lines = [f"{self.files} file(s), {self.packets:,} packets, {self.connections:,} "
                 f"connections in {self.seconds:.2f} s{rate}"]
        if self.rows:
            lines.append("records: " + ", ".join(f"{t} {n:,}" for t, n in self.rows.items()))
        skipped = sum(self.skipped.values())
        lines.append(f"skipped {skipped:,} packet(s)" + (": " + ", ".join(
            f"{what} {n:,}" for what, n in self.skipped.most_common()) if skipped else ""))
        malformed = sum(n for what, n in self.skipped.items() if "malformed" in what)
        lines.append(f"malformed {malformed:,}; errors {len(self.errors)}")
        lines.extend(f"error: {e}" for e in self.errors)
        return "\n".join(lines)


def _importer_for(head: bytes, path: Path):
    for name in IMPORTERS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue
            raise
        sniff = getattr(module, "sniff", None)
        if sniff is not None and sniff(head, path):
            return module
    return None


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(HEAD_BYTES)
    except OSError as exc:
        raise ObserverError(f"cannot read {path}: {exc.strerror or exc}") from None


def _is_capture(path: Path) -> bool:
    head = _head(path)
    if kind_of(head) == "gzip":
        head = _gzip_head(path)
    return kind_of(head) in ("pcap", "pcapng")


def _expand(path: Path) -> list[Path]:
    """A directory stands for the capture files under it, in path order (``observer capture``
    names rotated files so that this is time order); without any, for itself (an importer's)."""
    if not path.is_dir():
        return [path]
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
    except OSError as exc:
        raise ObserverError(f"cannot list {path}: {exc.strerror or exc}") from None
    captures = [p for p in files if p.stat().st_size and _is_capture(p)]
    return captures or [path]


def _gzip_head(path: Path) -> bytes:
    try:
        return gunzip_head(path, HEAD_BYTES)
    except OSError as exc:
        raise ObserverError(f"cannot read {path}: {exc.strerror or exc}") from None


class Replay:
    """One replay run over several files; connections that span files stay one connection.

    Every CHECK_BATCHES batches, connections that can take no more packets (``Tracker.finished``)
    and activity bins that are complete are handed to ``sink`` with the DNS rows parsed so far,
    once at least FLUSH_ROWS rows are ready, and their state is dropped: memory follows the
    connections open at a time, not the length of the captures.  "Now" is the latest packet time
    of the file being read, so files given out of time order do not close each other's flows.
    """

    def __init__(self, config: LabConfig | None, sink: Callable[[str, pd.DataFrame], None], *,
                 udp_idle_s: float | None, bin_s: float | None, progress: bool | None) -> None:
        self.config = config
        self.sink = sink
        devices = [(d.name, d.ips) for d in config.devices] if config else []
        self.device_addrs = device_keys(devices)
        idle = udp_idle_s if udp_idle_s is not None else (
            config.udp_idle_timeout_s if config else 120.0)
        self.bin_s = bin_s if bin_s is not None else (config.bin_seconds if config else 10.0)
        if idle <= 0 or self.bin_s <= 0:
            raise ObserverError("--udp-idle and --bin must be greater than 0")
        self.decoder = Decoder()
        self.tracker = Tracker(udp_idle_s=idle, bin_s=self.bin_s, devices=self.device_addrs)
        self.namer = Namer()
        self.stats = ReplayStats()
        self.sessions: list[dict] = []
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._bar = None
        self._batches = 0
        self._dns_from = 0  # serial of the first connection not yet named from DNS answers
        self._sent: set[str] = set()

    def read(self, paths: list[Path]) -> None:
        """Read every file (one error line each for those that fail), handing records to the
        sink as they are finished and the rest at the end."""
        started = time.perf_counter()
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(unit=" pkt", unit_scale=True, desc="replay", file=sys.stderr)
        try:
            for path in paths:
                try:
                    files = _expand(Path(path))
                except ObserverError as exc:
                    self.stats.files += 1
                    self.stats.errors.append(str(exc))
                    continue
                for file in files:
                    self.stats.files += 1
                    try:
                        self._file(file)
                    except ObserverError as exc:
                        self.stats.errors.append(str(exc))
        finally:
            if self._bar is not None:
                self._bar.close()
        self._finish()
        self.stats.skipped.update(self.decoder.skipped)
        self.stats.skipped.update(self.namer.skipped)
        self.stats.seconds = time.perf_counter() - started

    def _send(self, name: str, frame: pd.DataFrame) -> None:
        """Hand a table part to the sink (which conforms it to the schema)."""
        self._sent.add(name)
        self.sink(name, frame)

    def _file(self, path: Path) -> None:
        if path.is_dir():  # a directory no capture file is in: an importer's (Zeek, JSONL)
            module = _importer_for(b"", path)
            if module is None:
                raise ObserverError(f"{path}: directory holds no capture files (pcap, pcapng, "
                                    "gzip) and no Zeek logs or JSONL records")
            self._imported(module.read(path, self.config))
            return
        head = _head(path)
        kind = kind_of(head)
        inner = _gzip_head(path) if kind == "gzip" else head
        if kind_of(inner) in ("pcap", "pcapng"):
            self._capture(path, compressed=kind == "gzip")
            return
        module = _importer_for(inner, path)
        if module is None:
            what = "gzip file holding " if kind == "gzip" else ""
            raise ObserverError(f"{path}: {what}unknown file format (not pcap, pcapng, gzip, "
                                "or any format an importer reads)")
        self._imported(module.read(path, self.config))

    def _imported(self, tables: dict[str, pd.DataFrame]) -> None:
        for name, frame in tables.items():
            if name == "connections":
                self.stats.connections += len(frame)
            self._send(name, frame)

    def _capture(self, path: Path, *, compressed: bool) -> None:
        batches = Batches(path, compressed=compressed)
        first = last = None
        before = Counter(self.decoder.unsupported)
        for batch in batches:
            if batch.ts.size:
                lo, hi = float(batch.ts.min()), float(batch.ts.max())
                first = lo if first is None else min(first, lo)
                last = hi if last is None else max(last, hi)
            packets = self.decoder.decode(batch)
            gid, up = self.tracker.add(packets)
            self.namer.scan(packets, gid, up)
            if self._bar is not None:
                self._bar.update(batch.ts.size)
            self._batches += 1
            if last is not None and self._batches % CHECK_BATCHES == 0:
                self._check(last)
        self.stats.packets += batches.packets
        error = batches.error
        lost = self.decoder.unsupported - before
        if error is None and batches.packets and lost.total() == batches.packets:
            kinds = ", ".join(link_name(lt) for lt in sorted(lost))
            error = f"{path}: unsupported {kinds}; replay reads Ethernet, Linux cooked, raw IP " \
                    "and loopback captures"
        if error:
            self.stats.errors.append(error)
        self.sessions.append({
            "session_id": "pcap-" + hashlib.blake2b(f"{path.name}|{first}".encode(),
                                                    digest_size=8).hexdigest(),
            "source": "pcap", "ts_start": first, "ts_end": last, "interface": path.name,
            "packets_captured": batches.packets, "note": error,
        })

    def _check(self, now: float | None) -> None:
        """Name new connections from DNS; hand out what is finished by ``now`` once there is
        enough of it (everything when ``now`` is None, at the end)."""
        tracker, namer = self.tracker, self.namer
        namer.map_answers(now)
        serials = tracker.conns.view("serial")
        new = np.arange(np.searchsorted(serials, self._dns_from), serials.size)
        namer.name_from_dns(serials[new], tracker.conns["ts_start"][new], tracker.ends(new))
        self._dns_from = int(serials[-1]) + 1 if serials.size else self._dns_from
        if now is None:
            done, before, end = np.arange(serials.size), np.inf, max(
                (s["ts_end"] for s in self.sessions if s["ts_end"] is not None), default=0.0)
        else:
            done = tracker.finished(now, TCP_QUIET_S)
            if done.size + namer.pending_dns() + tracker.pending_activity() < FLUSH_ROWS:
                return
            before, end = np.floor((now - ACTIVITY_SLACK_S) / self.bin_s), now
        done = done[np.argsort(tracker.conns["ts_start"][done], kind="stable")]  # few days a slice
        gids = tracker.serials(done)
        tracker.issue(done)
        for start in range(0, done.size, WRITE_ROWS):
            rows = done[start : start + WRITE_ROWS]
            conns = self._named(tracker.connections(rows, capture_end=end),
                                gids[start : start + WRITE_ROWS])
            self.stats.connections += len(conns)
            self._send("connections", conns)
        for part in tracker.activity(gids, before, WRITE_ROWS):
            self._send("activity", part)
        dns = namer.dns()
        dns["device"] = self._devices(dns["client_ip"])
        for start in range(0, len(dns), WRITE_ROWS):
            self._send("dns", dns.iloc[start : start + WRITE_ROWS])
        namer.forget(gids)
        tracker.drop(done)

    def _finish(self) -> None:
        self._check(None)
        for name in ("dns", "connections", "activity"):  # every table, even empty
            if name not in self._sent:
                self._send(name, pd.DataFrame(columns=list(TABLES[name])))
        sessions = pd.DataFrame(self.sessions, columns=list(TABLES["sessions"]))
        if len(self.config.devices if self.config else ()) == 1:
            sessions["device"] = self.config.devices[0].name
        self._send("sessions", sessions)

    def _named(self, conns: pd.DataFrame, gids: np.ndarray) -> pd.DataFrame:
        """Protocol, TLS state and server name of connections ``gids``."""
        namer = self.namer
        udp = conns["proto"].to_numpy() == "udp"
        quic = udp & np.isin(gids, np.fromiter(namer.quic, np.int64, len(namer.quic)))
        tls = np.isin(gids, np.fromiter(namer.tls, np.int64, len(namer.tls)))
        conns["proto"] = np.where(quic, "quic", conns["proto"])
        conns["tls"] = np.where(tls | quic, "unknown", "none")
        names = [namer.names.get(g, (None, None, None)) for g in gids.tolist()]
        from_dns = [namer.dns_names.get(g) for g in gids.tolist()]
        conns["server_name"] = [n[0] or d for n, d in zip(names, from_dns, strict=True)]
        conns["name_source"] = [n[1] if n[0] else ("dns" if d else n[1])
                                for n, d in zip(names, from_dns, strict=True)]
        conns["alpn"] = [n[2] for n in names]
        conns["name_source"] = conns["name_source"].fillna("none")
        return conns

    def _devices(self, ips: pd.Series) -> np.ndarray:
        """Device names for client addresses: the config's name, else the address itself."""
        names, uniques = pd.factorize(ips.astype(object))
        named = np.array([self.device_addrs.get(address_key(ip), ip) for ip in uniques], object)
        return named[names] if len(uniques) else np.array([], object)


def replay_tables(paths: list[Path], *, config: LabConfig | None = None,
                  udp_idle_s: float | None = None, bin_s: float | None = None,
                  progress: bool | None = False, stats: ReplayStats | None = None,
                  ) -> dict[str, pd.DataFrame]:
    """Replay files into schema tables (connections, activity, dns, sessions, and imported ones)."""
    parts: dict[str, list[pd.DataFrame]] = {}
    run = Replay(config, lambda name, frame: parts.setdefault(name, []).append(frame),
                 udp_idle_s=udp_idle_s, bin_s=bin_s, progress=progress)
    run.read(list(paths))
    tables = {name: conform(name, pd.concat([f for f in frames if len(f)] or frames[:1],
                                            ignore_index=True))
              for name, frames in parts.items()}
    if stats is not None:
        stats.__dict__.update(run.stats.__dict__)
    return tables


def _by_days(frame: pd.DataFrame, column: str) -> Iterator[pd.DataFrame]:
    """``frame`` in parts of at most WRITE_DAYS days: a write keeps a Parquet writer, with buffers
    for every column, open per day (partition) it touches, and Arrow's allocator keeps the
    memory of the largest write."""
    if frame.empty:
        yield frame
        return
    day = np.floor(frame[column].to_numpy(float) / 86_400.0)
    day = np.where(np.isnan(day), 0, day)
    yield from (part for _, part in frame.groupby((day - day.min()) // WRITE_DAYS, sort=False))


def replay(paths: list[Path], out_dir: Path, *, config: LabConfig | None = None,
           overwrite: bool = False, progress: bool | None = None,
           udp_idle_s: float | None = None, bin_s: float | None = None) -> ReplayStats:
    """Replay files and write their records under ``out_dir`` as they are finished (Parquet
    part files); errors are in the stats."""
    rows: dict[str, int] = {}
    pool = pa.default_memory_pool()

    def write(name: str, frame: pd.DataFrame) -> None:
        first = overwrite and name not in rows
        rows[name] = rows.get(name, 0)
        for part in _by_days(frame, TIME_COLUMN[name]):
            rows[name] += write_table(out_dir, name, part, overwrite=first)
            first = False
            pool.release_unused()  # Arrow keeps freed buffers; without this the peak grows

    run = Replay(config, write, udp_idle_s=udp_idle_s, bin_s=bin_s, progress=progress)
    run.read(list(paths))
    run.stats.rows = rows
    return run.stats
