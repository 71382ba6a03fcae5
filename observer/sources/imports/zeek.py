"""Zeek logs (conn, dns, ssl, http; TSV or JSON lines) -> record tables.

A lab that already runs Zeek can ask the nightly-export question of the logs it has.  A conn.log
holds one line per connection with totals only, so the import yields no activity bins: the
analysis treats each such connection as one block spread over its duration.  ssl.log (SNI by uid),
http.log (Host by uid) and dns.log (answers) found beside the conn.log name its connections.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from observer import ObserverError
from observer.config import LabConfig, TimeWindow
from observer.records import conform, empty
from observer.redaction import Redaction
from observer.sources.imports.common import counts, devices, read_bytes, session
from observer.text import network_text

KINDS = ("conn", "dns", "ssl", "http")
# How a Zeek conn_state reads as our close_reason (Zeek's conn.log docs explain each state).
CLOSE_REASON = {
    "SF": "fin",
    "REJ": "rst",
    "RSTO": "rst",
    "RSTR": "rst",
    "RSTOS0": "rst",
    "RSTRH": "rst",
}
# TLS seen on the wire by a passive observer (as the pcap replay says it): interception unknown.
TLS_SEEN = "unknown"
NUMERIC_TYPES = {"time", "interval", "double", "count", "port", "int"}
_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


@dataclass
class ZeekLog:
    """One parsed log: its kind (conn, dns, ...), its rows as strings (NA = unset), skip count."""

    kind: str
    rows: pd.DataFrame
    skipped: int = 0
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # damage, where the first bad line is


NAME = "Zeek log (TSV or JSON)"


def sniff(head: bytes, path: Path) -> bool:
    """A directory with a conn log, a Zeek TSV header, or JSON lines with ``id.orig_h``."""
    if path.is_dir():
        return is_zeek_dir(path)
    text = head.lstrip(b"\xef\xbb\xbf")
    if text.startswith(b"#separator"):
        return True
    first = text.lstrip().split(b"\n", 1)[0]
    return first.startswith(b"{") and b'"id.orig_h"' in first and b'"log"' not in first[:20]


def _unescape(value: str) -> str:
    """Undo Zeek's ``\\xHH`` escaping of separators and non-printable bytes."""
    raw = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), value.encode("utf-8"))
    return raw.decode("utf-8", errors="replace")


def _parse_tsv(text: str, path: Path) -> tuple[str | None, pd.DataFrame, list[int]]:
    sep, unset, empty_field = "\t", "-", "(empty)"
    kind: str | None = None
    fields: list[str] | None = None
    types: list[str] = []
    blocks: list[pd.DataFrame] = []
    lines: list[str] = []
    skipped: list[int] = []  # line numbers

    def flush() -> None:
        if fields is not None and lines:
            typed = dict(zip(fields, types, strict=True)) if len(types) == len(fields) else {}
            numeric = {f: "float64" for f, t in typed.items() if t in NUMERIC_TYPES}
            options = dict(sep=sep, header=None, names=fields, keep_default_na=False,
                           na_values=[unset], quoting=csv.QUOTE_NONE, engine="c")
            text = "\n".join(lines)
            try:
                frame = pd.read_csv(io.StringIO(text), dtype={f: numeric.get(f, str)
                                                              for f in fields}, **options)
            except ValueError:  # a number column holding text: read it all as text
                frame = pd.read_csv(io.StringIO(text), dtype=str, **options)
            blocks.append(frame)
        lines.clear()

    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            if line.startswith("#separator"):
                value = line[len("#separator"):].strip()
                sep = _unescape(value) if value else "\t"
                continue
            key, _, value = line[1:].partition(sep)
            if key == "fields":
                flush()
                fields, types = value.split(sep), []
                doubled = sorted({f for f in fields if fields.count(f) > 1})
                if doubled:
                    raise ObserverError(f"{path}:{number}: #fields names {', '.join(doubled)} "
                                        "twice")
            elif key == "types":
                types = value.split(sep)
            elif key == "path":
                kind = value
            elif key == "unset_field":
                unset = value
            elif key == "empty_field":
                empty_field = value
            continue
        if not line.strip():
            continue
        if fields is None:
            raise ObserverError(f"{path}:{number}: Zeek log data before its #fields header line")
        if line.count(sep) != len(fields) - 1:
            skipped.append(number)
            continue
        lines.append(line)
    flush()
    if fields is None:
        raise ObserverError(f"{path}: Zeek log without a #fields header line")
    rows = pd.concat(blocks, ignore_index=True) if blocks else pd.DataFrame(columns=fields)
    for column in rows.columns:
        if pd.api.types.is_numeric_dtype(rows[column]):
            continue
        col = rows[column].astype("string")
        col = col.mask(col.eq(empty_field).fillna(False), "")
        rows[column] = col
        escaped = col.str.contains("\\x", regex=False, na=False)
        if escaped.any():
            rows.loc[escaped, column] = col[escaped].map(_unescape)
    return kind, rows, skipped


