"""Every public capture (tcpdump's test suite, Zeek's TLS traces) replays without a traceback:
records, counted skips, or one error line naming the file and offset."""

from __future__ import annotations

from pathlib import Path

import pytest

from observer.config import LabConfig, TimeWindow
from observer.records import read_table
from observer.sources import replay
from observer.sources.pipeline import ReplayStats, replay_tables

CAPTURES = Path(__file__).parents[2] / "shared" / "captures"


@pytest.mark.skipif(not (CAPTURES / "tcpdump-tests").is_dir(), reason="public captures absent")
def test_every_public_capture_replays_without_a_traceback(tmp_path):
    files = sorted(p for folder in ("tcpdump-tests", "zeek-tls")
                   for p in (CAPTURES / folder).iterdir() if p.name.endswith((".pcap", ".pcapng",
                                                                            ".gz")))
    assert len(files) > 850
    # tcpdump's suite holds captures from the 1990s and some timed at 0: widen the time window
    historic = LabConfig(time_window=TimeWindow(earliest=0.0))
    stats = replay(files, tmp_path / "records", config=historic, progress=False)
    sessions = read_table(tmp_path / "records", "sessions")
    assert sorted(sessions["interface"]) == sorted(p.name for p in files)
    by_file = {p.name: p for p in files}
    for error in stats.errors:
        assert "\n" not in error and len(error) < 300
        name = error.split(": ", 1)[0]
        assert Path(name).name in by_file, error
    errors = {Path(e.split(": ", 1)[0]).name: e for e in stats.errors}
    assert "unsupported link type 160" in errors["unsupported-link-type-160.pcap"]
    captured = sessions.set_index("interface")["packets_captured"]
    assert captured["tls-fragmented-handshake.pcap.gz"] > 0  # gzip read by content
    assert stats.connections > 500 and stats.packets > 10_000
    assert stats.skipped["malformed IP header"] > 0 and stats.skipped["not IP"] > 0
    assert len(read_table(tmp_path / "records", "connections")) == stats.connections


@pytest.mark.skipif(not (CAPTURES / "tcpdump-tests").is_dir(), reason="public captures absent")
def test_the_default_time_window_skips_and_counts_absurd_times():
    """Packets timed at 0 (1970) are counted as skipped, not turned into records."""
    path = CAPTURES / "tcpdump-tests" / "unsupported-link-type-160.pcap"
    stats = ReplayStats()
    tables = replay_tables([path], stats=stats)
    assert stats.skipped["timestamp outside the time window"] == stats.packets > 0
    assert tables["connections"].empty
    widened = ReplayStats()
    replay_tables([path], config=LabConfig(time_window=TimeWindow(earliest=0.0)), stats=widened)
    assert not widened.skipped["timestamp outside the time window"]
    assert "unsupported link type 160" in widened.errors[0]
