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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from observer import ObserverError
from observer.config import LabConfig, TimeWindow
from observer.records import conform, empty
from observer.redaction import Redaction
from observer.sources.imports.common import read_bytes, session
from observer.text import network_text

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


NAME = "HAR archive"


def sniff(head: bytes, path: Path) -> bool:
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
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e10:
            total += value  # milliseconds; above 1e10 (115 days) is damage, not a timing
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
    return len(network_text(data).encode("utf-8"))


@dataclass
class _Har:
    """What a HAR file gave: its creator, its entries, and the fault that ended it early."""

    creator: dict
    entries: list
    fault: str | None = None


def _load(path: Path) -> _Har:
    """The HAR's creator and entries.  A file cut short or damaged keeps the entries that parse
    before the fault; a file with none is one error line."""
    content, damage = read_bytes(path)
    text = content.decode("utf-8-sig", errors="replace")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        fault = f"not valid JSON at line {exc.lineno} column {exc.colno}" + (
            f" ({damage})" if damage else "")
        entries = _entries_before_fault(text)
        if not entries:
            raise ObserverError(f"{path}: {fault}") from None
        return _Har(_object_at(text, _CREATOR), entries, f"{fault}; kept the {len(entries)} "
                                                          "entries before it")
    except RecursionError:
        raise ObserverError(f"{path}: JSON nested too deeply to be a HAR file") from None
    log = doc.get("log") if isinstance(doc, dict) else None
    entries = log.get("entries") if isinstance(log, dict) else None
    if not isinstance(entries, list):
        raise ObserverError(f"{path}: not a HAR file (no log.entries list)")
    creator = log.get("creator")
    return _Har(creator if isinstance(creator, dict) else {}, entries)


_ENTRIES = re.compile(r'"entries"\s*:\s*\[')
_CREATOR = re.compile(r'"creator"\s*:\s*')
_BETWEEN = re.compile(r"[\s,]*")


def _entries_before_fault(text: str) -> list:
    """The entries of a damaged HAR that parse, one JSON object at a time, up to the fault."""
    start = _ENTRIES.search(text)
    if start is None:
        return []
    decoder, pos, entries = json.JSONDecoder(), start.end(), []
    while True:
        pos = _BETWEEN.match(text, pos).end()
        try:
            entry, pos = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError):
            return entries
        entries.append(entry)


