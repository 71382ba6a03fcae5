"""Parquet record store: one dataset per table, partitioned by device and UTC day.

Layout: ``RECORDS_DIR/<table>/device=<name>/day=<YYYY-MM-DD>/part-<uuid>.parquet`` plus
``RECORDS_DIR/meta.json`` with the schema version.  Appending writes new part files, so several
sources can fill one directory; ``overwrite`` clears a table first.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from observer import ObserverError
from observer.records.schema import SCHEMA_VERSION, TABLES, TIME_COLUMN, conform, empty

META = "meta.json"


def _check_version(root: Path) -> None:
    meta = root / META
    if meta.exists():
        version = json.loads(meta.read_text()).get("schema_version")
        if version != SCHEMA_VERSION:
            raise ObserverError(
                f"{root}: records have schema version {version}, this observer reads "
                f"version {SCHEMA_VERSION}; replay the sources again"
            )


def write_table(root: str | Path, table: str, df: pd.DataFrame, *, overwrite: bool = False) -> int:
    """Write ``df`` (conformed to the schema) under ``root``; return the number of rows written."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if (root / META).exists():
        _check_version(root)
    else:
        (root / META).write_text(json.dumps({"schema_version": SCHEMA_VERSION}))
    target = root / table
    if overwrite and target.exists():
        shutil.rmtree(target)
    df = conform(table, df)
    if df.empty:
        return 0
    seconds = df[TIME_COLUMN[table]].to_numpy(dtype="float64", na_value=np.nan)
    days = np.floor(seconds / 86400).astype("datetime64[D]").astype(str)  # NaT -> "NaT"
    parted = df.assign(
        device=df["device"].fillna("unknown").astype(str),
        day=np.where(np.isnan(seconds), "unknown", days),
    )
    arrow = pa.Table.from_pandas(parted, preserve_index=False)
    ds.write_dataset(
        arrow,
        target,
        format="parquet",
        partitioning=ds.partitioning(
            pa.schema([("device", pa.string()), ("day", pa.string())]), flavor="hive"
        ),
        basename_template=f"part-{uuid.uuid4().hex}-{{i}}.parquet",
        existing_data_behavior="overwrite_or_ignore",
    )
    return len(df)


def partitions(root: str | Path, table: str) -> list[Path]:
    """The partition directories of a table, sorted by device then day (for per-partition work)."""
    return sorted(p for p in (Path(root) / table).glob("device=*/day=*") if p.is_dir())


def read_table(
    root: str | Path, table: str, *, devices: list[str] | None = None
) -> pd.DataFrame:
    """Read a whole table (optionally some devices only) as a schema-conformed frame."""
    root = Path(root)
    if not root.exists():
        raise ObserverError(f"records directory {root} does not exist")
    _check_version(root)
    path = root / table
    if table not in TABLES:
        raise ObserverError(f"unknown record table {table!r}")
    files = sorted(path.glob("device=*/day=*/*.parquet"))
    if devices is not None:
        wanted = {f"device={d}" for d in devices}
        files = [f for f in files if f.parent.parent.name in wanted]
    if not files:
        return empty(table)
    frames = []
    for f in files:
        part = pq.read_table(f).to_pandas()
        part["device"] = f.parent.parent.name.removeprefix("device=")
        frames.append(part.drop(columns=[c for c in ("day",) if c in part.columns]))
    return conform(table, pd.concat(frames, ignore_index=True))


def read_records(root: str | Path) -> dict[str, pd.DataFrame]:
    """Every table of a records directory."""
    return {table: read_table(root, table) for table in TABLES}
