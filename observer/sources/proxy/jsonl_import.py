"""Read the proxy's live JSONL record files back into tables.

The addon writes a connection row more than once (partial rows while it is open, the final row at
close), so the last row of each ``conn_id`` wins; activity bins are summed per connection and bin.
Same contract as the other importers: ``sniff(head, path)`` and ``read(path, config)``; a path may
be one file or a directory of ``*.jsonl`` files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from observer import ObserverError
from observer.config import TimeWindow
from observer.records import TABLES, conform, read_jsonl

NAME = "observer JSONL records"


def sniff(head: bytes, path: Path) -> bool:
    """A directory of JSONL records, or a file whose first line is a record of a known table."""
    if path.is_dir():
        return any(path.glob("*.jsonl"))
    line = head.split(b"\n", 1)[0]
    if not line.startswith(b'{"table": "'):
        return False
    try:
        return json.loads(line).get("table") in TABLES
    except ValueError:
        return len(head) >= 4096  # the first line runs past the head we were given


def files_of(path: Path) -> list[Path]:
    """The JSONL files a path stands for, oldest first (names carry the UTC start time)."""
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise ObserverError(f"{path}: no *.jsonl record files in this directory")
        return files
    if not path.is_file():
        raise ObserverError(f"{path}: no such file")
    return [path]


LAST_SEEN = {
    "connections": ("ts_start", "ts_end"),
    "http": ("ts_request", "ts_response"),
    "websocket": ("ts",),
    "dns": ("ts",),
}


def last_record_time(tables: dict[str, pd.DataFrame]) -> float | None:
    """The latest timestamp in a run's records (activity bins count by their start)."""
    times = [tables[t][c].max() for t, cols in LAST_SEEN.items() for c in cols
             if t in tables and not tables[t].empty]
    if "activity" in tables and not tables["activity"].empty:
        times.append(tables["activity"].ts_bin.max())
    finite = [float(t) for t in times if t is not None and not pd.isna(t) and math.isfinite(t)]
    return max(finite) if finite else None


def close_cut_sessions(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """A session without an end (its mitmdump was killed) ends at the time of its last record."""
    sessions = tables.get("sessions")
    if sessions is None or sessions.empty or not sessions.ts_end.isna().any():
        return tables
    end = last_record_time(tables)
    cut = sessions.ts_end.isna()
    sessions = sessions.copy()
    sessions.loc[cut, "ts_end"] = end if end is not None else sessions.loc[cut, "ts_start"]
    sessions.loc[cut, "note"] = (sessions.loc[cut, "note"].fillna("") + "; cut short: ended at "
                                 "its last record").str.lstrip("; ")
    return {**tables, "sessions": sessions}


def tidy(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Keep the last row per connection and session; sum activity per connection and bin; close
    a session cut short at its last record."""
    out = dict(tables)
    conns = out["connections"]
    if not conns.empty:
        out["connections"] = conns.drop_duplicates("conn_id", keep="last").reset_index(drop=True)
    sessions = out["sessions"]
    if not sessions.empty:
        out["sessions"] = sessions.drop_duplicates("session_id", keep="last").reset_index(
            drop=True
        )
    act = out["activity"]
    if not act.empty:
        summed = act.groupby(["conn_id", "device", "ts_bin", "bin_s"], as_index=False, sort=True)[
            ["bytes_up", "bytes_down", "packets_up", "packets_down"]
        ].sum(min_count=1)
        out["activity"] = conform("activity", summed)
    return close_cut_sessions(out)


def read(path: Path, config: Any = None) -> dict[str, pd.DataFrame]:
    """Tables from one JSONL file or a directory of them; torn lines are skipped and counted."""
    result = read_jsonl(files_of(Path(path)), TimeWindow.of(config))
    tables = tidy(result.tables)
    if result.skipped:
        why = ", ".join(f"{n} {reason}" for reason, n in result.reasons.most_common(3))
        note = (f"skipped {result.skipped} torn or corrupt lines ({why}), "
                f"first at {result.skipped_where[0]}")
        tables["sessions"] = conform(
            "sessions",
            pd.concat(
                [
                    tables["sessions"],
                    pd.DataFrame([{"session_id": f"import-{Path(path).name}", "source": "import",
                                   "interface": str(path), "note": note}]),
                ],
                ignore_index=True,
            ),
        )
    return tables
