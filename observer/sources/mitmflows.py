"""Importer for mitmproxy flow files (``mitmdump -w``): the same records the live addon writes.

``mitmdump -w`` saves flows, not connections, so the addon copies each connection's facts (TLS
state, byte counts, activity bins since the previous saved flow) into ``flow.metadata`` just
before mitmproxy saves the flow; this importer reads them back and rebuilds the http, websocket
and dns rows from the flows themselves.  Flows saved without the addon still give http and dns
rows and connection rows without byte counts.  A torn end (a killed mitmdump) keeps every flow
read before it.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from observer import ObserverError
from observer.config import TimeWindow
from observer.devices import DeviceMap
from observer.records import TABLES, conform
from observer.records.jsonl import record_problem
from observer.sources.proxy import jsonl_import
from observer.sources.proxy.flows import (
    METADATA_KEY,
    conn_id_of,
    dns_rows,
    http_row,
    websocket_row,
)

# A flow file is a sequence of tnetstring dicts: "<length>:" then "<n>:<key>;" items.
# What mitmproxy's deserialisation or a flow's odd state raises on a damaged file.
FLOW_FAULTS = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError,
               UnicodeError)
HEAD = re.compile(rb"^(\d{1,10}):\d{1,3}:[A-Za-z_]+[,;]")


NAME = "mitmproxy flow file"


def sniff(head: bytes, path: Path) -> bool:
    """A ``mitmdump -w`` flow file (a tnetstring dict first)."""
    return is_flow_file(head)


def is_flow_file(head: bytes) -> bool:
    """A tnetstring dict whose end (if inside ``head``) is a dict terminator ``}``."""
    m = HEAD.match(head)
    if not m:
        return False
    end = len(m.group(1)) + 1 + int(m.group(1))
    return end >= len(head) or head[end : end + 1] == b"}"


def _conn_fallback(flow: Any, device: str) -> dict[str, Any]:
    """A connection row from a flow saved without the addon (no byte counts)."""
    client, server = flow.client_conn, flow.server_conn
    peer = client.peername or (None, None)
    addr = server.peername or server.address or (None, None)
    sni = client.sni
    return {
        "conn_id": conn_id_of(client),
        "source": "proxy",
        "device": device,
        "proto": client.transport_protocol,
        "client_ip": peer[0],
        "client_port": peer[1],
        "server_ip": None if addr[0] is None else str(addr[0]),
        "server_port": addr[1],
        "ts_start": client.timestamp_start,
        "ts_end": client.timestamp_end,
        "server_name": sni,
        "name_source": "sni" if sni else "none",
        "alpn": client.alpn.decode("ascii", "replace") if client.alpn else None,
        "tls": "intercepted" if client.tls_established else "none",
        "close_reason": "open" if client.timestamp_end is None else "client",
        "proxy_mode": client.proxy_mode.type_name,
        "ts_tcp_setup": server.timestamp_tcp_setup,
        "ts_tls_setup": client.timestamp_tls_setup,
    }


def _flow_rows(flow: Any, device: str, keep_query: bool) -> dict[str, list[dict[str, Any]]]:
    """The record rows of one flow: the addon's measured rows where it saved them."""
    from mitmproxy import dns, http

    meta = flow.metadata.get(METADATA_KEY, {})
    out: dict[str, list[dict[str, Any]]] = {
        "connections": [meta["conn"] if "conn" in meta else _conn_fallback(flow, device)],
        "activity": list(meta.get("activity", [])),
    }
    if isinstance(flow, http.HTTPFlow):
        out["http"] = [meta.get("http") or http_row(flow, device, keep_query)]
        if "websocket" in meta:
            out["websocket"] = list(meta["websocket"])
        elif flow.websocket is not None:
            out["websocket"] = [websocket_row(flow, m, device) for m in flow.websocket.messages]
    elif isinstance(flow, dns.DNSFlow):
        out["dns"] = dns_rows(flow, device)
    return out


class _FlowFile:
    """Rows gathered from a flow file's flows; each row is checked against the schema and the
    time window (``records.jsonl.record_problem``) and skipped with a count when it fails."""

    def __init__(self, config: Any) -> None:
        self.devices = DeviceMap.from_config(config)
        self.keep_query = config is not None and not config.redact_query
        self.window = TimeWindow.of(config).bounds()
        self.rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
        self.conns: dict[Any, dict[str, Any]] = {}
        self.measured: set[Any] = set()
        self.skipped: Counter[str] = Counter()
        self.flows = 0

    def device_of(self, flow: Any) -> str:
        peer = flow.client_conn.peername
        return self.devices.name(str(peer[0]) if peer else None)

    def add(self, flow: Any) -> None:
        self.flows += 1
        try:
            made = _flow_rows(flow, self.device_of(flow), self.keep_query)
            measured = "conn" in flow.metadata.get(METADATA_KEY, {})
        except FLOW_FAULTS:
            self.skipped["damaged flow"] += 1
            return
        for table, items in made.items():
            for row in items:
                why = record_problem(table, row, self.window)
                if why:
                    self.skipped[why] += 1
                elif table != "connections":
                    self.rows[table].append(row)
                elif measured or row.get("conn_id") not in self.measured:
                    self.conns[row.get("conn_id")] = row  # the addon's measured row wins
                    if measured:
                        self.measured.add(row.get("conn_id"))

    def tables(self, path: Path, torn: str) -> dict[str, pd.DataFrame]:
        if self.skipped:
            torn += "; skipped " + ", ".join(
                f"{n} {why}" for why, n in self.skipped.most_common(3))
        conns = list(self.conns.values())
        starts = [r["ts_start"] for r in conns if r.get("ts_start")]
        ends = [r.get("ts_end") or r["ts_start"] for r in conns if r.get("ts_start")]
        rows = dict(self.rows, connections=conns, sessions=[{
            "session_id": f"flows-{path.name}",
            "source": "proxy",
            "ts_start": min(starts, default=None),
            "ts_end": max(ends, default=None),
            "interface": str(path),
            "note": f"replayed {self.flows} flows from a mitmproxy flow file{torn}",
        }])
        return jsonl_import.tidy({t: conform(t, pd.DataFrame(r)) for t, r in rows.items()})


def read(path: Path, config: Any = None) -> dict[str, pd.DataFrame]:
    """Record tables from one ``mitmdump -w`` flow file; a damaged flow ends the file, keeping
    every flow before it (its byte offset in the session note)."""
    from mitmproxy import io
    from mitmproxy.exceptions import FlowReadException

    found = _FlowFile(config)
    torn = ""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
        if fh.read(2) == b"\x1f\x8b":  # a gzipped flow file (sniffed inside the compression)
            fh.close()
            fh = gzip.open(path, "rb")  # noqa: SIM115 - closed below
        fh.seek(0)
    except OSError as exc:
        raise ObserverError(f"cannot read flow file {path}: {exc.strerror or exc}") from None
    with fh:
        stream = io.FlowReader(fh).stream()
        while True:
            at = fh.tell()
            try:
                flow = next(stream, None)
            except (FlowReadException, EOFError, OSError, zlib.error, *FLOW_FAULTS) as exc:
                why = f"{type(exc).__name__}: {exc}"
                if found.flows == 0:
                    raise ObserverError(f"{path}: not a readable mitmproxy flow file ({why})"
                                        ) from None
                torn = (f"; stopped at a torn or corrupt flow at byte offset {at} after "
                        f"{found.flows} flows ({why})")
                break
            if flow is None:
                break
            found.add(flow)
    return found.tables(path, torn)
