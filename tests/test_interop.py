"""Interoperability: Zeek / HAR / PCAPdroid importers and the conn.log / CSV exporters."""

from __future__ import annotations

import csv
import gzip
import http.server
import io
import json
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from observer import ObserverError
from observer.cli import main
from observer.config import LabConfig
from observer.records import conform, write_table
from observer.records.export import (
    CONN_FIELDS,
    CONN_TYPES,
    write_conn_log,
    write_csv,
    write_ssl_log,
)
from observer.redaction import Redaction
from observer.sources import formats
from observer.sources.formats import read_tables
from observer.text import network_text

DATA = Path(__file__).parent / "data" / "interop"
CAPTURES = Path(__file__).parents[2] / "shared" / "captures"
MITMDUMP = Path(sys.executable).with_name("mitmdump")


def _conn_log_text(frame: pd.DataFrame) -> str:
    out = io.StringIO()
    write_conn_log(frame, out, now=1_772_409_600.0)
    return out.getvalue()


# --- Zeek ----------------------------------------------------------------------------------------


def test_zeek_tsv_names_connections_from_ssl_and_dns_logs_beside_it():
    tables = read_tables(DATA / "zeek-tsv" / "conn.log")
    conns = tables["connections"].set_index("conn_id")
    assert len(conns) == 5  # the sixth, truncated line is a counted skip
    note = tables["sessions"]["note"].iloc[0]
    assert "1 malformed or out-of-time lines skipped" in note
    assert f"first malformed line {DATA / 'zeek-tsv' / 'conn.log'}:14" in note
    upload = conns.loc["CPh0neUp1oad01"]
    assert (upload.bytes_up, upload.bytes_down) == (52_430_117, 48_211)
    assert (upload.wire_bytes_up, upload.packets_up, upload.packets_down) == (53_875_077, 36_120,
                                                                               18_233)
    assert upload.ts_end - upload.ts_start == pytest.approx(95.25)
    assert (upload.server_name, upload.name_source) == ("mmg.whatsapp.net", "sni")
    assert upload.alpn == "h2"
    assert upload.close_reason == "fin" and upload.source == "import"
    # No SNI: named through the dns.log answer seen just before it, by the same client.
    assert conns.loc["CG00gleApis0002", "server_name"] == "www.googleapis.com"
    assert conns.loc["CG00gleApis0002", "name_source"] == "dns"
    assert pd.isna(conns.loc["CG00gleApis0002", "close_reason"])  # S1: never closed
    assert conns.loc["CQuic00000004", "proto"] == "quic"
    assert pd.isna(conns.loc["CQuic00000004", "bytes_up"])  # '-' is unknown, not zero
    assert conns.loc["CRst000000005", "close_reason"] == "rst"
    assert conns.loc["CDns000000003", "close_reason"] == "idle"
    assert tables["activity"].empty  # a conn.log has no bins inside a connection
    dns = tables["dns"]
    assert set(dns["answer_type"]) == {"A", "AAAA", "CNAME"}
    assert "café.example" in set(dns["query"])  # Zeek's \xHH escapes undone as UTF-8


def test_zeek_json_logs_give_the_same_records_as_tsv():
    tsv = read_tables(DATA / "zeek-tsv" / "conn.log")
    js = read_tables(DATA / "zeek-json" / "conn.json")
    pd.testing.assert_frame_equal(tsv["connections"], js["connections"])
    pd.testing.assert_frame_equal(tsv["dns"], js["dns"])


def test_zeek_iso_timestamps_and_gzipped_rotated_logs_in_a_directory(tmp_path):
    for name in ("conn", "ssl", "dns"):
        raw = (DATA / "zeek-tsv" / f"{name}.log").read_bytes()
        (tmp_path / f"{name}.02:00:00-03:00:00.log.gz").write_bytes(gzip.compress(raw))
    assert formats.format_for(tmp_path).NAME.startswith("Zeek")
    tables = read_tables(tmp_path)
    assert tables["connections"]["server_name"].eq("mmg.whatsapp.net").sum() == 1
    line = json.dumps({"ts": "2026-03-02T02:00:03.512345Z", "uid": "Ciso", "id.orig_h": "10.0.0.2",
                       "id.orig_p": 1, "id.resp_h": "10.0.0.9", "id.resp_p": 443, "proto": "tcp",
                       "duration": 1.5, "orig_bytes": 7, "resp_bytes": 9, "conn_state": "SF"})
    path = tmp_path / "export.ndjson"
    path.write_text(line + "\n")
    conn = read_tables(path)["connections"].iloc[0]
    assert conn.ts_start == pytest.approx(1772416803.512345)
    assert conn.ts_end == pytest.approx(1772416805.012345)


