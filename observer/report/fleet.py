"""Several devices in one records directory: one report per device, an index page, fleet.json.

The index has one line per device (its answer, its largest schedule, its coverage) linking to the
device's own report; fleet.json holds the same for scripts.  Everything comes from the findings
(observer.records.findings) and the records, like the single report.  ``device_records`` reads the
records one device at a time (they are partitioned by device), so a fleet's report needs the
memory of its largest device, not of the fleet.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from observer import ObserverError, __version__, words
from observer.records import TABLES, partition_devices, read_table
from observer.records.findings import Finding, Findings
from observer.records.location import Location
from observer.report.text import clip
from observer.report.writer import TITLE_WIDTH, render_html, write_report

FLEET_VERSION = 1


def devices(records: dict[str, pd.DataFrame]) -> list[str]:
    """The devices of a records set, as the analysis names them (missing -> "unknown")."""
    conns = records.get("connections")
    if conns is None or conns.empty:
        return []
    return sorted(set(conns["device"].fillna("unknown").astype(str)))


def records_of(records: dict[str, pd.DataFrame], device: str) -> dict[str, pd.DataFrame]:
    """Each table's rows of one device; a session of no one device recorded them all."""
    out = {}
    for table, df in records.items():
        if df is None or "device" not in df.columns:
            out[table] = df
            continue
        mine = df["device"].fillna("unknown").astype(str) == device
        if table == "sessions":
            mine |= df["device"].isna() | (df["device"] == "unknown")
        out[table] = df[mine]
    return out


def device_records(root: str | Path | Location,
                   problems: list[str]) -> Iterator[dict[str, pd.DataFrame]]:
    """Each device's tables in turn, read from its own partitions only (with the sessions kept
    for no one device, and the tables without a device column, as ``records_of`` gives them)."""
    root = Location.of(root)
    shared = {table: read_table(root, table, problems=problems)
              for table, columns in TABLES.items() if "device" not in columns}
    for device in partition_devices(root, "connections"):
        yield {table: shared[table] if table in shared else read_table(
                   root, table, devices=[device, "unknown"] if table == "sessions" else [device],
                   problems=problems)
               for table in TABLES}


def device_dir(device: str) -> str:
    """A folder name for a device that no name can turn into a path elsewhere ("../x")."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", device).strip("._-")[:48]
    if slug == device and slug:
        return slug
    return f"{slug or 'device'}-{hashlib.sha256(device.encode('utf-8')).hexdigest()[:8]}"


def largest_schedule(findings: list[Finding]) -> Finding | None:
    """The periodic bulk upload moving the most data: an export before any backup."""
    periodic = [f for f in findings if f.verdict == "periodic bulk upload"]
    periodic.sort(key=lambda f: (f.is_backup, -(f.typical_bytes or 0)))
    return periodic[0] if periodic else None


def answer(findings: list[Finding]) -> str:
    periodic = [f for f in findings if f.verdict == "periodic bulk upload"]
    if any(not f.is_backup for f in periodic):
        return "export"
    return "backup only" if periodic else "none"


def summary(device: str, findings: Findings, report: str) -> dict:
    """One device's line of the fleet: answer, headline, largest schedule, coverage, counts."""
    cov = findings.coverage
    span = float(cov.get("ts_end") or 0.0) - float(cov.get("ts_start") or 0.0)
    covered = float(cov.get("covered_s") or 0.0)
    top = largest_schedule(findings.findings)
    return {
        "device": device,
        "report": report,
        "answer": answer(findings.findings),
        "headline": words.headline(findings.findings),
        "largest_schedule": None if top is None else {
            "label": top.label, "is_backup": top.is_backup, "period_s": top.period_s,
            "phase_local": top.phase_local, "typical_bytes": top.typical_bytes,
            "occurrences": top.occurrences, "expected": top.expected, "p_value": top.p_value,
            "words": words.schedule_words(top),
        },
        "coverage": {"covered_s": covered, "span_s": max(span, 0.0),
                     "words": words.coverage_words(covered, max(span, 0.0))},
        "verdicts": {v: sum(f.verdict == v for f in findings.findings)
                     for v in ("periodic bulk upload", "periodic heartbeat", "irregular uploads")},
    }


def write_fleet(records: dict[str, pd.DataFrame] | Iterable[dict[str, pd.DataFrame]],
                findings: Findings, out_dir: Path) -> Path:
    """A report per device under ``out_dir/<device>/``, then index.html and fleet.json.
    ``records``: every device's tables, or tables of a device (or a few) at a time, in turn
    (``device_records``)."""
    out_dir = Path(out_dir)
    lines = []
    for group in [records] if isinstance(records, dict) else records:
        for device in devices(group):
            folder = device_dir(device)
            mine = findings.for_device(device)
            write_report(records_of(group, device), mine, out_dir / folder)
            lines.append(summary(device, mine, f"{folder}/report.html"))
        del group  # before the next device's records are read
    lines.sort(key=lambda line: line["device"])
    fleet = {
        "schema_version": FLEET_VERSION,
        "timezone": findings.timezone,
        "records": None if findings.records is None else asdict(findings.records),
        "devices": lines,
    }
    context = {
        "version": __version__,
        "tz": findings.timezone,
        "zone_note": words.zone_note(findings.timezone, findings.timezone_configured),
        "rows": [{**line, "name": clip(line["device"], TITLE_WIDTH)} for line in lines],
        "exports": sum(line["answer"] == "export" for line in lines),
    }
    index = out_dir / "index.html"
    try:
        (out_dir / "fleet.json").write_text(
            json.dumps(fleet, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
            encoding="utf-8")
        index.write_text(render_html("index.html.j2", context), encoding="utf-8")
    except OSError as exc:
        raise ObserverError(f"cannot write the fleet index into {out_dir}: "
                            f"{exc.strerror or exc}") from None
    return index
