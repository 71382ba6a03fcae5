"""Unit level of the proxy source: counters, rows, importers and the addon's options and guards."""

from __future__ import annotations

import logging
from argparse import Namespace
from pathlib import Path

import pytest
from mitmproxy import exceptions, io
from mitmproxy.net.http.http1.assemble import assemble_request_head, assemble_response_head
from mitmproxy.test import taddons, tflow

from observer import ObserverError
from observer.commands import proxy as proxy_command
from observer.records import JsonlWriter
from observer.sources import mitmflows
from observer.sources.proxy import addon, jsonl_import
from observer.sources.proxy.flows import METADATA_KEY, http_row
from observer.sources.proxy.records import ConnRecord, header_bytes
from observer.sources.proxy.traffic import Traffic


def test_traffic_bins_split_at_boundaries_and_finished_bins_leave():
    t = Traffic(10.0)
    t.up(100, 1000.0)
    t.down(40, 1009.9)
    t.up(7, 1010.0)
    t.up(3, 1035.5)
    assert (t.bytes_up, t.bytes_down, t.packets_up, t.packets_down) == (110, 40, 3, 1)
    assert t.take_bins(before=1030.0) == [(1000.0, [100, 40, 1, 1]), (1010.0, [7, 0, 1, 0])]
    t.up(1, 1036.0)  # the open bin keeps counting after a take
    assert t.take_bins() == [(1030.0, [4, 0, 2, 0])]
    assert t.take_bins() == []


def test_flow_bins_are_a_separate_ledger():
    t = Traffic(10.0, track_flow_bins=True)
    t.up(5, 1.0)
    assert t.take_flow_bins() == [(0.0, [5, 0, 1, 0])]
    t.down(6, 2.0)
    assert t.take_flow_bins() == [(0.0, [0, 6, 0, 1])]
    assert t.take_bins() == [(0.0, [5, 6, 1, 1])]


def test_http_row_survives_a_non_utf8_host_and_its_parquet_conversion(tmp_path):
    """A Host header with an invalid UTF-8 byte (mitmproxy keeps it as a lone surrogate) is
    decoded at the edge, so the run still converts to Parquet."""
    from observer.records import read_table
    from observer.sources.proxy.store import RecordStore

    f = tflow.tflow(resp=True)
    f.request.headers["Host"] = b"caf\xe9.example".decode("utf-8", "surrogateescape")
    f.request.path = "/p?token=s3cret"
    row = http_row(f, "phone", keep_query=False)
    assert row["host"] == "caf\ufffd.example" and row["path"] == "/p?token=*"
    store = RecordStore(tmp_path, bin_s=10, device_of=lambda ip: "phone", checkpoint_s=60)
    store.start(1000.0, "regular")
    store.write("http", row)
    assert store.stop(1001.0, parquet=True)["http"] == 1
    assert read_table(tmp_path, "http").host.tolist() == ["caf\ufffd.example"]
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o700"


def test_a_run_cut_short_is_closed_at_its_last_record(tmp_path):
    from observer.records import read_table
    from observer.sources.proxy import store as store_module

    w = JsonlWriter(tmp_path / "live", "proxy-cut")
    w.write("sessions", {"session_id": "proxy-cut", "source": "proxy", "ts_start": 100.0})
    w.write("connections", {"conn_id": "c", "device": "d", "ts_start": 101.0, "ts_end": 150.5})
    w.write("http", {"conn_id": "c", "device": "d", "ts_request": 120.0, "ts_response": 160.25})
    w.close()
    assert store_module.convert(tmp_path, "cut")["sessions"] == 1
    (session,) = read_table(tmp_path, "sessions").itertuples()
    assert session.ts_end == 160.25 and "cut short" in session.note


def test_a_failed_conversion_keeps_the_jsonl_and_says_so(tmp_path):
    from observer.sources.proxy import store as store_module

    w = JsonlWriter(tmp_path / "live", "proxy-bad")
    w.write("sessions", {"session_id": "proxy-bad", "source": "proxy", "ts_start": 100.0})
    w.close()
    (tmp_path / "sessions").write_text("a file where the table's directory goes")
    with pytest.raises(ObserverError, match="JSONL records are kept"):
        store_module.convert(tmp_path, "bad")
    assert list((tmp_path / "live").glob("proxy-bad-*.jsonl"))


def test_header_bytes_equal_the_http1_header_block():
    f = tflow.tflow(resp=True)
    f.request.headers["X-Long"] = "v" * 50
    req, resp = f.request, f.response
    assert header_bytes(f"{req.method} {req.path} {req.http_version}", req.headers.fields) == len(
        assemble_request_head(req))
    assert header_bytes(f"{resp.http_version} {resp.status_code} {resp.reason}",
                        resp.headers.fields) == len(assemble_response_head(resp))


