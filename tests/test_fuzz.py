"""A deterministic mutation fuzzer over real seed files of every input format.

Each format's seeds are mutated (bit flips, byte overwrites, truncation, insertion, deletion and
duplication of chunks) with fixed seeds, and every mutant is read the way a user reads it
(``observer replay``'s reader for captures and importers, ``load_config`` / ``Catalog`` for YAML).
Must hold for every case: no traceback (only ``ObserverError``, one-line errors or counted skips),
no hang (a per-case timer), bounded memory (peak RSS), and for truncations: the records of a
prefix are a subset of the whole file's.  ``FUZZ_CASES`` sets the mutations per format (default
200); ``python tests/test_fuzz.py`` prints the table for docs/reliability.md.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import resource
import signal
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from observer import ObserverError
from observer.catalog import Catalog
from observer.config import load_config
from observer.records import JsonlWriter
from observer.sources.decode import Decoder
from observer.sources.pcapfile import PAD, Batch
from observer.sources.pipeline import ReplayStats, replay_tables

ROOT = Path(__file__).parents[1]
CAPTURES = ROOT.parent / "shared" / "captures"
INTEROP = Path(__file__).parent / "data" / "interop"
CASES = int(os.environ.get("FUZZ_CASES", "200"))
CASE_TIMEOUT_S = 10.0  # one mutant; the slowest seen takes well under a second
RSS_GROWTH_MB = 600  # peak memory may grow this much over the fuzzing run, no more
T0 = 1_772_409_600.0  # 2026-03-02 00:00 UTC: inside the default time window


# --- seeds -----------------------------------------------------------------------------------

def _capture(name: str) -> bytes:
    for folder in ("zeek-tls", "tcpdump-tests"):
        path = CAPTURES / folder / name
        if path.is_file():
            return path.read_bytes()
    pytest.skip(f"public capture {name} absent")


def _jsonl(directory: Path) -> bytes:
    """Records as the live proxy writes them, through the real writer."""
    writer = JsonlWriter(directory, "live")
    for i in range(12):
        conn = f"c{i}"
        writer.write("connections", {
            "conn_id": conn, "source": "proxy", "device": "phone", "proto": "tcp",
            "client_ip": "10.0.0.2", "client_port": 40000 + i, "server_ip": "203.0.113.7",
            "server_port": 443, "ts_start": T0 + 60 * i, "ts_end": T0 + 60 * i + 5,
            "bytes_up": 1000 * i, "bytes_down": 50 * i, "server_name": f"s{i}.example",
            "name_source": "sni", "tls": "intercepted", "close_reason": "fin"})
        writer.write("activity", {"conn_id": conn, "device": "phone", "ts_bin": T0 + 60 * i,
                                  "bin_s": 10.0, "bytes_up": 1000 * i, "bytes_down": 50 * i})
        writer.write("http", {"conn_id": conn, "device": "phone", "ts_request": T0 + 60 * i + 1,
                              "method": "POST", "scheme": "https", "host": f"s{i}.example",
                              "path": "/upload?id=*", "status": 200})
    writer.close()
    [path] = directory.glob("live-*.jsonl")
    return path.read_bytes()


def _har() -> bytes:
    entries = [{
        "startedDateTime": f"2026-03-02T02:{i:02d}:00.000Z", "time": 120.0,
        "request": {"method": "POST", "url": f"https://backup.example/upload/{i}?session=abc",
                    "httpVersion": "HTTP/1.1", "headersSize": 200, "bodySize": 50_000 + i,
                    "headers": [{"name": "Host", "value": "backup.example"}]},
        "response": {"status": 200, "httpVersion": "HTTP/1.1", "headersSize": 120, "bodySize": 2},
        "timings": {"connect": 12.0 if i % 3 == 0 else -1, "send": 90.0, "wait": 20.0,
                    "receive": 1.0},
        "serverIPAddress": "203.0.113.7",
        "_webSocketMessages": [{"type": "send", "time": T0 + 7200 + i, "opcode": 1,
                                "data": "hello"}] if i == 4 else [],
    } for i in range(10)]
    doc = {"log": {"version": "1.2", "creator": {"name": "mitmproxy", "version": "12"},
                   "entries": entries}}
    return json.dumps(doc, indent=1).encode()


def _pcapdroid() -> bytes:
    head = ("IPProto,SrcIP,SrcPort,DstIp,DstPort,UID,App,PackageName,Proto,Status,Info,BytesSent,"
            "BytesRcvd,PktsSent,PktsRcvd,FirstSeen,LastSeen\n")
    rows = "".join(
        f"{'TCP' if i % 2 else 'UDP'},10.215.173.1,{41000 + i},157.240.20.{i},443,10123,WhatsApp,"
        f"com.whatsapp,{'TLS' if i % 2 else 'QUIC'},Closed,mmg{i}.whatsapp.net,{5000 * i},"
        f"{300 * i},{10 + i},{5 + i},{int(T0 * 1000) + 60_000 * i},{int(T0 * 1000) + 61_000 * i}\n"
        for i in range(12))
    return (head + rows).encode()


def _flows() -> bytes:
    """A ``mitmdump -w`` file, written by mitmproxy's own writer."""
    import io

    from mitmproxy import io as mio
    from mitmproxy.test import tflow

    out = io.BytesIO()
    writer = mio.FlowWriter(out)
    for i in range(6):
        flow = tflow.tflow(resp=True)
        flow.request.path = f"/sync/{i}?token=secret"
        flow.client_conn.timestamp_start = T0 + i
        flow.request.timestamp_start = T0 + i
        writer.add(flow)
    writer.add(tflow.tdnsflow(resp=True))
    return out.getvalue()


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


