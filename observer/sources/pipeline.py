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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa

from observer import ObserverError
from observer.records import TABLES, conform, write_table
from observer.sources.decode import Decoder, link_name
from observer.sources.flows import Tracker, address_key, device_keys
from observer.sources.names import Namer
from observer.sources.pcapfile import Batches, gunzip_head, kind_of

if TYPE_CHECKING:
    from observer.config import LabConfig

IMPORTERS = ("observer.sources.mitmflows", "observer.sources.imports")
HEAD_BYTES = 4096
WRITE_ROWS = 1 << 14  # rows per table slice: bounds the memory of building and writing one


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


def _gzip_head(path: Path) -> bytes:
    try:
        return gunzip_head(path, HEAD_BYTES)
    except OSError as exc:
        raise ObserverError(f"cannot read {path}: {exc.strerror or exc}") from None


class Replay:
    """One replay run over several files; connections that span files stay one connection."""

    def __init__(self, config: LabConfig | None, *, udp_idle_s: float | None,
                 bin_s: float | None, progress: bool | None) -> None:
        self.config = config
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
        self.imported: list[dict[str, pd.DataFrame]] = []
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._bar = None

    def read(self, paths: list[Path]) -> None:
        """Read every file (one error line each for those that fail)."""
        self._started = time.perf_counter()
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(unit=" pkt", unit_scale=True, desc="replay", file=sys.stderr)
        try:
            for path in paths:
                self.stats.files += 1
                try:
                    self._file(Path(path))
                except ObserverError as exc:
                    self.stats.errors.append(str(exc))
        finally:
            if self._bar is not None:
                self._bar.close()
        self.stats.skipped.update(self.decoder.skipped)

    def tables(self) -> Iterator[tuple[str, pd.DataFrame]]:
        """The record tables, one at a time so a writer can drop each before the next is built;
        a name comes again for each importer that also gave that table."""
        yield from self._tables()
        self.stats.skipped.update(self.namer.skipped)
        self.stats.seconds = time.perf_counter() - self._started

    def _file(self, path: Path) -> None:
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
        self.imported.append(module.read(path, self.config))

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

    def _tables(self) -> Iterator[tuple[str, pd.DataFrame]]:
        """Tables in slices of WRITE_ROWS rows, so only one slice of output exists at a time."""
        tracker, namer = self.tracker, self.namer
        end = max((s["ts_end"] for s in self.sessions if s["ts_end"] is not None), default=0.0)
        dns = namer.dns()
        dns["device"] = self._devices(dns["client_ip"])
        for start in range(0, max(len(dns), 1), WRITE_ROWS):  # every table, even empty
            yield "dns", conform("dns", dns.iloc[start : start + WRITE_ROWS])
        ids = tracker.conn_ids()
        devices = np.empty(len(ids), object)
        for start in range(0, max(len(ids), 1), WRITE_ROWS):
            rows = slice(start, min(len(ids), start + WRITE_ROWS))
            conns = self._named(tracker.connections(ids, rows, capture_end=end), rows, dns)
            devices[rows] = conns["device"].to_numpy(object)
            self.stats.connections += len(conns)
            yield "connections", conform("connections", conns)
        del dns
        for part in tracker.activity(ids, devices, WRITE_ROWS):
            yield "activity", conform("activity", part)
        sessions = pd.DataFrame(self.sessions, columns=list(TABLES["sessions"]))
        if len(self.config.devices if self.config else ()) == 1:
            sessions["device"] = self.config.devices[0].name
        yield "sessions", conform("sessions", sessions)
        for extra in self.imported:
            for name, frame in extra.items():
                frame = conform(name, frame)
                if name == "connections":
                    self.stats.connections += len(frame)
                yield name, frame

    def _named(self, conns: pd.DataFrame, rows: slice, dns: pd.DataFrame) -> pd.DataFrame:
        """Protocol, TLS state and server name of connections ``rows``."""
        namer = self.namer
        gids = np.arange(rows.start, rows.stop)
        udp = conns["proto"].to_numpy() == "udp"
        quic = udp & np.isin(gids, np.fromiter(namer.quic, np.int64, len(namer.quic)))
        tls = np.isin(gids, np.fromiter(namer.tls, np.int64, len(namer.tls)))
        conns["proto"] = np.where(quic, "quic", conns["proto"])
        conns["tls"] = np.where(tls | quic, "unknown", "none")
        names = [namer.names.get(g, (None, None, None)) for g in gids.tolist()]
        conns["server_name"] = [n[0] or None for n in names]
        conns["name_source"] = [n[1] for n in names]
        conns["alpn"] = [n[2] for n in names]
        conns = _name_from_dns(conns, dns)
        conns["name_source"] = conns["name_source"].fillna("none")
        return conns

    def _devices(self, ips: pd.Series) -> np.ndarray:
        """Device names for client addresses: the config's name, else the address itself."""
        names, uniques = pd.factorize(ips.astype(object))
        named = np.array([self.device_addrs.get(address_key(ip), ip) for ip in uniques], object)
        return named[names] if len(uniques) else np.array([], object)


