"""Every public capture (tcpdump's test suite, Zeek's TLS traces) replays without a traceback:
records, counted skips, or one error line naming the file and offset."""

from __future__ import annotations

from pathlib import Path

import pytest

from observer.records import read_table
from observer.sources import replay

CAPTURES = Path(__file__).parents[2] / "shared" / "captures"


@pytest.mark.skipif(not (CAPTURES / "tcpdump-tests").is_dir(), reason="public captures absent")
def test_every_public_capture_replays_without_a_traceback(tmp_path):
    files = sorted(p for folder in ("tcpdump-tests", "zeek-tls")
                   for p in (CAPTURES / folder).iterdir() if p.name.endswith((".pcap", ".pcapng",
                                                                            ".gz")))
    assert len(files) > 850
    stats = replay(files, tmp_path / "records", progress=False)
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
