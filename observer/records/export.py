"""Records -> files other tools read: a Zeek-style conn.log (RITA, zeek-cut, any Zeek tooling) and
CSV for spreadsheets, with formula-looking cells neutralised.

Only records go out: this module knows nothing of how they were captured.
"""

from __future__ import annotations

import time
from typing import TextIO

import numpy as np
import pandas as pd

from observer.records.schema import conform

CONN_FIELDS = (
    "ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "service",
    "duration", "orig_bytes", "resp_bytes", "conn_state", "local_orig", "local_resp",
    "missed_bytes", "history", "orig_pkts", "orig_ip_bytes", "resp_pkts", "resp_ip_bytes",
    "tunnel_parents", "ip_proto",
)
CONN_TYPES = (
    "time", "string", "addr", "port", "addr", "port", "enum", "string", "interval", "count",
    "count", "string", "bool", "bool", "count", "string", "count", "count", "count", "count",
    "set[string]", "count",
)
SSL_FIELDS = (
    "ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "version", "cipher", "curve",
    "server_name", "resumed", "last_alert", "next_protocol", "established",
)
SSL_TYPES = (
    "time", "string", "addr", "port", "addr", "port", "string", "string", "string", "string",
    "bool", "string", "string", "bool",
)
UNSET = "-"
EMPTY = "(empty)"
IP_PROTO = {"tcp": 6, "udp": 17, "quic": 17, "icmp": 1}
# Spreadsheets run a cell starting with one of these as a formula (OWASP "CSV injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _zeek_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime(ts))


def _escape(value: str) -> str:
    """Zeek's ASCII escaping: tab, comma, backslash and non-printable bytes as ``\\xHH``.

    A value that would read as unset or empty is escaped too, as Zeek does.
    """
    if value in (UNSET, EMPTY):
        return "".join(f"\\x{ord(c):02x}" for c in value)
    out = []
    for byte in value.encode("utf-8"):
        if byte < 0x20 or byte >= 0x7F or byte in (0x09, 0x2C, 0x5C):
            out.append(f"\\x{byte:02x}")
        else:
            out.append(chr(byte))
    return "".join(out)


def _escaped(series: pd.Series) -> pd.Series:
    """``_escape`` applied only to the few values that need it (the rest pass untouched)."""
    series = series.astype("string")
    needs = series.str.contains(r"[^\x21-\x2b\x2d-\x5b\x5d-\x7e]|^-$|^\(empty\)$",
                                regex=True, na=False)
    if needs.any():
        series = series.copy()
        series[needs] = series[needs].map(_escape)
    return series


def _seconds(values: np.ndarray) -> list[str]:
    """Zeek's time and interval text: six decimals (microseconds), '-' when unknown."""
    return [UNSET if v != v else f"{v:.6f}" for v in values.tolist()]


def _counts(series: pd.Series) -> pd.Series:
    return series.astype("Int64").astype("string").fillna(UNSET)


def conn_state(connections: pd.DataFrame) -> pd.Series:
    """Zeek's conn_state from our close_reason where it says enough, else from who sent packets.

    fin -> SF, rst -> RSTO (our records do not say which side reset); an unclosed TCP connection
    is S1 (both sides sent) or S0 (only the originator); UDP is SF when both sides sent.
    """
    up = connections["packets_up"].fillna(0).astype("int64") > 0
    down = connections["packets_down"].fillna(0).astype("int64") > 0
    reason = connections["close_reason"].fillna("")
    udp = connections["proto"].isin(["udp", "quic"])
    state = np.select(
        [udp & up & down, udp & up, udp & down, reason == "fin", reason == "rst", up & down, up],
        ["SF", "S0", "SHR", "SF", "RSTO", "S1", "S0"],
        default="OTH",
    )
    return pd.Series(state, index=connections.index)


def _service(connections: pd.DataFrame) -> pd.Series:
    # "unknown" is how a passive capture records TLS it saw but could not see into.
    tls = connections["tls"].fillna("none").isin(["intercepted", "passthrough", "failed",
                                                  "unknown"])
    service = np.where(connections["proto"] == "quic", "quic", np.where(tls, "ssl", UNSET))
    return pd.Series(service, index=connections.index)


def _uids(connections: pd.DataFrame) -> pd.Series:
    """conn_id as the uid (so a log read back keeps our ids); a stable stand-in when missing."""
    missing = connections["conn_id"].isna() | (connections["conn_id"] == "")
    stand_in = pd.Series([f"CX{i:x}" for i in range(len(connections))], index=connections.index)
    return _escaped(connections["conn_id"].astype("string").where(~missing, stand_in))