def _json_value(value: object) -> object:
    """A JSON value written the way Zeek's TSV writer would (T/F, comma-joined sets)."""
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, list):
        return ",".join(str(_json_value(v)) for v in value)
    if value is None:
        return pd.NA
    return str(value) if not isinstance(value, str) else network_text(value)


def _parse_json(text: str, path: Path) -> tuple[str | None, pd.DataFrame, list[int]]:
    records: list[dict] = []
    skipped: list[int] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            skipped.append(number)
            continue
        if not isinstance(obj, dict):
            skipped.append(number)
            continue
        records.append({k: _json_value(v) for k, v in obj.items()})
    if not records:
        raise ObserverError(f"{path}: no Zeek JSON records in the file")
    rows = pd.DataFrame.from_records(records).astype("string")
    paths = rows["_path"].dropna() if "_path" in rows else pd.Series(dtype="string")
    kind = str(paths.iloc[0]) if len(paths) else None
    return kind, rows, skipped


def _guess_kind(rows: pd.DataFrame, path: Path) -> str | None:
    columns = set(rows.columns)
    if {"conn_state", "orig_bytes"} & columns or "resp_ip_bytes" in columns:
        return "conn"
    if "query" in columns and ({"answers", "qtype_name"} & columns):
        return "dns"
    if {"server_name", "cipher", "established"} & columns:
        return "ssl"
    if {"method", "uri"} <= columns:
        return "http"
    stem = path.name.split(".", 1)[0]
    return stem if stem in KINDS else None


def parse_log(path: Path, window: TimeWindow | None = None) -> ZeekLog:
    """Parse one Zeek log file (TSV or JSON lines, optionally gzipped); lines that do not parse
    and lines timed outside ``window`` are skipped and counted."""
    content, damage = read_bytes(path)
    text = content.decode("utf-8-sig", errors="replace")
    if text.startswith("#"):
        kind, rows, bad = _parse_tsv(text, path)
    else:
        kind, rows, bad = _parse_json(text, path)
    notes = [f"{path.name}: {damage}"] if damage else []
    if bad:
        notes.append(f"first malformed line {path}:{bad[0]}")
    skipped = len(bad)
    kind = kind or _guess_kind(rows, path)
    if kind is None:
        raise ObserverError(f"{path}: cannot tell which Zeek log this is (no #path or _path)")
    if "ts" in rows:
        earliest, latest = (window or TimeWindow()).bounds()
        ts = _times(rows)
        end = ts + _numbers(rows, "duration").fillna(0.0)  # a conn's end must be sane too
        outside = ts.notna() & ~(ts.between(earliest, latest) & end.between(ts, latest))
        if outside.any():
            rows, skipped = rows[~outside].reset_index(drop=True), skipped + int(outside.sum())
    return ZeekLog(kind, rows, skipped, [path], notes)


def _numbers(rows: pd.DataFrame, column: str) -> pd.Series:
    if column not in rows:
        return pd.Series(np.nan, index=rows.index)
    if pd.api.types.is_numeric_dtype(rows[column]):
        return rows[column].astype("float64")
    return pd.to_numeric(rows[column], errors="coerce").astype("float64")