def test_zeek_bad_input_is_a_one_line_error(tmp_path):
    no_fields = tmp_path / "conn.log"
    no_fields.write_text("#separator \\x09\n#path\tconn\n")
    with pytest.raises(ObserverError, match=r"conn.log: Zeek log without a #fields header"):
        read_tables(no_fields)
    early = tmp_path / "early.log"
    early.write_text("#separator \\x09\n1.0\tCx\n#fields\tts\tuid\n")
    with pytest.raises(ObserverError, match=r"early.log:2: Zeek log data before its #fields"):
        read_tables(early)
    (tmp_path / "alone").mkdir()
    ssl_only = tmp_path / "alone" / "ssl.log"
    shutil.copy(DATA / "zeek-tsv" / "ssl.log", ssl_only)
    with pytest.raises(ObserverError, match=r"ssl\.log alone"):
        read_tables(ssl_only)


def test_importer_is_chosen_by_content_not_name(tmp_path):
    names = {"zeek": "notes.txt", "har": "capture.json", "csv": "phone.dat"}
    (tmp_path / names["zeek"]).write_bytes((DATA / "zeek-tsv" / "conn.log").read_bytes())
    (tmp_path / names["har"]).write_text(json.dumps({"log": {"version": "1.2", "entries": []}}))
    (tmp_path / names["csv"]).write_text(PCAPDROID_CSV)
    for kind, name in names.items():
        module = formats.format_for(tmp_path / name)
        assert module is not None and module.__name__.rsplit(".", 1)[1].startswith(
            {"zeek": "zeek", "har": "har", "csv": "pcapdroid"}[kind])
    pcap = next((CAPTURES / "zeek-tls").glob("*.pcap"), None)
    if pcap is not None:
        assert formats.is_packets(formats.format_for(pcap))
        with pytest.raises(ObserverError, match="a packet capture; use observer replay"):
            read_tables(pcap)
    assert formats.format_for(_write(tmp_path / "x.har", b'{"entries": []}')) is None
    with pytest.raises(ObserverError, match="not a format an importer reads"):
        read_tables(_write(tmp_path / "noise.bin", b"\x00\x01 not a log\n" * 64))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_damaged_files_give_one_line_errors_or_records_never_a_traceback(tmp_path):
    sources = {
        "conn.log": (DATA / "zeek-tsv" / "conn.log").read_bytes(),
        "conn.json": (DATA / "zeek-json" / "conn.json").read_bytes(),
        "dns.log": (DATA / "zeek-tsv" / "dns.log").read_bytes(),
        "connections.csv": PCAPDROID_CSV.encode(),
    }
    rng = random.Random(8)
    outcomes = {"records": 0, "error": 0}
    for name, data in sources.items():
        for _ in range(25):
            damaged = bytearray(data)
            if rng.random() < 0.3:
                damaged = damaged[: rng.randrange(1, len(damaged))]
            else:
                for _ in range(rng.randrange(1, 20)):
                    damaged[rng.randrange(len(damaged))] = rng.choice(b"\t\n,-#{}:09x\\\x00\xff")
            path = tmp_path / name
            path.write_bytes(bytes(damaged))
            try:
                read_tables(path)
                outcomes["records"] += 1
            except ObserverError as exc:
                assert "\n" not in str(exc) and str(tmp_path) in str(exc)
                outcomes["error"] += 1
    assert outcomes["records"] > 0 and outcomes["error"] > 0


# --- export ---------------------------------------------------------------------------------------


