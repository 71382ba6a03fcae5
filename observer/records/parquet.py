"""Parquet record store: one dataset per table, partitioned by device and UTC day.

Layout: ``RECORDS_DIR/<table>/device=<name>/day=<YYYY-MM-DD>/part-r<run>-<n>.parquet`` plus
``RECORDS_DIR/meta.json`` (schema version) and ``manifest.json`` (which runs count, see
``records.manifest``).  Every file is written whole or not at all (temp file, fsync, rename), and a
run's parts count only once it commits, so a full disk or a kill never leaves half a run behind
and never costs the records that were there.  A part or meta.json that cannot be read is skipped
with one warning line, never a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sys
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from observer import ObserverError
from observer.records.location import Location
from observer.records.manifest import (
    Manifest,
    fsync_dir,
    hold_run,
    manifest_lock,
    now_iso,
    part_files,
    release_run,
    run_of,
    sweep,
    write_atomic,
)
from observer.records.schema import ROW_KEY, SCHEMA_VERSION, TABLES, TIME_COLUMN, conform, empty

META = "meta.json"
NAME_MAX = 255  # bytes in one path component on Linux file systems


def device_dir(device: str) -> str:
    """``device=<name>`` for a partition directory: the name as people write it (``fd00:7::23``,
    ``Pixel 7``), with only what a file name cannot hold percent-encoded: '%' itself, '/', control
    characters and a leading '.'.  Names too long for one path component are cut and given a
    hash; the part files hold the full name in their ``device`` column."""
    text = "".join(f"%{ord(c):02X}" if c in "%/" or ord(c) < 0x20 or ord(c) == 0x7F else c
                   for c in device)
    if text.startswith("."):
        text = "%2E" + text[1:]
    name = "device=" + text
    if len(name.encode()) > NAME_MAX:
        tag = "~" + hashlib.blake2b(device.encode(), digest_size=8).hexdigest()
        name = name.encode()[: NAME_MAX - len(tag) - 3].decode(errors="ignore") + tag
    return name


def device_name(directory: str) -> str:
    """The device a partition directory is for (also reads the fully URI-encoded names that
    earlier versions wrote, e.g. ``fd00%3A7%3A%3A23``)."""
    return urllib.parse.unquote(directory.removeprefix("device="))


def _meta_problem(root: Path | Location) -> str | None:
    """Refuse records of another schema version; describe a meta.json that cannot be read."""
    where = Location.of(root)
    meta = where.place(META)
    try:
        version = json.loads(where.read_bytes(META))["schema_version"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        return f"{meta} unreadable ({reason}); read as schema version {SCHEMA_VERSION}"
    if version != SCHEMA_VERSION:
        raise ObserverError(
            f"{root}: records have schema version {version}, this observer reads "
            f"version {SCHEMA_VERSION}; replay the sources again"
        )
    return None


class RecordRun:
    """One write transaction into a records directory: a replay, a conversion, a table.

    Parts are written atomically as they come; ``commit`` makes them count, in one atomic
    replacement of the manifest, together with dropping what ``overwrite`` (every earlier record)
    or ``replace_runs`` (earlier runs being redone) names.  On an exception the run's own parts
    are removed and the directory is as it was.
    """

    def __init__(self, root: str | Path, *, overwrite: bool = False,
                 drop_tables: Iterable[str] = (), replace_runs: Iterable[str] = (),
                 command: str = "write") -> None:
        self.root = Path(root)
        self.id = secrets.token_hex(8)
        self.drop_tables = set(TABLES) if overwrite else set(drop_tables)
        self.replace_runs = set(replace_runs)
        self.command = command
        self.tables: set[str] = set()
        self.rows: dict[str, int] = {}
        self.sources: list[dict] = []  # replayed source files, see commands/replay.py
        self.sessions: list[pd.DataFrame] = []  # this run's session rows
        self.duplicates: dict[str, int] = {}  # rows not written: already in the records
        self.started = now_iso()
        self._manifest = Manifest()
        self._known: dict[Path, np.ndarray] = {}  # partition -> sorted row-key hashes in it
        self._written: list[Path] = []
        self._dirs: set[Path] = set()  # directories with new entries: fsynced once, at commit
        self._held = None
        self._parts = 0

    def __enter__(self) -> RecordRun:
        self.open()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()

    def open(self) -> None:
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        manifest = self._manifest = Manifest.load(root)
        if manifest.damaged:
            raise ObserverError(f"{manifest.damaged}: cannot tell which records count; move it "
                                "away and replay the sources again")
        problem = _meta_problem(root)
        if problem is not None or not (root / META).exists():
            if problem is not None:
                print(f"warning: {problem}; writing it again", file=sys.stderr)
            write_atomic(root / META, json.dumps({"schema_version": SCHEMA_VERSION}).encode())
        self._held = hold_run(root, self.id)

    def write(self, table: str, df: pd.DataFrame) -> int:
        """Write ``df`` (conformed to the schema) as new parts of ``table``; the number of rows."""
        df = conform(table, df)
        self.tables.add(table)
        self.rows[table] = self.rows.get(table, 0) + len(df)
        if df.empty:
            return 0
        if table == "sessions":
            self.sessions.append(df)
        seconds = df[TIME_COLUMN[table]].to_numpy(dtype="float64", na_value=np.nan)
        days, inverse = np.unique(np.floor(seconds / 86400), return_inverse=True)  # text per day
        days = np.where(np.isnan(days), "unknown", days.astype("datetime64[D]").astype(str))
        days = days[inverse.ravel()]
        if "device" in df.columns:
            df["device"] = df["device"].fillna("unknown")
            devices = df["device"].to_numpy(object)
        else:  # a table not kept per device
            devices = np.full(len(df), "unknown", object)
        arrow = pa.Table.from_pandas(df, preserve_index=False, nthreads=1)
        groups = pd.Series(np.arange(len(df))).groupby([devices, days], sort=True).indices
        hashes = _row_hashes(table, df)
        touched: set[Path] = set()
        written = 0
        for (device, day), rows in groups.items():
            directory = self.root / table / device_dir(device) / f"day={day}"
            if hashes is not None:
                rows = self._new_rows(table, directory, rows, hashes)
                if not rows.size:
                    continue
            written += rows.size
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                touched.update(directory.parents[:3])  # new entries up to the table's
            self._write_part(directory, arrow.take(pa.array(rows)))
            touched.add(directory)
        self._dirs.update(touched)
        if written < len(df):
            self.duplicates[table] = self.duplicates.get(table, 0) + len(df) - written
            self.rows[table] -= len(df) - written
        return written

    def _new_rows(self, table: str, directory: Path, rows: np.ndarray,
                  hashes: np.ndarray) -> np.ndarray:
        """``rows`` less those whose key the partition already holds (or that repeat one)."""
        known = self._known.get(directory)
        if known is None:
            known = self._existing(table, directory)
        mine = hashes[rows]
        _, first = np.unique(mine, return_index=True)
        keep = np.zeros(rows.size, bool)
        keep[first] = True
        keep &= ~np.isin(mine, known)
        self._known[directory] = np.union1d(known, mine[keep])
        return rows[keep]

    def _existing(self, table: str, directory: Path) -> np.ndarray:
        """Key hashes of the rows that count in a partition and that this run does not drop."""
        if table in self.drop_tables or not directory.is_dir():
            return np.zeros(0, np.uint64)
        key, frames = ROW_KEY[table], []
        for part in sorted(directory.glob("*.parquet")):
            if (not self._manifest.visible(table, part.name)
                    or run_of(part.name) in self.replace_runs):
                continue
            try:
                columns = pq.ParquetFile(part).schema_arrow.names
                frame = pq.ParquetFile(part).read(
                    columns=[c for c in key if c in columns]).to_pandas()
            except (OSError, pa.ArrowException, ValueError):
                continue  # unreadable: the readers skip it too
            if "device" in key and "device" not in frame.columns:
                frame["device"] = device_name(directory.parent.name)
            frames.append(frame)
        if not frames:
            return np.zeros(0, np.uint64)
        return np.unique(_row_hashes(table, pd.concat(frames, ignore_index=True)))

    def _write_part(self, directory: Path, table: pa.Table) -> None:
        name = f"part-r{self.id}-{self._parts}.parquet"
        self._parts += 1
        tmp = directory / f".{name}.tmp"
        try:
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, directory / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._written.append(directory / name)

    def commit(self) -> Manifest:
        """Make this run's parts count (and what it replaces stop counting), atomically."""
        try:
            for directory in sorted(self._dirs):  # the parts' names are on disk before they count
                fsync_dir(directory)
        except BaseException:
            self.abort()
            raise
        with manifest_lock(self.root):
            manifest = Manifest.load(self.root)
            if manifest.damaged:
                self.abort()
                raise ObserverError(f"{manifest.damaged}: the records were not changed")
            manifest.drop_runs(self.replace_runs)
            manifest.drop_tables(self.drop_tables)
            manifest.runs[self.id] = {"command": self.command, "started": self.started,
                                      "finished": now_iso(), "tables": sorted(self.tables),
                                      "rows": self.rows}
            manifest.sources.extend(dict(source, run=self.id) for source in self.sources)
            try:
                manifest.save(self.root)
            except BaseException:
                self.abort()
                raise
        self._release()
        with contextlib.suppress(OSError):
            sweep(self.root, manifest)
        return manifest

    def abort(self) -> None:
        """Remove this run's parts: the directory holds what it held before the run."""
        for path in self._written:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        for directory in sorted({p.parent for p in self._written}):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty: a partition only this run had
                directory.parent.rmdir()
        self._written.clear()
        self._release()

    def _release(self) -> None:
        if self._held is not None:
            with contextlib.suppress(OSError):
                release_run(self.root, self.id, self._held)
            self._held = None