@dataclass
class Seed:
    name: str  # file name the mutant is written as (importers judge by content, not name)
    data: bytes


def seeds(fmt: str, tmp: Path) -> list[Seed]:
    """Real seed files of one format: public captures, the repository's test data, and files
    written here by the real writers (mitmproxy, the JSONL writer)."""
    if fmt == "pcap":
        return [Seed("a.pcap", _capture("ecdhe.pcap")), Seed("b.pcap", _capture("dtls1_2.pcap"))]
    if fmt == "pcapng":
        return [Seed("a.pcapng", _capture("OSPFv2_Capture_FINAL.pcapng")),
                Seed("b.pcapng", _capture("nhrp.pcapng"))]
    if fmt == "gzip":
        return [Seed("a.pcap.gz", _gzip(_capture("ecdhe.pcap"))),
                Seed("b.pcap.gz", _capture("tls-fragmented-handshake.pcap.gz"))]
    if fmt == "jsonl":
        records = _jsonl(tmp / "jsonl-seed")
        return [Seed("live.jsonl", records), Seed("live.jsonl.gz", _gzip(records))]
    if fmt == "har":
        return [Seed("session.har", _har())]
    if fmt == "zeek":
        return [Seed("conn.log", (INTEROP / "zeek-tsv" / "conn.log").read_bytes()),
                Seed("conn.json", (INTEROP / "zeek-json" / "conn.json").read_bytes()),
                Seed("conn.log.gz", _gzip((INTEROP / "zeek-tsv" / "conn.log").read_bytes()))]
    if fmt == "pcapdroid":
        return [Seed("phone.csv", _pcapdroid())]
    if fmt == "flows":
        return [Seed("flows.mitm", _flows()), Seed("flows.mitm.gz", _gzip(_flows()))]
    if fmt == "yaml-config":
        return [Seed("lab.yaml", (ROOT / "docs" / "lab.example.yaml").read_bytes())]
    if fmt == "yaml-catalog":
        return [Seed("catalog.yaml", (ROOT / "observer" / "catalog.yaml").read_bytes())]
    raise ValueError(fmt)


FORMATS = ["pcap", "pcapng", "gzip", "jsonl", "har", "zeek", "pcapdroid", "flows",
           "yaml-config", "yaml-catalog"]


# --- mutations -------------------------------------------------------------------------------

def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes, int | None]:
    """One mutation of ``data``: its kind, the mutant, and for truncations the cut offset."""
    kind = rng.choice(["flip", "flip", "byte", "truncate", "insert", "delete", "duplicate",
                       "splice"])
    buf = bytearray(data)
    n = len(buf)
    at = rng.randrange(n) if n else 0
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        buf[at] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x0A, 0x22, 0x2C, 0x09, rng.randrange(256)])
    elif kind == "truncate":
        return kind, bytes(buf[:at]), at
    elif kind == "insert":
        noise = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        filler = rng.choice([b"\x00" * 8, b"\xff" * 4, noise, b"\n", b'"', b"\xe9"])
        buf[at:at] = filler
    elif kind == "delete":
        del buf[at : at + rng.randint(1, 64)]
    elif kind == "duplicate":
        size = rng.randint(1, 512)
        buf[at:at] = buf[at : at + size]
    else:  # splice: a chunk copied over another place (moves headers into data)
        size = rng.randint(4, 64)
        src = rng.randrange(n)
        buf[at : at + size] = buf[src : src + size]
    return kind, bytes(buf), None