def _frame() -> pd.DataFrame:
    return conform("connections", pd.DataFrame({
        "conn_id": ["pcap:a:1", "pcap:a:2", "pcap:a:3"],
        "source": "pcap", "device": "phone",
        "proto": ["tcp", "quic", "tcp"],
        "client_ip": ["192.168.1.23", "192.168.1.23", "fe80::1"],
        "client_port": [41022, 50123, 40000], "server_ip": ["157.240.20.52", "142.250.74.10",
                                                             "2001:db8::7"],
        "server_port": [443, 443, 5222],
        "ts_start": [1772416803.512345, 1772417000.25, 1772417100.0],
        "ts_end": [1772416898.762345, 1772417003.0, 1772417100.3],
        "bytes_up": [52_430_117, 2400, 0], "bytes_down": [48_211, 9100, 0],
        "packets_up": [36_120, 6, 3], "packets_down": [18_233, 9, 0],
        "wire_bytes_up": [53_875_077, 2700, 180], "wire_bytes_down": [777_551, 9600, 0],
        "tls": ["passthrough", "passthrough", "none"],
        "server_name": ["mmg.whatsapp.net", "www.google.com", None],
        "name_source": ["sni", "quic", "none"],
        "alpn": ["h2", "h3", None],
        "close_reason": ["fin", "idle", "rst"],
    }))


def test_conn_log_has_zeeks_exact_header_and_conventions():
    lines = _conn_log_text(_frame()).splitlines()
    assert lines[:6] == ["#separator \\x09", "#set_separator\t,", "#empty_field\t(empty)",
                         "#unset_field\t-", "#path\tconn", "#open\t2026-03-02-00-00-00"]
    assert lines[6].split("\t") == ["#fields", *CONN_FIELDS]
    assert lines[7].split("\t") == ["#types", *CONN_TYPES]
    assert lines[-1] == "#close\t2026-03-02-00-00-00"
    rows = [dict(zip(CONN_FIELDS, line.split("\t"), strict=True)) for line in lines[8:-1]]
    assert [r["conn_state"] for r in rows] == ["SF", "SF", "RSTO"]
    assert (rows[1]["proto"], rows[1]["service"], rows[1]["ip_proto"]) == ("udp", "quic", "17")
    assert rows[0]["service"] == "ssl" and rows[2]["service"] == "-"
    assert {r["history"] for r in rows} == {"-"} and rows[0]["duration"] == "95.250000"
    assert rows[0]["orig_bytes"] == "52430117" and rows[0]["resp_ip_bytes"] == "777551"


def test_conn_log_round_trip_keeps_every_connection(tmp_path):
    original = _frame()
    path = tmp_path / "conn.log"
    path.write_text(_conn_log_text(original))
    back = read_tables(path)["connections"]
    _assert_same_connections(original, back)


def _assert_same_connections(original: pd.DataFrame, back: pd.DataFrame) -> None:
    keys = ["conn_id", "proto", "client_ip", "client_port", "server_ip", "server_port", "bytes_up",
            "bytes_down", "packets_up", "packets_down", "wire_bytes_up", "wire_bytes_down"]
    a = original.sort_values("conn_id").reset_index(drop=True)
    b = back.sort_values("conn_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a[keys], b[keys])
    for column in ("ts_start", "ts_end"):
        assert (a[column] - b[column]).abs().max() < 2e-6  # conn.log keeps microseconds
    closed = a["close_reason"].isin(["fin", "rst"]) & a["proto"].eq("tcp")
    assert (a.loc[closed, "close_reason"] == b.loc[closed, "close_reason"]).all()


def test_csv_export_neutralises_formula_cells():
    frame = _frame()
    frame.loc[0, "server_name"] = "=HYPERLINK(\"http://x\")"
    frame.loc[1, "server_name"] = "+cmd|' /C calc'!A0"
    frame.loc[2, "server_name"] = "@SUM(1)"
    frame.loc[0, "tls_error"] = "-2+3"
    frame.loc[1, "tls_error"] = "\tx"
    frame.loc[2, "tls_error"] = "\rx"
    out = io.StringIO()
    assert write_csv(frame, out) == 3
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["server_name"][0] for r in rows] == ["'", "'", "'"]
    assert rows[0]["server_name"] == "'=HYPERLINK(\"http://x\")"
    assert [r["tls_error"][:2] for r in rows] == ["'-", "'\t", "'\r"]
    assert rows[0]["bytes_up"] == "52430117"  # numbers are numbers, never prefixed
    assert rows[0]["client_ip"] == "192.168.1.23"