def _row_hashes(table: str, df: pd.DataFrame) -> np.ndarray | None:
    """A 64-bit hash of each row's key columns (ROW_KEY), None for a table without a key."""
    key = ROW_KEY.get(table)
    if key is None:
        return None
    columns = TABLES[table]
    frame = pd.DataFrame({c: (df[c] if c in df.columns else pd.Series(None, index=df.index))
                          .astype(columns[c]) for c in key})
    return pd.util.hash_pandas_object(frame, index=False).to_numpy()


def write_table(root: str | Path, table: str, df: pd.DataFrame, *, overwrite: bool = False) -> int:
    """Write ``df`` (conformed to the schema) under ``root`` as one committed run; return the
    number of rows written.  ``overwrite`` replaces the table's earlier rows in the same step."""
    with RecordRun(root, drop_tables=[table] if overwrite else ()) as run:
        return run.write(table, df)


def partitions(root: str | Path | Location, table: str) -> list[Path]:
    """The partition directories of a table that hold records, sorted by device then day."""
    where = Location.of(root)
    manifest = Manifest.load(where)
    return sorted({p.parent for p in part_files(where, table) if manifest.visible(table, p.name)})


def partition_devices(root: str | Path | Location, *tables: str) -> list[str]:
    """The devices whose partitions hold records of any of ``tables``, sorted (directory
    names only, no reads)."""
    return sorted({device_name(p.parent.name) for table in tables for p in partitions(root, table)})


