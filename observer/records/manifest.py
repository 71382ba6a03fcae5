"""What a records directory holds: committed runs, their source files, and which parts count.

Every write (a replay, a proxy conversion, one ``write_table``) is a *run*.  Its Parquet parts are
named ``part-r<run>-<n>.parquet`` and count only once ``manifest.json`` lists the run; the manifest
is replaced atomically.  So a run that is killed or fails half-way leaves the earlier records as
they were, and a replay can drop an earlier run's rows (``--replace``) in the same rename that adds
its own.  The manifest also lists each replayed source file by a fingerprint of its content, so the
same packets are not added twice, whatever the file is called.

Parts written before manifests existed (``part-<uuid>-<i>.parquet``) keep counting until an
overwrite replaces their table.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from observer import ObserverError
from observer.records.location import Location
from observer.records.schema import SCHEMA_VERSION, TABLES

MANIFEST = "manifest.json"
RUNS = ".runs"  # one lock file per run in progress: a run whose lock is free is dead
LOCK = ".lock"  # held while the manifest is read, changed and replaced
TAGGED = re.compile(r"^part-r([0-9a-f]{16})-\d+\.parquet$")
CHUNK = 1 << 20
GROWABLE_MIN = 256  # bytes: a file this short is no evidence that a longer one grew from it
GZIP_MAGIC = b"\x1f\x8b"
SOURCE_KEYS = {"fingerprint", "size", "packets", "path", "added", "run"}


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that it holds either its old or its new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def run_of(part: str) -> str | None:
    """The run a part file belongs to, None for an untagged (older) part."""
    match = TAGGED.match(part)
    return match.group(1) if match else None


@dataclass
class Manifest:
    """The committed runs, the tables whose untagged parts count, and the replayed source files."""

    runs: dict[str, dict] = field(default_factory=dict)
    legacy: list[str] | None = None  # None: no manifest yet, every untagged part counts
    sources: list[dict] = field(default_factory=list)
    damaged: str | None = None  # why manifest.json could not be read (then every part counts)

    @classmethod
    def load(cls, root: Path | Location) -> Manifest:
        where = Location.of(root)
        path = where.place(MANIFEST)
        try:
            data = json.loads(where.read_bytes(MANIFEST))
            manifest = cls(runs=dict(data["runs"]), legacy=list(data["legacy"]),
                           sources=list(data["sources"]))
            if not all(isinstance(info.get("tables"), list) for info in manifest.runs.values()):
                raise ValueError("a run without its tables")
            if not all(source.keys() >= SOURCE_KEYS for source in manifest.sources):
                raise ValueError("a source without " + ", ".join(sorted(SOURCE_KEYS)))
            return manifest
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return cls(damaged=f"{path}: {getattr(exc, 'strerror', None) or exc}")

    def save(self, root: Path) -> None:
        data = {"manifest_version": 1, "runs": self.runs, "legacy": self.legacy,
                "sources": self.sources}
        write_atomic(Path(root) / MANIFEST, json.dumps(data, indent=1).encode())

    def visible(self, table: str, part: str) -> bool:
        """Whether part file ``part`` of ``table`` is part of the records."""
        if self.damaged:
            return part.endswith(".parquet")
        run = run_of(part)
        if run is None:
            return part.endswith(".parquet") and (self.legacy is None or table in self.legacy)
        return table in self.runs.get(run, {}).get("tables", ())

    def drop_runs(self, runs: Iterable[str]) -> None:
        gone = set(runs)
        self.runs = {r: v for r, v in self.runs.items() if r not in gone}
        self.sources = [s for s in self.sources if s["run"] not in gone]

    def drop_tables(self, tables: Iterable[str]) -> None:
        """Earlier runs' (and untagged) parts of ``tables`` stop counting (an overwrite)."""
        tables = set(tables)
        self.legacy = [t for t in self._legacy() if t not in tables]
        emptied = []
        for run, info in self.runs.items():
            kept = [t for t in info["tables"] if t not in tables]
            if info["tables"] and not kept:
                emptied.append(run)
            info["tables"] = kept
        self.drop_runs(emptied)

    def _legacy(self) -> list[str]:
        return list(TABLES) if self.legacy is None else self.legacy


