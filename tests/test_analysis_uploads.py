"""Bulk upload events and endpoint groups from small synthetic record tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_analysis_synth import Records

from observer.analysis.groups import base_domain, endpoint_groups
from observer.analysis.uploads import blocks, bulk_events
from observer.catalog import Catalog
from observer.config import Thresholds
from observer.records import conform

T0 = 1_772_400_000.0


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog()


def events_of(r: Records, catalog: Catalog, **thresholds) -> pd.DataFrame:
    t = r.tables()
    groups = endpoint_groups(t["connections"], catalog)
    blk = blocks(t["activity"], t["connections"], r.bin_s)
    ev = bulk_events(blk, groups, Thresholds(**thresholds))
    return ev.merge(groups.drop_duplicates("key")[["key", "group"]], on="key")


def chat_with_keepalives(r: Records, hours: float = 24) -> str:
    chat = r.connection("chat", "g.whatsapp.net", "157.240.1.53", T0, T0 + hours * 3600)
    r.ticks(chat, np.arange(T0, T0 + hours * 3600, 240.0))
    return chat


def test_upload_inside_a_long_lived_connection_is_one_event(catalog):
    r = Records()
    chat = chat_with_keepalives(r)
    r.send(chat, T0 + 5 * 3600 + 3, 30_000_000, rate=1e6, down=10_000)
    ev = events_of(r, catalog)
    assert len(ev) == 1
    e = ev.iloc[0]
    assert e["group"] == "WhatsApp" and e["conn_ids"] == ["chat"]
    assert e["bytes_up"] >= 30_000_000  # the hot bins, keepalives inside them included
    assert e["ts_start"] == pytest.approx(T0 + 5 * 3600, abs=10)
    assert e["ts_end"] - e["ts_start"] == pytest.approx(30, abs=11)
    assert not e["from_totals"]


def test_runs_merge_across_short_gaps_but_not_long_ones(catalog):
    r = Records()
    chat = chat_with_keepalives(r)
    r.send(chat, T0 + 3600, 3_000_000)
    r.send(chat, T0 + 3600 + 60, 3_000_000)  # 60 s later: same event
    r.send(chat, T0 + 3 * 3600, 3_000_000)  # two hours later: another
    ev = events_of(r, catalog, merge_gap_s=120)
    assert len(ev) == 2
    assert ev["bytes_up"].iloc[0] >= 6_000_000


def test_parallel_connections_to_one_group_merge(catalog):
    r = Records()
    chat_with_keepalives(r)
    for i in range(3):
        c = r.connection(f"up{i}", f"up{i}.example-sync.net", "203.0.113.9", T0 + 7200,
                         T0 + 7300)
        r.send(c, T0 + 7200 + 5 * i, 2_000_000)
    ev = events_of(r, catalog)
    assert len(ev) == 1
    assert ev.iloc[0]["group"] == "example-sync.net"
    assert ev.iloc[0]["conn_ids"] == ["up0", "up1", "up2"]


def test_small_uploads_and_downloads_and_calls_are_not_events(catalog):
    r = Records()
    chat = chat_with_keepalives(r)
    r.send(chat, T0 + 3600, 400_000)  # hot but below the 1 MB floor
    cdn = r.connection("cdn", "mmg.whatsapp.net", "157.240.9.9", T0 + 7200, T0 + 7300)
    r.send(cdn, T0 + 7200, 5_000, down=20_000_000)  # a download
    call = r.connection("call", "g.whatsapp.net", "157.240.1.53", T0 + 9000, T0 + 9600)
    r.send(call, T0 + 9000, 20_000_000, rate=40_000, down=20_000_000)  # a video call: up ~ down
    assert events_of(r, catalog).empty


def test_floor_relative_to_the_device_baseline(catalog):
    r = Records()
    chat = chat_with_keepalives(r)
    busy = r.connection("busy", "stream.example.org", "198.51.100.1", T0, T0 + 86400)
    # A device that always sends 200 kB per bin: 2 MB spread thinly is not unusual for it.
    r._add(busy, T0 + np.arange(0, 86400, 10.0), np.full(8640, 200_000), np.full(8640, 1_000))
    r.send(chat, T0 + 3600, 2_000_000, rate=150_000)
    ev = events_of(r, catalog)
    assert "WhatsApp" not in set(ev["group"])


def test_connection_without_activity_rows_is_one_block(catalog):
    r = Records()
    chat_with_keepalives(r)
    r.connection("zeek1", "sync.example-analytics.net", "203.0.113.7", T0 + 7200, T0 + 7260,
                 binned=False, up=40_000_000, down=9_000)
    r.connection("zeek2", "g.whatsapp.net", "157.240.1.53", T0, T0 + 86400, binned=False,
                 up=4_000_000, down=9_000_000)  # a day-long chat: thin, and more down than up
    ev = events_of(r, catalog)
    assert list(ev["conn_ids"]) == [["zeek1"]]
    e = ev.iloc[0]
    assert e["from_totals"] and e["ts_start"] == T0 + 7200 and e["ts_end"] == T0 + 7260


def test_groups_by_service_name_and_address_block(catalog):
    conns = conform("connections", pd.DataFrame({
        "conn_id": ["a", "b", "c", "d", "e", "f"],
        "device": "phone",
        "server_name": ["g.whatsapp.net", "backup.googleapis.com", "up1.tracker.co.uk",
                        "up2.tracker.co.uk", None, None],
        "server_ip": ["157.240.1.1", "142.250.1.1", "203.0.113.1", "203.0.113.2",
                      "157.240.3.3", "2001:db8:1:2::7"],
        "app": [None, None, None, None, None, "com.example.app"],
    }))
    g = endpoint_groups(conns, catalog).set_index(["conn_id", "group_kind"])
    assert g.loc[("a", "service"), "group"] == "WhatsApp"
    assert g.loc[("b", "service"), "is_backup"]
    assert g.loc[("c", "name"), "group"] == g.loc[("d", "name"), "group"] == "tracker.co.uk"
    assert g.loc[("e", "service"), "group"] == "Meta network"  # catalogued address block
    assert g.loc[("f", "network"), "group"] == "2001:db8:1::/48"
    assert g.loc[("f", "app"), "group"] == "com.example.app"
    assert base_domain("a.b.example.com") == "example.com"


def test_coverage_from_sessions_and_silence(catalog):
    from observer.analysis.coverage import device_coverage

    r = Records()
    chat = r.connection("chat", "g.whatsapp.net", "157.240.1.53", T0, T0 + 86400)
    # Keepalives all day except a 10-hour hole with no packet at all (a capture gap).
    ticks = np.arange(T0, T0 + 86400, 240.0)
    r.ticks(chat, ticks[(ticks < T0 + 3600) | (ticks >= T0 + 11 * 3600)])
    t = r.tables()
    blk = blocks(t["activity"], t["connections"], r.bin_s)
    cov, silent = device_coverage(t["sessions"], blk, "phone")
    assert len(silent) == 1 and silent[0][1] - silent[0][0] == pytest.approx(10 * 3600, abs=300)
    assert cov.total_s == pytest.approx(86400 - 10 * 3600, abs=600)
    # With a session row, coverage stops where the session stops.
    r.session(T0, T0 + 3600)
    cov, _ = device_coverage(r.tables()["sessions"], blk, "phone")
    assert cov.intervals == ((T0, T0 + 3600),)
    # Silence means a capture gap only in a packet source: an import's session is covered whole.
    sessions = r.tables()["sessions"].assign(source="import", ts_end=T0 + 86400)
    cov, silent = device_coverage(sessions, blk, "phone")
    assert silent == [] and cov.intervals == ((T0, T0 + 86400),)
