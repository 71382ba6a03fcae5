"""Replay saved captures into record tables: choose a reader by content, track, name, write.

The reader is chosen from the one list of input formats (``observer.sources.formats``): capture
files (pcap, pcapng, gzip) give packet batches to the flow engine; the other formats give record
tables.  A damaged file ends with one error line; what was read before it is kept and the other
files still run.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa

from observer import ObserverError
from observer.devices import DeviceMap
from observer.records import TABLES, TIME_COLUMN, RecordRun, conform
from observer.sources.decode import link_name
from observer.sources.engine import FlowEngine, FlowSettings
from observer.sources.formats import format_for, is_packets, names
from observer.sources.pcapfile import gunzip_head, kind_of
from observer.sources.workers import DaskDecoders, Decoders, FileEnd, Step

if TYPE_CHECKING:
    from observer.config import LabConfig


def tune_process() -> None:
    """Two process settings that cost a replay CPU time for nothing (docs/performance.md).  For
    a process that runs a replay and exits (``observer replay`` sets them), not for a library
    call: they last as long as the process, and frozen objects are never collected.

    What numpy, pandas and pyarrow leave at import lives as long as the process: keep it out of
    the cyclic collector, whose passes over it at interpreter exit cost ~0.07 CPU-s.  glibc gives
    freed heap back to the system once a few batch-sized arrays are free at its top, and the next
    batch faults the same pages in again (~40k page faults for 2M packets, ~0.08 CPU-s of kernel
    time): keep up to 128 MB of it (peak RSS ~8 MB higher, still flat).  Other C libraries: as
    they are.
    """
    gc.freeze()
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    for option, value in ((-1, 128 << 20), (-2, 16 << 20), (-3, 32 << 20)):  # glibc's
        mallopt(option, value)  # M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD

HEAD_BYTES = 4096
CHECK_BATCHES = 4  # look for finished connections every this many batches (<= 8 MB each)
FLUSH_ROWS = 1 << 14  # hand out finished rows once this many are ready (bounds what is held)
WRITE_DAYS = 7  # days per records write at most (a write makes a part per day; 1 cost 20% more
# CPU in per-write overhead, 7 keeps the peak as flat: 2M -> 20M packets 218 -> 233 MB)


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

    Capture files go through the flow engine (``observer.sources.engine``).  Every CHECK_BATCHES
    batches, what is finished is handed to ``sink`` once at least FLUSH_ROWS rows are ready.
    "Now" is the latest packet time of the file being read, so files given out of time order do
    not close each other's flows.  With ``jobs`` > 1, capture files are read and decoded by
    ``jobs`` - 1 worker processes ahead of this one (``observer.sources.workers``); tracking stays
    here, in file order, so the records are the same.  With ``dask`` (a scheduler's address, or
    "local" for a LocalCluster of ``jobs`` workers) they are decoded on that cluster instead.
    """

    def __init__(self, config: LabConfig | None, sink: Callable[[str, pd.DataFrame], None], *,
                 udp_idle_s: float | None, bin_s: float | None, progress: bool | None,
                 jobs: int = 1, dask: str | None = None) -> None:
        self.config = config
        self.jobs = jobs
        self.dask = dask
        self.sink = sink
        self.engine = FlowEngine(FlowSettings.of(config, bin_s=bin_s, udp_idle_s=udp_idle_s),
                                 self._send, devices=DeviceMap.from_config(config))
        self.stats = ReplayStats()
        self.sessions: list[dict] = []
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._bar = None
        self._batches = 0
        self._sent: set[str] = set()
        self._decoders: Decoders | DaskDecoders | None = None

    def _start_workers(self, files: list[Path | ObserverError]) -> Decoders | DaskDecoders | None:
        """Workers for the capture files among ``files`` (none if there are none)."""
        captures = []
        for file in files:
            try:
                module = format_for(file) if isinstance(file, Path) else None
            except ObserverError:
                continue  # said again when its turn comes
            if module is not None and is_packets(module):
                captures.append((file, module.__name__))
        if not captures:
            return None
        if self.dask is not None:
            return DaskDecoders(captures, self.config, self.engine.settings, self.dask, self.jobs)
        return Decoders(captures, self.config, self.engine.settings, self.jobs - 1)

    def read(self, paths: list[Path]) -> None:
        """Read every file (one error line each for those that fail), handing records to the
        sink as they are finished and the rest at the end."""
        started = time.perf_counter()
        files: list[Path | ObserverError] = []
        for path in paths:
            try:
                files.extend(_expand(Path(path)))
            except ObserverError as exc:
                files.append(exc)
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(unit=" pkt", unit_scale=True, desc="replay", file=sys.stderr)
        try:
            if self.jobs > 1 or self.dask is not None:
                self._decoders = self._start_workers(files)
            for number, file in enumerate(files, 1):
                self.stats.files += 1
                if self._bar is not None:
                    self._bar.set_postfix_str(f"file {number}/{len(files)}")
                try:
                    if isinstance(file, ObserverError):
                        raise file
                    self._file(file)
                except ObserverError as exc:
                    self.stats.errors.append(str(exc))
        finally:
            if self._decoders is not None:
                self._decoders.close()
            if self._bar is not None:
                self._bar.close()
        self._finish()
        self.stats.skipped.update(self.engine.skipped)
        self.stats.seconds = time.perf_counter() - started

    def _send(self, name: str, frame: pd.DataFrame) -> None:
        """Hand a table part to the sink (which conforms it to the schema)."""
        self._sent.add(name)
        if name == "connections":
            self.stats.connections += len(frame)
        self.sink(name, frame)

    def _file(self, path: Path) -> None:
        module = format_for(path)
        if module is None and path.is_dir():  # no capture file in it, and no importer's files
            raise ObserverError(f"{path}: directory holds no capture files (pcap, pcapng, "
                                "gzip) and no Zeek logs or JSONL records")
        if module is None:
            raise ObserverError(f"{path}: unknown file format (not a {names()})")
        if is_packets(module):
            steps = self._local(path, module)
            if self._decoders is not None:
                steps = self._decoders.feed(path, self.engine, lambda: self._local(path, module))
            self._capture(path, steps)
        else:
            self._imported(module.read(path, self.config))

    def _imported(self, tables: dict[str, pd.DataFrame]) -> None:
        for name, frame in tables.items():
            self._send(name, frame)

    def _local(self, path: Path, module: ModuleType) -> Iterator[Step | FileEnd]:
        """Read and feed a capture file in this process: a Step per batch, then its FileEnd."""
        batches = module.read(path, self.config)
        for batch in batches:
            self.engine.feed(batch)
            n = batch.ts.size
            yield Step(float(batch.ts.min()) if n else None, float(batch.ts.max()) if n else None,
                       n)
        yield FileEnd(batches.packets, batches.skipped, batches.error, Counter(), Counter(), {})

    def _capture(self, path: Path, steps: Iterable[Step | FileEnd]) -> None:
        """Account a capture file's batches as ``steps`` feed them to the engine."""
        first = last = None
        decoder = self.engine.decoder
        before = Counter(decoder.unsupported)
        for step in steps:
            if isinstance(step, FileEnd):
                end = step
                break
            if step.count:
                first = step.lo if first is None else min(first, step.lo)
                last = step.hi if last is None else max(last, step.hi)
            if self._bar is not None:
                self._bar.update(step.count)
            self._batches += 1
            if last is not None and self._batches % CHECK_BATCHES == 0:
                self.engine.flush(last, min_rows=FLUSH_ROWS)
        self.stats.packets += end.packets
        self.stats.skipped.update(end.skipped)
        error = end.error
        lost = decoder.unsupported - before
        if error is None and end.packets and lost.total() == end.packets:
            kinds = ", ".join(link_name(lt) for lt in sorted(lost))
            error = f"{path}: unsupported {kinds}; replay reads Ethernet, Linux cooked, raw IP " \
                    "and loopback captures"
        if error:
            self.stats.errors.append(error)
        self.sessions.append({
            "session_id": "pcap-" + hashlib.blake2b(f"{path.name}|{first}".encode(),
                                                    digest_size=8).hexdigest(),
            "source": "pcap", "ts_start": first, "ts_end": last, "interface": path.name,
            "packets_captured": end.packets, "note": error,
        })

    def _finish(self) -> None:
        self.engine.flush(None)
        for name in ("dns", "connections", "activity"):  # every table, even empty
            if name not in self._sent:
                self._send(name, pd.DataFrame(columns=list(TABLES[name])))
        sessions = pd.DataFrame(self.sessions, columns=list(TABLES["sessions"]))
        if len(self.config.devices if self.config else ()) == 1:
            sessions["device"] = self.config.devices[0].name
        self._send("sessions", sessions)