# --- reading a mutant ------------------------------------------------------------------------

class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


@dataclass
class Outcome:
    result: str  # records | skips (counted, or a fault noted in the session) | error | empty
    keys: set = field(default_factory=set)  # record identities, for the prefix check
    kept: bool = False  # read something: packets, records, or a valid YAML file
    seconds: float = 0.0


def _keys(tables: dict[str, pd.DataFrame]) -> set:
    """Identities of records that a longer file must also give: connection 5-tuples with their
    start, and the rows of the importers' event tables."""
    keys: set = set()
    conns = tables.get("connections")
    if conns is not None and len(conns):
        cols = ["proto", "client_ip", "client_port", "server_ip", "server_port", "ts_start"]
        keys |= {("conn", *row) for row in conns[cols].astype(str).itertuples(index=False)}
    for name, cols in (("http", ["ts_request", "method", "host", "path"]),
                       ("dns", ["ts", "query", "answer"])):
        frame = tables.get(name)
        if frame is not None and len(frame):
            keys |= {(name, *row) for row in frame[cols].astype(str).itertuples(index=False)}
    return keys


def read(fmt: str, path: Path) -> Outcome:
    """Read one file the way the CLI does; any exception but ObserverError propagates."""
    if fmt == "yaml-config":
        try:
            load_config(path)
            return Outcome("records", kept=True)
        except ObserverError as exc:
            assert "\n" not in str(exc)
            return Outcome("error")
    if fmt == "yaml-catalog":
        try:
            Catalog([path])
            return Outcome("records", kept=True)
        except ObserverError as exc:
            assert "\n" not in str(exc)
            return Outcome("error")
    stats = ReplayStats()
    tables = replay_tables([path], stats=stats)
    for error in stats.errors:
        assert "\n" not in error and str(path) in error, error
    keys = _keys(tables)
    notes = " ".join(tables["sessions"]["note"].dropna()) if "sessions" in tables else ""
    if stats.errors:
        result = "error"
    elif sum(stats.skipped.values()) or any(
            word in notes for word in ("skipped", "stopped at", "kept the", "damaged")):
        result = "skips"
    else:
        result = "records" if keys else "empty"
    return Outcome(result, keys, kept=bool(keys) or stats.packets > 0)


