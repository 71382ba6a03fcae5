"""Importer for mitmproxy flow files (``mitmdump -w``): the same records the live addon writes.

It also takes the addon's own JSONL record files (see ``observer.sources.proxy.jsonl_import``).

``mitmdump -w`` saves flows, not connections, so the addon copies each connection's facts (TLS
state, byte counts, activity bins since the previous saved flow) into ``flow.metadata`` just
before mitmproxy saves the flow; this importer reads them back and rebuilds the http, websocket
and dns rows from the flows themselves.  Flows saved without the addon still give http and dns
rows and connection rows without byte counts.  A torn end (a killed mitmdump) keeps every flow
read before it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from observer import ObserverError
from observer.records import TABLES, conform
from observer.sources.proxy import jsonl_import
from observer.sources.proxy.flows import (
    METADATA_KEY,
    conn_id_of,
    dns_rows,
    http_row,
    websocket_row,
)

# A flow file is a sequence of tnetstring dicts: "<length>:" then "<n>:<key>;" items.
HEAD = re.compile(rb"^(\d{1,10}):\d{1,3}:[A-Za-z_]+[,;]")


def sniff(head: bytes, path: Path) -> bool:
    """A flow file, or the addon's JSONL records (``observer replay live/*.jsonl``)."""
    return is_flow_file(head) or jsonl_import.sniff(head, Path(path))


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


def read(path: Path, config: Any = None) -> dict[str, pd.DataFrame]:
    """Record tables from one flow file (or one of the addon's JSONL record files)."""
    path = Path(path)
    if path.is_dir():
        return jsonl_import.read(path, config)
    head = _head(path)
    if is_flow_file(head):
        return read_flows(path, config)
    if jsonl_import.sniff(head, path):
        return jsonl_import.read(path, config)
    raise ObserverError(f"{path}: neither a mitmproxy flow file nor observer JSONL records")


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(4096)
    except OSError as exc:
        raise ObserverError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_flows(path: Path, config: Any = None) -> dict[str, pd.DataFrame]:
    """Record tables from one ``mitmdump -w`` flow file."""
    from mitmproxy import dns, http, io
    from mitmproxy.exceptions import FlowReadException

    keep_query = config is not None and not config.redact_query

    def device_of(flow: Any) -> str:
        peer = flow.client_conn.peername
        ip = peer[0] if peer else None
        name = config.device_of(ip) if config is not None and ip else None
        return name or ip or "unknown"

    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
    conns: dict[str, dict[str, Any]] = {}
    measured: set[str] = set()
    flows = 0
    torn = ""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ObserverError(f"cannot read flow file {path}: {exc.strerror or exc}") from None
    with fh:
        try:
            for flow in io.FlowReader(fh).stream():
                flows += 1
                device = device_of(flow)
                meta = flow.metadata.get(METADATA_KEY, {})
                cid = conn_id_of(flow.client_conn)
                if "conn" in meta:
                    conns[cid] = meta["conn"]
                    measured.add(cid)
                elif cid not in measured:
                    conns[cid] = _conn_fallback(flow, device)
                rows["activity"].extend(meta.get("activity", []))
                if isinstance(flow, http.HTTPFlow):
                    rows["http"].append(meta.get("http") or http_row(flow, device, keep_query))
                    if "websocket" in meta:
                        rows["websocket"].extend(meta["websocket"])
                    elif flow.websocket is not None:
                        rows["websocket"].extend(
                            websocket_row(flow, m, device) for m in flow.websocket.messages)
                elif isinstance(flow, dns.DNSFlow):
                    rows["dns"].extend(dns_rows(flow, device))
        except FlowReadException as exc:
            if flows == 0:
                raise ObserverError(f"{path}: not a readable mitmproxy flow file ({exc})") from None
            torn = f"; stopped at a torn or corrupt flow after {flows} flows ({exc})"
    rows["connections"] = list(conns.values())
    starts = [r["ts_start"] for r in conns.values() if r.get("ts_start")]
    ends = [r["ts_end"] or r["ts_start"] for r in conns.values() if r.get("ts_start")]
    rows["sessions"] = [{
        "session_id": f"flows-{path.name}",
        "source": "proxy",
        "ts_start": min(starts, default=None),
        "ts_end": max(ends, default=None),
        "interface": str(path),
        "note": f"replayed {flows} flows from a mitmproxy flow file{torn}",
    }]
    tables = {t: conform(t, pd.DataFrame(r)) for t, r in rows.items()}
    return jsonl_import.tidy(tables)