def replay_tables(paths: list[Path], *, config: LabConfig | None = None,
                  udp_idle_s: float | None = None, bin_s: float | None = None,
                  progress: bool | None = False, stats: ReplayStats | None = None,
                  jobs: int = 1, dask: str | None = None) -> dict[str, pd.DataFrame]:
    """Replay files into schema tables (connections, activity, dns, sessions, and imported ones)."""
    parts: dict[str, list[pd.DataFrame]] = {}
    run = Replay(config, lambda name, frame: parts.setdefault(name, []).append(frame),
                 udp_idle_s=udp_idle_s, bin_s=bin_s, progress=progress, jobs=jobs, dask=dask)
    run.read(list(paths))
    tables = {name: conform(name, pd.concat([f for f in frames if len(f)] or frames[:1],
                                            ignore_index=True))
              for name, frames in parts.items()}
    if stats is not None:
        stats.__dict__.update(run.stats.__dict__)
    return tables


def _by_days(frame: pd.DataFrame, column: str) -> Iterator[pd.DataFrame]:
    """``frame`` in parts of at most WRITE_DAYS days: a write holds a Parquet part per day
    (partition) it touches, and Arrow's allocator keeps the memory of the largest write."""
    if frame.empty:
        yield frame
        return
    day = np.floor(frame[column].to_numpy(float) / 86_400.0)
    day = np.where(np.isnan(day), 0, day)
    yield from (part for _, part in frame.groupby((day - day.min()) // WRITE_DAYS, sort=False))


def replay(paths: list[Path], out_dir: Path, *, config: LabConfig | None = None,
           overwrite: bool = False, progress: bool | None = None,
           udp_idle_s: float | None = None, bin_s: float | None = None,
           run: RecordRun | None = None, jobs: int = 1, dask: str | None = None) -> ReplayStats:
    """Replay files and write their records under ``out_dir`` as they are finished (Parquet
    part files); errors are in the stats.  The records count once the whole replay is done: in
    ``run`` (a transaction the caller commits) or in one of its own.  ``jobs`` > 1: decode in
    that many processes (with this one), the same records."""
    if run is None:
        with RecordRun(out_dir, overwrite=overwrite, command="replay") as own:
            return replay(paths, out_dir, config=config, progress=progress,
                          udp_idle_s=udp_idle_s, bin_s=bin_s, run=own, jobs=jobs, dask=dask)
    rows: dict[str, int] = {}
    pool = pa.default_memory_pool()

    def write(name: str, frame: pd.DataFrame) -> None:
        rows[name] = rows.get(name, 0)
        for part in _by_days(frame, TIME_COLUMN[name]):
            rows[name] += run.write(name, part)
            pool.release_unused()  # Arrow keeps freed buffers; without this the peak grows

    replaying = Replay(config, write, udp_idle_s=udp_idle_s, bin_s=bin_s, progress=progress,
                       jobs=jobs, dask=dask)
    replaying.read(list(paths))
    replaying.stats.rows = rows
    return replaying.stats