def run_case(fmt: str, path: Path) -> Outcome:
    """``read`` under a per-case timer; pytest-timeout's own alarm is put back afterwards."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
    start = time.perf_counter()
    try:
        outcome = read(fmt, path)
    finally:
        outcome_s = time.perf_counter() - start
        signal.setitimer(signal.ITIMER_REAL, max(outer - outcome_s, 0.001) if outer else 0)
        signal.signal(signal.SIGALRM, previous)
    outcome.seconds = outcome_s
    return outcome


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Report:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    prefix_checks: int = 0
    kept: int = 0  # mutants that still gave packets or records (those before the fault)
    slowest: float = 0.0
    seconds: float = 0.0
    rss_growth_mb: float = 0.0


def fuzz(fmt: str, tmp: Path, cases: int = CASES,
         check: Callable[[bool, str], None] | None = None) -> Report:
    """Run ``cases`` mutants of ``fmt``'s seeds; ``check(ok, message)`` is told each property."""
    def verify(ok: bool, message: str) -> None:
        if check is not None:
            check(ok, message)
        elif not ok:
            raise AssertionError(message)

    report = Report()
    started, rss0 = time.perf_counter(), peak_rss_mb()
    workdir = tmp / f"fuzz-{fmt}"
    workdir.mkdir(parents=True, exist_ok=True)
    full: dict[str, set] = {}
    seed_files = seeds(fmt, tmp)
    for seed in seed_files:
        path = workdir / "seed" / seed.name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(seed.data)
        outcome = run_case(fmt, path)
        verify(outcome.result in ("records", "skips"), f"{fmt} seed {seed.name}: {outcome}")
        full[seed.name] = outcome.keys
    for i in range(cases):
        rng = random.Random(f"{fmt}:{i}")
        seed = seed_files[i % len(seed_files)]
        kind, data, cut = mutate(seed.data, rng)
        case_dir = workdir / f"{i:04d}"  # alone in a directory: Zeek reads sibling logs
        case_dir.mkdir(exist_ok=True)
        path = case_dir / seed.name
        path.write_bytes(data)
        where = f"{fmt} case {i} ({kind} of {seed.name}, seed '{fmt}:{i}')"
        try:
            outcome = run_case(fmt, path)
        except Hang:
            verify(False, f"{where}: no answer within {CASE_TIMEOUT_S} s")
            continue
        report.cases += 1
        report.kinds[kind] += 1
        report.outcomes[outcome.result] += 1
        report.kept += outcome.kept
        report.slowest = max(report.slowest, outcome.seconds)
        if cut is not None and not fmt.startswith("yaml"):
            report.prefix_checks += 1
            extra = outcome.keys - full[seed.name]
            verify(not extra, f"{where}: a prefix gave records the whole file does not: "
                              f"{sorted(extra)[:3]}")
        growth = peak_rss_mb() - rss0
        verify(growth < RSS_GROWTH_MB, f"{where}: peak memory grew by {growth:.0f} MB")
        for child in case_dir.iterdir():
            child.unlink()
        case_dir.rmdir()
    report.seconds = time.perf_counter() - started
    report.rss_growth_mb = peak_rss_mb() - rss0
    return report


@pytest.mark.parametrize("fmt", FORMATS)
def test_mutants_give_records_skips_or_one_line(fmt, tmp_path):
    report = fuzz(fmt, tmp_path)
    assert report.cases == CASES
    assert report.slowest < CASE_TIMEOUT_S


# --- targeted faults the issue names -----------------------------------------------------------

def test_gzip_with_trailing_zeros_reads_whole(tmp_path):
    data = _capture("ecdhe.pcap")
    plain, padded = tmp_path / "a.pcap", tmp_path / "b.pcap.gz"
    plain.write_bytes(data)
    padded.write_bytes(_gzip(data) + b"\0" * 4096)
    stats_plain, stats_padded = ReplayStats(), ReplayStats()
    expect = replay_tables([plain], stats=stats_plain)["connections"]
    got = replay_tables([padded, plain], stats=stats_padded)["connections"]
    assert stats_padded.errors == [] and stats_padded.packets == 2 * stats_plain.packets
    alone = replay_tables([padded])["connections"]
    assert alone.drop(columns="conn_id").equals(expect.drop(columns="conn_id"))
    assert len(got) >= len(expect)  # and the file after it still ran