def test_jsonl_import_keeps_last_connection_row_and_sums_bins(tmp_path):
    w = JsonlWriter(tmp_path, "proxy-test")
    w.write("connections", {"conn_id": "c1", "device": "d", "bytes_up": 5, "close_reason": "open"})
    w.write("activity", {"conn_id": "c1", "device": "d", "ts_bin": 1_772_409_600.0, "bin_s": 10.0,
                         "bytes_up": 5, "bytes_down": 0})
    w.write("activity", {"conn_id": "c1", "device": "d", "ts_bin": 1_772_409_600.0, "bin_s": 10.0,
                         "bytes_up": 2, "bytes_down": 1})
    w.write("connections",
            {"conn_id": "c1", "device": "d", "bytes_up": 7, "close_reason": "client"})
    w.close()
    (f,) = tmp_path.glob("*.jsonl")
    with f.open("a") as fh:
        fh.write('{"table": "connections", "conn_id": "torn"')
    assert jsonl_import.sniff(f.read_bytes()[:4096], f) and jsonl_import.sniff(b"", tmp_path)
    assert not jsonl_import.sniff(b'{"other": 1}\n', f)
    tables = jsonl_import.read(tmp_path)
    conns = tables["connections"]
    assert list(conns.conn_id) == ["c1"] and conns.bytes_up[0] == 7
    assert conns.close_reason[0] == "client"
    act = tables["activity"]
    assert (act.bytes_up.tolist(), act.bytes_down.tolist()) == ([7], [1])
    assert "skipped 1 torn" in tables["sessions"].note.iloc[-1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ObserverError, match=r"no \*\.jsonl"):
        jsonl_import.read(tmp_path / "empty")


def test_flow_file_importer_uses_metadata_and_survives_a_torn_end(tmp_path):
    f = tflow.tflow(resp=True)
    f.request.path = "/p?secret=1"
    plain = tflow.tflow(resp=True)
    f.metadata[METADATA_KEY] = {
        "conn": {"conn_id": "proxy-x", "device": "phone", "bytes_up": 11, "bytes_down": 22,
                 "tls": "intercepted", "close_reason": "open"},
        "activity": [{"conn_id": "proxy-x", "device": "phone", "ts_bin": 1_772_409_600.0,
                      "bin_s": 10.0, "bytes_up": 11, "bytes_down": 22}],
    }
    path = tmp_path / "flows.mitm"
    with path.open("wb") as fh:
        w = io.FlowWriter(fh)
        w.add(f)
        w.add(plain)
    whole = path.read_bytes()
    path.write_bytes(whole + whole[:40])  # a killed mitmdump's half-written last flow
    assert mitmflows.sniff(whole[:4096], path)
    assert not mitmflows.is_flow_file(b'{"table": "http"}\n')
    assert not mitmflows.sniff(b"\xd4\xc3\xb2\xa1 a pcap", path)
    tables = mitmflows.read(path, None)
    conns = tables["connections"].set_index("conn_id")
    assert conns.loc["proxy-x", "bytes_up"] == 11
    assert conns.loc[f"proxy-{plain.client_conn.id}", "bytes_up"] is not None
    assert sorted(tables["http"].path) == ["/p?secret=*", plain.request.path]
    assert tables["activity"].bytes_down.tolist() == [22]
    assert "torn or corrupt" in tables["sessions"].note[0]
    garbage = tmp_path / "garbage.mitm"
    garbage.write_bytes(b"12:not a flow")
    with pytest.raises(ObserverError, match=r"garbage\.mitm"):
        mitmflows.read(garbage, None)
    garbage.write_bytes(whole[:30])  # a flow file torn inside its first flow
    with pytest.raises(ObserverError, match=r"garbage\.mitm: not a readable"):
        mitmflows.read(garbage, None)


def test_http_row_keeps_no_body_and_counts_streamed_sizes():
    f = tflow.tflow(resp=True)
    f.request.content = b"secret body"
    row = http_row(f, "phone", keep_query=False, streamed=(None, 12345))
    assert row["request_body_bytes"] == len(b"secret body")
    assert row["response_body_bytes"] == 12345
    assert "secret body" not in repr(row)


def test_options_are_validated_with_a_sentence(tmp_path):
    rec = addon.Recorder()
    with taddons.context(rec) as tctx:
        with pytest.raises(exceptions.OptionsError, match="observer_bin_s must be"):
            tctx.configure(rec, observer_bin_s=-5)
        with pytest.raises(exceptions.OptionsError, match="observer_config"):
            tctx.configure(rec, observer_config=str(tmp_path / "missing.yaml"))
        (tmp_path / "lab.yaml").write_text("bin_seconds: 30\nredact_query: false\n")
        tctx.configure(rec, observer_config=str(tmp_path / "lab.yaml"))
        assert rec.bin_s == 30.0 and rec.keep_query
        tctx.configure(rec, observer_bin_s=5)
        assert rec.bin_s == 5.0


def test_hook_failures_are_counted_not_raised(caplog):
    telemetry = addon.Telemetry()
    before = addon.HEALTH.failures
    with caplog.at_level(logging.ERROR):
        telemetry.tcp_message(object())  # no .messages: a bug in the addon's view
    assert addon.HEALTH.failures == before + 1
    assert "tcp_message failed" in caplog.text