def test_export_command_writes_conn_log_and_csv(tmp_path, capsys):
    records = tmp_path / "records"
    write_table(records, "connections", _frame())
    conn_log = tmp_path / "out" / "conn.log"
    conn_log.parent.mkdir()
    assert main(["export", str(records), "--format", "zeek", "-o", str(conn_log)]) == 0
    _assert_same_connections(_frame(), read_tables(conn_log)["connections"])
    assert read_tables(conn_log)["connections"]["server_name"].isna().all()
    assert main(["export", str(records), "--format", "zeek", "-o", str(conn_log), "--ssl-log",
                 str(conn_log.with_name("ssl.log"))]) == 0
    back = read_tables(conn_log)["connections"].set_index("conn_id")
    assert back.loc["pcap:a:1", "server_name"] == "mmg.whatsapp.net"
    assert back.loc["pcap:a:1", "name_source"] == "sni" and back.loc["pcap:a:1", "alpn"] == "h2"
    out_csv = tmp_path / "conn.csv"
    assert main(["export", str(records), "--format", "csv", "-o", str(out_csv)]) == 0
    assert len(pd.read_csv(out_csv)) == 3
    assert main(["export", str(records), "--format", "zeek", "--table", "dns", "-o",
                 str(out_csv)]) == 2
    assert main(["export", str(tmp_path / "nothing"), "--format", "csv", "-o", str(out_csv)]) == 2
    err = capsys.readouterr().err
    assert "holds connections only" in err and "not a records directory" in err


# --- PCAPdroid CSV --------------------------------------------------------------------------------

PCAPDROID_CSV = (
    "IPProto,SrcIP,SrcPort,DstIp,DstPort,UID,App,PackageName,Proto,Status,Info,BytesSent,"
    "BytesRcvd,PktsSent,PktsRcvd,FirstSeen,LastSeen\n"
    "TCP,10.215.173.1,41022,157.240.20.52,443,10123,WhatsApp,com.whatsapp,TLS,Closed,"
    "mmg.whatsapp.net,52430117,48211,36120,18233,1772416803512,1772416898762\n"
    "UDP,10.215.173.1,50123,142.250.74.10,443,10077,Chrome,com.android.chrome,QUIC,Closed,"
    "www.google.com,2400,9100,6,9,1772417000250,1772417003000\n"
    "UDP,10.215.173.1,5353,10.215.173.2,53,10123,WhatsApp,com.whatsapp,DNS,Closed,"
    "g.whatsapp.net,38,54,1,1,1772416799000,1772416799020\n"
    "TCP,10.215.173.1,41200,203.0.113.9,5222,10123,WhatsApp,com.whatsapp,TLS,Open,"
    "g.whatsapp.net,9000,7000,40,35,1772417100000,1772420700000\n"
    "TCP,10.215.173.1\n"
)


