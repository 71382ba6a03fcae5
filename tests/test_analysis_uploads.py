"""Bulk upload events and endpoint groups from small synthetic record tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_analysis_synth import Records

from observer.analysis.groups import endpoint_groups, group_of, registrable_domain
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


def busy_device(rate: float) -> Records:
    r = Records()
    chat = chat_with_keepalives(r)
    busy = r.connection("busy", "stream.example.org", "198.51.100.1", T0, T0 + 86400)
    # A device that always sends 200 kB per bin (20 kB/s): its baseline is high.
    r._add(busy, T0 + np.arange(0, 86400, 10.0), np.full(8640, 200_000), np.full(8640, 1_000))
    r.send(chat, T0 + 3600, 2_000_000, rate=rate)
    return r


def test_floor_relative_to_the_device_baseline(catalog):
    # 2 MB at 60 kB/s is 3x this device's usual rate and below the absolute floor: not bulk.
    assert "WhatsApp" not in set(events_of(busy_device(60_000), catalog)["group"])
    # The same 2 MB from a device that usually sends only keepalives is a bulk upload.
    quiet = Records()
    quiet.send(chat_with_keepalives(quiet), T0 + 3600, 2_000_000, rate=60_000)
    assert list(events_of(quiet, catalog)["group"]) == ["WhatsApp"]


def test_absolute_floor_beside_the_relative_one(catalog):
    # 150 kB/s is under 10x this busy device's baseline, but above the absolute floor (100 kB/s).
    r = busy_device(150_000)
    assert list(events_of(r, catalog)["group"]) == ["WhatsApp"]
    assert events_of(r, catalog, absolute_rate_bytes_per_s=1e12)["group"].tolist() == []


def test_absolute_floor_finds_uploads_of_a_nearly_silent_device(catalog):
    # A device that sends nothing but a few keepalives and a 3 MB upload every 6 hours: its
    # sending bins are mostly upload bins, so its median rate is the upload rate.
    r = Records()
    sync = r.connection("sync", "api.sync-partner.com", "198.51.100.9", T0, T0 + 86400)
    r.ticks(sync, T0 + np.array([30.0, 43_000.0, 86_000.0]))
    for k in range(4):
        r.send(sync, T0 + 2700 + k * 21_600, 3_000_000, rate=200_000, down=10_000)
    blk = blocks(r.tables()["activity"], r.tables()["connections"], r.bin_s)
    base = (blk.loc[blk["up"] > 0, "up"] / blk.loc[blk["up"] > 0, "dur"]).median()
    assert base > 100_000  # the relative rule alone (10x) would need > 1 MB/s
    assert events_of(r, catalog, absolute_rate_bytes_per_s=1e12).empty
    ev = events_of(r, catalog)
    assert len(ev) == 4 and set(ev["group"]) == {"sync-partner.com"}
    assert (ev["bytes_up"] == 3_000_000).all()


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
    assert g.loc[("f", "network"), "label"] == "unnamed addresses in 2001:db8:1::/48"


def test_names_group_by_registrable_domain_from_the_public_suffix_list(catalog):
    assert registrable_domain("a.b.example.com") == "example.com"
    assert registrable_domain("A.Example.CO.UK.") == "example.co.uk"
    assert registrable_domain("x.example.com.au") == "example.com.au"  # not in the old table
    assert registrable_domain("b.example.pvt.k12.ma.us") == "example.pvt.k12.ma.us"
    assert registrable_domain("foo.github.io") != registrable_domain("bar.github.io")
    assert registrable_domain("localhost") == "localhost"
    conns = conform("connections", pd.DataFrame({
        "conn_id": ["a", "b", "c"], "device": "phone",
        "server_name": ["a.example.co.uk", "b.example.co.uk", "c.other.co.uk"],
        "server_ip": ["203.0.113.1", "198.51.100.2", "203.0.113.1"],
    }))
    g = endpoint_groups(conns, catalog).set_index("conn_id")
    assert g.loc["a", "group"] == g.loc["b", "group"] == g.loc["a", "label"] == "example.co.uk"
    assert g.loc["c", "group"] == "other.co.uk"


def test_unnamed_addresses_group_by_network_labelled_as_such(catalog):
    conns = conform("connections", pd.DataFrame({
        "conn_id": ["a", "b", "c", "d", "e", "f"], "device": "phone",
        # An address given as a name (an HTTP Host of 10.0.3.4) is an address, not a domain.
        "server_name": [None, "10.0.3.9", None, "127.0.0.1", "[2001:db8:5:6::1]", None],
        "server_ip": ["10.0.3.4", "10.0.3.9", "10.0.4.4", "127.0.0.1", "2001:db8:5:6::1",
                      "2001:db8:5:7::2"],
    }))
    g = endpoint_groups(conns, catalog).set_index("conn_id")
    assert set(g["group_kind"]) == {"network"}
    assert g.loc["a", "key"] == g.loc["b", "key"]
    assert g.loc["a", "group"] == "10.0.3.0/24"
    assert g.loc["a", "label"] == "unnamed addresses in 10.0.3.0/24"
    assert g.loc["c", "group"] == "10.0.4.0/24"
    assert g.loc["d", "group"] == "127.0.0.0/24"  # not the fake domain "0.1"
    assert g.loc["e", "key"] == g.loc["f", "key"] and g.loc["e", "group"] == "2001:db8:5::/48"
    # A configured prefix: one /16 for IPv4, /64 for IPv6.
    wide = endpoint_groups(conns, catalog, (16, 64)).set_index("conn_id")
    assert wide.loc["a", "key"] == wide.loc["c", "key"]
    assert wide.loc["a", "label"] == "unnamed addresses in 10.0.0.0/16"
    assert wide.loc["e", "group"] != wide.loc["f", "group"]
    assert group_of("10.0.3.4", None, catalog).label == "unnamed addresses in 10.0.3.0/24"


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


# -- on a real capture file (written with scapy, replayed like any pcap) -----------------------
PHONE = "10.0.0.2"


def tls_conn(server: str, sport: int, t0: float, *, name: str | None = None,
             host: str | None = None, up: int = 0, seconds: float = 5.0) -> list:
    """One TCP connection from the phone: a ClientHello (SNI ``name``) or an HTTP request
    (``Host: host``), then ``up`` bytes upstream in 1400-byte segments over ``seconds``."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.layers.tls.all import TLS, ServerName, TLS_Ext_ServerName, TLSClientHello
    from scapy.packet import Raw

    out = []

    def add(p, t: float, outbound: bool = True) -> None:
        mac = ("02:00:00:00:00:01", "02:00:00:00:00:02")
        frame = Ether(src=mac[not outbound], dst=mac[outbound]) / p
        frame.time = t
        out.append(frame)

    cl = lambda **kw: IP(src=PHONE, dst=server) / TCP(sport=sport, dport=443, **kw)  # noqa: E731
    sv = lambda **kw: IP(src=server, dst=PHONE) / TCP(sport=443, dport=sport, **kw)  # noqa: E731
    add(cl(flags="S"), t0)
    add(sv(flags="SA"), t0 + 0.01, False)
    add(cl(flags="A"), t0 + 0.02)
    if name:
        hello = TLSClientHello(ext=[TLS_Ext_ServerName(servernames=[ServerName(servername=name)])])
        add(cl(flags="PA") / Raw(bytes(TLS(msg=[hello]))), t0 + 0.03)
    if host:
        add(cl(flags="PA") / Raw(f"POST /u HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()), t0 + 0.03)
    n = up // 1400
    for i in range(n):
        add(cl(flags="PA") / Raw(b"u" * 1400), t0 + 0.05 + seconds * i / max(n, 1))
    add(sv(flags="PA") / Raw(b"ok"), t0 + seconds + 0.1, False)
    add(cl(flags="FA"), t0 + seconds + 0.2)
    add(sv(flags="FA"), t0 + seconds + 0.21, False)
    return out


def test_groups_and_absolute_floor_on_a_replayed_capture(tmp_path, catalog):
    from scapy.utils import PcapWriter

    from observer.sources import replay_tables

    t = T0
    packets = tls_conn("203.0.113.1", 40001, t, name="a.example.co.uk")
    packets += tls_conn("198.51.100.2", 40002, t + 60, name="b.example.co.uk")
    packets += tls_conn("10.0.3.4", 40003, t + 120, host="10.0.3.4")
    # A nearly silent phone: apart from these pings, it only uploads 1.4 MB at ~280 kB/s
    # three times, so its upload bins outnumber the others.
    packets += tls_conn("10.0.3.9", 40004, t + 3600, up=1_400_000)
    packets += tls_conn("10.0.3.9", 40005, t + 7200, up=1_400_000)
    packets += tls_conn("10.0.3.9", 40006, t + 10800, up=1_400_000)
    pcap = tmp_path / "quiet.pcap"
    with PcapWriter(str(pcap), sync=True) as w:
        for p in sorted(packets, key=lambda p: p.time):
            w.write(p)
    tables = replay_tables([pcap])
    conns = tables["connections"]
    groups = endpoint_groups(conns, catalog)
    ends = groups.merge(conns[["conn_id", "client_port"]], on="conn_id").set_index("client_port")
    assert ends.loc[40001, "group"] == ends.loc[40002, "group"] == "example.co.uk"
    assert ends.loc[40003, "key"] == ends.loc[40004, "key"] == ends.loc[40006, "key"]
    assert ends.loc[40003, "label"] == "unnamed addresses in 10.0.3.0/24"
    blk = blocks(tables["activity"], conns, 10.0)
    ev = bulk_events(blk, groups, Thresholds())
    assert len(ev) == 3 and (ev["bytes_up"] >= 1_390_000).all()
    assert bulk_events(blk, groups, Thresholds(absolute_rate_bytes_per_s=1e12)).empty


def test_silence_of_a_device_quiet_by_habit_is_not_a_capture_gap(catalog):
    from observer.analysis.coverage import device_coverage

    r = Records()
    r.session(T0, T0 + 3 * 86400)
    sync = r.connection("sync", "api.sync-partner.com", "198.51.100.9", T0, T0 + 3 * 86400)
    # Packets only at its 6-hourly uploads: 12 of 72 hours.  Its 6-hour silences are its habit.
    for k in range(12):
        r.send(sync, T0 + 600 + k * 21_600, 3_000_000, rate=150_000)
    t = r.tables()
    blk = blocks(t["activity"], t["connections"], r.bin_s)
    cov, silent = device_coverage(t["sessions"], blk, "phone")
    assert silent == [] and cov.intervals == ((T0, T0 + 3 * 86400),)
    # The same uploads beside keepalives every 4 minutes, with one 5-hour hole: a capture gap.
    chat = chat_with_keepalives(r, hours=72)
    ticks = np.arange(T0, T0 + 72 * 3600, 240.0)
    r.bins = [b for b in r.bins if not (b["conn_id"] == chat).all()]
    r.ticks(chat, ticks[(ticks < T0 + 36.5 * 3600) | (ticks >= T0 + 42 * 3600)])
    t = r.tables()
    cov, silent = device_coverage(t["sessions"], blocks(t["activity"], t["connections"], 10.0),
                                  "phone")
    assert len(silent) == 1 and cov.total_s == pytest.approx(3 * 86400 - 5.4 * 3600, abs=1200)


def test_floor_and_prefixes_come_from_the_lab_config(tmp_path):
    from observer import ObserverError
    from observer.config import load_config

    lab = tmp_path / "lab.yaml"
    lab.write_text("analysis:\n  absolute_rate_bytes_per_s: 50000\n  network_prefix_v4: 16\n")
    config = load_config(lab)
    assert config.thresholds.absolute_rate_bytes_per_s == 50_000
    assert config.thresholds.network_prefix_v4 == 16 and config.thresholds.network_prefix_v6 == 48
    assert not config.timezone_configured
    lab.write_text("timezone: Europe/Berlin\nanalysis:\n  network_prefix_v6: 129\n")
    with pytest.raises(ObserverError, match="network_prefix_v6"):
        load_config(lab)
    lab.write_text("timezone: UTC\n")
    assert load_config(lab).timezone_configured
