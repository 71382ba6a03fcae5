"""HAR files (browsers, mitmproxy's savehar, HTTP Toolkit) -> http and connections tables.

Only metadata is read: method, host, path (query redacted by default), status, header and body
sizes, timings.  Bodies, headers' values and cookies are never copied.  A HAR has no client address
and no transport counters: each connection's bytes are the sums of its exchanges' HTTP sizes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from observer import ObserverError
from observer.config import LabConfig
from observer.records import conform, empty
from observer.sources.imports.common import read_bytes, redact_path, session

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def sniff(head: bytes) -> bool:
    """A JSON object whose first key is ``log``, holding ``version``, ``creator``, ``entries``."""
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if not text.startswith(b"{"):
        return False
    start = text[1:].lstrip()
    return start.startswith(b'"log"') and any(
        key in text for key in (b'"entries"', b'"creator"', b'"version"')
    )


def _size(value: Any) -> int | None:
    """HAR sizes: -1 (or absent) means unknown."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2**62:
        return None
    return int(value)


def _headers_size(message: dict) -> int | None:
    """headersSize, or an estimate from the header list (``name: value\\r\\n``) when it is -1."""
    size = _size(message.get("headersSize"))
    if size is not None:
        return size
    headers = message.get("headers")
    if isinstance(headers, list) and headers:
        return sum(
            len(str(h.get("name", ""))) + len(str(h.get("value", ""))) + 4
            for h in headers if isinstance(h, dict)
        )
    return None


def _response_body(response: dict) -> int | None:
    """Bytes on the wire for the body: bodySize, else _transferSize minus headers, else content."""
    size = _size(response.get("bodySize"))
    if size is not None:
        return size
    transfer = _size(response.get("_transferSize"))
    headers = _size(response.get("headersSize"))
    if transfer is not None:
        return max(transfer - (headers or 0), 0)
    content = response.get("content")
    return _size(content.get("size")) if isinstance(content, dict) else None


def _timing(timings: dict, *names: str) -> float:
    """Sum of the named HAR timings in seconds, skipping the -1 (not applicable) ones."""
    total = 0.0
    for name in names:
        value = timings.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            total += value
    return total / 1000.0