def test_pcapdroid_csv_gives_per_app_connections(tmp_path):
    path = tmp_path / "connections.csv"
    path.write_text(PCAPDROID_CSV)
    tables = read_tables(path)
    conns = tables["connections"]
    note = tables["sessions"]["note"].iloc[0]
    assert len(conns) == 4 and "1 malformed or out-of-time rows skipped" in note
    assert "the first on line 6" in note
    upload = conns.iloc[0]
    assert (upload.app, upload.server_name, upload.name_source) == ("WhatsApp", "mmg.whatsapp.net",
                                                                    "sni")
    assert (upload.bytes_up, upload.bytes_down, upload.close_reason) == (52_430_117, 48_211, "fin")
    assert upload.ts_start == pytest.approx(1772416803.512)  # epoch ms detected
    assert conns.iloc[1].proto == "quic" and conns.iloc[1].app == "Chrome"
    assert pd.isna(conns.iloc[2].server_name)  # a DNS flow's Info is the query, not its server
    assert conns.iloc[3].close_reason == "open"
    seconds = tmp_path / "old.csv"
    seconds.write_text(PCAPDROID_CSV.replace("1772416803512", "1772416803")
                       .replace("1772416898762", "1772416898").splitlines()[0] + "\n"
                       + PCAPDROID_CSV.replace("1772416803512", "1772416803")
                       .replace("1772416898762", "1772416898").splitlines()[1] + "\n")
    assert read_tables(seconds)["connections"].iloc[0].ts_start == 1772416803.0
    missing = tmp_path / "bad.csv"
    missing.write_text("IPProto,SrcIP,SrcPort,DstIp,DstPort\nTCP,1.2.3.4,1,5.6.7.8,2\n")
    with pytest.raises(ObserverError, match="lacks the column"):
        read_tables(missing)


# --- HAR from a real mitmdump ---------------------------------------------------------------------


class _Server(http.server.BaseHTTPRequestHandler):
    """A tiny origin: GET /download sends 20000 bytes, POST /upload swallows the body."""

    def do_GET(self) -> None:
        body = b"d" * 20_000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(201)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not MITMDUMP.exists(), reason="mitmdump not installed in the venv")
