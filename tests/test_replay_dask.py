"""`observer replay --dask`: capture files decoded on a dask.distributed LocalCluster (one task
per file), tracked in file order here, give the records of `--jobs 1`, across rotations."""

from __future__ import annotations

import pandas as pd
import pytest
from test_replay import (
    TABLE_KEYS,
    files_across_boundaries,
    only,
    sorted_table,
    tcp_conv,
    write,
)

from observer.cli import main
from observer.records import read_table
from observer.sources.pipeline import ReplayStats, replay_tables

pytest.importorskip("distributed")

def test_dask_replay_of_a_rotated_capture_gives_the_same_records(tmp_path, capsys):
    from observer.simulate import load_scenario, simulate

    capture = tmp_path / "fleet"
    simulate(load_scenario("fleet").with_days(1), capture, progress=False)
    one, dask = tmp_path / "one", tmp_path / "dask"
    assert main(["replay", str(capture), "-o", str(one), "--jobs", "1", "--no-progress"]) == 0
    assert main(["replay", str(capture), "-o", str(dask), "--dask", "--workers", "2",
                 "--progress"]) == 0
    out = capsys.readouterr()
    assert "24 file(s)" in out.out and "replay" in out.err  # the one bar over all files
    sessions = read_table(one, "sessions")["ts_start"].sort_values()
    conns = sorted_table(one, "connections")
    spanning = conns[(conns["ts_start"] < sessions.iloc[1]) & (conns["ts_end"] > sessions.iloc[2])]
    assert len(sessions) == 24 and len(spanning) > 0  # connections run on across rotations
    for name in TABLE_KEYS:
        a, b = sorted_table(one, name), sorted_table(dask, name)
        assert len(a) > 0
        pd.testing.assert_frame_equal(a, b)


def test_dask_keeps_fragments_across_files_and_errors_per_file(tmp_path, monkeypatch):
    """The cases the worker processes handle (tests/test_replay.py), on Dask: IP fragments
    waiting across a file boundary, a missing file, a truncated one, a file given twice."""
    from observer.sources.workers import DaskDecoders

    fed = []
    real_feed = DaskDecoders.feed

    def feed(self, path, engine, local):
        fed.append(path.name)
        yield from real_feed(self, path, engine, local)

    monkeypatch.setattr(DaskDecoders, "feed", feed)
    paths = files_across_boundaries(tmp_path)
    runs = []
    for options in ({"jobs": 1}, {"jobs": 2, "dask": "local"}):
        stats = ReplayStats()
        runs.append((replay_tables(paths, stats=stats, **options), stats))
    (one, one_stats), (dask, dask_stats) = runs
    assert fed == ["a-0.pcap", "a-1.pcap", "a-2.pcap", "a-3.pcap", "a-2.pcap"]  # on the cluster
    udp = only(dask["connections"], client_port=5001)
    assert (udp.packets_up, udp.bytes_up) == (1, 3000)  # reassembled across the two files
    assert (dask_stats.packets, dask_stats.errors, dask_stats.files) == (
        one_stats.packets, one_stats.errors, 6)
    assert len(dask_stats.errors) == 2
    for name, frame in dask.items():
        pd.testing.assert_frame_equal(frame, one[name])


@pytest.mark.parametrize("options", [["--jobs", "2", "--dask"], ["--workers", "2"],
                                     ["--dask", "tcp://127.0.0.1:9", "--workers", "2"],
                                     ["--dask", "--workers", "0"]])
def test_contradicting_options_are_one_line(tmp_path, capsys, options):
    pcap = tmp_path / "x.pcap"
    pcap.write_bytes(b"")
    assert main(["replay", str(pcap), "-o", str(tmp_path / "rec"), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("observer replay: error:") and "\n" not in err


def test_a_task_reads_by_absolute_path_and_names_the_file_as_given(tmp_path, monkeypatch):
    """A remote worker's directory is not ours: tasks get absolute paths, messages keep the
    user's."""
    from observer.sources.engine import FlowSettings
    from observer.sources.workers import decode_file

    monkeypatch.chdir(tmp_path)
    write(tmp_path / "cut.pcap", tcp_conv(), linktype=101)
    (tmp_path / "cut.pcap").write_bytes((tmp_path / "cut.pcap").read_bytes()[:-5])
    settings = FlowSettings.of(None)
    done = decode_file(str(tmp_path / "cut.pcap"), "cut.pcap", "observer.sources.pcapfile", None,
                       settings)
    assert done.batches and done.end.error.startswith("cut.pcap") and str(tmp_path) not in (
        done.end.error)
    missing = decode_file(str(tmp_path / "gone.pcap"), "gone.pcap", "observer.sources.pcapfile",
                          None, settings)
    assert missing.batches == [] and "gone.pcap" in missing.error
    assert str(tmp_path) not in missing.error