def _times(rows: pd.DataFrame, column: str = "ts") -> pd.Series:
    """Epoch seconds from Zeek's epoch floats or its JSON ISO 8601 timestamps."""
    values = _numbers(rows, column)
    if column not in rows or pd.api.types.is_numeric_dtype(rows[column]):
        return values
    iso = values.isna() & rows[column].notna()
    if iso.any():
        parsed = pd.to_datetime(rows.loc[iso, column], utc=True, errors="coerce", format="ISO8601")
        values[iso] = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    return values


def _column(rows: pd.DataFrame, column: str) -> pd.Series:
    return rows[column] if column in rows else pd.Series(pd.NA, index=rows.index, dtype="string")


def _first_by_uid(log: ZeekLog | None, column: str) -> pd.Series:
    if log is None or "uid" not in log.rows or column not in log.rows:
        return pd.Series(dtype="string")
    rows = log.rows[["uid", column]].dropna()
    rows = rows[rows[column] != ""]
    return rows.drop_duplicates("uid").set_index("uid")[column]


def dns_table(log: ZeekLog, config: LabConfig | None) -> pd.DataFrame:
    """One dns row per answer of each query (A, AAAA, or a CNAME name)."""
    rows = log.rows
    if "answers" not in rows or rows.empty:
        return empty("dns")
    frame = pd.DataFrame({
        "ts": _times(rows),
        "client_ip": _column(rows, "id.orig_h"),
        "query": _column(rows, "query").str.lower().str.rstrip("."),
        "answer": rows["answers"].str.split(","),
        "ttl": _column(rows, "TTLs").str.split(","),
    })
    frame = frame[frame["answer"].notna() & frame["query"].notna()]
    if frame.empty:
        return empty("dns")
    frame["ttl"] = [
        t if isinstance(t, list) and len(t) == len(a) else [None] * len(a)
        for a, t in zip(frame["answer"], frame["ttl"], strict=True)
    ]
    frame = frame.explode(["answer", "ttl"], ignore_index=True)
    frame = frame[frame["answer"].notna() & (frame["answer"] != "")]
    answer = frame["answer"].astype("string")
    is_v4 = answer.str.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", na=False)
    is_v6 = answer.str.contains(":", regex=False, na=False)
    frame["answer_type"] = np.where(is_v4, "A", np.where(is_v6, "AAAA", "CNAME"))
    frame["ttl"] = counts(frame["ttl"])
    frame["device"] = devices(frame["client_ip"].astype("string"), config)
    return conform("dns", frame)


def http_table(log: ZeekLog, config: LabConfig | None) -> pd.DataFrame:
    """http.log rows: method, host, path (query redacted), status and body sizes.

    Zeek logs no header sizes and no response time, so those stay unknown.
    """
    rows = log.rows
    redaction = Redaction.of(config)
    uri = _column(rows, "uri")
    frame = pd.DataFrame({
        "conn_id": _column(rows, "uid"),
        "ts_request": _times(rows),
        "method": _column(rows, "method"),
        "scheme": "http",
        "host": _column(rows, "host").str.lower(),
        "path": uri.map(lambda u: redaction.path(u) if isinstance(u, str) else pd.NA),
        "http_version": _column(rows, "version"),
        "status": counts(_numbers(rows, "status_code")),
        "request_body_bytes": counts(_numbers(rows, "request_body_len")),
        "response_body_bytes": counts(_numbers(rows, "response_body_len")),
        "device": devices(_column(rows, "id.orig_h"), config),
    })
    return conform("http", frame)