def test_pinned_host_is_added_to_ignore_hosts():
    rec = addon.Recorder()
    with taddons.context(rec) as tctx:
        f = tflow.tflow()
        f.client_conn.sni = "chat.example.org"
        f.client_conn.error = "the client does not trust the proxy's certificate"
        data = Namespace(context=Namespace(client=f.client_conn, server=f.server_conn),
                         conn=f.client_conn)
        rec.tls_failed_client(data)
        rec.tls_failed_client(data)
        assert tctx.options.ignore_hosts == [r"^chat\.example\.org:\d+$"]
        tctx.configure(rec, ignore_hosts=[], observer_pinned_passthrough=False)
        rec.tls_failed_client(data)
        assert tctx.options.ignore_hosts == []


def test_misspelled_option_is_warned_about(caplog):
    with taddons.context(addon.Recorder()) as tctx, caplog.at_level(logging.WARNING):
        tctx.options.deferred["observer_bins"] = "5"
        addon.warn_unknown_options()
    assert "observer_bins" in caplog.text and "did you mean observer_bin_s" in caplog.text


def test_proxy_command_line(tmp_path):
    parser = __import__("argparse").ArgumentParser()
    proxy_command.add_arguments(parser)
    args = parser.parse_args(["--mode", "wireguard", "--out", str(tmp_path), "--keep-query",
                              "--", "--set", "confdir=/x"])
    cmd = proxy_command.mitmdump_command(args, "mitmdump")
    assert cmd[:2] == ["mitmdump", "-s"] and Path(cmd[2]).name == "telemetry.py"
    joined = " ".join(cmd)
    assert "--mode wireguard" in joined and f"observer_dir={tmp_path}" in joined
    assert "tcp_timeout=86400" in joined and "observer_keep_query=true" in joined
    assert cmd[-2:] == ["--set", "confdir=/x"]
    assert "flow_detail=0" in joined and "observer_console=true" in joined

    bad = tmp_path / "lab.yaml"
    bad.write_text("bin_seconds: -1\n")
    with pytest.raises(ObserverError, match=r"lab\.yaml:1"):
        proxy_command.run(parser.parse_args(["--config", str(bad), "--dry-run"]))


def test_proxy_warns_loudly_about_all_interfaces_and_passes_proxyauth(capsys):
    parser = __import__("argparse").ArgumentParser()
    proxy_command.add_arguments(parser)
    open_args = parser.parse_args(["--mode", "regular"])
    proxy_command.warn_if_open(open_args)
    assert "WARNING: listening on ALL interfaces WITHOUT authentication" in capsys.readouterr().err
    limited = parser.parse_args(["--listen-host", "127.0.0.1", "--proxyauth", "u:p"])
    proxy_command.warn_if_open(limited)
    assert capsys.readouterr().err == ""
    cmd = proxy_command.mitmdump_command(limited, "mitmdump", "run1")
    assert cmd[cmd.index("--proxyauth") + 1] == "u:p"
    assert "observer_run=run1" in cmd and "observer_parquet=false" in cmd


def test_pinning_after_the_handshake_is_told_from_an_idle_connection():
    def closed(after_s: float, extra_up: int = 0, by: str = "client", used: bool = False,
               requests: int = 0, alert: str | None = None, counted: bool = True) -> str | None:
        traffic = Traffic(10.0)
        traffic.up(600, 100.0)
        traffic.requests = requests
        rec = ConnRecord("c", "d", "tcp", None, None, "regular", 99.0, traffic,
                         ts_tls_setup=100.0, tls="intercepted", used=used, alert=alert,
                         up_at_handshake=600, counter=object() if counted else None)
        traffic.up(extra_up, 100.0 + after_s)
        traffic.closed(by)
        rec.ts_end = 100.0 + after_s
        return addon.pinned_after_handshake(rec, window_s=1.0)

    assert closed(0.01) == "pinned after handshake"
    assert closed(0.01, extra_up=24) == "pinned after handshake"  # a TLS 1.3 close_notify
    assert closed(30.0) is None  # idle, closed later
    assert closed(0.01, extra_up=80) is None  # it sent something
    assert closed(0.01, requests=1) is None  # it made a request (in its handshake's segment)
    assert closed(0.01, used=True) is None  # it sent a TCP message
    assert closed(0.01, counted=False) is None  # bytes and requests unknown: never a guess
    assert closed(0.01, by="server") is None
    assert closed(5.0, alert="bad_certificate") == "client alert after handshake: bad_certificate"


def test_undelivered_bytes_come_off_totals_and_bins_written_or_not():
    t = Traffic(10.0)
    t.down(1000, 5.0)
    assert t.take_bins(before=10.0) == [(0.0, [0, 1000, 0, 1])]  # written
    t.down(300, 12.0)
    t.not_delivered(500)
    assert (t.bytes_down, t.undelivered) == (800, 500)
    assert t.take_bins() == [(10.0, [0, 0, 0, 1]), (0.0, [0, -200, 0, 0])]