def test_gzip_with_a_flipped_byte_keeps_the_packets_before_it(tmp_path):
    data = _capture("tls-fragmented-handshake.pcap.gz")
    whole = tmp_path / "whole.pcap.gz"
    whole.write_bytes(data)
    flipped = bytearray(data)
    flipped[len(data) * 3 // 4] ^= 0x10
    damaged = tmp_path / "damaged.pcap.gz"
    damaged.write_bytes(bytes(flipped))
    full, part = ReplayStats(), ReplayStats()
    replay_tables([whole], stats=full)
    replay_tables([damaged, whole], stats=part)
    assert len(part.errors) == 1 and str(damaged) in part.errors[0]
    assert "unknown file format" not in part.errors[0]
    assert full.packets < part.packets < 2 * full.packets  # the damaged file kept a prefix


def _pcap_records_before(data: bytes, cut: int) -> int:
    """Complete packet records of a classic little-endian pcap within its first ``cut`` bytes."""
    assert data[:4] == b"\xd4\xc3\xb2\xa1"
    pos, count = 24, 0
    while pos + 16 <= len(data):
        caplen = struct.unpack_from("<I", data, pos + 8)[0]
        if pos + 16 + caplen > cut:
            break
        pos, count = pos + 16 + caplen, count + 1
    return count


def test_truncated_pcap_keeps_every_complete_packet_and_names_the_offset(tmp_path):
    data = _capture("ecdhe.pcap")
    for cut in range(30, len(data), 97):
        path = tmp_path / f"cut-{cut}.pcap"
        path.write_bytes(data[:cut])
        stats = ReplayStats()
        replay_tables([path], stats=stats)
        assert stats.packets == _pcap_records_before(data, cut)
        if stats.errors:
            assert "byte offset" in stats.errors[0] and str(path) in stats.errors[0]


def test_truncated_line_formats_keep_every_complete_line(tmp_path):
    jsonl, csv_text = _jsonl(tmp_path / "seed"), _pcapdroid()
    for cut in range(40, len(jsonl), 397):
        path = tmp_path / f"cut-{cut}.jsonl"
        path.write_bytes(jsonl[:cut])
        tables = replay_tables([path])
        rows = sum(len(tables.get(t, ())) for t in ("connections", "activity", "http"))
        assert rows == jsonl[:cut].count(b"\n")  # the torn last line is skipped, no more
    for cut in range(200, len(csv_text), 37):
        path = tmp_path / f"cut-{cut}.csv"
        path.write_bytes(csv_text[:cut])
        complete = csv_text[:cut].count(b"\n") - 1  # the header line
        assert len(replay_tables([path])["connections"]) >= complete


def test_gzipped_jsonl_and_flow_files_read_whole_and_keep_a_torn_prefix(tmp_path):
    for name, data in (("live.jsonl.gz", _jsonl(tmp_path / "seed")), ("f.mitm.gz", _flows())):
        whole, torn = tmp_path / name, tmp_path / f"torn-{name}"
        packed = _gzip(data)
        whole.write_bytes(packed)
        torn.write_bytes(packed[: len(packed) * 2 // 3])
        stats = ReplayStats()
        full, part = replay_tables([whole], stats=stats), replay_tables([torn], stats=stats)
        assert stats.errors == [] and len(full["connections"]) in (7, 12)  # 6 flows + 1 DNS
        assert 0 < len(part["connections"]) < len(full["connections"])
        assert "byte offset" in part["sessions"]["note"].iloc[-1] or (
            "unreadable from here on" in part["sessions"]["note"].iloc[-1])


def test_har_cut_short_keeps_the_entries_before_the_cut(tmp_path):
    data = _har()
    starts = [i for i in range(len(data)) if data.startswith(b'{\n    "startedDateTime"', i)]
    for n, cut in enumerate([*starts[1:], len(data) - 3]):
        path = tmp_path / f"cut-{n}.har"
        path.write_bytes(data[:cut])
        tables = replay_tables([path])
        assert len(tables["http"]) == n + 1  # every entry that ended before the cut
        assert "kept the" in tables["sessions"]["note"].iloc[0]
        assert set(tables["http"]["path"]) <= {f"/upload/{i}?session=*" for i in range(10)}


def test_absurd_pcap_times_are_skipped_and_counted(tmp_path):
    data = bytearray(_capture("ecdhe.pcap"))
    struct.pack_into("<I", data, 24, 0)  # the first packet: 1970
    struct.pack_into("<I", data, 24 + 16 + struct.unpack_from("<I", data, 24 + 8)[0],
                     4_000_000_000)  # the second: 2096
    path = tmp_path / "times.pcap"
    path.write_bytes(bytes(data))
    stats = ReplayStats()
    tables = replay_tables([path], stats=stats)
    assert stats.skipped["timestamp outside the time window"] == 2
    assert tables["connections"]["ts_start"].min() > 1e9


def test_jsonl_bad_value_or_key_skips_the_line_not_the_file(tmp_path):
    data = _jsonl(tmp_path / "seed").decode().splitlines()
    data[3] = data[3].replace('"bytes_up": 1000', '"bytes_up": "lots"')
    data[4] = data[4].replace('"bin_s"', '"bin_sx"')
    data[8] = data[8].replace('"host": "s2.example"', '"host": "s2.\\udc80example"')
    path = tmp_path / "edited.jsonl"
    path.write_text("\n".join(data) + "\n")
    stats = ReplayStats()
    tables = replay_tables([path], stats=stats)
    note = " ".join(tables["sessions"]["note"].dropna())
    assert "skipped 2 torn or corrupt lines" in note and f"{path}:4" in note
    assert len(tables["connections"]) == 11 and len(tables["activity"]) == 11
    assert "s2.\ufffdexample" in set(tables["http"]["host"])


# --- property tests for the packet decoder ------------------------------------------------------

def _batch(packets: list[bytes], linktypes: list[int]) -> Batch:
    """A reader's batch over ``packets``, laid out as the pcap reader lays them out."""
    offsets, pos = [], 16
    for packet in packets:
        offsets.append(pos)
        pos += len(packet) + 16
    buf = np.zeros(pos + PAD, np.uint8)
    for off, packet in zip(offsets, packets, strict=True):
        buf[off : off + len(packet)] = np.frombuffer(packet, np.uint8)
    n = len(packets)
    caplen = np.asarray([len(p) for p in packets], np.int64)
    return Batch(buf, np.asarray(offsets, np.int64), caplen, caplen.copy(),
                 np.full(n, T0) + np.arange(n), np.asarray(linktypes, np.int64))


LINKTYPES = st.sampled_from([0, 1, 12, 101, 108, 113, 228, 229, 276, 9, 105, 127, 239, 220])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=120), LINKTYPES), max_size=12))
def test_decoder_takes_any_bytes(items):
    """Whatever the bytes: no exception, and every packet decoded is inside its capture."""
    decoder = Decoder()
    batch = _batch([p for p, _ in items], [lt for _, lt in items])
    packets = decoder.decode(batch)
    n = len(packets)
    assert all(getattr(packets, f).shape[0] == n for f in (
        "ts", "sport", "dport", "udp", "flags", "payload", "wire", "data", "captured"))
    assert ((packets.sport >= 0) & (packets.sport < 65536)).all()
    assert ((packets.dport >= 0) & (packets.dport < 65536)).all()
    assert (packets.payload >= 0).all() and (packets.captured >= 0).all()
    ok = packets.data >= 0
    assert (packets.data[ok] + packets.captured[ok] <= batch.buf.size - PAD).all()
    assert set(packets.ts.tolist()) <= set(batch.ts.tolist())


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@settings(max_examples=300, deadline=None)
@given(src=st.integers(1, 2**32 - 2), dst=st.integers(1, 2**32 - 2),
       sport=st.integers(1, 65535), dport=st.integers(1, 65535), udp=st.booleans(),
       payload=st.integers(0, 1400), vlan=st.booleans(), trailer=st.integers(0, 12))
