"""The traffic simulator: its capture opens in independent readers and matches its ground truth."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from observer import ObserverError
from observer.simulate import Scenario, bundled_names, load_scenario, simulate

SMALL = {
    "name": "small",
    "days": 2,
    "start": "2026-03-02",
    "timezone": "Europe/Berlin",
    "seed": 5,
    "device": {"name": "testphone", "ip": "192.168.50.23", "mac": "02:00:5e:10:00:23"},
    "chat": {"keepalive_s": 240, "reconnects_per_day": 3},
    "activity": {"messages_per_day": 40, "media_per_day": 6, "media_median_kb": 20,
                 "telemetry_interval_s": 600, "quic_per_day": 3},
    "gaps": [{"day": 1, "at": "11:50", "hours": 1.5}],
    "jobs": [
        {"name": "export", "kind": "export", "server_name": "sync.example-analytics.net",
         "size_kb": 900, "at": "02:00", "every": "24h", "jitter_min": 20, "skip": [1]},
        {"name": "hidden", "kind": "export", "inside_long_lived": True, "size_kb": 700,
         "at": "03:00", "every": "24h", "jitter_min": 10, "jitter": "normal"},
        {"name": "six-hourly", "kind": "other", "server_name": "api.sync-partner.com",
         "size_kb": 150, "at": "00:30", "every": "6h", "jitter_min": 2},
    ],
}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict, Scenario]:
    scenario = Scenario.from_dict(SMALL, name="small")
    pcap = tmp_path_factory.mktemp("sim") / "small.pcap"
    truth = simulate(scenario, pcap, progress=False)
    assert truth == pcap.with_name("small.truth.json")
    return pcap, json.loads(truth.read_text()), scenario


@pytest.fixture(scope="module")
def packets(small) -> list[dict]:
    """Every packet, dissected by scapy (an independent reader)."""
    from scapy.layers.dns import DNS
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.utils import PcapReader

    out = []
    with PcapReader(str(small[0])) as reader:
        for p in reader:
            ip = p.getlayer(IP) or p[IPv6]
            transport = ip.len - ip.ihl * 4 if IP in p else ip.plen
            row = {"ts": float(p.time), "src": ip.src, "dst": ip.dst, "wirelen": p.wirelen,
                   "v6": IPv6 in p}
            if TCP in p:
                tcp = p[TCP]
                row.update(proto="tcp", sport=tcp.sport, dport=tcp.dport, flags=str(tcp.flags),
                           plen=transport - tcp.dataofs * 4, raw=bytes(tcp.payload))
            else:
                udp = p[UDP]
                row.update(proto="udp", sport=udp.sport, dport=udp.dport, plen=udp.len - 8,
                           dns=p.getlayer(DNS))
            out.append(row)
    return out


def _sni(raw: bytes) -> str:
    from scapy.layers.tls.record import TLS

    hello = TLS(raw).msg[0]
    (ext,) = [e for e in hello.ext if e.type == 0]
    return ext.servernames[0].servername.decode()


def test_pcap_reads_in_scapy_in_order(small, packets):
    _pcap, truth, _ = small
    assert len(packets) == truth["capture"]["packets"] > 1000
    times = [p["ts"] for p in packets]
    assert times == sorted(times)
    assert sum(p["wirelen"] for p in packets) == truth["capture"]["wire_bytes"]
    # Data segments are stored truncated but keep their true size on the wire.
    assert max(p["plen"] for p in packets if p["proto"] == "tcp") == 1460
    assert all(len(p["raw"]) in (0, p["plen"]) for p in packets if p["proto"] == "tcp")


def test_no_packets_inside_capture_gaps(small, packets):
    _pcap, truth, _ = small
    (gap,) = truth["capture_gaps"]
    assert gap[1] - gap[0] == pytest.approx(1.5 * 3600)
    assert not [p for p in packets if gap[0] <= p["ts"] < gap[1]]
    in_gap = [m for m in truth["missed"] if m["reason"] == "in a capture gap"]
    assert [m["job"] for m in in_gap] == ["six-hourly"]  # the 12:30 occurrence of day 1


def test_tshark_reads_without_warnings_and_sees_every_sni(small):
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark is not installed")
    pcap = small[0]
    done = subprocess.run([tshark, "-r", str(pcap), "-q", "-z", "io,phs"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0
    warnings = [line for line in done.stderr.splitlines() if "Running as user" not in line]
    assert warnings == []
    assert "dns" in done.stdout and "tls" in done.stdout
    fields = subprocess.run(
        [tshark, "-r", str(pcap), "-Y", "tcp.flags.syn == 1 && tcp.flags.ack == 0 || "
         "tls.handshake.type == 1", "-T", "fields", "-e", "tcp.stream",
         "-e", "tls.handshake.extensions_server_name"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.splitlines()
    names: dict[str, str] = {}
    for line in fields:
        stream, _, name = line.partition("\t")
        names[stream] = names.get(stream) or name
    assert names and all(names.values()), "a TLS connection without a decoded SNI"
    quic = subprocess.run(
        [tshark, "-r", str(pcap), "-Y", "quic.long.packet_type == 0", "-T", "fields",
         "-e", "tls.handshake.extensions_server_name"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.split()
    assert quic and set(quic) <= {"www.youtube.com", "i.ytimg.com", "www.googleapis.com"}


def test_ground_truth_matches_the_packets(small, packets):
    _pcap, truth, _ = small
    device = truth["device"]["ip"]
    uploads = truth["uploads"]
    assert {u["job"] for u in uploads} == {"export", "hidden", "six-hourly"}
    assert len([u for u in uploads if u["job"] == "export"]) == 1  # occurrence 1 skipped
    assert any(m["job"] == "export" and m["occurrence"] == 1 for m in truth["missed"])
    flows = defaultdict(list)
    for p in packets:
        if p["proto"] == "tcp":
            flows[(p["src"], p["sport"], p["dst"], p["dport"])].append(p)
    for u in uploads:
        key = (device, u["client_port"], u["server_ip"], u["server_port"])
        up = [p for p in flows[key] if u["ts_start"] - 1e-6 <= p["ts"] <= u["ts_end"] + 1e-6]
        assert sum(p["plen"] for p in up) == u["bytes_up"], u
        assert u["bytes_up"] >= u["payload_bytes"] > 0
        assert up[0]["ts"] == pytest.approx(u["ts_start"], abs=1e-6)
        assert max(p["ts"] for p in up) <= u["ts_end"] + 1e-6
        local = dt.datetime.fromtimestamp(u["ts_start"], dt.UTC).astimezone(
            dt.datetime.fromisoformat(u["local_time"]).tzinfo)
        assert local.isoformat(timespec="seconds") == u["local_time"]
        if not u["inside_long_lived"]:
            assert up[0]["flags"] == "S"
            hello = next(p for p in up if p["plen"] > 0)
            assert _sni(hello["raw"]) == u["server_name"]


def test_hidden_upload_rides_in_the_chat_connection(small, packets):
    _pcap, truth, _ = small
    chat = truth["chat"]
    hidden = [u for u in truth["uploads"] if u["inside_long_lived"]]
    assert hidden and all(u["job"] == "hidden" for u in hidden)
    for u in hidden:
        assert (u["server_name"], u["server_ip"], u["server_port"]) == (
            chat["server_name"], chat["server_ip"], chat["server_port"])
        (session,) = [s for s in chat["sessions"] if s["client_port"] == u["client_port"]
                      and s["ts_start"] < u["ts_start"] < u["ts_end"] < s["ts_end"]]
        syn = [p for p in packets if p["sport"] == u["client_port"] and p.get("flags") == "S"
               and p["dst"] == u["server_ip"]]
        assert [p["ts"] for p in syn] == [pytest.approx(session["ts_start"], abs=1e-6)]


def test_dns_answers_precede_connections(small, packets):
    _pcap, truth, _ = small
    answers = []  # (ts, name asked, addresses)
    for p in packets:
        dns = p.get("dns")
        if dns is not None and dns.qr == 1:
            addrs = {dns.an[i].rdata for i in range(dns.ancount) if dns.an[i].type in (1, 28)}
            answers.append((p["ts"], dns.qd[0].qname.decode().rstrip("."), addrs))
    assert answers
    # Some connections go over IPv6, each to an address a DNS (AAAA) answer gave before its SYN.
    v6_syns = [p for p in packets if p["v6"] and p.get("flags") == "S"]
    assert v6_syns
    for syn in v6_syns:
        assert any(a[0] < syn["ts"] and syn["dst"] in a[2] for a in answers)
    for u in truth["uploads"]:
        if u["inside_long_lived"]:
            continue
        before = [a for a in answers if a[0] < u["ts_start"] and a[1] == u["server_name"]]
        assert u["server_ip"] in set().union(*(a[2] for a in before[-2:]))  # the A and AAAA
    # CNAME chains appear for names that have one (mmg.whatsapp.net and friends).
    assert any(p["dns"].ancount > 1 for p in packets if p.get("dns") is not None
               and p["dns"].qr == 1 and p["dns"].qd[0].qtype == 1)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(small, tmp_path):
    pcap, _truth, scenario = small
    again = tmp_path / "again.pcap"
    simulate(scenario, again, progress=False)
    assert _sha(again) == _sha(pcap)
    other = tmp_path / "other.pcap"
    simulate(scenario.with_seed(scenario.seed + 1), other, progress=False)
    assert _sha(other) != _sha(pcap)


def test_jobs_follow_the_local_clock_across_dst(tmp_path):
    scenario = load_scenario("dst").with_days(6)
    truth = json.loads(simulate(scenario, tmp_path / "dst.pcap", progress=False).read_text())
    (change,) = truth["dst_changes"]
    assert change["offset_before_s"] - change["offset_after_s"] == 3600
    exports = [u for u in truth["uploads"] if u["job"] == "nightly-export"]
    assert len(exports) == 6
    for u in exports:  # 02:30 local +- 5 min, whatever the UTC offset
        local = dt.datetime.fromisoformat(u["nominal_local_time"])
        assert (local.hour, local.minute) == (2, 30)
    offsets = {dt.datetime.fromisoformat(u["local_time"]).utcoffset() for u in exports}
    assert offsets == {dt.timedelta(hours=2), dt.timedelta(hours=1)}


def test_bundled_scenarios_load():
    assert {"week", "quiet", "hidden", "month", "dst", "dualstack", "fleet"} <= set(bundled_names())
    week = load_scenario(None)
    assert (week.name, week.days, week.timezone) == ("week", 7, "Europe/Berlin")
    assert load_scenario("month").days == 30
    (hidden,) = [job for job in load_scenario("hidden").jobs if job.inside_long_lived]
    assert (hidden.server_name, hidden.port) == ("g.whatsapp.net", 443)
    config = week.lab_config()
    assert config.device_of("192.168.50.23") == week.device
    assert config.timezone == week.timezone


@pytest.mark.parametrize(("change", "key", "words"), [
    ({"dayz": 3}, "dayz", "unknown key"),
    ({"days": "seven"}, "days", "must be a number"),
    ({"timezone": "Mars/Olympus"}, "timezone", "unknown time zone"),
    ({"jobs": [{"name": "x", "at": "25:00"}]}, "jobs.0.at", "local time"),
    ({"jobs": [{"name": "x", "every": "often"}]}, "jobs.0.every", "duration"),
    ({"jobs": [{"name": "x", "kind": "exfil"}]}, "jobs.0.kind", "one of"),
    ({"jobs": [{"name": "x", "size_mb": -1}]}, "jobs.0.size_mb", "above"),
    ({"jobs": [{"name": "x", "colour": 1}]}, "jobs.0.colour", "unknown key"),
    ({"device": {"ip": "not-an-ip"}}, "device.ip", "not an IPv4"),
    ({"activity": {"media_per_day": True}}, "activity.media_per_day", "must be a number"),
])
def test_scenario_errors_name_the_key(change, key, words):
    with pytest.raises(ObserverError) as err:
        Scenario.from_dict({**SMALL, **change}, name="bench-7")
    message = str(err.value)
    assert message.startswith("bench-7") and f": {key}:" in message and words in message


def test_scenario_file_errors_name_file_line_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("days: 2\njobs:\n  - name: x\n    jitter_min: lots\n")
    with pytest.raises(ObserverError, match=r"bad\.yaml:4: jobs\.0\.jitter_min: must be a number"):
        load_scenario(path)
    path.write_text("days: [2\n")
    with pytest.raises(ObserverError, match=r"bad\.yaml:2: not valid YAML"):
        load_scenario(path)
    with pytest.raises(ObserverError, match="bundled scenarios"):
        load_scenario(tmp_path / "missing.yaml")


def test_cli_writes_capture_and_prints_summary(tmp_path, capsys):
    from observer.cli import main

    out = tmp_path / "cli.pcap"
    assert main(["simulate", "quiet", "-o", str(out), "--days", "1", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "packets" in printed and str(out.with_name("cli.truth.json")) in printed
    truth = json.loads(out.with_name("cli.truth.json").read_text())
    assert truth["scenario"]["days"] == 1 and truth["scenario"]["seed"] == 3
    assert out.stat().st_size > 24


# --- several phones, IPv6 privacy addresses, address families, rotated files -------------------

QUIET = {"messages_per_day": 20, "media_per_day": 4, "media_median_kb": 20,
         "telemetry_interval_s": 900, "quic_per_day": 2, "ipv6_share": 0.8}
LAB = {
    "name": "lab", "days": 3, "start": "2026-03-02", "seed": 9, "activity": QUIET,
    "phones": [
        {"name": "dual", "mac": "02:00:5e:10:00:31", "ip": "192.168.50.31",
         "ipv6": "2001:db8:50::31", "temporary_ipv6": True,
         "jobs": [{"name": "export", "size_kb": 800, "at": "02:00", "jitter_min": 10,
                   "family": "alternate"}]},
        {"name": "v6only-export", "jobs": [{"name": "export", "size_kb": 600, "at": "03:00",
                                            "server_name": "up.v6-collector.net",
                                            "family": "ipv6"}]},
        {"name": "silent", "chat": {"enabled": False},
         "activity": {"messages_per_day": 0, "media_per_day": 0, "quic_per_day": 0,
                      "telemetry_interval_s": 0},
         "jobs": [{"name": "upload", "size_kb": 500, "at": "04:00", "every": "12h"}]},
    ],
}


def _frames(pcap: Path) -> list[dict]:
    """Ethernet and IP addresses of every frame, read with scapy's raw pcap reader and decoded
    here from the header bytes (fast enough for a week of several phones)."""
    import ipaddress

    from scapy.utils import RawPcapReader

    rows = []
    for frame, meta in RawPcapReader(str(pcap)):
        v6 = frame[12:14] == b"\x86\xdd"
        src, dst = (frame[22:38], frame[38:54]) if v6 else (frame[26:30], frame[30:34])
        rows.append({"ts": meta.sec + meta.usec / 1e6, "smac": frame[6:12].hex(":"),
                     "dmac": frame[0:6].hex(":"), "v6": v6, "size": meta.wirelen,
                     "src": str(ipaddress.ip_address(src)), "dst": str(ipaddress.ip_address(dst))})
    return rows


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    """Three phones on one network: (pcap, truth, frames)."""
    pcap = tmp_path_factory.mktemp("lab") / "lab.pcap"
    truth = json.loads(simulate(Scenario.from_dict(LAB, name="lab"), pcap,
                                progress=False).read_text())
    return pcap, truth, _frames(pcap)


def test_each_phone_sends_from_its_own_mac(lab):
    _pcap, truth, rows = lab
    phones = {p["mac"]: p for p in truth["phones"]}
    assert len(phones) == 3
    gateway = "02:00:5e:10:00:01"
    seen = defaultdict(set)
    for r in rows:
        if r["smac"] != gateway:
            assert r["dmac"] == gateway
            seen[r["smac"]].add(r["src"])
        else:
            seen[r["dmac"]].add(r["dst"])
    assert set(seen) == set(phones)
    for mac, addresses in seen.items():
        phone = phones[mac]
        known = {phone["ip"]} | {a["address"] for a in phone["ipv6_addresses"]}
        assert addresses <= known, (phone["name"], addresses - known)
        assert phone["ip"] in addresses


def test_temporary_ipv6_addresses_rotate_daily(lab):
    _pcap, truth, rows = lab
    dual = next(p for p in truth["phones"] if p["name"] == "dual")
    temporary = [a for a in dual["ipv6_addresses"] if a["kind"] == "temporary"]
    assert 3 <= len(temporary) <= 4  # 3 days: the first address, then one a day
    for a, b in itertools.pairwise(temporary):
        assert a["until"] == b["from"]
        if a["from"] > truth["capture"]["ts_start"]:
            assert a["until"] - a["from"] == pytest.approx(86400, abs=1)
    prefix = dual["ipv6"].rsplit(":", 2)[0]
    used = {r["src"] for r in rows if r["v6"] and r["smac"] == dual["mac"]}
    # Outgoing IPv6 leaves only from temporary addresses in the stable address's /64, one a day,
    # each used only while it is the current one.
    assert len(used) >= 3 and dual["ipv6"] not in used
    assert all(a.startswith("2001:db8:50:0:") for a in used) and prefix
    for r in rows:
        if r["v6"] and r["smac"] == dual["mac"] and r["size"] < 100 and r["src"] in used:
            current = next(a for a in temporary if a["address"] == r["src"])
            assert current["from"] - 1 <= r["ts"] <= current["until"] + 3600


def test_export_families_follow_the_job(lab):
    _pcap, truth, rows = lab
    exports = [u for u in truth["uploads"] if u["device"] == "dual"]
    assert [u["family"] for u in exports] == [
        "ipv6" if u["occurrence"] % 2 else "ipv4" for u in exports]
    assert {u["family"] for u in exports} == {"ipv4", "ipv6"}
    dual = next(p for p in truth["phones"] if p["name"] == "dual")
    for u in exports:
        if u["family"] == "ipv6":
            current = [a for a in dual["ipv6_addresses"] if a["kind"] == "temporary"
                       and a["from"] <= u["ts_start"] < a["until"]]
            assert [a["address"] for a in current] == [u["client_ip"]]
            assert ":" in u["server_ip"]
        else:
            assert u["client_ip"] == dual["ip"]
        up = [r for r in rows if r["src"] == u["client_ip"] and r["dst"] == u["server_ip"]
              and u["ts_start"] - 1e-6 <= r["ts"] <= u["ts_end"] + 1e-6]
        assert up and up[0]["ts"] == pytest.approx(u["ts_start"], abs=1e-6)
    v6only = [u for u in truth["uploads"] if u["device"] == "v6only-export"]
    assert len(v6only) == 3 and {u["family"] for u in v6only} == {"ipv6"}
    assert all(u["client_ip"] == "2001:db8:50::24" for u in v6only)  # no temporaries


def test_near_silent_phone_sends_little_but_its_uploads(lab):
    _pcap, truth, rows = lab
    silent = next(p for p in truth["phones"] if p["name"] == "silent")
    assert silent["chat"]["sessions"] == [] and not silent["chat"]["enabled"]
    uploads = [u for u in truth["uploads"] if u["device"] == "silent"]
    assert len(uploads) == 6  # twice a day for 3 days
    mine = [r for r in rows if silent["mac"] in (r["smac"], r["dmac"])]
    inside = [r for r in mine if any(u["ts_start"] - 1 <= r["ts"] <= u["ts_end"] + 5
                                     for u in uploads)]
    assert len(mine) - len(inside) < 100  # only the DNS look-ups before each upload


def test_fleet_writes_hourly_files_with_truth(tmp_path):
    from observer.simulate import fleet_scenario

    scenario = fleet_scenario(phones=3, days=1, seed=3, with_export=2)
    out = tmp_path / "fleet"
    truth_file = simulate(scenario, out, progress=False)
    assert truth_file == tmp_path / "fleet.truth.json"
    truth = json.loads(truth_file.read_text())
    files = truth["capture"]["files"]
    assert len(files) == 24 and sorted(p.name for p in out.glob("*.pcap")) == \
        [f["file"] for f in files]
    assert sum(f["packets"] for f in files) == truth["capture"]["packets"]
    assert len(truth["phones"]) == 3
    assert sum(1 for p in truth["phones"] if p["exports"]) == 2
    macs = {p["mac"] for p in truth["phones"]} | {"02:00:5e:10:00:01"}
    for f in files[::5]:  # every file holds only its own hour, and starts with a pcap header
        frames = _frames(out / f["file"])
        assert len(frames) == f["packets"]
        assert all(f["ts_start"] <= r["ts"] < f["ts_end"] for r in frames)
        assert {r["smac"] for r in frames} | {r["dmac"] for r in frames} <= macs
    devices = {u["device"] for u in truth["uploads"]}
    assert devices <= {p["name"] for p in truth["phones"]} and len(devices) >= 2
    # A second run over the same folder replaces its files, never mixes two runs.
    simulate(scenario.with_seed(4), out, progress=False)
    assert len(list(out.glob("*.pcap"))) == len(json.loads(truth_file.read_text())
                                                ["capture"]["files"])


def test_fleet_replays_as_one_device_per_phone(tmp_path):
    from observer.records import read_records
    from observer.simulate import fleet_scenario
    from observer.sources import replay

    scenario = fleet_scenario(phones=3, days=1, seed=5)
    truth = json.loads(simulate(scenario, tmp_path / "fleet", progress=False).read_text())
    files = sorted((tmp_path / "fleet").glob("*.pcap"))
    stats = replay(files, tmp_path / "records", config=scenario.lab_config(), progress=False)
    assert not stats.errors
    devices = set(read_records(tmp_path / "records")["connections"]["device"].astype(str))
    assert devices == {p["name"] for p in truth["phones"]}


@pytest.mark.parametrize(("change", "key", "words"), [
    ({"phones": [{"name": "a"}], "jobs": []}, "jobs", "under each phone"),
    ({"phones": [{"name": "a"}, {"name": "a"}]}, "phones.1.name", "two phones"),
    ({"phones": [{"mac": "02:00:5e:10:00:01"}, {"mac": "02:00:5e:10:00:01"}]}, "phones.1.mac",
     "two phones"),
    ({"phones": [{"chat": {"enabled": False},
                  "jobs": [{"name": "x", "inside_long_lived": True}]}]},
     "phones.0.jobs.0.inside_long_lived", "no chat"),
    ({"jobs": [{"name": "x", "family": "ipv5"}]}, "jobs.0.family", "one of"),
    ({"jobs": [{"name": "x", "inside_long_lived": True, "family": "ipv6"}]}, "jobs.0.family",
     "chat"),
    ({"fleet": {"phones": 3, "with_export": 4}}, "fleet.with_export", "at most"),
    ({"rotate": "10s"}, "rotate", "at least"),
    ({"activity": {"telemetry_interval_s": 5}}, "activity.telemetry_interval_s", "0 (none)"),
])
def test_lab_scenario_errors_name_the_key(change, key, words):
    lab = "phones" in change or "fleet" in change
    data = {k: v for k, v in SMALL.items() if not (lab and k in ("device", "jobs"))}
    data.update(change)
    with pytest.raises(ObserverError) as err:
        Scenario.from_dict(data, name="lab-7")
    message = str(err.value)
    assert message.startswith("lab-7") and f": {key}:" in message and words in message


def test_lab_replays_as_one_device_per_mac(lab, tmp_path):
    """The config names each phone by MAC and stable addresses only; every temporary address
    of the dual-stack phone must still land on that phone."""
    from observer.records import read_records
    from observer.sources import replay

    pcap, truth, _rows = lab
    scenario = Scenario.from_dict(LAB, name="lab")
    stats = replay([pcap], tmp_path / "records", config=scenario.lab_config(), progress=False)
    assert not stats.errors
    conns = read_records(tmp_path / "records")["connections"]
    assert set(conns["device"].astype(str)) == {p["name"] for p in truth["phones"]}
    dual = conns[conns["device"].astype(str) == "dual"]
    used = {a for a in dual["client_ip"].astype(str) if ":" in a}
    temporary = {a["address"] for p in truth["phones"] if p["name"] == "dual"
                 for a in p["ipv6_addresses"] if a["kind"] == "temporary"}
    assert len(used) >= 3 and used <= temporary


def test_cli_writes_a_rotated_fleet(tmp_path, capsys):
    from observer.cli import main

    out = tmp_path / "lab"
    assert main(["simulate", "fleet", "-o", str(out), "--days", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    truth = json.loads((tmp_path / "lab.truth.json").read_text())
    files = truth["capture"]["files"]
    assert f"({len(files)} files" in printed and len(files) == 24
    assert len(truth["phones"]) == 8 and len(list(out.glob("fleet-*.pcap"))) == 24
