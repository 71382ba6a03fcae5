"""Read and decode capture files in worker processes; the one tracker stays in the parent.

Reading record headers and decoding link, IP and transport headers is most of a replay's work and
depends on nothing but the file (and the decoder's few cross-batch facts: IP fragments still
waiting, 802.11 frames to bin, counters).  Workers do that, up to SLOTS batches ahead of the
parent, and hand each decoded batch over in a shared-memory slot that both map.  The parent
feeds them to its flow engine in file order, so connections, names and bins are the same as in
one process by construction.  The one cross-file fact a worker cannot know: IP fragments left
waiting at the end of the previous file; a file that starts with some is decoded by the parent.

``DaskDecoders`` is the same design on a dask.distributed cluster (``observer replay --dask``):
one task per file decodes it whole and returns its batches; the parent tracks them in file order.
"""

from __future__ import annotations

import importlib
import mmap
import os
import pickle
import queue
import signal
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from observer import ObserverError
from observer.sources.decode import Decoder, Packets
from observer.sources.pcapfile import PAD

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from observer.config import LabConfig
    from observer.sources.engine import FlowEngine, FlowSettings

SLOTS = 4  # shared-memory slots per worker: decoded batches it may hold ready for the parent
SLOT_BYTES = 40 << 20  # a batch: <= 8 MB of records (+ one packet) and its ~140 bytes per packet
ALIGN = 64
POLL_S = 1.0  # how often a waiting parent (worker) checks that its worker (parent) still lives
SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def default_jobs() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class FileEnd:
    """What a worker knows once a file is read: the reader's counts and the decoder's state."""

    packets: int
    skipped: Counter[str]
    error: str | None
    decoder_skipped: Counter[str]
    unsupported: Counter[int]
    fragments: dict


@dataclass
class Step:
    """One decoded batch as the parent sees it: its time span and size (for the progress bar
    and the engine's "now")."""

    lo: float | None
    hi: float | None
    count: int


