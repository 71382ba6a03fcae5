"""Fault injection: a full disk (a tiny tmpfs), a read-only directory, and kill -9 at fixed points
of a replay.  Whatever happens, the records that were there stay readable and complete, the command
says so in one line with a non-zero status, and running it again gives what one clean run gives.

Mounting needs root (CAP_SYS_ADMIN); without it these tests are skipped with the reason.  The live
capture test uses the network-namespace lab of tests/test_capture.py (skipped where netns is not).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_capture import lab, new_flow_trickle  # noqa: F401 - the network-namespace lab fixture
from test_records import T0, capture_bytes, replay_cli

from observer.cli import main
from observer.records import read_table, records_fingerprint

ROOT = Path(__file__).resolve().parents[1]
_mounts = itertools.count()


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)`` mounts a tmpfs of that size (e.g. "512k") and returns its path; all are
    unmounted at the end."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"mnt{next(_mounts)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                               str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)], check=False)
        if os.path.ismount(where):
            subprocess.run(["umount", "-l", str(where)], check=False)


def read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)


def observer(*args) -> SimpleNamespace:
    """``observer ARGS`` through the command line entry point: status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in args])
    return SimpleNamespace(returncode=status, stdout=out.getvalue(), stderr=err.getvalue())


def one_error_line(done: SimpleNamespace, *words: str) -> str:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def conns(records: Path) -> pd.DataFrame:
    """Connections without their run-unique ids, in a fixed order: equal for equal packets."""
    frame = read_table(records, "connections").drop(columns="conn_id")
    return frame.sort_values(["device", "ts_start", "client_port"]).reset_index(drop=True)


def every_part_readable(records: Path) -> int:
    parts = list(records.rglob("*.parquet"))
    for part in parts:
        pq.ParquetFile(part).read()
    return len(parts)


@pytest.fixture(scope="module")
def captures(tmp_path_factory) -> dict[str, Path]:
    """Three small captures; ``c`` spans 30 days, so its replay writes dozens of parts."""
    where = tmp_path_factory.mktemp("captures")
    files = {"a": capture_bytes(20), "b": capture_bytes(10, t0=T0 + 86_400, client="10.0.0.3"),
             "c": capture_bytes(600, t0=T0 + 3 * 86_400, spacing=4320.0)}
    out = {}
    for name, data in files.items():
        out[name] = where / f"{name}.pcap"
        out[name].write_bytes(data)
    return out


def test_disk_full_during_replay_keeps_the_records(tmpfs, captures):
    disk = tmpfs("256k")
    records = disk / "records"
    assert replay_cli(captures["a"], "-o", records)[0] == 0
    before, stamp = conns(records), records_fingerprint(records)
    for extra in ([], ["--overwrite"]):
        done = observer("replay", captures["c"], "-o", records, "--no-progress", *extra)
        one_error_line(done, "No space left on device", "records there are as they were")
        pd.testing.assert_frame_equal(conns(records), before)
        assert records_fingerprint(records) == stamp
        every_part_readable(records)
        assert not list(records.rglob("*.tmp"))  # the failed run cleaned up after itself
    # With room again, the same command completes and holds what one clean replay holds.
    roomy = tmpfs("8m")
    shutil.copytree(records, roomy / "records")
    assert replay_cli(captures["c"], "-o", roomy / "records")[0] == 0
    assert len(conns(roomy / "records")) == 20 + 600


def test_disk_full_during_simulate_leaves_no_partial_capture(tmpfs):
    disk = tmpfs("1m")
    done = observer("simulate", "--days", "1", "-o", disk / "week.pcap", "--no-progress")
    one_error_line(done, "No space left on device")
    assert list(disk.iterdir()) == []


def test_read_only_directory(tmpfs, captures):
    disk = tmpfs("2m")
    records = disk / "records"
    assert replay_cli(captures["a"], "-o", records)[0] == 0
    before = conns(records)
    read_only(disk)
    one_error_line(observer("replay", captures["b"], "-o", records, "--no-progress"),
                   "Read-only file system")
    one_error_line(observer("replay", captures["b"], "-o", disk / "new", "--no-progress"),
                   "Read-only file system")
    one_error_line(observer("simulate", "--days", "1", "-o", disk / "x.pcap", "--no-progress"),
                   "Read-only file system")
    pd.testing.assert_frame_equal(conns(records), before)
    # Already-replayed input is recognised without writing anything.
    done = observer("replay", captures["a"], "-o", records, "--no-progress")
    assert done.returncode == 0 and "already in the records" in done.stdout


