"""Record stores: Parquet round trip with partitions, JSONL flushing and torn-line tolerance."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from observer import ObserverError
from observer.records import (
    JsonlWriter,
    conform,
    empty,
    partitions,
    read_jsonl,
    read_records,
    read_table,
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
    write_table(tmp_path, "connections", connections(2))
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