def _object_at(text: str, key: re.Pattern) -> dict:
    """The JSON object after ``key`` in a damaged file, or ``{}``."""
    found = key.search(text)
    try:
        value = json.JSONDecoder().raw_decode(text, found.end())[0] if found else {}
    except (json.JSONDecodeError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


class _Exchanges:
    """HAR entries -> http and websocket rows; unusable entries (no URL, no or absurd start
    time, a malformed URL) are counted in ``skipped``."""

    def __init__(self, path: Path, config: LabConfig | None) -> None:
        self.redaction = Redaction.of(config)
        self.window = TimeWindow.of(config).bounds()
        self.file_key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        self.http: list[dict] = []
        self.websocket: list[dict] = []
        self.skipped: list[int] = []  # indexes of the entries skipped
        self._last_conn: dict[tuple, str] = {}

    def add(self, index: int, entry: Any) -> None:
        request = entry.get("request") if isinstance(entry, dict) else None
        if not isinstance(request, dict) or not isinstance(request.get("url"), str):
            self.skipped.append(index)
            return
        started = entry.get("startedDateTime")
        started = pd.to_datetime(started, utc=True, errors="coerce") if isinstance(
            started, str) else pd.NaT
        raw_url = network_text(request["url"])
        try:
            url = urlsplit(raw_url)
            port = url.port or DEFAULT_PORTS.get(url.scheme.lower())
        except ValueError:  # a malformed URL (bad IPv6 brackets, port out of range)
            started = pd.NaT
        if pd.isna(started) or not self.window[0] <= started.timestamp() <= self.window[1]:
            self.skipped.append(index)
            return
        server_ip = network_text(str(entry.get("serverIPAddress") or "")).strip("[]") or None
        timings = entry.get("timings") if isinstance(entry.get("timings"), dict) else {}
        conn_id = self._conn_id(index, entry, timings, (server_ip, url.hostname, port))
        response = entry.get("response") if isinstance(entry.get("response"), dict) else {}
        status = response.get("status")
        status = status if isinstance(status, int) and 100 <= status <= 999 else None
        ts_request = started.timestamp()
        self.http.append({
            "conn_id": conn_id,
            "ts_request": ts_request,
            "ts_response": ts_request + _timing(timings, "blocked", "dns", "connect", "send",
                                                "wait") if status else None,
            "ts_end": ts_request + _timing(timings, "blocked", "dns", "connect", "send", "wait",
                                           "receive"),
            "method": network_text(str(request.get("method", ""))).upper() or None,
            "scheme": url.scheme.lower(),
            "host": (url.hostname or "").lower() or None,
            "path": self.redaction.path(raw_url),
            "http_version": network_text(str(request.get("httpVersion") or "")) or None,
            "status": status,
            "request_header_bytes": _headers_size(request),
            "request_body_bytes": _size(request.get("bodySize")),
            "response_header_bytes": _headers_size(response) if status else None,
            "response_body_bytes": _response_body(response) if status else None,
            "server_ip": server_ip,
            "server_port": port,
        })
        messages = entry.get("_webSocketMessages")
        for message in messages if isinstance(messages, list) else []:
            ts = message.get("time") if isinstance(message, dict) else None
            if isinstance(ts, (int, float)) and self.window[0] <= ts <= self.window[1]:
                self.websocket.append({
                    "conn_id": conn_id, "ts": float(ts),
                    "direction": "up" if message.get("type") == "send" else "down",
                    "bytes": _websocket_bytes(message),
                })

    def _conn_id(self, index: int, entry: dict, timings: dict, server: tuple) -> str:
        """Exchanges on one connection share Chrome's "connection" id.  Without it, an entry
        with no connect time (-1: mitmproxy, Firefox) reuses the last connection to its server."""
        connect = timings.get("connect")
        if entry.get("connection"):
            key = network_text(str(entry["connection"]))
        elif isinstance(connect, (int, float)) and connect < 0 and server in self._last_conn:
            key = self._last_conn[server]
        else:
            key = f"e{index}"
        self._last_conn[server] = key
        return f"har:{self.file_key}:{server[0]}:{server[2]}:{key}"


def _connections(rows: pd.DataFrame, ws: pd.DataFrame, intercepted: bool) -> pd.DataFrame:
    """One connection per HAR connection id: its exchanges' HTTP (and WebSocket) sizes summed."""
    sizes = rows[["request_header_bytes", "request_body_bytes", "response_header_bytes",
                  "response_body_bytes"]].astype("Int64")
    rows = rows.assign(
        up=sizes["request_header_bytes"].fillna(0) + sizes["request_body_bytes"].fillna(0),
        down=sizes["response_header_bytes"].fillna(0) + sizes["response_body_bytes"].fillna(0))
    ws_up = ws[ws["direction"] == "up"].groupby("conn_id")["bytes"].sum()
    ws_down = ws[ws["direction"] == "down"].groupby("conn_id")["bytes"].sum()
    conns = rows.groupby("conn_id", sort=False).agg(
        ts_start=("ts_request", "min"), ts_end=("ts_end", "max"), bytes_up=("up", "sum"),
        bytes_down=("down", "sum"), server_name=("host", "first"), server_ip=("server_ip", "first"),
        server_port=("server_port", "first"), scheme=("scheme", "first"),
        version=("http_version", "first"), device=("device", "first"),
    ).reset_index()
    conns["bytes_up"] += conns["conn_id"].map(ws_up).fillna(0).astype("int64")
    conns["bytes_down"] += conns["conn_id"].map(ws_down).fillna(0).astype("int64")
    secure = conns["scheme"].isin(["https", "wss"])
    is_h3 = conns["version"].fillna("").str.lower().isin(["h3", "http/3", "http/3.0"])
    conns["proto"] = np.where(is_h3, "quic", "tcp")
    conns["name_source"] = np.where(conns["server_name"].notna(), "http", "none")
    conns["tls"] = np.where(secure, "intercepted" if intercepted else "unknown", "none")
    conns["source"] = "import"
    return conform(
        "connections", conns.drop(columns=["scheme", "version"]).astype({"server_port": "Int64"})
    )


def read(path: Path, config: LabConfig | None = None) -> dict[str, pd.DataFrame]:
    """Import a HAR (or mitmproxy's zlib-compressed .zhar) file."""
    har = _load(path)
    creator = har.creator
    exchanges = _Exchanges(path, config)
    for index, entry in enumerate(har.entries):
        exchanges.add(index, entry)
    tables = {t: empty(t) for t in ("connections", "activity", "dns", "http", "websocket")}
    if not exchanges.http:
        note = f"HAR with no usable entries ({len(exchanges.skipped)} skipped)"
        tables["sessions"] = session(path, "har", None, None,
                                     note + (f"; {har.fault}" if har.fault else ""))
        return tables
    # A HAR has no client address: the lab's only device if it has one, else "unknown".
    device = config.devices[0].name if config is not None and len(config.devices) == 1 else (
        "unknown")
    rows = pd.DataFrame(exchanges.http).assign(device=device)
    tables["http"] = conform("http", rows.drop(columns=["ts_end", "server_ip", "server_port"]))
    ws = pd.DataFrame(exchanges.websocket, columns=["conn_id", "ts", "direction", "bytes"])
    tables["websocket"] = conform("websocket", ws.assign(device=device))
    intercepted = str(creator.get("name", "")).lower() == "mitmproxy"
    conns = tables["connections"] = _connections(rows, ws, intercepted)
    note = f"HAR by {creator.get('name') or 'unknown tool'}: HTTP sizes, no transport bytes"
    if exchanges.skipped:
        note += (f"; {len(exchanges.skipped)} unusable entries skipped (the first is "
                 f"log.entries[{exchanges.skipped[0]}])")
    if har.fault:
        note += f"; {har.fault}"
    tables["sessions"] = session(path, "har", float(conns["ts_start"].min()),
                                 float(conns["ts_end"].max()), note)
    return tables