@contextlib.contextmanager
def manifest_lock(root: Path) -> Iterator[None]:
    """Serialise read-change-replace of the manifest between writers of one directory."""
    with open(Path(root) / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def hold_run(root: Path, run: str) -> IO:
    """Mark run ``run`` as in progress for as long as the returned file stays open (a kill
    releases it)."""
    runs = Path(root) / RUNS
    runs.mkdir(exist_ok=True)
    f = open(runs / f"{run}.lock", "a")  # noqa: SIM115 - held for the run's lifetime
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def release_run(root: Path, run: str, held: IO) -> None:
    (Path(root) / RUNS / f"{run}.lock").unlink(missing_ok=True)
    held.close()


def _live(root: Path, run: str) -> bool:
    path = Path(root) / RUNS / f"{run}.lock"
    try:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
    except FileNotFoundError:
        return False
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    path.unlink(missing_ok=True)
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def part_files(root: Path | Location, table: str) -> list[Path]:
    """Every part file of a table on disk, visible or not, in path order."""
    return Location.of(root).glob(f"{table}/device=*/day=*/*.parquet")


def sweep(root: Path, manifest: Manifest) -> int:
    """Delete parts (and temp files) that no longer count and whose run is not in progress:
    replaced, overwritten, or left by a killed run.  Returns how many files went."""
    if manifest.damaged:
        return 0
    root = Path(root)
    live: dict[str, bool] = {}
    removed = 0
    for tmp in root.glob(".*.json.*.tmp"):  # from write_atomic in a killed process
        match = re.match(r"^\.\w+\.json\.(\d+)-[0-9a-f]+\.tmp$", tmp.name)
        if match and not _pid_alive(int(match.group(1))):
            tmp.unlink(missing_ok=True)
            removed += 1
    for table in TABLES:
        for part in sorted((root / table).glob("device=*/day=*/*")):
            name = part.name
            if name.endswith(".tmp"):
                match = re.match(r"^\.part-r([0-9a-f]{16})-", name)
                run = match.group(1) if match else None
                doomed = run is not None and run not in manifest.runs
            else:
                run = run_of(name)
                doomed = name.endswith(".parquet") and not manifest.visible(table, name)
            if doomed and run is not None and live.setdefault(run, _live(root, run)):
                continue
            if doomed:
                part.unlink(missing_ok=True)
                removed += 1
        for day in (root / table).glob("device=*/day=*"):
            with contextlib.suppress(OSError):
                day.rmdir()  # only if empty
        for device in (root / table).glob("device=*"):
            with contextlib.suppress(OSError):
                device.rmdir()
    return removed


def records_fingerprint(root: str | Path | Location, tables: Iterable[str] | None = None) -> str:
    """A digest of what a records directory holds: the schema version and the name and size of
    every part that counts.  Parts are never changed in place and are named uniquely, so equal
    digests mean equal records; any replay, replace or overwrite changes it."""
    where = Location.of(root)
    manifest = Manifest.load(where)
    digest = hashlib.blake2b(f"schema {SCHEMA_VERSION}\n".encode(), digest_size=16)
    for table in sorted(TABLES if tables is None else tables):
        for part in part_files(where, table):
            if manifest.visible(table, part.name):
                with contextlib.suppress(FileNotFoundError):
                    size = where.size(part)
                    digest.update(f"{part.relative_to(where.root).as_posix()} {size}\n".encode())
    return "blake2b:" + digest.hexdigest()


@dataclass
class Fingerprint:
    """A source's content digest and size, the (size, digest) of each file in it (itself, or the
    files of a directory), and the (size, digest) of some of those files' prefixes."""

    digest: str
    size: int
    files: list[tuple[int, str]]
    prefixes: set[tuple[int, str]]


def fingerprint(path: Path, prefixes: Iterable[int] = ()) -> Fingerprint:
    """blake2b of a file's content (of what is inside, for gzip, so ``x.pcap`` and ``x.pcap.gz``
    are the same packets), and of its first ``n`` bytes for each ``n`` in ``prefixes`` (to see
    that a file is a grown version of one replayed while it was still written)."""
    path = Path(path)
    if path.is_dir():
        return _dir_fingerprint(path, prefixes)
    wanted = sorted({n for n in prefixes if n > 0})
    digest = hashlib.blake2b(digest_size=32)
    found: set[tuple[int, str]] = set()
    size = 0
    try:
        with open(path, "rb") as f:
            for chunk in _content(f):
                while wanted and size + len(chunk) >= wanted[0]:
                    cut = wanted.pop(0) - size
                    digest.update(chunk[:cut])
                    size += cut
                    chunk = chunk[cut:]
                    found.add((size, "blake2b:" + digest.hexdigest()))
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise ObserverError(f"cannot read {path}: {exc.strerror or exc}") from None
    whole = "blake2b:" + digest.hexdigest()
    return Fingerprint(whole, size, [(size, whole)], found)


def _content(f: IO[bytes]) -> Iterator[bytes]:
    """A file's bytes, or the bytes inside it for gzip (as far as they can be decompressed)."""
    head = f.read(CHUNK)
    if not head.startswith(GZIP_MAGIC):
        while head:
            yield head
            head = f.read(CHUNK)
        return
    inflate = zlib.decompressobj(wbits=31)
    data = head
    while True:
        try:
            out = inflate.decompress(data)
        except zlib.error:
            return  # damage: the readable part is the content
        if out:
            yield out
        if inflate.eof:  # another member follows, or trailing zeros or garbage end it
            rest = inflate.unused_data
            while len(rest) < 2 and (more := f.read(CHUNK)):
                rest += more
            if not rest.startswith(GZIP_MAGIC):
                return
            inflate, data = zlib.decompressobj(wbits=31), rest
            continue
        data = f.read(CHUNK)
        if not data:
            return


def _dir_fingerprint(path: Path, prefixes: Iterable[int]) -> Fingerprint:
    """A directory an importer reads whole (Zeek logs, JSONL records): the digests of its files'
    contents in order of content, so the same logs under other names are the same source.  Parquet
    records in it (a proxy directory holds both) are what replays write, not what they read."""
    try:
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts)
            and p.suffix != ".parquet" and p.name not in (MANIFEST, "meta.json")]
    except OSError as exc:
        raise ObserverError(f"cannot list {path}: {exc.strerror or exc}") from None
    prefixes = list(prefixes)
    prints = [fingerprint(p, prefixes) for p in files]
    parts = sorted((p.size, p.digest) for p in prints)
    digest = hashlib.blake2b("\n".join(d for _, d in parts).encode(), digest_size=32)
    return Fingerprint("blake2b:" + digest.hexdigest(), sum(n for n, _ in parts), parts,
                       set().union(*(p.prefixes for p in prints)))