def _dns_names(conn: pd.DataFrame, dns: pd.DataFrame) -> pd.Series:
    """Name each connection by the latest DNS answer for its server, asked by the same client."""
    answers = dns[dns["answer_type"].isin(["A", "AAAA"])][["ts", "client_ip", "answer", "query"]]
    if answers.empty or conn.empty:
        return pd.Series(pd.NA, index=conn.index, dtype="string")
    left = conn[["ts_start", "client_ip", "server_ip"]].reset_index()
    left = left.rename(columns={"server_ip": "answer"}).dropna(subset=["ts_start"])
    left = left.sort_values("ts_start")
    right = answers.dropna(subset=["ts"]).sort_values("ts")
    right = right.astype({"client_ip": object, "answer": object})
    left = left.astype({"client_ip": object, "answer": object})
    merged = pd.merge_asof(
        left, right, left_on="ts_start", right_on="ts", by=["client_ip", "answer"],
        direction="backward",
    )
    return merged.set_index("index")["query"].reindex(conn.index).astype("string")


def connections_table(
    log: ZeekLog, ssl: ZeekLog | None, http: ZeekLog | None, dns: pd.DataFrame,
    config: LabConfig | None,
) -> pd.DataFrame:
    """conn.log rows -> connections (totals only: no activity bins exist in a conn.log)."""
    rows = log.rows
    ts = _times(rows)
    duration = _numbers(rows, "duration")
    proto = _column(rows, "proto").str.lower()
    service = _column(rows, "service").fillna("").str.lower()
    proto = proto.mask((proto == "udp") & service.str.contains("quic", regex=False), "quic")
    uid = _column(rows, "uid")
    conn_state = _column(rows, "conn_state")
    close = conn_state.map(CLOSE_REASON).astype("string")
    # UDP has no close: Zeek ends a UDP flow when it idles out (or the trace ends).
    close = close.mask(proto.isin(["udp", "quic"]).fillna(False) & conn_state.notna(), "idle")
    frame = pd.DataFrame({
        "conn_id": uid,
        "source": "import",
        "proto": proto,
        "client_ip": _column(rows, "id.orig_h"),
        "client_port": _numbers(rows, "id.orig_p"),
        "server_ip": _column(rows, "id.resp_h"),
        "server_port": _numbers(rows, "id.resp_p"),
        "ts_start": ts,
        "ts_end": ts + duration.fillna(0.0),
        "bytes_up": _numbers(rows, "orig_bytes"),
        "bytes_down": _numbers(rows, "resp_bytes"),
        "packets_up": _numbers(rows, "orig_pkts"),
        "packets_down": _numbers(rows, "resp_pkts"),
        "wire_bytes_up": _numbers(rows, "orig_ip_bytes"),
        "wire_bytes_down": _numbers(rows, "resp_ip_bytes"),
        "close_reason": close,
    })
    for column in ("client_port", "server_port", "bytes_up", "bytes_down", "packets_up",
                   "packets_down", "wire_bytes_up", "wire_bytes_down"):
        frame[column] = counts(frame[column])
    frame["device"] = devices(frame["client_ip"], config)

    sni = uid.map(_first_by_uid(ssl, "server_name")).astype("string")
    alpn = uid.map(_first_by_uid(ssl, "next_protocol")).astype("string")
    established = uid.map(_first_by_uid(ssl, "established")).astype("string")
    host = uid.map(_first_by_uid(http, "host")).astype("string").str.lower()
    by_dns = _dns_names(frame, dns)
    frame["server_name"] = sni.fillna(host).fillna(by_dns)
    frame["name_source"] = np.where(
        sni.notna(), "sni", np.where(host.notna(), "http", np.where(by_dns.notna(), "dns", "none"))
    )
    frame.loc[(proto == "quic") & sni.notna(), "name_source"] = "quic"
    frame["alpn"] = alpn
    has_tls = (service.str.contains("ssl", regex=False) | established.notna()).fillna(False)
    failed = established.eq("F").fillna(False)
    frame["tls"] = np.where(failed, "failed", np.where(has_tls, TLS_SEEN, "none"))
    frame.loc[proto == "quic", "tls"] = TLS_SEEN
    return conform("connections", frame)


