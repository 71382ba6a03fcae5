"""Record stores: Parquet round trip with partitions, JSONL flushing and torn-line tolerance;
atomic writes, the manifest (idempotent replay, --replace), unreadable parts skipped."""

import errno
import gzip
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from observer import ObserverError
from observer.cli import main
from observer.records import (
    JsonlWriter,
    RecordRun,
    conform,
    device_dir,
    device_name,
    empty,
    partitions,
    read_jsonl,
    read_records,
    read_table,
    records_fingerprint,
    write_table,
)


def connections(n: int = 4) -> pd.DataFrame:
    return conform(
        "connections",
        pd.DataFrame(
            {
                "conn_id": [f"c{i}" for i in range(n)],
                "source": "pcap",
                "device": ["phone", "phone", "tablet", None][:n],
                "proto": "tcp",
                "client_ip": "192.168.50.23",
                "client_port": [40000 + i for i in range(n)],
                "server_ip": "157.240.1.53",
                "server_port": 443,
                "ts_start": [1_700_000_000.5, 1_700_090_000.25, 1_700_000_100.0, 1_700_000_200.0][
                    :n
                ],
                "ts_end": [1_700_000_010.5, 1_700_090_100.0, 1_700_000_200.0, 1_700_000_300.0][:n],
                "bytes_up": [10, 0, 5_000_000_000, 7][:n],
                "bytes_down": [20, 30, 40, None][:n],
                "server_name": ["g.whatsapp.net", None, "<script>x</script>", "a"][:n],
                "tls": "unknown",
            }
        ),
    )


def test_parquet_round_trip_partitions_by_device_and_day(tmp_path):
    df = connections()
    assert write_table(tmp_path, "connections", df) == 4
    table_dir = tmp_path / "connections"
    parts = [p.relative_to(table_dir).as_posix() for p in partitions(tmp_path, "connections")]
    assert parts == [
        "device=phone/day=2023-11-14",
        "device=phone/day=2023-11-15",
        "device=tablet/day=2023-11-14",
        "device=unknown/day=2023-11-14",
    ]
    back = read_table(tmp_path, "connections").sort_values("conn_id").reset_index(drop=True)
    expected = df.assign(device=df["device"].fillna("unknown")).astype({"device": "string"})
    pd.testing.assert_frame_equal(back, expected)
    assert back["bytes_up"].dtype == "Int64" and back["bytes_down"].isna().sum() == 1
    assert read_table(tmp_path, "connections", devices=["tablet"])["conn_id"].tolist() == ["c2"]


def test_parquet_append_and_overwrite(tmp_path):
    write_table(tmp_path, "connections", connections(2))
    write_table(tmp_path, "connections", connections(2).assign(conn_id=["d0", "d1"]))
    assert len(read_table(tmp_path, "connections")) == 4
    write_table(tmp_path, "connections", connections(1), overwrite=True)
    assert len(read_table(tmp_path, "connections")) == 1
    records = read_records(tmp_path)
    assert set(records) >= {"connections", "activity", "dns", "sessions", "http"}
    assert records["dns"].empty and list(records["dns"].columns) == list(empty("dns").columns)


def test_schema_version_mismatch_is_a_clear_error(tmp_path):
    write_table(tmp_path, "connections", connections(1))
    (tmp_path / "meta.json").write_text(json.dumps({"schema_version": 999}))
    with pytest.raises(ObserverError, match="schema version 999"):
        read_table(tmp_path, "connections")


def test_unknown_columns_and_tables_are_refused():
    with pytest.raises(ObserverError, match="not in the schema: bytes_upp"):
        conform("connections", pd.DataFrame({"bytes_upp": [1]}))
    with pytest.raises(ObserverError, match="unknown record table"):
        conform("flows", pd.DataFrame())


def test_jsonl_torn_last_line_is_skipped_and_counted(tmp_path):
    writer = JsonlWriter(tmp_path, "proxy")
    for i in range(3):
        writer.write("activity", {"conn_id": f"c{i}", "device": "phone", "ts_bin": 10.0 * i,
                                  "bin_s": 10.0, "bytes_up": i, "bytes_down": float("nan")})
    writer.close()
    [path] = tmp_path.glob("proxy-*.jsonl")
    with open(path, "a") as fh:
        fh.write('{"table": "activity", "conn_id": "torn", "bytes_')
    result = read_jsonl([path])
    assert result.skipped == 1 and result.skipped_where == [f"{path}:4"]
    activity = result.tables["activity"]
    assert activity["conn_id"].tolist() == ["c0", "c1", "c2"]
    assert activity["bytes_down"].isna().all() and activity["bytes_up"].tolist() == [0, 1, 2]