def test_har_written_by_mitmdump_imports_sizes_and_redacted_paths(tmp_path):
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    port = _free_port()
    har = tmp_path / "flows.har"
    proxy = subprocess.Popen(
        [str(MITMDUMP), "--listen-host", "127.0.0.1", "--listen-port", str(port), "-q",
         "--set", f"hardump={har}", "--set", f"confdir={tmp_path / 'conf'}"],
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        base = f"http://127.0.0.1:{origin.server_port}"
        with httpx.Client(proxy=f"http://127.0.0.1:{port}", trust_env=False) as client:
            assert client.get(f"{base}/download?token=s3cret").status_code == 200
            posted = client.post(f"{base}/upload?user=alice", content=b"u" * 50_000)
            assert posted.status_code == 201
    finally:
        proxy.send_signal(signal.SIGINT)
        proxy.wait(30)
        origin.shutdown()
    assert json.loads(har.read_text())["log"]["creator"]["name"] == "mitmproxy"
    tables = read_tables(har)
    rows = tables["http"].set_index("method")
    assert rows.loc["GET", "path"] == "/download?token=*"
    assert rows.loc["POST", "path"] == "/upload?user=*"
    assert "s3cret" not in tables["http"].to_csv() and "alice" not in tables["http"].to_csv()
    assert rows.loc["GET", "response_body_bytes"] == 20_000
    assert rows.loc["POST", "request_body_bytes"] == 50_000
    assert rows.loc["POST", "status"] == 201 and rows.loc["GET", "host"] == "127.0.0.1"
    assert rows.loc["POST", "ts_response"] >= rows.loc["POST", "ts_request"]
    conns = tables["connections"]
    upload = conns[conns["conn_id"] == rows.loc["POST", "conn_id"]].iloc[0]
    assert upload.bytes_up == 50_000 + rows.loc["POST", "request_header_bytes"]
    assert upload.server_port == origin.server_port and upload.source == "import"


def test_har_bad_input_is_a_one_line_error(tmp_path):
    broken = tmp_path / "broken.har"
    broken.write_text('{"log": {"version": "1.2", "entries": [')
    with pytest.raises(ObserverError, match=r"broken.har: not valid JSON at line 1"):
        read_tables(broken)
    odd = tmp_path / "odd.har"
    odd.write_text(json.dumps({"log": {"version": "1.2", "entries": [
        {"request": {"url": 5}}, {"startedDateTime": "never", "request": {"url": "http://a/"}},
        {"startedDateTime": ["2026"], "request": {"url": "http://a/"}},
        {"startedDateTime": "2026-03-02T02:00:00Z", "request": {"url": "http://[::1/"}},
        {"startedDateTime": "2026-03-02T02:00:00Z", "time": 10,
         "request": {"method": "GET", "url": "https://a.example/x?q=1", "headersSize": -1,
                     "bodySize": -1, "headers": [{"name": "Host", "value": "a.example"}]},
         "response": {"status": 200, "headersSize": 50, "bodySize": -1, "_transferSize": 1050},
         "timings": {"send": 1, "wait": 5, "receive": 4}},
    ]}}))
    tables = read_tables(odd)
    row = tables["http"].iloc[0]
    assert row.request_header_bytes == len("Host") + len("a.example") + 4
    assert row.response_body_bytes == 1000 and row.path == "/x?q=*"
    assert "4 unusable entries skipped" in tables["sessions"]["note"].iloc[0]


# --- with our own pcap replay ---------------------------------------------------------------------

# What real Zeek wrote for three of the public captures (zeek/zeek testing baselines,
# scripts.base.protocols.{pop3,irc,xmpp}.starttls conn.log): start time where the baseline keeps it,
# then orig/resp payload bytes, packets and IP bytes.
ZEEK_SAYS = {
    "pop3-starttls.pcap": (1400173552.423915, 851, 2590, 16, 17, 1695, 3462),
    "irc-starttls.pcap": (None, 913, 1903, 11, 9, 1469, 2379),
    "xmpp-starttls.pcap": (None, 676, 4678, 19, 15, 1676, 5442),
}


def _replay(*paths: Path, config=None) -> dict[str, pd.DataFrame]:
    from observer.sources import replay_tables

    return replay_tables(list(paths), config=config)


@pytest.mark.parametrize("name", sorted(ZEEK_SAYS))
def test_our_replay_agrees_with_real_zeek_on_per_connection_bytes(name):
    pcap = CAPTURES / "zeek-tls" / name
    if not pcap.exists():
        pytest.skip(f"{pcap} not present")
    conns = _replay(pcap)["connections"]
    conns = conns[conns["proto"] == "tcp"]
    assert len(conns) == 1
    c = conns.iloc[0]
    ts, up, down, pkts_up, pkts_down, wire_up, wire_down = ZEEK_SAYS[name]
    assert (c.bytes_up, c.bytes_down) == (up, down)
    assert (c.packets_up, c.packets_down) == (pkts_up, pkts_down)
    assert (c.wire_bytes_up, c.wire_bytes_down) == (wire_up, wire_down)
    if ts is not None:
        assert c.ts_start == pytest.approx(ts, abs=1e-6)


def test_replayed_capture_survives_a_conn_log_round_trip(tmp_path):
    pcaps = sorted((CAPTURES / "zeek-tls").glob("*.pcap"))
    if not pcaps:
        pytest.skip("public captures not present")
    original = _replay(*pcaps)["connections"]
    assert len(original) >= len(pcaps) and set(original["proto"]) >= {"tcp", "udp"}
    assert original["client_ip"].str.contains(":").any()  # IPv6 addresses survive too
    path = tmp_path / "conn.log"
    path.write_text(_conn_log_text(original))
    ssl = io.StringIO()
    named = write_ssl_log(original, ssl, now=1_772_409_600.0)
    (tmp_path / "ssl.log").write_text(ssl.getvalue())
    back = read_tables(path)["connections"]
    _assert_same_connections(original, back)
    assert set(back["source"]) == {"import"}
    sni = original[original["name_source"].eq("sni") & original["proto"].eq("tcp")]
    assert named == len(sni) > 10
    names = back.set_index("conn_id")["server_name"]
    assert (names.loc[sni["conn_id"]].to_numpy() == sni["server_name"].to_numpy()).all()


def test_replaying_every_log_of_a_zeek_directory_reads_each_once():
    logs = sorted((DATA / "zeek-tsv").glob("*.log"))
    tables = _replay(*logs)
    assert len(tables["connections"]) == 5 and len(tables["dns"]) == 3
    assert tables["connections"]["server_name"].eq("mmg.whatsapp.net").sum() == 1


def test_replay_picks_the_importer_by_content(tmp_path):
    renamed = tmp_path / "notes.txt"
    renamed.write_bytes((DATA / "zeek-tsv" / "conn.log").read_bytes())
    har = tmp_path / "capture.bin"
    har.write_text(json.dumps({"log": {"version": "1.2", "creator": {"name": "x"}, "entries": [
        {"startedDateTime": "2026-03-02T02:00:00Z", "request": {
            "method": "PUT", "url": "https://backup.example/put?k=1", "headersSize": 80,
            "bodySize": 4_000_000}, "response": {"status": 200, "headersSize": 60, "bodySize": 0},
         "timings": {"send": 900, "wait": 30, "receive": 1}}]}}))
    tables = _replay(renamed, har)
    conns = tables["connections"]
    assert set(conns["source"]) == {"import"}
    assert conns["bytes_up"].max() == 52_430_117
    assert (conns["bytes_up"] == 4_000_080).sum() == 1
    assert tables["http"]["path"].tolist() == ["/put?k=*"]


def _pcapdroid_frame(ip_packet: bytes, uid: int, app: str) -> bytes:
    """One frame as PCAPdroid writes it with its trailer option (layout in NOTES.md)."""
    frame = b"\x00" * 12 + b"\x08\x00" + ip_packet
    frame += b"\x00" * (-len(frame) % 4)
    frame += struct.pack(">Ii", 0x01072021, uid) + app.encode()[:19].ljust(20, b"\x00")
    return frame + struct.pack(">I", zlib.crc32(frame))


def _write_pcapdroid_capture(path: Path, start: float) -> None:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    phone = "10.215.173.1"
    packets: list = []

    def tcp_session(sport: int, server: str, uid: int, app: str, t: float, up: int, down: int):
        seq, ack = 1000, 5000
        script = [("S", 0, True), ("SA", 0, False), ("A", 0, True)]
        script += [("PA", 1400, True)] * (up // 1400) + [("PA", up % 1400, True)] * bool(up % 1400)
        script += [("PA", 1400, False)] * (down // 1400) + [("PA", down % 1400, False)] * bool(
            down % 1400)
        script += [("FA", 0, True), ("FA", 0, False), ("A", 0, True)]
        for i, (flags, size, outgoing) in enumerate(script):
            src, dst = (phone, server) if outgoing else (server, phone)
            sp, dp = (sport, 443) if outgoing else (443, sport)
            pkt = IP(src=src, dst=dst) / TCP(sport=sp, dport=dp, flags=flags, seq=seq, ack=ack)
            if size:
                pkt = pkt / (b"\x17" * size)
            frame = Ether(_pcapdroid_frame(bytes(pkt), uid, app))
            frame.time = t + i * 0.01
            packets.append(frame)

    tcp_session(41022, "157.240.20.52", 10123, "WhatsApp", start, 200_000, 3_000)
    tcp_session(41030, "142.250.74.10", 10077, "Chrome", start + 5, 600, 30_000)
    dns = IP(src=phone, dst="10.215.173.2") / UDP(sport=5353, dport=53) / (b"\x00" * 30)
    frame = Ether(_pcapdroid_frame(bytes(dns), 10210, "Signal"))
    frame.time = start + 9
    packets.append(frame)
    wrpcap(str(path), packets, linktype=1)


def test_pcapdroid_trailer_capture_gives_per_app_connections(tmp_path):
    pcap = tmp_path / "pcapdroid.pcap"
    _write_pcapdroid_capture(pcap, 1772416800.0)
    raw = pcap.read_bytes()
    assert raw.count(struct.pack(">I", 0x01072021)) > 150  # the trailer is really in the file
    tables = _replay(pcap)
    conns = tables["connections"].set_index("server_ip")
    assert conns.loc["157.240.20.52", "app"] == "WhatsApp"
    assert conns.loc["157.240.20.52", "bytes_up"] == 200_000  # trailer and padding not counted
    assert conns.loc["157.240.20.52", "bytes_down"] == 3_000
    assert conns.loc["142.250.74.10", "app"] == "Chrome"
    assert conns.loc["142.250.74.10", "bytes_down"] == 30_000
    assert conns.loc["10.215.173.2", "app"] == "Signal"
    assert not tables["activity"].empty  # unlike the CSV path, the pcap keeps activity bins


def _nightly_pcapdroid_csv(path: Path, nights: int = 7) -> None:
    day0 = 1772409600  # 2026-03-02 00:00 UTC
    lines = [PCAPDROID_CSV.splitlines()[0]]
    for night in range(nights):
        start = (day0 + night * 86400 + 2 * 3600 + 60 * (night % 3)) * 1000
        lines.append(f"TCP,10.215.173.1,{41000 + night},157.240.20.52,443,10123,WhatsApp,"
                     f"com.whatsapp,TLS,Closed,mmg.whatsapp.net,52430117,48211,36120,18233,"
                     f"{start},{start + 95_000}")
        for hour in range(0, 24, 2):  # the chat socket's keepalives: the capture was running
            t = (day0 + night * 86400 + hour * 3600 + 1800) * 1000
            lines.append(f"TCP,10.215.173.1,{43000 + night * 24 + hour},157.240.20.60,5222,10123,"
                         f"WhatsApp,com.whatsapp,TLS,Closed,g.whatsapp.net,2100,1800,8,7,"
                         f"{t},{t + 5_000}")
        for hour in (9, 13, 18):
            t = (day0 + night * 86400 + hour * 3600) * 1000
            lines.append(f"TCP,10.215.173.1,{42000 + night * 10 + hour},142.250.74.10,443,10077,"
                         f"Chrome,com.android.chrome,TLS,Closed,www.google.com,3000,250000,40,200,"
                         f"{t},{t + 20_000}")
    path.write_text("\n".join(lines) + "\n")


def test_app_attribution_reaches_the_findings(tmp_path):
    from observer.analysis import analyze_records
    from observer.catalog import load_catalog
    from observer.config import LabConfig
    from observer.records import empty

    path = tmp_path / "connections.csv"
    _nightly_pcapdroid_csv(path)
    tables = read_tables(path)
    records = {t: tables.get(t, empty(t)) for t in
               ("connections", "activity", "http", "websocket", "dns", "sessions")}
    findings = analyze_records(records, LabConfig(), load_catalog(), n_sim=200)
    text = json.dumps(findings, default=str)
    assert "WhatsApp" in text
    by_app = {f["group"]: f for f in findings["findings"] if f.get("group_kind") == "app"}
    assert by_app["WhatsApp"]["verdict"] == "periodic bulk upload"
    assert by_app["WhatsApp"]["phase_local"] == "02:00" and by_app["WhatsApp"]["occurrences"] == 7
    assert by_app["Chrome"]["verdict"] != "periodic bulk upload"
    # Built from connection totals, not activity bins: the evidence says so.
    assert all(e["from_totals"] for e in by_app["WhatsApp"]["events"])


# --- one redaction policy, one text policy ---------------------------------------------------

NAMES = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)
VALUES = st.text(alphabet="XYZ0123456789-.", min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(path=st.from_regex(r"\A(/[a-z0-9]{0,6}){1,3}\Z"),
       query=st.lists(st.tuples(NAMES, VALUES), max_size=5), fragment=st.booleans())
def test_redaction_keeps_names_and_drops_every_value(path, query, fragment):
    url = f"https://h.example{path}" + ("?" + "&".join(f"{k}={v}" for k, v in query)
                                        if query else "") + ("#frag=SECRET" if fragment else "")
    redacted = Redaction().path(url)
    assert redacted.startswith(path) and "SECRET" not in redacted
    if query:
        assert redacted.split("?", 1)[1].split("&") == [f"{k}=*" for k, _ in query]
    kept = Redaction.of(LabConfig(redact_query=False)).path(url)
    assert kept == path + ("?" + "&".join(f"{k}={v}" for k, v in query) if query else "")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40) | st.text(max_size=40))
def test_network_text_is_always_valid_utf8(value):
    text = network_text(value)
    text.encode("utf-8")  # never raises
    if isinstance(value, bytes):
        assert text == value.decode("utf-8", "replace")
    elif not any("\ud800" <= c <= "\udfff" for c in value):
        assert text == value