def _name_from_dns(conns: pd.DataFrame, dns: pd.DataFrame) -> pd.DataFrame:
    """Name still-unnamed connections from the latest DNS answer their client saw before them."""
    answers = dns[dns["answer_type"].isin(["A", "AAAA"])]
    unnamed = conns["server_name"].isna()
    if answers.empty or not unnamed.any():
        return conns
    table = pd.DataFrame({
        "ts": answers["ts"].to_numpy(float), "client_ip": answers["client_ip"].astype(str),
        "server_ip": answers["answer"].astype(str).to_numpy(),
        "dns_name": answers["query"].to_numpy(object),
    }).sort_values("ts")
    left = conns.loc[unnamed, ["ts_start", "client_ip", "server_ip"]].astype(
        {"client_ip": str, "server_ip": str}).reset_index().sort_values("ts_start")
    merged = pd.merge_asof(left, table, left_on="ts_start", right_on="ts",
                           by=["client_ip", "server_ip"], direction="backward")
    hit = merged.dropna(subset=["dns_name"])
    conns.loc[hit["index"], "server_name"] = hit["dns_name"].to_numpy()
    conns.loc[hit["index"], "name_source"] = "dns"
    return conns


def replay_tables(paths: list[Path], *, config: LabConfig | None = None,
                  udp_idle_s: float | None = None, bin_s: float | None = None,
                  progress: bool | None = False, stats: ReplayStats | None = None,
                  ) -> dict[str, pd.DataFrame]:
    """Replay files into schema tables (connections, activity, dns, sessions, and imported ones)."""
    run = Replay(config, udp_idle_s=udp_idle_s, bin_s=bin_s, progress=progress)
    run.read(list(paths))
    tables: dict[str, pd.DataFrame] = {}
    for name, frame in run.tables():
        tables[name] = (pd.concat([tables[name], frame], ignore_index=True)
                        if name in tables and len(tables[name]) else frame)
    if stats is not None:
        stats.__dict__.update(run.stats.__dict__)
    return tables


def replay(paths: list[Path], out_dir: Path, *, config: LabConfig | None = None,
           overwrite: bool = False, progress: bool | None = None,
           udp_idle_s: float | None = None, bin_s: float | None = None) -> ReplayStats:
    """Replay files and write their records under ``out_dir``; errors are in the stats."""
    run = Replay(config, udp_idle_s=udp_idle_s, bin_s=bin_s, progress=progress)
    run.read(list(paths))
    pool = pa.default_memory_pool()
    rows: dict[str, int] = {}
    for name, frame in run.tables():
        first = overwrite and name not in rows
        rows[name] = rows.get(name, 0) + write_table(out_dir, name, frame, overwrite=first)
        del frame
        pool.release_unused()  # Arrow keeps freed buffers; without this the peak grows per table
    run.stats.rows = rows
    return run.stats