def conn_log_rows(connections: pd.DataFrame) -> list[str]:
    """The data lines of a conn.log (tab-separated, no trailing newline)."""
    c = conform("connections", connections).sort_values("ts_start", kind="stable")
    duration = _seconds((c["ts_end"] - c["ts_start"]).to_numpy("float64"))
    columns = {
        "ts": _seconds(c["ts_start"].to_numpy("float64")),
        "uid": _uids(c),
        "id.orig_h": c["client_ip"].fillna(UNSET),
        "id.orig_p": _counts(c["client_port"]),
        "id.resp_h": c["server_ip"].fillna(UNSET),
        "id.resp_p": _counts(c["server_port"]),
        "proto": c["proto"].replace({"quic": "udp"}).fillna("unknown_transport"),
        "service": _service(c),
        "duration": duration,
        "orig_bytes": _counts(c["bytes_up"]),
        "resp_bytes": _counts(c["bytes_down"]),
        "conn_state": conn_state(c),
        "local_orig": UNSET,
        "local_resp": UNSET,
        "missed_bytes": UNSET,
        "history": UNSET,
        "orig_pkts": _counts(c["packets_up"]),
        "orig_ip_bytes": _counts(c["wire_bytes_up"]),
        "resp_pkts": _counts(c["packets_down"]),
        "resp_ip_bytes": _counts(c["wire_bytes_down"]),
        "tunnel_parents": UNSET,
        "ip_proto": c["proto"].map(IP_PROTO).astype("Int64").astype("string").fillna(UNSET),
    }
    columns["id.orig_h"] = _escaped(columns["id.orig_h"])
    columns["id.resp_h"] = _escaped(columns["id.resp_h"])
    lists = [pd.Series(columns[name], index=c.index).astype(object).fillna(UNSET).tolist()
             for name in CONN_FIELDS]
    return ["\t".join(row) for row in zip(*lists, strict=True)]


def _write_log(out: TextIO, path: str, fields: tuple[str, ...], types: tuple[str, ...],
               lines: list[str], now: float | None) -> int:
    """A Zeek ASCII log: the full header, the data lines, and the #close line."""
    opened = time.time() if now is None else now
    out.write("#separator \\x09\n")
    out.write("#set_separator\t,\n")
    out.write(f"#empty_field\t{EMPTY}\n")
    out.write(f"#unset_field\t{UNSET}\n")
    out.write(f"#path\t{path}\n")
    out.write(f"#open\t{_zeek_time(opened)}\n")
    out.write("#fields\t" + "\t".join(fields) + "\n")
    out.write("#types\t" + "\t".join(types) + "\n")
    if lines:
        out.write("\n".join(lines) + "\n")
    out.write(f"#close\t{_zeek_time(time.time() if now is None else now)}\n")
    return len(lines)


def write_conn_log(connections: pd.DataFrame, out: TextIO, *, now: float | None = None) -> int:
    """Write a Zeek conn.log (TSV with Zeek's full header and #close line); return rows written."""
    return _write_log(out, "conn", CONN_FIELDS, CONN_TYPES, conn_log_rows(connections), now)


def write_ssl_log(connections: pd.DataFrame, out: TextIO, *, now: float | None = None) -> int:
    """Write the TLS server names (SNI) of connections as a Zeek ssl.log, keyed by uid.

    A conn.log has no column for names; Zeek tools (and our importer) find them in the ssl.log
    beside it.  Only names that came from a TLS ClientHello are written, as Zeek would see them.
    """
    c = conform("connections", connections).sort_values("ts_start", kind="stable")
    c = c[c["name_source"].eq("sni").fillna(False) & c["proto"].eq("tcp").fillna(False)]
    ts = c["ts_tls_setup"].fillna(c["ts_start"]).to_numpy("float64")
    columns = {
        "ts": _seconds(ts),
        "uid": _uids(c),
        "id.orig_h": _escaped(c["client_ip"].fillna(UNSET)),
        "id.orig_p": _counts(c["client_port"]),
        "id.resp_h": _escaped(c["server_ip"].fillna(UNSET)),
        "id.resp_p": _counts(c["server_port"]),
        "server_name": _escaped(c["server_name"].fillna(UNSET)),
        "next_protocol": _escaped(c["alpn"].fillna(UNSET)),
        "established": np.where(c["tls"].eq("failed").fillna(False), "F", "T"),
    }
    lists = [pd.Series(columns.get(name, UNSET), index=c.index).astype(object).fillna(UNSET)
             .tolist() for name in SSL_FIELDS]
    lines = ["\t".join(row) for row in zip(*lists, strict=True)]
    return _write_log(out, "ssl", SSL_FIELDS, SSL_TYPES, lines, now)


def neutralise(value: object) -> object:
    """A text cell that a spreadsheet would run as a formula, made inert with a leading quote.

    Leading spaces do not hide a formula: some spreadsheets trim them before evaluating.
    """
    if isinstance(value, str) and value.lstrip(" ").startswith(FORMULA_START):
        return "'" + value
    return value


def csv_field(value: object) -> str:
    """One RFC 4180 field: unknown is empty; a field holding a comma, quote, line break or
    leading/trailing space is quoted, with quotes doubled; formula cells neutralised."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return ""
    text = str(neutralise(value)) if isinstance(value, str) else str(value)
    if text != text.strip() or any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def csv_line(values: list[object]) -> str:
    """A CSV record with RFC 4180's CRLF line end."""
    return ",".join(csv_field(v) for v in values) + "\r\n"


def write_csv(frame: pd.DataFrame, out: TextIO) -> int:
    """Write a table as CSV (header row, empty cell = unknown); return rows written."""
    out.write(csv_line(list(frame.columns)))
    columns = [frame[c].astype(object).tolist() for c in frame.columns]
    for row in zip(*columns, strict=True):
        out.write(csv_line(list(row)))
    return len(frame)