def _read(root: Location, table: str, devices: list[str] | None, manifest: Manifest,
          problems: list[str]) -> pd.DataFrame:
    if table not in TABLES:
        raise ObserverError(f"unknown record table {table!r}")
    files = [f for f in part_files(root, table) if manifest.visible(table, f.name)]
    if devices is not None:  # by directory, or by name for directories of earlier versions
        dirs, names = {device_dir(d) for d in devices}, set(devices)
        files = [f for f in files
                 if f.parent.parent.name in dirs or device_name(f.parent.parent.name) in names]
    frames = []
    for f in files:
        try:
            part = root.parquet(f).read().to_pandas()
        except FileNotFoundError:
            continue  # replaced since it was listed
        except (OSError, pa.ArrowException, ValueError) as exc:
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            problems.append(f"{f.relative_to(root.root)}: {reason}")
            continue
        if "device" in TABLES[table] and ("device" not in part.columns
                                          or part["device"].isna().all()):  # older parts
            part["device"] = device_name(f.parent.parent.name)
        frames.append(part.drop(columns=[c for c in part.columns if c not in TABLES[table]]))
    if not frames:
        return empty(table)
    try:
        return conform(table, pd.concat(frames, ignore_index=True))
    except (ValueError, TypeError) as exc:
        problems.append(f"{table}: parts disagree on column types ({exc})")
        return empty(table)


def _open(root: Location, problems: list[str]) -> Manifest:
    if not root.exists():
        raise ObserverError(f"records directory {root} does not exist")
    problem = _meta_problem(root)
    if problem:
        problems.append(problem)
    manifest = Manifest.load(root)
    if manifest.damaged:
        problems.append(f"{manifest.damaged}; every part read, rows may repeat")
    return manifest


def warn_unreadable(root: object, problems: list[str]) -> None:
    """One warning line for the record files that could not be read, the first of them named
    (a file met by several reads counts once)."""
    unique = list(dict.fromkeys(problems))
    if unique:
        more = f" (and {len(unique) - 1} more)" if len(unique) > 1 else ""
        print(f"warning: {root}: skipped {len(unique)} unreadable record file(s): "
              f"{unique[0]}{more}", file=sys.stderr)


def _report(root: Location, problems: list[str], sink: list[str] | None) -> None:
    if sink is not None:
        sink.extend(problems)
    else:
        warn_unreadable(root, problems)


def read_table(root: str | Path | Location, table: str, *, devices: list[str] | None = None,
               problems: list[str] | None = None) -> pd.DataFrame:
    """Read a whole table (optionally some devices only) as a schema-conformed frame.  Parts that
    cannot be read are skipped: listed in ``problems`` if given, else one warning line.  ``root``
    is a local directory or an fsspec URL (``observer.records.location``)."""
    root = Location.of(root)
    found: list[str] = []
    manifest = _open(root, found)
    frame = _read(root, table, devices, manifest, found)
    _report(root, found, problems)
    return frame


def read_records(root: str | Path | Location, *,
                 problems: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Every table of a records directory (unreadable parts as in ``read_table``)."""
    root = Location.of(root)
    found: list[str] = []
    manifest = _open(root, found)
    tables = {table: _read(root, table, None, manifest, found) for table in TABLES}
    _report(root, found, problems)
    return tables