# kill -9 at fixed points: a wrapper patches one step to SIGKILL its own process right there.
KILLER = """
import os, signal, sys
import observer.records.manifest as M
import observer.records.parquet as P

point, n = os.environ["KILL_AT"].split(":")
n, seen = int(n), [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def nth():
    seen[0] += 1
    return seen[0] == n

if point == "part":  # right after the n-th part file is complete
    write_part = P.RecordRun._write_part
    def patched(self, directory, table):
        write_part(self, directory, table)
        if nth():
            die()
    P.RecordRun._write_part = patched
elif point == "torn":  # half-way through writing the n-th part file
    write_table = P.pq.write_table
    def patched(table, where, **kw):
        if nth():
            where.write(b"PAR1" + bytes(100))
            where.flush()
            die()
        write_table(table, where, **kw)
    P.pq.write_table = patched
elif point == "manifest":  # the new manifest is written but not yet renamed into place
    replace = os.replace
    def patched(src, dst):
        if str(dst).endswith("manifest.json"):
            die()
        replace(src, dst)
    M.os.replace = patched
elif point == "sweep":  # committed, but the replaced parts are not deleted yet
    P.sweep = lambda *args: die()

from observer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def replayed(captures, tmp_path_factory) -> dict[str, Path]:
    """Records of a and b (the state before the killed run), and of a, b and c replayed cleanly."""
    where = tmp_path_factory.mktemp("replayed")
    for name in ("a", "b", "c"):
        if name != "c":
            assert replay_cli(captures[name], "-o", where / "before")[0] == 0
        assert replay_cli(captures[name], "-o", where / "clean")[0] == 0
    return {"before": where / "before", "clean": where / "clean"}


@pytest.mark.parametrize("point, committed, how", [
    ("part:1", False, "--replace"), ("part:25", False, "--replace"),
    ("torn:1", False, "--replace"), ("torn:40", False, "--replace"),
    ("manifest:1", False, "--replace"), ("sweep:1", True, "--replace"),
    ("part:10", False, "--overwrite"),
])
def test_kill_9_during_replay(tmp_path, captures, replayed, point, committed, how):
    records = tmp_path / "records"
    shutil.copytree(replayed["before"], records)
    before, stamp = conns(records), records_fingerprint(records)
    command = ["replay", captures["c"], captures["a"], how, "-o", records, "--no-progress"]
    done = subprocess.run([sys.executable, "-c", KILLER, *map(str, command)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KILL_AT": point})
    assert done.returncode == -9, done.stderr

    every_part_readable(records)  # whatever is on disk is whole
    after = conns(records)
    if committed:
        assert len(after) == 20 + 10 + 600
    else:
        pd.testing.assert_frame_equal(after, before)
        assert records_fingerprint(records) == stamp

    # Run again: the result is what one clean run gives, and nothing of the killed run is left.
    assert replay_cli(*command[1:])[0] == 0
    if how == "--overwrite":  # b is gone: only what this command replays
        assert len(conns(records)) == 600 + 20
    else:
        pd.testing.assert_frame_equal(conns(records), conns(replayed["clean"]))
    runs = set(json.loads((records / "manifest.json").read_text())["runs"])
    leftovers = [p for p in records.rglob("*") if p.is_file() and p.suffix in (".parquet", ".tmp")
                 and not any(run in p.name for run in runs)]
    assert leftovers == []


def test_unreadable_part_and_meta_in_analyze_report_export(tmp_path, captures, replayed, capsys):
    records = tmp_path / "records"
    shutil.copytree(replayed["clean"], records)
    [part, *_] = sorted((records / "connections").rglob("*.parquet"))
    part.write_bytes(part.read_bytes()[:-200])  # a torn copy: footer gone
    (records / "meta.json").write_bytes(b"\xff\xfe not json")
    for args in (["analyze", records], ["report", records, "-o", tmp_path / "report"],
                 ["export", records, "--format", "csv", "-o", tmp_path / "conns.csv"]):
        capsys.readouterr()
        main([str(a) for a in args])
        err = capsys.readouterr().err
        warnings = [line for line in err.splitlines() if "unreadable record file" in line]
        assert len(warnings) == 1 and "skipped 2 unreadable record file(s)" in warnings[0], err


def test_kill_9_of_a_live_capture_then_both_of_its_outputs_replayed(lab, tmp_path):  # noqa: F811
    """``kill -9`` of ``observer capture --records``: its JSONL and its ring files, replayed into
    one directory, give every flow older than a second, each once, and every part reads whole."""
    import signal
    import time

    live = lab.tmp / "live"
    config = lab.tmp / "fine.yaml"  # 1 s bins: complete bins reach the JSONL before the kill
    config.write_text(lab.config.read_text() + "bin_seconds: 1\n")
    proc, _log = lab.start_capture("--records", str(live), "--config", str(config))
    sent: list[tuple[int, float]] = []

    def trickle() -> None:
        """3 s of new flows, and on until the live JSONL holds complete bins (a loaded machine
        starts the capture late), so the kill finds something in both outputs."""
        new_flow_trickle(3.0, sent)
        deadline = time.time() + 20
        while time.time() < deadline and not any(
                '"activity"' in path.read_text() for path in live.glob("*.jsonl")):
            new_flow_trickle(0.5, sent)

    try:
        lab.run_in(lab.phone_ns, trickle)
    finally:
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    records = tmp_path / "records"
    ring = lab.tmp / "captures" / "phone"
    first = observer("replay", live, "-o", records, "--config", config)
    assert first.returncode == 0 and len(read_table(records, "activity")) > 0, first.stdout
    done = observer("replay", ring, "-o", records, "--config", config)
    assert done.returncode == 0, done.stderr
    assert "not added again" in done.stdout and "activity" in done.stdout.splitlines()[-1]
    every_part_readable(records)
    conns = read_table(records, "connections")
    flows = conns[conns["server_port"] == 6000]
    ports = flows["client_port"].astype(int).tolist()
    assert len(ports) == len(set(ports)), "a flow was counted twice"
    old_enough = {port for port, at in sent if at < killed_at - 1.0}
    assert len(old_enough) >= 20 and old_enough <= set(ports)
    activity = read_table(records, "activity")
    assert not activity.duplicated(["conn_id", "ts_bin"]).any()
    again = observer("replay", ring, "-o", records, "--config", config)
    assert "already in the records" in again.stdout


def fill(disk: Path) -> None:
    """Use up what is left of a file system."""
    with open(disk / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(1 << 16))


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_analyze_report_export_on_a_full_or_read_only_disk(tmpfs, captures, fault):
    disk = tmpfs("2m")
    records = disk / "records"
    assert replay_cli(captures["a"], captures["b"], "-o", records)[0] == 0
    before = conns(records)
    fill(disk) if fault == "full" else read_only(disk)
    reason = "No space left on device" if fault == "full" else "Read-only file system"
    one_error_line(observer("analyze", records), reason)
    one_error_line(observer("report", records, "-o", disk / "report"), reason)
    for form, name in (("csv", "c.csv"), ("zeek", "conn.log")):
        one_error_line(observer("export", records, "--format", form, "-o", disk / name), reason)
    pd.testing.assert_frame_equal(conns(records), before)
    assert not [p for p in disk.rglob("*") if p.name.endswith((".tmp", ".partial"))]


def test_live_jsonl_on_a_full_disk_keeps_what_was_written_and_says_so(tmpfs):
    """The proxy's and live capture's JSONL writer queues rows and writes them at each flush: on
    a full disk the rows already flushed stay readable, the failed batch is counted as lost, the
    error reaches the caller of ``flush`` and the proxy's next tick, and writing goes on once
    there is space again."""
    from observer.records import JsonlWriter, read_jsonl
    from observer.sources.proxy.store import RecordStore

    disk = tmpfs("256k")
    store = RecordStore(disk / "proxy", bin_s=10, device_of=lambda ip: "phone", checkpoint_s=60)
    store.start(T0, "regular")
    writer = store.writer
    assert isinstance(writer, JsonlWriter)
    row = {"conn_id": "proxy-1", "device": "phone", "ts_request": T0, "method": "GET",
           "scheme": "https", "host": "example.org", "path": "/" + "p" * 200}
    for _ in range(50):
        store.write("http", dict(row))
    writer.flush()
    fill(disk)
    for _ in range(2000):
        store.write("http", dict(row))
    with pytest.raises(OSError):
        writer.flush()
    assert writer.lost == 2000 and writer.error is not None
    with pytest.raises(OSError, match="records not written"):
        store.tick(T0 + 1)
    assert writer.error is None  # reported once
    (disk / "filler").unlink()
    store.write("http", dict(row, path="/after"))
    store.stop(T0 + 2, parquet=False)
    read = read_jsonl(sorted((disk / "proxy" / "live").glob("*.jsonl")))
    paths = read.tables["http"]["path"].tolist()
    assert paths.count(row["path"]) >= 50 and paths[-1] == "/after"
    assert read.skipped <= 1  # at most the line the full disk cut