def _websocket_bytes(message: dict) -> int:
    data = message.get("data")
    if not isinstance(data, str):
        return 0
    if message.get("opcode") == 2:
        try:
            return len(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            return len(data)
    return len(data.encode("utf-8"))


def _entries(doc: Any, path: Path) -> list:
    log = doc.get("log") if isinstance(doc, dict) else None
    entries = log.get("entries") if isinstance(log, dict) else None
    if not isinstance(entries, list):
        raise ObserverError(f"{path}: not a HAR file (no log.entries list)")
    return entries


def read(path: Path, config: LabConfig | None = None) -> dict[str, pd.DataFrame]:
    """Import a HAR (or mitmproxy's zlib-compressed .zhar) file."""
    try:
        doc = json.loads(read_bytes(path).decode("utf-8-sig", errors="replace"))
    except json.JSONDecodeError as exc:
        raise ObserverError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}")
    entries = _entries(doc, path)
    creator = doc["log"].get("creator") if isinstance(doc["log"].get("creator"), dict) else {}
    intercepted = str(creator.get("name", "")).lower() == "mitmproxy"
    redact = True if config is None else config.redact_query
    # A HAR has no client address: the lab's only device if it has one, else "unknown".
    device = "unknown"
    if config is not None and len(config.devices) == 1:
        device = config.devices[0].name
    file_key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]

    http_rows: list[dict] = []
    ws_rows: list[dict] = []
    last_conn: dict[tuple, str] = {}
    skipped = 0
    for index, entry in enumerate(entries):
        request = entry.get("request") if isinstance(entry, dict) else None
        if not isinstance(request, dict) or not isinstance(request.get("url"), str):
            skipped += 1
            continue
        response = entry.get("response") if isinstance(entry.get("response"), dict) else {}
        timings = entry.get("timings") if isinstance(entry.get("timings"), dict) else {}
        started = entry.get("startedDateTime")
        started = pd.to_datetime(started, utc=True, errors="coerce") if isinstance(
            started, str) else pd.NaT
        try:
            url = urlsplit(request["url"])
            port = url.port or DEFAULT_PORTS.get(url.scheme.lower())
            path_text = redact_path(request["url"], redact)
        except ValueError:  # a malformed URL (bad IPv6 brackets, port out of range)
            started = pd.NaT
        if pd.isna(started):
            skipped += 1
            continue
        ts_request = started.timestamp()
        scheme = url.scheme.lower()
        server_ip = str(entry.get("serverIPAddress") or "").strip("[]") or None
        # Exchanges on one connection share Chrome's "connection" id.  Without it, an entry with
        # no connect time (-1: mitmproxy, Firefox) reuses the last connection to its server.
        server = (server_ip, url.hostname, port)
        connect = timings.get("connect")
        if entry.get("connection"):
            conn_key = str(entry["connection"])
        elif isinstance(connect, (int, float)) and connect < 0 and server in last_conn:
            conn_key = last_conn[server]
        else:
            conn_key = f"e{index}"
        last_conn[server] = conn_key
        conn_id = f"har:{file_key}:{server_ip}:{port}:{conn_key}"
        status = response.get("status")
        http_rows.append({
            "conn_id": conn_id,
            "ts_request": ts_request,
            "ts_response": ts_request + _timing(timings, "blocked", "dns", "connect", "send",
                                                "wait") if status else None,
            "ts_end": ts_request + _timing(timings, "blocked", "dns", "connect", "send", "wait",
                                           "receive"),
            "method": str(request.get("method", "")).upper() or None,
            "scheme": scheme,
            "host": (url.hostname or "").lower() or None,
            "path": path_text,
            "http_version": str(request.get("httpVersion") or "") or None,
            "status": int(status) if isinstance(status, int) and status > 0 else None,
            "request_header_bytes": _headers_size(request),
            "request_body_bytes": _size(request.get("bodySize")),
            "response_header_bytes": _headers_size(response) if status else None,
            "response_body_bytes": _response_body(response) if status else None,
            "server_ip": server_ip,
            "server_port": port,
        })
        for message in entry.get("_webSocketMessages") or []:
            if isinstance(message, dict) and isinstance(message.get("time"), (int, float)):
                ws_rows.append({
                    "conn_id": conn_id, "ts": float(message["time"]),
                    "direction": "up" if message.get("type") == "send" else "down",
                    "bytes": _websocket_bytes(message),
                })

    tables = {t: empty(t) for t in ("connections", "activity", "dns")}
    if not http_rows:
        tables["http"] = empty("http")
        tables["websocket"] = empty("websocket")
        tables["sessions"] = session(path, "har", None, None,
                                     f"HAR with no usable entries ({skipped} skipped)")
        return tables
    rows = pd.DataFrame(http_rows)
    rows["device"] = device
    tables["http"] = conform("http", rows.drop(columns=["ts_end", "server_ip", "server_port"]))
    ws = pd.DataFrame(ws_rows, columns=["conn_id", "ts", "direction", "bytes"])
    ws["device"] = device
    tables["websocket"] = conform("websocket", ws)

    sizes = rows[["request_header_bytes", "request_body_bytes", "response_header_bytes",
                  "response_body_bytes"]].astype("Int64")
    rows["up"] = sizes["request_header_bytes"].fillna(0) + sizes["request_body_bytes"].fillna(0)
    rows["down"] = sizes["response_header_bytes"].fillna(0) + sizes["response_body_bytes"].fillna(0)
    ws_up = ws[ws["direction"] == "up"].groupby("conn_id")["bytes"].sum()
    ws_down = ws[ws["direction"] == "down"].groupby("conn_id")["bytes"].sum()
    grouped = rows.groupby("conn_id", sort=False)
    conns = grouped.agg(
        ts_start=("ts_request", "min"), ts_end=("ts_end", "max"), bytes_up=("up", "sum"),
        bytes_down=("down", "sum"), server_name=("host", "first"), server_ip=("server_ip", "first"),
        server_port=("server_port", "first"), scheme=("scheme", "first"),
        version=("http_version", "first"),
    ).reset_index()
    conns["bytes_up"] += conns["conn_id"].map(ws_up).fillna(0).astype("int64")
    conns["bytes_down"] += conns["conn_id"].map(ws_down).fillna(0).astype("int64")
    secure = conns["scheme"].isin(["https", "wss"])
    is_h3 = conns["version"].fillna("").str.lower().isin(["h3", "http/3", "http/3.0"])
    conns["proto"] = np.where(is_h3, "quic", "tcp")
    conns["name_source"] = np.where(conns["server_name"].notna(), "http", "none")
    conns["tls"] = np.where(secure, "intercepted" if intercepted else "unknown", "none")
    conns["source"] = "import"
    conns["device"] = device
    tables["connections"] = conform(
        "connections", conns.drop(columns=["scheme", "version"]).astype({"server_port": "Int64"})
    )
    note = f"HAR by {creator.get('name') or 'unknown tool'}: HTTP sizes, no transport bytes"
    if skipped:
        note += f"; {skipped} unusable entries skipped"
    tables["sessions"] = session(path, "har", float(conns["ts_start"].min()),
                                 float(conns["ts_end"].max()), note)
    return tables