class _Slots:
    """A worker's shared-memory files, mapped once and reused (fresh tmpfs pages cost more than
    the copy); a batch too large for a slot gets a file of its own."""

    def __init__(self, prefix: str, parent: int) -> None:
        self.prefix = prefix
        self.parent = parent
        self.free = list(range(SLOTS))
        self.maps = [_mapped(self.path(j), SLOT_BYTES, create=True) for j in range(SLOTS)]
        self.extra = 0

    def path(self, j: int | str) -> str:
        return str(SHM_DIR / f"{self.prefix}-{j}")

    def put(self, out, back, pk: Packets, protected: list, lo, hi, count: int) -> None:
        """Copy the batch's arrays into a free slot (waiting for the parent to give one back)
        and queue its layout.  ``buf`` shrinks to the bytes the payload offsets point into."""
        arrays = _compact(pk)
        layout, size, extra = [], 0, {}
        for name, value in arrays.items():
            if isinstance(value, np.ndarray) and value.dtype != object:
                layout.append((name, value.dtype.str, value.shape, size))
                size += -(-value.nbytes // ALIGN) * ALIGN
            else:
                extra[name] = value  # apps (dict), tunnel (object array) or None: pickled
        if size <= SLOT_BYTES:
            if not self.free:
                self.free.append(_patiently(self.parent, back.get))
            slot: int | str = self.free.pop()
            mm = self.maps[slot]
        else:
            self.extra += 1
            slot = f"x{self.extra}"
            mm = _mapped(self.path(slot), size, create=True)
        for name, _, _, offset in layout:
            value = np.ascontiguousarray(arrays[name])
            mm[offset : offset + value.nbytes] = value.reshape(-1).view(np.uint8).data
        if isinstance(slot, str):
            mm.close()  # the parent maps it
        message = ("batch", self.path(slot), slot, layout, pickle.dumps(extra), protected, lo, hi,
                   count)
        _patiently(self.parent, out.put, message)

    def remove(self) -> None:
        for path in SHM_DIR.glob(self.prefix + "-*"):
            path.unlink(missing_ok=True)


def _compact(pk: Packets) -> dict:
    """The batch's fields, ``buf`` cut to the bytes the payload offsets point into (a view)."""
    arrays = {f.name: getattr(pk, f.name) for f in fields(Packets)}
    has = arrays["data"] >= 0
    if has.any():
        first = int(arrays["data"][has].min())
        stop = int((arrays["data"][has] + arrays["captured"][has]).max())
        arrays["data"] = np.where(has, arrays["data"] - first, -1)
        arrays["buf"] = arrays["buf"][first : min(arrays["buf"].size, stop + PAD)]
    else:
        arrays["buf"] = arrays["buf"][:PAD]
    return arrays


class _Orphaned(Exception):
    """The parent is gone (killed): a worker stops instead of waiting for it forever."""


def _patiently(parent: int, call, *args):
    """``call(*args, timeout=...)`` on a queue, again and again while process ``parent``
    (the worker's) lives."""
    while True:
        try:
            return call(*args, timeout=POLL_S)
        except (queue.Empty, queue.Full):
            if os.getppid() != parent:
                raise _Orphaned from None


def _mapped(path: str, size: int, *, create: bool = False) -> mmap.mmap:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR if create else os.O_RDWR, 0o600)
    try:
        if create:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size or os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _work(files: list[tuple[int, str, str]], config: LabConfig | None, settings: FlowSettings,
          out, back, prefix: str, parent: int) -> None:
    """Worker: read and decode each file (its index, path, format module) into ``out``; the
    parent gives slots back through ``back``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops us
    slots = _Slots(prefix, parent)
    try:
        _decode_files(files, config, settings, out, back, slots)
    except _Orphaned:
        slots.remove()


def _decoded(path: str, module: str, config: LabConfig | None,
             settings: FlowSettings) -> Iterator[tuple[Packets, list, Step] | FileEnd]:
    """Read and decode one capture file with a fresh decoder (a worker's files are not in a
    row): each batch with the 802.11 rows it leaves to bin and its Step, then its FileEnd."""
    decoder = Decoder(tunnel_depth=settings.tunnel_depth, checksums=settings.checksums,
                      cut_headers=settings.cut_headers)
    batches = importlib.import_module(module).read(Path(path), config)
    for batch in batches:
        count = batch.ts.size
        step = Step(float(batch.ts.min()) if count else None,
                    float(batch.ts.max()) if count else None, count)
        pk = decoder.decode(batch)
        protected, decoder._protected = decoder._protected, []
        yield pk, protected, step
    yield FileEnd(batches.packets, Counter(batches.skipped), batches.error,
                  Counter(decoder.skipped), Counter(decoder.unsupported), decoder.fragments)


def _carry_over(decoder: Decoder, end: FileEnd) -> None:
    """Take over what decoding a file elsewhere left: its counts, and the IP fragments still
    waiting for the next file."""
    decoder.skipped.update(end.decoder_skipped)
    decoder.unsupported.update(end.unsupported)
    decoder.fragments = end.fragments


def _decode_files(files: list[tuple[int, str, str]], config: LabConfig | None,
                  settings: FlowSettings, out, back, slots: _Slots) -> None:
    for _index, path, module in files:
        try:
            for item in _decoded(path, module, config, settings):
                if isinstance(item, FileEnd):
                    _patiently(slots.parent, out.put, ("end", item))
                else:
                    pk, protected, step = item
                    slots.put(out, back, pk, protected, step.lo, step.hi, step.count)
        except ObserverError as exc:
            _patiently(slots.parent, out.put, ("error", str(exc)))
        except _Orphaned:
            raise
        except Exception as exc:  # reported by the parent as one line
            failed = f"{path}: worker failed: {type(exc).__name__}: {exc}"
            _patiently(slots.parent, out.put, ("error", failed))


class Decoders:
    """Worker processes decoding capture files ahead of the parent, in file order.

    ``files`` are (path, format module name) of the capture files to replay, in the order the
    parent will ask for them; worker k decodes files k, k + W, k + 2W, ... so the one the parent
    needs next is always the one its worker is on.
    """

    def __init__(self, files: list[tuple[Path, str]], config: LabConfig | None,
                 settings: FlowSettings, workers: int) -> None:
        import multiprocessing

        # fork: a spawned worker would spend ~0.5 s importing numpy and pandas again.  The
        # worker only reads files and runs numpy decoding, never the Arrow or BLAS code whose
        # threads the parent may have
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.prefix = f"observer-replay-{os.getpid()}-{os.urandom(4).hex()}"
        self.workers = max(1, min(workers, len(files)))
        self.queues = [ctx.Queue(SLOTS + 2) for _ in range(self.workers)]
        self.back = [ctx.Queue() for _ in range(self.workers)]
        self.maps: dict[str, mmap.mmap] = {}
        self.index: dict[Path, list[int]] = {}  # a file given twice is read twice
        for i, (p, _) in enumerate(files):
            self.index.setdefault(Path(p), []).append(i)
        self.procs: list[BaseProcess] = []
        for k in range(self.workers):
            mine = [(i, str(p), m) for i, (p, m) in enumerate(files) if i % self.workers == k]
            proc = ctx.Process(target=_work, args=(mine, config, settings, self.queues[k],
                                                   self.back[k], f"{self.prefix}-w{k}",
                                                   os.getpid()),
                               daemon=True)
            with warnings.catch_warnings():  # "multi-threaded, fork() may deadlock": see above
                warnings.simplefilter("ignore", DeprecationWarning)
                proc.start()
            self.procs.append(proc)

    def _get(self, k: int):
        while True:
            try:
                return self.queues[k].get(timeout=POLL_S)
            except queue.Empty:
                if not self.procs[k].is_alive():
                    raise ObserverError("the replay worker process for this file ended "
                                        "unexpectedly (out of memory?)") from None

    def _take(self, path: str, slot: int | str, layout: list, extra: bytes) -> Packets:
        """The batch in ``slot``: arrays copied out, ``buf`` a view (valid until the slot is
        given back, as a reader's buffer is until the next batch)."""
        mm = self.maps.get(path)
        if mm is None:
            mm = _mapped(path, 0)
            if isinstance(slot, int):
                self.maps[path] = mm
            os.unlink(path)  # gone from the file system; the mapping stays
        values = pickle.loads(extra)
        for name, dtype, shape, offset in layout:
            count = int(np.prod(shape))
            value = np.frombuffer(mm, dtype, count, offset).reshape(shape)
            values[name] = value if name == "buf" else value.copy()
        return Packets(**values)

    def feed(self, path: Path, engine: FlowEngine,
             local: Callable[[], Iterator[Step | FileEnd]]) -> Iterator[Step | FileEnd]:
        """Feed file ``path``'s decoded batches to ``engine`` (yielding a Step each), then yield
        its FileEnd; ``local`` (the same, decoding in this process) is used instead when earlier
        files left IP fragments waiting."""
        k = self.index[Path(path)].pop(0) % self.workers
        decoder = engine.decoder
        if decoder.fragments:  # the worker decoded it without them: drop its batches
            while (message := self._get(k))[0] == "batch":
                self._take(*message[1:5])
                self._give_back(k, message[2])
            yield from local()
            return
        while (message := self._get(k))[0] == "batch":
            _, name, slot, layout, extra, protected, lo, hi, count = message
            pk = self._take(name, slot, layout, extra)
            decoder._protected.extend(protected)
            engine.track(pk, hi)
            del pk
            yield Step(lo, hi, count)
            self._give_back(k, slot)
        if message[0] == "error":
            raise ObserverError(message[1])
        end: FileEnd = message[1]
        _carry_over(decoder, end)
        yield end

    def _give_back(self, k: int, slot: int | str) -> None:
        if isinstance(slot, int):
            self.back[k].put(slot)

    def close(self) -> None:
        """Stop the workers and remove the shared memory."""
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(5)
        for q in self.queues + self.back:
            q.cancel_join_thread()
            q.close()
        for left in SHM_DIR.glob(self.prefix + "-*"):
            left.unlink(missing_ok=True)
        self.maps.clear()


@dataclass
class Decoded:
    """A file decoded whole by a Dask task: its batches (with their 802.11 rows and Step), then
    its FileEnd, or the one-line error that stopped it after those batches."""

    batches: list[tuple[Packets, list, Step]]
    end: FileEnd | None
    error: str | None


def decode_file(path: str, shown: str, module: str, config: LabConfig | None,
                settings: FlowSettings) -> Decoded:
    """A Dask task: read and decode one capture file (a fresh decoder, as a worker process
    starts each file).  ``path`` is absolute (a worker's directory is not ours); messages name
    the file as the user gave it (``shown``).  ``buf`` is copied out of the reader's buffer."""
    done: list[tuple[Packets, list, Step]] = []
    end = None
    try:
        for item in _decoded(path, module, config, settings):
            if isinstance(item, FileEnd):
                end = replace(item, error=item.error and item.error.replace(path, shown))
                continue
            pk, protected, step = item
            arrays = _compact(pk)
            arrays["buf"] = arrays["buf"].copy()
            done.append((Packets(**arrays), protected, step))
        return Decoded(done, end, None)
    except ObserverError as exc:
        return Decoded(done, None, str(exc).replace(path, shown))


class DaskDecoders:
    """Capture files decoded on a dask.distributed cluster, one task per file, tracked here in
    file order (``Decoders``' interface).  ``address``: a scheduler's, or "local" for a
    LocalCluster of ``workers`` single-threaded processes.  At most AHEAD_PER_WORKER files per
    worker are decoded and not yet tracked (the workers hold their results until then)."""

    AHEAD_PER_WORKER = 2

    def __init__(self, files: list[tuple[Path, str]], config: LabConfig | None,
                 settings: FlowSettings, address: str, workers: int | None) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise ObserverError("--dask needs dask.distributed: "
                                "pip install 'telemetry-observer[dask]'") from None
        self.cluster = None
        if address == "local":
            self.cluster = LocalCluster(n_workers=workers or default_jobs(), threads_per_worker=1,
                                        processes=True, dashboard_address=None)
        try:
            self.client = Client(self.cluster or address, timeout="20s")
        except OSError as exc:  # no scheduler at that address
            self.close()
            raise ObserverError(f"Dask scheduler {address}: {exc}") from None
        self.files = [(str(Path(p).absolute()), str(p), m) for p, m in files]
        self.job = (config, settings)
        self.index: dict[Path, list[int]] = {}
        for i, (p, _) in enumerate(files):
            self.index.setdefault(Path(p), []).append(i)
        cores = sum(self.client.nthreads().values()) or 1
        self.ahead = self.AHEAD_PER_WORKER * cores
        self.futures: dict[int, object] = {}
        self.submitted = 0

    def _future(self, i: int):
        """File ``i``'s task, submitting the tasks up to ``ahead`` files beyond it."""
        while self.submitted < min(len(self.files), i + self.ahead):
            self.futures[self.submitted] = self.client.submit(
                decode_file, *self.files[self.submitted], *self.job, pure=False)
            self.submitted += 1
        return self.futures.pop(i)

    def feed(self, path: Path, engine: FlowEngine,
             local: Callable[[], Iterator[Step | FileEnd]]) -> Iterator[Step | FileEnd]:
        """As ``Decoders.feed``: the file's batches to ``engine``, a Step each, then its FileEnd."""
        future = self._future(self.index[Path(path)].pop(0))
        decoder = engine.decoder
        if decoder.fragments:  # decoded without the fragments waiting from the file before
            future.cancel()
            yield from local()
            return
        try:
            decoded: Decoded = future.result()
        except Exception as exc:  # a worker lost, the scheduler gone: one line
            raise ObserverError(f"{path}: Dask task failed: {type(exc).__name__}: {exc}") from None
        del future
        batches = decoded.batches[::-1]
        decoded.batches.clear()
        while batches:  # each batch dropped once tracked
            pk, protected, step = batches.pop()
            decoder._protected.extend(protected)
            engine.track(pk, step.hi)
            yield step
        if decoded.error is not None:
            raise ObserverError(decoded.error)
        _carry_over(decoder, decoded.end)
        yield decoded.end

    def close(self) -> None:
        """Cancel what is left, and stop a local cluster."""
        client = getattr(self, "client", None)
        if client is not None:
            client.cancel(list(self.futures.values()))
            self.futures.clear()
            client.close()
        if self.cluster is not None:
            self.cluster.close()