WRITER_SCRIPT = """
import sys, time
from observer.records import JsonlWriter
w = JsonlWriter(sys.argv[1], "live", flush_s=0.5)
i = 0
while True:
    w.write("activity", {"conn_id": f"c{i}", "ts_bin": float(i), "bytes_up": i})
    print(i, flush=True)
    i += 1
    time.sleep(0.01)
"""


def test_jsonl_killed_writer_loses_at_most_the_last_second(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    written = []
    start = time.monotonic()
    while time.monotonic() - start < 2.0:
        written.append(int(proc.stdout.readline()))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Every record the writer reported at least one second before the kill must be on disk.
    rate = len(written) / 2.0
    result = read_jsonl(sorted(tmp_path.glob("live-*.jsonl")))
    on_disk = len(result.tables["activity"])
    assert on_disk >= len(written) - rate * 1.0
    assert result.tables["activity"]["conn_id"].tolist() == [f"c{i}" for i in range(on_disk)]


# --- manifest, atomic writes, idempotent replay ------------------------------------------------

T0 = 1_700_000_000.0
FLAGS = {"S": 0x02, "SA": 0x12, "A": 0x10, "PA": 0x18, "FA": 0x11}


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack("!10H", header))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def _frame(t: float, src: str, dst: str, sport: int, dport: int, flags: str, payload: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 0x50, FLAGS[flags], 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + payload, 0, 0x4000, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", _ip_checksum(ip)) + ip[12:]
    frame = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + ip + tcp + bytes(payload)
    sec = int(t)
    return struct.pack("<IIII", sec, round((t - sec) * 1e6), len(frame), len(frame)) + frame


def capture_bytes(conns: int = 20, t0: float = T0, spacing: float = 60.0,
                  client: str = "10.0.0.2", upload: int = 300) -> bytes:
    """A classic pcap of ``conns`` whole TCP connections (handshake, an upload, a reply, FIN),
    built byte by byte so that thousands take milliseconds."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    server = "93.184.216.34"
    for i in range(conns):
        t, port = t0 + i * spacing, 20000 + i % 40000
        steps = [(client, "S", 0), (server, "SA", 0), (client, "A", 0), (client, "PA", upload),
                 (server, "PA", 50), (client, "FA", 0), (server, "FA", 0), (client, "A", 0)]
        for k, (src, flags, size) in enumerate(steps):
            dst = server if src == client else client
            sport, dport = (port, 443) if src == client else (443, port)
            out.append(_frame(t + k * 0.01, src, dst, sport, dport, flags, size))
    return b"".join(out)


def replay_cli(*args) -> tuple[int, str, str]:
    """``observer replay ...`` in this process: status, stdout, stderr."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["replay", "--no-progress", *map(str, args)])
    return status, out.getvalue(), err.getvalue()


def rows(records) -> pd.DataFrame:
    conns = read_table(records, "connections")
    return conns.sort_values("conn_id").reset_index(drop=True)


def test_replay_twice_gives_the_same_rows_and_a_copy_is_the_same_file(tmp_path):
    cap = tmp_path / "cap.pcap"
    cap.write_bytes(capture_bytes(30))
    records = tmp_path / "records"
    assert replay_cli(cap, "-o", records)[0] == 0
    first = rows(records)
    assert len(first) == 30
    stamp = records_fingerprint(records)

    status, out, _ = replay_cli(cap, "-o", records)
    assert status == 0 and "cap.pcap: skipped, already in the records" in out
    pd.testing.assert_frame_equal(rows(records), first)
    assert records_fingerprint(records) == stamp

    # The same packets under another name, and gzip-compressed: still the same source.
    copy = tmp_path / "rotated-0001.pcap"
    shutil.copy(cap, copy)
    packed = tmp_path / "other.gz"
    packed.write_bytes(gzip.compress(cap.read_bytes()))
    status, out, _ = replay_cli(copy, packed, "-o", records)
    assert status == 0 and "rotated-0001.pcap: skipped, already in the records" in out
    assert "other.gz: skipped, same content as" in out
    assert len(read_table(records, "connections")) == 30
    assert len(read_table(records, "sessions")) == 1
    manifest = json.loads((records / "manifest.json").read_text())
    [source] = manifest["sources"]
    assert source["packets"] == 30 * 8 and source["size"] == cap.stat().st_size


def test_replace_redoes_a_file_and_keeps_the_others(tmp_path):
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    a.write_bytes(capture_bytes(10))
    b.write_bytes(capture_bytes(5, t0=T0 + 86_400 * 2, client="10.0.0.3"))
    records = tmp_path / "records"
    assert replay_cli(a, "-o", records)[0] == 0
    assert replay_cli(b, "-o", records)[0] == 0
    before = rows(records)
    assert len(before) == 15
    parts_before = {p.name for p in records.rglob("*.parquet")}

    status, out, _ = replay_cli(a, "--replace", "-o", records)
    assert status == 0 and "a.pcap: replacing its earlier rows" in out
    after = rows(records)
    assert len(after) == 15
    pd.testing.assert_frame_equal(after.drop(columns="conn_id"), before.drop(columns="conn_id"))
    parts_after = {p.name for p in records.rglob("*.parquet")}
    # a's old parts are gone from the disk, b's are untouched.
    b_run = [s["run"] for s in json.loads((records / "manifest.json").read_text())["sources"]
             if s["path"].endswith("b.pcap")]
    assert all(b_run[0] in name for name in parts_before & parts_after)
    assert not list(records.rglob("*.tmp"))


def test_grown_capture_replaces_its_earlier_part(tmp_path):
    cap = tmp_path / "live-0001.pcap"
    cap.write_bytes(capture_bytes(3))  # replayed while the capture was still being written
    records = tmp_path / "records"
    assert replay_cli(cap, "-o", records)[0] == 0
    assert len(read_table(records, "connections")) == 3
    cap.write_bytes(capture_bytes(12))  # the same first packets, then more
    status, out, _ = replay_cli(cap, "-o", records)
    assert status == 0 and "held when it was replayed" in out
    assert len(read_table(records, "connections")) == 12
    assert read_table(records, "sessions")["packets_captured"].tolist() == [12 * 8]


def test_failed_write_leaves_the_previous_records(tmp_path, monkeypatch):
    write_table(tmp_path, "connections", connections(4))
    before = read_table(tmp_path, "connections")
    stamp = records_fingerprint(tmp_path)
    calls = {"n": 0}
    real = pq.write_table

    def full_disk(table, where, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            where.write(b"PAR1 torn")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", full_disk)
    for overwrite in (False, True):
        calls["n"] = 0
        with pytest.raises(OSError, match="No space"):
            write_table(tmp_path, "connections", connections(4).assign(conn_id=list("wxyz")),
                        overwrite=overwrite)
        pd.testing.assert_frame_equal(read_table(tmp_path, "connections"), before)
        assert records_fingerprint(tmp_path) == stamp
        assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and ".tmp" in p.name) == []
    assert not [p for p in (tmp_path / "connections").rglob("part-*") if p.stat().st_size == 0]


def test_uncommitted_parts_do_not_count_and_are_swept(tmp_path):
    write_table(tmp_path, "connections", connections(2))
    run = RecordRun(tmp_path)
    run.open()
    run.write("connections", connections(4))  # parts on disk, run not committed (as if killed)
    assert len(read_table(tmp_path, "connections")) == 2
    run._release()  # the kernel drops a killed process's lock
    write_table(tmp_path, "dns", pd.DataFrame({"device": ["phone"], "ts": [T0]}))
    assert not [p for p in tmp_path.rglob("*.parquet") if run.id in p.name]


def test_corrupt_part_and_meta_are_skipped_and_counted(tmp_path, capsys):
    write_table(tmp_path, "connections", connections(2))
    write_table(tmp_path, "connections", connections(3).iloc[2:])
    [bad] = [p for p in (tmp_path / "connections").rglob("*.parquet") if "tablet" in str(p)]
    bad.write_bytes(bad.read_bytes()[:40])
    (tmp_path / "meta.json").write_text('{"schema_vers')
    capsys.readouterr()
    back = read_table(tmp_path, "connections")
    assert sorted(back["conn_id"]) == ["c0", "c1"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 2 unreadable record file(s)" in err[0]
    problems: list[str] = []
    read_records(tmp_path, problems=problems)
    assert len(problems) == 2 and "meta.json" in problems[0] and "tablet" in problems[1]
    status = main(["export", str(tmp_path), "-o", str(tmp_path / "out.csv"), "--format", "csv"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "skipped 2 unreadable" in err and status in (0, 1, 2)


@pytest.mark.parametrize("name, shown", [
    ("fd00:7::23", "device=fd00:7::23"),
    ("aa:bb:cc:00:11:22", "device=aa:bb:cc:00:11:22"),
    ("Pixel 7 (Ana)", "device=Pixel 7 (Ana)"),
    ("a/b", "device=a%2Fb"),
    ("..", "device=%2E."),
    ("50%", "device=50%25"),
    ("tab\there", "device=tab%09here"),
])
def test_device_names_in_directories_are_as_people_write_them(tmp_path, name, shown):
    assert device_dir(name) == shown and device_name(shown) == name
    df = connections(1).assign(device=name)
    write_table(tmp_path, "connections", df)
    assert [p.parent.name for p in partitions(tmp_path, "connections")] == [shown]
    assert read_table(tmp_path, "connections")["device"].tolist() == [name]
    assert read_table(tmp_path, "connections", devices=[name])["device"].tolist() == [name]


def test_long_device_name_fits_a_directory(tmp_path):
    name = "phone-" + "ü" * 200
    write_table(tmp_path, "connections", connections(1).assign(device=name))
    [part] = partitions(tmp_path, "connections")
    assert len(part.parent.name.encode()) <= 255
    assert read_table(tmp_path, "connections")["device"].tolist() == [name]


def test_old_uri_encoded_device_directories_still_read(tmp_path):
    assert device_name("device=fd00%3A7%3A%3A23") == "fd00:7::23"


def test_live_jsonl_directory_replayed_again_after_it_grew(tmp_path):
    live = tmp_path / "live"
    live.mkdir()

    def add(path, first: int, n: int) -> None:
        with open(path, "a") as f:
            for i in range(first, first + n):
                f.write(json.dumps({"table": "connections", "conn_id": f"live-{i}",
                                    "device": "phone", "source": "live", "proto": "tcp",
                                    "ts_start": T0 + i, "ts_end": T0 + i + 1,
                                    "bytes_up": 1000 + i}) + "\n")

    add(live / "live-phone-1.jsonl", 0, 10)
    records = tmp_path / "records"
    assert replay_cli(live, "-o", records)[0] == 0
    assert len(read_table(records, "connections")) == 10
    add(live / "live-phone-1.jsonl", 10, 5)  # the file grew
    add(live / "live-phone-2.jsonl", 15, 5)  # and the writer rotated
    status, out, _ = replay_cli(live, "-o", records)
    assert status == 0 and "held when it was replayed" in out
    assert sorted(read_table(records, "connections")["conn_id"]) == sorted(
        f"live-{i}" for i in range(20))
    status, out, _ = replay_cli(live, "-o", records)
    assert "already in the records" in out and len(read_table(records, "connections")) == 20
    # One of its files alone is already in the records, as part of the directory.
    status, out, _ = replay_cli(live / "live-phone-2.jsonl", "-o", records)
    assert "already in the records" in out and len(read_table(records, "connections")) == 20


def test_rows_already_in_the_records_are_not_added_again(tmp_path):
    """The same connection through two paths (a live capture's JSONL, a replay of its pcap files)
    keeps its id: the second copy is not added, its missing rows are."""
    assert write_table(tmp_path, "connections", connections(3)) == 3
    assert write_table(tmp_path, "connections", connections(4)) == 1  # c3 is new
    assert sorted(read_table(tmp_path, "connections")["conn_id"]) == ["c0", "c1", "c2", "c3"]
    bins = pd.DataFrame({"conn_id": ["c0", "c0", "c1"], "device": "phone",
                         "ts_bin": [T0, T0 + 10, T0], "bin_s": 10.0, "bytes_up": [1, 2, 3]})
    assert write_table(tmp_path, "activity", bins.iloc[:2]) == 2
    assert write_table(tmp_path, "activity", pd.concat([bins, bins])) == 1  # repeats too
    assert len(read_table(tmp_path, "activity")) == 3
    # An overwrite replaces: nothing counts as already there.
    assert write_table(tmp_path, "activity", bins, overwrite=True) == 3
    assert len(read_table(tmp_path, "activity")) == 3


def test_live_jsonl_and_the_pcap_of_the_same_packets_count_once(tmp_path):
    """A live capture writes JSONL rows and rotating pcap files of the same packets; replaying
    both into one directory keeps each connection once, and adds what the JSONL lacked."""
    from observer.sources import replay_tables

    cap = tmp_path / "phone-20231114T221320Z-0001.pcap"
    cap.write_bytes(capture_bytes(12))
    tables = replay_tables([cap])
    live = tmp_path / "live"
    writer = JsonlWriter(live, "live-phone")
    seen = {"connections": tables["connections"].iloc[:8].assign(source="live"),  # killed early
            "activity": tables["activity"].iloc[:8]}
    for table, frame in seen.items():
        for row in frame.astype(object).where(frame.notna(), None).to_dict("records"):
            writer.write(table, row)
    writer.close()
    records = tmp_path / "records"
    assert replay_cli(live, "-o", records)[0] == 0
    assert len(read_table(records, "connections")) == 8
    status, out, _ = replay_cli(cap, "-o", records)
    assert status == 0 and "not added again" in out and "connections 8" in out
    conns = read_table(records, "connections")
    assert len(conns) == 12 and sorted(conns["conn_id"]) == sorted(tables["connections"]["conn_id"])
    assert (conns["source"] == "live").sum() == 8
    assert len(read_table(records, "activity")) == len(tables["activity"])


def test_text_that_is_not_utf8_is_written_not_fatal(tmp_path):
    """A lone surrogate (an invalid byte under surrogateescape) that got past its source is
    replaced by U+FFFD when conformed, so the Parquet write cannot fail on it."""
    frame = connections(2).astype({"server_name": object})
    frame.loc[0, "server_name"] = "bad\udc80host.example"
    assert write_table(tmp_path, "connections", frame) == 2
    names = sorted(read_table(tmp_path, "connections")["server_name"].dropna())
    assert names == ["bad\ufffdhost.example"]


@pytest.mark.parametrize("damage", ['{"runs": [', '{"runs": {}, "legacy": [], "sources": [{}]}'])
def test_damaged_manifest_is_read_with_a_warning_and_refused_for_writing(tmp_path, damage, capsys):
    cap = tmp_path / "cap.pcap"
    cap.write_bytes(capture_bytes(5))
    records = tmp_path / "records"
    assert replay_cli(cap, "-o", records)[0] == 0
    (records / "manifest.json").write_text(damage)
    capsys.readouterr()
    assert len(read_table(records, "connections")) == 5
    assert "rows may repeat" in capsys.readouterr().err
    status, _, err = replay_cli(cap, "-o", records)
    assert status == 2 and "cannot tell which files the records hold" in err
    assert len(err.strip().splitlines()) == 1


def test_every_file_is_written_temp_fsync_rename(tmp_path, monkeypatch):
    """Each part, meta.json and manifest.json: written under a temporary name, fsynced, then
    renamed into place (and its directory fsynced), never written in place."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", f"{src} -> {dst}"))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_table(tmp_path, "connections", connections(4))
    renames = [e[1] for e in events if e[0] == "rename"]
    finals = [Path(r.split(" -> ")[1]).name for r in renames]
    assert finals[0] == "meta.json" and finals[-1] == "manifest.json"  # the commit comes last
    assert sum(name.endswith(".parquet") for name in finals) == 4 and len(finals) == 4 + 2
    for i, (kind, what) in enumerate(events):
        if kind == "rename":
            src, dst = what.split(" -> ")
            assert Path(src).name.startswith(".") and src.endswith(".tmp")
            assert ("fsync", src) in events[:i]  # the data is on disk before the name is
            assert ("fsync", str(Path(dst).parent)) in events[i + 1:]  # and then the name
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")) == []