@dataclass
class SourcePlan:
    """Which of the given source files a replay reads, which earlier runs it replaces, and a
    note for each file it leaves out."""

    files: list[Path] = field(default_factory=list)
    prints: dict[Path, Fingerprint] = field(default_factory=dict)
    replace_runs: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def entry(self, path: Path, packets: int | None) -> dict:
        """The manifest entry of a replayed file (or directory: with its files)."""
        fp = self.prints[path]
        entry = {"fingerprint": fp.digest, "size": fp.size, "packets": packets,
                 "path": str(Path(path).resolve()), "added": now_iso()}
        if Path(path).is_dir():
            entry["files"] = fp.files
        return entry


def plan_sources(files: list[Path], manifest: Manifest, *, replace: bool = False,
                 overwrite: bool = False) -> SourcePlan:
    """Leave out files whose content the records already hold (or that were given twice);
    with ``replace``, redo them instead: their earlier run is dropped when the new one commits,
    and that run's other files are read again if they are still there as they were.  A file
    that has grown since it was replayed (a capture or JSONL file still being written then), or
    a directory holding files already replayed, replaces those earlier rows without being asked."""
    plan = SourcePlan()
    known = {} if overwrite else {s["fingerprint"]: s for s in manifest.sources}
    pieces: dict[tuple[int, str], dict] = {}  # (size, digest) of every file replayed -> its entry
    for source in known.values():
        for size, digest in source.get("files") or [(source["size"], source["fingerprint"])]:
            if size > GROWABLE_MIN:  # not just a capture file header
                pieces[(size, digest)] = source
    growable = {size for size, _ in pieces}
    seen: dict[str, Path] = {}
    for path in files:
        try:
            fp = fingerprint(path, growable)
        except ObserverError:
            plan.files.append(path)  # the replay says why it cannot be read
            continue
        if fp.digest in seen:
            plan.notes.append(f"{path}: skipped, same content as {seen[fp.digest]}")
            continue
        seen[fp.digest] = path
        old = known.get(fp.digest)
        if old is None and not Path(path).is_dir():  # a file replayed inside a directory
            old = pieces.get((fp.size, fp.digest))
        if old is not None and not replace:
            plan.notes.append(f"{path}: skipped, already in the records (same content as "
                              f"{old['path']}, added {old['added']}); --replace to redo it")
            continue
        if old is not None:
            plan.replace_runs.add(old["run"])
            plan.notes.append(f"{path}: replacing its earlier rows")
        for earlier in {id(e): e for key in (fp.prefixes | set(fp.files))
                        if (e := pieces.get(key)) is not None and e is not old}.values():
            plan.replace_runs.add(earlier["run"])
            plan.notes.append(f"{path}: holds what {earlier['path']} held when it was replayed "
                              f"({earlier['size']:,} bytes), and more; replacing those rows")
        plan.files.append(path)
        plan.prints[path] = fp
    given = {Path(p).resolve() for p in plan.files}
    for source in manifest.sources:  # files replayed in the same run as one being replaced
        if (source["run"] not in plan.replace_runs or source["fingerprint"] in seen
                or Path(source["path"]) in given):
            continue
        path = Path(source["path"])
        try:
            fp = fingerprint(path)
        except ObserverError:
            fp = None
        if fp is None or fp.digest != source["fingerprint"]:
            plan.notes.append(f"{path}: its rows were replayed together with a replaced file "
                              "and are removed with them; it is no longer there as it was")
            continue
        seen[fp.digest] = path
        plan.files.append(path)
        plan.prints[path] = fp
        plan.notes.append(f"{path}: read again (it was replayed together with a replaced file)")
    return plan