def test_decoder_reads_the_fields_it_was_given(src, dst, sport, dport, udp, payload, vlan,
                                               trailer):
    """An Ethernet (optionally VLAN-tagged) IPv4 TCP or UDP packet decodes to its own fields,
    with Ethernet padding after the IP packet not counted as payload."""
    l4 = (struct.pack("!HHHH", sport, dport, 8 + payload, 0) if udp else
          struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x18, 65535, 0, 0))
    total = 20 + len(l4) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17 if udp else 6, 0,
                     src.to_bytes(4, "big"), dst.to_bytes(4, "big"))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    tag = struct.pack("!HH", 0x8100, 7) if vlan else b""
    frame = (b"\x02" * 6 + b"\x04" * 6 + tag + b"\x08\x00" + ip + l4 + b"\xab" * payload
             + b"\x00" * trailer)
    packets = Decoder().decode(_batch([frame], [1]))
    assert len(packets) == 1
    assert (int(packets.src_lo[0]) & 0xFFFFFFFF, int(packets.dst_lo[0]) & 0xFFFFFFFF) == (src, dst)
    assert (int(packets.sport[0]), int(packets.dport[0])) == (sport, dport)
    assert bool(packets.udp[0]) is udp
    assert int(packets.payload[0]) == payload and int(packets.wire[0]) == total


if __name__ == "__main__":  # the table for docs/reliability.md
    import tempfile

    total = time.perf_counter()
    print("| input | mutants | records | counted skips | one-line error | empty | read something "
          "| prefix checks | slowest case | peak RSS growth |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in FORMATS:
            r = fuzz(name, Path(tmp))
            print(f"| {name} | {r.cases} | {r.outcomes['records']} | {r.outcomes['skips']} | "
                  f"{r.outcomes['error']} | {r.outcomes['empty']} | {r.kept} | {r.prefix_checks} | "
                  f"{r.slowest:.2f} s | {r.rss_growth_mb:.0f} MB |", flush=True)
    print(f"\nall formats: {time.perf_counter() - total:.1f} s", file=sys.stderr)