def _sibling(path: Path, kind: str) -> Path | None:
    """dns.log beside conn.log, dns.00:00:00-01:00:00.log.gz beside conn.00:00:00-...log.gz."""
    if not path.name.startswith("conn"):
        return None
    candidate = path.with_name(kind + path.name[len("conn"):])
    return candidate if candidate.is_file() else None


def _conn_beside(path: Path, kind: str) -> Path | None:
    """conn.log beside a dns.log (the inverse of ``_sibling``)."""
    if not path.name.startswith(kind):
        return None
    candidate = path.with_name("conn" + path.name[len(kind):])
    return candidate if candidate.is_file() else None


def _logs_in(directory: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {k: [] for k in KINDS}
    for child in sorted(directory.iterdir()):
        kind = child.name.split(".", 1)[0]
        is_log = ".log" in child.name or child.name.endswith((".json", ".json.gz"))
        if kind in found and is_log and child.is_file():
            found[kind].append(child)
    return found


def _merge(logs: list[ZeekLog], kind: str) -> ZeekLog | None:
    if not logs:
        return None
    rows = pd.concat([log.rows for log in logs], ignore_index=True)
    return ZeekLog(kind, rows, sum(log.skipped for log in logs),
                   [f for log in logs for f in log.files], [n for log in logs for n in log.notes])


def is_zeek_dir(path: Path) -> bool:
    return path.is_dir() and bool(_logs_in(path)["conn"])


def read(path: Path, config: LabConfig | None = None) -> dict[str, pd.DataFrame]:
    """Import a Zeek log, or a directory of them, into record tables (source = "import")."""
    groups: dict[str, list[ZeekLog]] = {k: [] for k in KINDS}
    window = TimeWindow.of(config)
    if path.is_dir():
        found = _logs_in(path)
        if not any(found.values()):
            raise ObserverError(f"{path}: no Zeek conn/dns/ssl/http logs in this directory")
        for kind, files in found.items():
            groups[kind] = [parse_log(f, window) for f in files]
    else:
        main = parse_log(path, window)
        if main.kind not in KINDS:
            raise ObserverError(
                f"{path}: a Zeek {main.kind}.log carries no connections; import conn.log, "
                "dns.log, ssl.log or http.log"
            )
        if main.kind != "conn" and _conn_beside(path, main.kind) is not None:
            # Read with its conn.log (``observer replay logs/*.log`` names both): not twice.
            return {t: empty(t) for t in ("connections", "activity", "dns", "http", "sessions")}
        groups[main.kind].append(main)
        if main.kind == "conn":
            for kind in ("dns", "ssl", "http"):
                sibling = _sibling(path, kind)
                if sibling is not None:
                    groups[kind].append(parse_log(sibling, window))
    logs = {kind: _merge(items, kind) for kind, items in groups.items()}
    conn, dns_log, ssl, http = logs["conn"], logs["dns"], logs["ssl"], logs["http"]
    if conn is None and dns_log is None and http is None:
        raise ObserverError(
            f"{path}: an ssl.log alone carries no traffic sizes; import the conn.log beside it"
        )
    dns = dns_table(dns_log, config) if dns_log is not None else empty("dns")
    tables = {
        "connections": (
            connections_table(conn, ssl, http, dns, config) if conn is not None
            else empty("connections")
        ),
        "dns": dns,
        "http": http_table(http, config) if http is not None else empty("http"),
        "activity": empty("activity"),
    }
    times = pd.concat([tables["connections"]["ts_start"], tables["connections"]["ts_end"],
                       dns["ts"], tables["http"]["ts_request"]]).dropna()
    skipped = sum(log.skipped for log in logs.values() if log is not None)
    used = [f.name for log in logs.values() if log is not None for f in log.files]
    note = (f"Zeek logs {', '.join(used)}: connection totals only, no activity bins"
            + (f"; {skipped} malformed or out-of-time lines skipped" if skipped else "")
            + "".join(f"; {n}" for log in logs.values() if log is not None for n in log.notes))
    tables["sessions"] = session(
        path, "zeek", float(times.min()) if len(times) else None,
        float(times.max()) if len(times) else None, note,
    )
    return tables
