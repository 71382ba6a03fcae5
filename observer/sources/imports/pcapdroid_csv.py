"""PCAPdroid's connections CSV export -> connections table, with per-app attribution.

PCAPdroid runs on the phone, so each connection carries the app (uid, package, name) that opened
it: the second path to per-app attribution besides its pcap trailer.  Totals only, no activity bins.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd

from observer import ObserverError
from observer.config import LabConfig, TimeWindow
from observer.records import conform, empty
from observer.sources.imports.common import counts, devices, read_bytes, session

REQUIRED = ("IPProto", "SrcIP", "SrcPort", "DstIp", "DstPort", "BytesSent", "BytesRcvd",
            "FirstSeen", "LastSeen")
IP_PROTOCOLS = {"6": "tcp", "17": "udp", "1": "icmp", "58": "icmp"}
TLS_PROTOCOLS = {"tls", "https", "quic", "imaps", "smtps", "pop3s"}
# Epoch milliseconds pass 1e11 in 1973; epoch seconds will not reach it for millennia.
MILLISECONDS_ABOVE = 1e11
NAME = "PCAPdroid connections CSV"


def sniff(head: bytes, path: Path) -> bool:
    first = head.lstrip(b"\xef\xbb\xbf").split(b"\n", 1)[0].strip().lower()
    return first.startswith(b"ipproto,srcip,srcport,dstip,dstport")


def _epoch_seconds(values: pd.Series) -> pd.Series:
    """FirstSeen/LastSeen are epoch ms in current PCAPdroid and seconds in old versions."""
    numbers = pd.to_numeric(values, errors="coerce").astype("float64")
    scale = 1000.0 if numbers.median() > MILLISECONDS_ABOVE else 1.0
    return numbers / scale


def _text(rows: pd.DataFrame, column: str) -> pd.Series:
    """A stripped text column, empty cells as NA (absent columns are all NA)."""
    if column not in rows:
        return pd.Series(pd.NA, index=rows.index, dtype="string")
    return rows[column].str.strip().replace("", pd.NA).astype("string")


def _rows(text: str, path: Path) -> tuple[pd.DataFrame, list[int], list[int]]:
    """The CSV's rows as text, the line of each, and the lines of rows skipped because they
    have the wrong number of fields or do not parse as CSV."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = [name.strip() for name in next(reader)]
    except (StopIteration, csv.Error) as exc:
        raise ObserverError(f"{path}: not a readable CSV ({exc or 'empty'})") from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ObserverError(f"{path}: PCAPdroid CSV lacks the column(s) {', '.join(missing)}")
    if len(set(header)) < len(header):
        raise ObserverError(f"{path}:1: a column name is given twice")
    rows: list[list[str]] = []
    lines: list[int] = []
    bad: list[int] = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error:  # e.g. a field longer than the csv module's limit
            bad.append(reader.line_num)
            continue
        if not any(field.strip() for field in row):
            continue
        if len(row) != len(header):
            bad.append(reader.line_num)
            continue
        rows.append(row)
        lines.append(reader.line_num)
    return pd.DataFrame(rows, columns=header, dtype=str), lines, bad


def read(path: Path, config: LabConfig | None = None) -> dict[str, pd.DataFrame]:
    """Import a PCAPdroid connections CSV."""
    content, damage = read_bytes(path)
    rows, lines, bad_lines = _rows(content.decode("utf-8-sig", errors="replace"), path)
    skipped = len(bad_lines)
    if rows.empty:
        tables = {t: empty(t) for t in ("connections", "activity", "dns", "http")}
        tables["sessions"] = session(path, "pcapdroid-csv", None, None, "empty PCAPdroid CSV")
        return tables

    ip_proto = rows["IPProto"].str.strip().str.lower()
    ip_proto = ip_proto.map(lambda p: IP_PROTOCOLS.get(p, p))
    l7 = _text(rows, "Proto").str.lower().fillna("")
    proto = np.where((ip_proto == "udp") & (l7 == "quic"), "quic", ip_proto)
    status = _text(rows, "Status").str.lower().fillna("")
    udp_like = pd.Series(proto, index=rows.index).isin(["udp", "quic"])
    close = np.select(
        [status == "open", (status == "closed") & udp_like, status == "closed", status == "reset",
         status.isin(["unreachable", "error"])],
        ["open", "idle", "fin", "rst", "error"],
        default=None,
    )
    info = _text(rows, "Info").str.lower().fillna("")
    named = (info != "") & (l7 != "dns")
    name_source = np.where(
        ~named, "none",
        np.where(l7 == "quic", "quic", np.where(l7.isin(["tls", "https"]), "sni",
                                                 np.where(l7 == "http", "http", "dns"))),
    )
    # The app's name as PCAPdroid shows it (its pcap trailer carries the same), else the package.
    app = _text(rows, "App").fillna(_text(rows, "PackageName"))
    uid_key = _text(rows, "UID").fillna("")
    first = _epoch_seconds(rows["FirstSeen"])
    last = _epoch_seconds(rows["LastSeen"])
    frame = pd.DataFrame({
        "conn_id": [f"pcapdroid:{path.stem}:{i}:{u}" for i, u in zip(rows.index, uid_key,
                                                                        strict=True)],
        "source": "import",
        "proto": proto,
        "client_ip": rows["SrcIP"].str.strip(),
        "client_port": pd.to_numeric(rows["SrcPort"], errors="coerce"),
        "server_ip": rows["DstIp"].str.strip(),
        "server_port": pd.to_numeric(rows["DstPort"], errors="coerce"),
        "ts_start": first,
        "ts_end": last.fillna(first),
        "bytes_up": pd.to_numeric(rows["BytesSent"], errors="coerce"),
        "bytes_down": pd.to_numeric(rows["BytesRcvd"], errors="coerce"),
        "packets_up": pd.to_numeric(rows.get("PktsSent"), errors="coerce"),
        "packets_down": pd.to_numeric(rows.get("PktsRcvd"), errors="coerce"),
        "server_name": info.where(named),
        "name_source": name_source,
        "tls": np.where(l7.isin(TLS_PROTOCOLS), "unknown", "none"),
        "close_reason": close,
        "app": app,
    })
    for column in ("client_port", "server_port", "bytes_up", "bytes_down", "packets_up",
                   "packets_down"):
        frame[column] = counts(frame[column])
    earliest, latest = TimeWindow.of(config).bounds()
    bad = (~frame["ts_start"].between(earliest, latest) | frame["client_ip"].eq("")
           | ~frame["ts_end"].between(frame["ts_start"], latest))
    skipped += int(bad.sum())
    bad_lines = sorted([*bad_lines, *np.asarray(lines)[bad.to_numpy()].tolist()])
    frame = frame[~bad]
    frame["device"] = devices(frame["client_ip"].astype("string"), config)
    connections = conform("connections", frame)
    note = "PCAPdroid connections CSV: totals per connection, no activity bins"
    if skipped:
        note += (f"; {skipped} malformed or out-of-time rows skipped, the first on line "
                 f"{bad_lines[0]}")
    if damage:
        note += f"; {damage}"
    tables = {t: empty(t) for t in ("activity", "dns", "http")}
    tables["connections"] = connections
    tables["sessions"] = session(
        path, "pcapdroid-csv",
        float(connections["ts_start"].min()) if len(connections) else None,
        float(connections["ts_end"].max()) if len(connections) else None, note,
    )
    return tables
