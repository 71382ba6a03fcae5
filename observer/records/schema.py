"""The record schema: the one contract between sources, analysis and report.

Every source (pcap replay, live capture, the mitmproxy addon, importers) writes these tables and
every later stage reads them.  docs/schema.md explains each column; keep the two in step and bump
SCHEMA_VERSION when a column changes meaning or type.

Conventions: times are UTC epoch seconds (float64) in files and ``datetime64[ns, UTC]`` only where
the analysis converts them; "up" is device -> server (client -> server), "down" the reverse;
``bytes_*`` are transport payload bytes, ``wire_bytes_*`` are IP-level bytes (IP header included).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SCHEMA_VERSION = 1

# Column name -> pandas dtype.  Nullable extension dtypes keep "unknown" apart from zero.
STR = "string"
F64 = "float64"
I64 = "Int64"

TABLES: dict[str, dict[str, str]] = {
    "connections": {
        "conn_id": STR,  # unique across sources and runs
        "source": STR,  # proxy | pcap | live | import
        "device": STR,  # device name from the lab config, or the client address when unknown
        "proto": STR,  # tcp | udp | quic
        "client_ip": STR,
        "client_port": I64,
        "server_ip": STR,
        "server_port": I64,
        "ts_start": F64,
        "ts_end": F64,
        "bytes_up": I64,
        "bytes_down": I64,
        "packets_up": I64,
        "packets_down": I64,
        "wire_bytes_up": I64,
        "wire_bytes_down": I64,
        "server_name": STR,
        "name_source": STR,  # sni | http | dns | quic | none
        "alpn": STR,
        "tls": STR,  # none | intercepted | passthrough | failed | unknown
        "tls_error": STR,  # why a handshake failed (proxy), else null
        "close_reason": STR,  # fin | rst | idle | open | client | server | error | end-of-capture
        "app": STR,  # per-app attribution where the source knows it (PCAPdroid), else null
        "proxy_mode": STR,  # regular | transparent | wireguard | socks5 | local, proxy only
        "ts_tcp_setup": F64,  # proxy only: upstream TCP connected
        "ts_tls_setup": F64,  # proxy only: TLS handshake done
        "tunnel": STR,  # replay: the outer connection(s) of a decapsulated one, else null
    },
    "activity": {
        "conn_id": STR,
        "device": STR,
        "ts_bin": F64,  # start of the bin, a multiple of bin_s
        "bin_s": F64,
        "bytes_up": I64,
        "bytes_down": I64,
        "packets_up": I64,
        "packets_down": I64,
    },
    "link_activity": {  # replay: 802.11 frames that cannot be decoded (protected), per station
        "station": STR,  # the station's (phone's) MAC address
        "bssid": STR,
        "ts_bin": F64,
        "bin_s": F64,
        "frames_up": I64,  # station -> access point
        "frames_down": I64,
        "bytes_up": I64,  # 802.11 frame bytes as captured on the air
        "bytes_down": I64,
    },
    "http": {
        "conn_id": STR,
        "device": STR,
        "ts_request": F64,
        "ts_response": F64,
        "method": STR,
        "scheme": STR,
        "host": STR,
        "path": STR,  # query string redacted unless the source was told otherwise
        "http_version": STR,
        "status": I64,
        "request_header_bytes": I64,
        "request_body_bytes": I64,
        "response_header_bytes": I64,
        "response_body_bytes": I64,
    },
    "websocket": {
        "conn_id": STR,
        "device": STR,
        "ts": F64,
        "direction": STR,  # up | down
        "bytes": I64,
    },
    "dns": {
        "device": STR,
        "ts": F64,
        "client_ip": STR,
        "query": STR,
        "answer_type": STR,  # A | AAAA | CNAME
        "answer": STR,
        "ttl": I64,
    },
    "sessions": {
        "session_id": STR,
        "source": STR,
        "device": STR,
        "ts_start": F64,
        "ts_end": F64,
        "interface": STR,  # capture interface, proxy mode, or input file
        "filter": STR,
        "packets_captured": I64,
        "packets_dropped": I64,  # kernel drops where libpcap reports them
        "note": STR,
    },
}

# The columns that identify a row whatever wrote it: a connection keeps its id (``pcap-<hash>``)
# whether it reached the records through a live capture's JSONL or through a replay of the pcap
# files, so a row already in the records is not added again.  Sessions describe coverage and
# have none.
ROW_KEY = {
    "connections": ["conn_id"],
    "activity": ["conn_id", "ts_bin"],
    "http": ["conn_id", "ts_request", "method", "host", "path"],
    "websocket": ["conn_id", "ts", "direction", "bytes"],
    "dns": ["device", "ts", "client_ip", "query", "answer_type", "answer"],
    "link_activity": ["station", "bssid", "ts_bin"],
}

# The column whose UTC day partitions each table on disk.
TIME_COLUMN = {
    "connections": "ts_start",
    "activity": "ts_bin",
    "link_activity": "ts_bin",
    "http": "ts_request",
    "websocket": "ts",
    "dns": "ts",
    "sessions": "ts_start",
}


def empty(table: str) -> pd.DataFrame:
    """An empty frame with the table's columns and dtypes."""
    return conform(table, pd.DataFrame())


def conform(table: str, df: pd.DataFrame) -> pd.DataFrame:
    """Return ``df`` with exactly the table's columns, in order, cast to the schema's dtypes.

    Missing columns are added as nulls; unknown columns are an error, because a misspelled column
    would otherwise vanish silently.
    """
    from observer import ObserverError

    columns = TABLES.get(table)
    if columns is None:
        raise ObserverError(f"unknown record table {table!r}; known: {', '.join(TABLES)}")
    extra = [c for c in df.columns if c not in columns]
    if extra:
        unknown = ", ".join(map(str, extra))
        raise ObserverError(f"table {table}: columns not in the schema: {unknown}")
    n = len(df)
    # Build all columns first and the frame once: inserting columns one by one is ~5x slower,
    # and replay conforms thousands of slices.
    return pd.DataFrame(
        {
            name: (
                _cast(df[name].reset_index(drop=True), dtype)
                if name in df.columns
                else _missing(dtype, n)
            )
            for name, dtype in columns.items()
        },
        index=pd.RangeIndex(n),
    )


def _cast(column: pd.Series, dtype: str) -> pd.Series:
    try:
        return column.astype(dtype)
    except UnicodeEncodeError:  # text that is not valid UTF-8 got past its source: the last guard
        from observer.text import network_texts

        return network_texts(column)


def _missing(dtype: str, n: int) -> pd.Series:
    """A column of ``n`` nulls, built from numpy arrays (the generic constructor is slow)."""
    if dtype == F64:
        return pd.Series(np.full(n, np.nan))
    if dtype == I64:
        return pd.Series(pd.arrays.IntegerArray(np.zeros(n, np.int64), np.ones(n, bool)))
    return pd.Series(np.full(n, None, dtype=object), dtype=dtype)
