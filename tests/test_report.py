"""The report: wording, aggregation in local time, escaping of hostile names, CSV, the command."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest
from test_report_synthetic import TZ, synthetic_findings, synthetic_records

from observer.analysis import records_stamp
from observer.analysis.findings import endpoint_labels
from observer.analysis.groups import endpoint_groups
from observer.catalog import Catalog
from observer.config import LabConfig
from observer.records import conform, write_table
from observer.records.export import neutralise
from observer.report import aggregate, write_report
from observer.report.text import md_escape
from observer.words import human_bytes, human_duration, period_words, verdict_sentence

HOSTILE = {
    # A TLS SNI with markup and script, a single label so it also becomes a plot label.
    "export": '<script>alert("sni")</script>',
    # An HTTP Host that tries to break out of an attribute, with mathtext and a Markdown link.
    "backup": '"><img src=x onerror=alert(1)>$\\frac{1}{2}$[x](javascript:alert(2))|.evil.test',
    # A DNS name that tries to close the stylesheet, and a spreadsheet formula.
    "chat": '=HYPERLINK("http://evil.test","</style><svg onload=alert(3)>")',
}


# --- wording -------------------------------------------------------------------------------------


def test_sizes_durations_and_periods_read_naturally():
    assert human_bytes(512) == "512 bytes"
    assert human_bytes(48_000_000) == "48.0 MB"
    assert human_bytes(1_234_000_000) == "1.2 GB"
    assert human_bytes(None) == "–"
    assert human_duration(3600) == "1 hour"
    assert human_duration(300) == "5 minutes"
    assert human_duration(86400) == "24 hours"
    assert human_duration(7 * 86400) == "7 days"
    assert period_words(86400.0) == "every 24 hours (daily)"
    assert period_words(86400.0 * 1.01) == "every 24 hours (daily)"
    assert period_words(6 * 3600.0) == "every 6 hours"
    assert period_words(None) == "at no fixed interval"


def test_verdict_sentences_name_backups_and_quote_the_numbers():
    records = synthetic_records(days=7, browsing_per_day=2)
    backup, export, quiet = synthetic_findings(records)["findings"]
    text = verdict_sentence(backup, TZ)
    assert text.startswith("A scheduled backup: the phone uploaded about 48.0 MB to Google Drive")
    assert "every 24 hours (daily) at about 02:00 local time (Europe/Berlin)" in text
    assert "6 of 7 expected nights" in text and "Confidence: high (p < 0.001" in text
    text = verdict_sentence(export, TZ)
    assert text.startswith("The phone uploaded about 9.0 MB to tracker-example.com every 24 hours")
    assert "backup" not in text
    heartbeat = {**export, "verdict": "periodic heartbeat", "typical_bytes": 900, "period_s": 270.0}
    assert "a heartbeat, not a bulk upload" in verdict_sentence(heartbeat, TZ)
    assert verdict_sentence(quiet, TZ) == "Nothing notable: no bulk uploads to WhatsApp (Meta)."
    irregular = {**export, "verdict": "irregular uploads", "bulk_events": 17, "p_value": 0.064}
    text = verdict_sentence(irregular, TZ)
    assert text.startswith("The phone made 17 bulk uploads to tracker-example.com")
    assert "at irregular times" in text and "is not significant (p = 0.064" in text
    checks = {
        "significant": True,
        "enough_occurrences": True,
        "most_cycles_seen": True,
        "one_upload_per_cycle": False,
        "tight_timing": False,
    }
    text = verdict_sentence({**irregular, "p_value": 0.002, "schedule_checks": checks}, TZ)
    assert text.endswith(
        "Their timing is not random (p = 0.002, corrected), but they do not follow a daily "
        "schedule: several uploads in one cycle, the time of day varies too much."
    )


def test_markdown_and_csv_cells_are_neutralised():
    assert md_escape("<b>x</b> | [a](b)\n#1") == "&lt;b&gt;x&lt;/b&gt; \\| \\[a\\](b) \\#1"
    for bad in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"):
        assert neutralise(bad) == "'" + bad
    assert neutralise("  =1+1") == "'  =1+1"
    assert neutralise("mmg.whatsapp.net") == "mmg.whatsapp.net"
    assert neutralise(-5) == -5


# --- aggregation ---------------------------------------------------------------------------------


def labelled(conns: pd.DataFrame) -> pd.DataFrame:
    """Each connection's label as the analysis gives it (the report never labels on its own)."""
    groups = endpoint_groups(conns, Catalog())
    return aggregate.label_connections(conns, endpoint_labels(conns, groups))


def _nightly(zone: str, first: datetime, days: int, hour: int) -> dict[str, pd.DataFrame]:
    """One 20 MB upload per night at ``hour`` local time, as activity bins."""
    tz = ZoneInfo(zone)
    starts = [
        datetime(first.year, first.month, first.day + d, hour, 5, tzinfo=tz).timestamp()
        for d in range(days)
    ]
    conns = conform(
        "connections",
        pd.DataFrame(
            {
                "conn_id": [f"c{d}" for d in range(days)],
                "device": "phone",
                "server_ip": "192.0.2.1",
                "server_name": "up.example.com",
                "ts_start": starts,
                "ts_end": [s + 60 for s in starts],
                "bytes_up": 20_000_000,
                "bytes_down": 1000,
            }
        ),
    )
    activity = conform(
        "activity",
        pd.DataFrame(
            {
                "conn_id": [f"c{d}" for d in range(days)],
                "device": "phone",
                "ts_bin": starts,
                "bin_s": 10.0,
                "bytes_up": 20_000_000,
                "bytes_down": 1000,
            }
        ),
    )
    return {"connections": conns, "activity": activity}


@pytest.mark.parametrize(
    ("zone", "first"),
    [
        ("Europe/Berlin", datetime(2026, 10, 22)),  # crosses the end of summer time (25 Oct)
        ("Asia/Kolkata", datetime(2026, 3, 1)),  # a half-hour offset
        ("America/New_York", datetime(2026, 3, 5)),  # crosses the start of summer time (8 Mar)
    ],
)
def test_heatmap_puts_a_nightly_upload_in_its_local_hour_every_day(zone, first):
    records = _nightly(zone, first, days=7, hour=4)
    labels = labelled(records["connections"])
    flow = aggregate.traffic(records, labels["label"])
    t0, t1 = aggregate.span(records)
    heat = aggregate.heatmap(flow, ZoneInfo(zone), t0, t1)
    assert len(heat.days) == 7
    assert heat.days[0] == pd.Timestamp(first)
    assert np.array_equal(np.nonzero(heat.up)[1], [4] * 7)
    assert heat.up.sum() == 7 * 20_000_000


def test_timeline_keeps_every_byte_and_uses_bins_for_long_connections():
    records = synthetic_records(days=3, browsing_per_day=10)
    labels = labelled(records["connections"])
    flow = aggregate.traffic(records, labels["label"])
    # Drop the bins of one connection: its bytes must still count, from the connection row.
    records["activity"] = records["activity"][records["activity"]["conn_id"] != "export-1"]
    flow_partial = aggregate.traffic(records, labels["label"])
    for f in (flow, flow_partial):
        t0, t1 = aggregate.span(records)
        tl = aggregate.timeline(f, t0, t1, aggregate.top_services(f, []))
        assert tl.up.sum() == pytest.approx(f["bytes_up"].sum())
        assert len(tl.services) <= aggregate.MAX_SERVICES + 1
    assert abs(flow["bytes_up"].sum() - flow_partial["bytes_up"].sum()) < 100
    # The chat socket is spread over its keepalive bins, not lumped at its start.
    chat = flow[flow["service"] == "WhatsApp"]
    assert len(chat) > 300


def test_endpoints_name_services_and_keep_unnamed_addresses():
    records = synthetic_records(days=2, browsing_per_day=10)
    conns = records["connections"]
    table = aggregate.endpoints(conns, labelled(conns))
    backup = table[table["name"] == "backup.googleapis.com"].iloc[0]
    assert (backup["service"], backup["organization"]) == ("Google Drive backup", "Google")
    assert table.iloc[0]["name"] == "backup.googleapis.com"
    unnamed = table[~table["named"]]
    assert len(unnamed) > 0 and unnamed["name"].str.startswith("198.51.100.").all()
    assert table["connections"].sum() == len(conns)
    assert table["bytes_up"].sum() == conns["bytes_up"].sum()


def test_event_table_lists_the_missed_night(tmp_path):
    records = synthetic_records(days=7, browsing_per_day=2)
    page = write_report(records, synthetic_findings(records), tmp_path)
    html = page.read_text(encoding="utf-8")
    # The synthetic backup skips the night of Thu 5 Nov; the capture was running then.
    assert html.count('<tr class="missed">') == 1
    missed = '<tr class="missed"><td class="when">Thu 5 Nov</td><td colspan="5">no upload</td>'
    assert missed in html
    assert "| Thu 5 Nov | no upload | | | | |" in (tmp_path / "report.md").read_text()


def test_coverage_is_the_analysis_coverage_and_sessions_only_draw_lanes():
    records = synthetic_records(days=7, browsing_per_day=2)
    found = synthetic_findings(records)["coverage"]
    t0, t1 = aggregate.span(records)
    cov = aggregate.coverage(found, records["sessions"], t0, t1)
    assert cov.known and not cov.inferred and len(cov.sessions) == 2
    assert cov.gaps == [tuple(g) for g in found["gaps"]] and cov.covered_s == found["covered_s"]
    # A different analysis coverage changes the report's gaps, whatever the sessions say.
    other = {**found, "gaps": [[t0 + 3600, t0 + 7200]], "covered_s": 1.0}
    cov = aggregate.coverage(other, records["sessions"], t0, t1)
    assert cov.gaps == [(t0 + 3600, t0 + 7200)] and cov.covered_s == 1.0
    inferred = aggregate.coverage(found, conform("sessions", pd.DataFrame()), t0, t1)
    assert inferred.inferred and inferred.gaps == [tuple(g) for g in found["gaps"]]
    assert aggregate.coverage({}, records["sessions"], t0, t1).known is False


# --- hostile names -------------------------------------------------------------------------------


# Every element the report may contain: no script, iframe, object, svg, form or link.
# fmt: off
ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "p", "strong",
    "em", "section", "article", "span", "dl", "div", "dt", "dd", "code", "ul", "li", "a", "figure",
    "img", "figcaption", "table", "thead", "tbody", "tr", "th", "td", "footer",
}
# fmt: on


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.style = ""
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data


def hostile_records() -> tuple[dict[str, pd.DataFrame], dict]:
    records = synthetic_records(days=7, browsing_per_day=10, names=HOSTILE)
    sessions = records["sessions"].copy()
    sessions["interface"] = ["<b>capture</b>.pcap", "-2+3 @eth0"]
    records["sessions"] = conform("sessions", sessions)
    records["dns"] = conform(
        "dns",
        pd.DataFrame(
            {
                "device": ["pixel-7"],
                "ts": [records["connections"]["ts_start"].min()],
                "query": [HOSTILE["chat"]],
                "answer_type": ["A"],
                "answer": ["157.240.1.53"],
            }
        ),
    )
    findings = synthetic_findings(records, names=HOSTILE)
    findings["findings"][1]["group"] = findings["findings"][1]["service"] = HOSTILE["export"]
    findings["findings"][1]["summary"] = HOSTILE["backup"]
    return records, findings


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory) -> Path:
    records, findings = hostile_records()
    return write_report(records, findings, tmp_path_factory.mktemp("h"))


def test_hostile_names_are_escaped_in_the_html(hostile_report):
    html = hostile_report.read_text(encoding="utf-8")
    for name in HOSTILE.values():
        assert name not in html
    assert "<script" not in html.lower() and "onerror=" not in html.replace("onerror=alert", "")
    assert "&lt;script&gt;alert(&#34;sni&#34;)&lt;/script&gt;" in html
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    parser = _Tags()
    parser.feed(html)
    tags = {tag for tag, _ in parser.tags}
    assert tags <= ALLOWED_TAGS, tags - ALLOWED_TAGS
    for tag, attrs in parser.tags:
        assert not any(key.startswith("on") for key in attrs), (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/svg+xml;base64,")
        if tag == "a":
            assert attrs["href"].startswith("#")
    # The policy is in the page and pins the one stylesheet by its hash.
    policy = next(
        a["content"] for t, a in parser.tags if a.get("http-equiv") == "Content-Security-Policy"
    )
    digest = base64.b64encode(hashlib.sha256(parser.style.encode()).digest()).decode()
    assert policy == (
        f"default-src 'none'; img-src data:; style-src 'sha256-{digest}'; "
        "base-uri 'none'; form-action 'none'"
    )


def test_hostile_names_stay_text_inside_the_svg_plots(hostile_report):
    html = hostile_report.read_text(encoding="utf-8")
    texts = []
    for uri in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', html):
        root = ET.fromstring(base64.b64decode(uri))  # well-formed XML, or this raises
        for element in root.iter():
            tag = element.tag.rsplit("}", 1)[-1]
            assert tag not in ("script", "foreignObject", "iframe")
            assert not any(k.rsplit("}", 1)[-1].startswith("on") for k in element.attrib)
            texts.append("".join(element.itertext()))
    joined = "\n".join(texts)
    # Drawn literally (no mathtext), as text the XML parser gave back unchanged.
    assert '<script>alert("sni")</script>' in joined
    assert "<b>capture</b>.pcap" in joined


def test_hostile_names_are_escaped_in_markdown_csv_and_kept_in_json(hostile_report):
    out = hostile_report.parent
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "<script" not in markdown and "<img" not in markdown
    assert "\\[x\\](javascript" in markdown  # brackets escaped: no link can form
    assert re.search(r"(?<!\\)\]\(", markdown) is None
    assert "&lt;script&gt;alert(&quot;sni&quot;)&lt;/script&gt;" in markdown
    # Every row of every table keeps its column count: no name adds an unescaped pipe.
    for block in re.findall(r"(?:^\|.*\|$\n?)+", markdown, flags=re.M):
        widths = {len(re.findall(r"(?<!\\)\|", row)) for row in block.strip().splitlines()}
        assert len(widths) == 1, block
    with (out / "endpoints.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][0] == "name"
    cells = [cell for row in rows[1:] for cell in row]
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in cells)
    assert "'" + HOSTILE["chat"] in cells
    findings = json.loads((out / "findings.json").read_text(encoding="utf-8"))
    assert findings["findings"][1]["group"] == HOSTILE["export"]


# --- hostile names through a real capture: scapy pcap -> replay -> analysis -> report -----------

PHONE = "10.0.0.23"
REPLAYED = {
    "dns": "<img src=x onerror=alert(3)>.dns.test",
    "sni": '<script>alert("sni")</script>',
    "http": '"><svg onload=alert(1)>',
    "formula": "=cmd|' /c calc'!a1",
}


def _client_hello(name: str) -> bytes:
    """A minimal TLS 1.3 ClientHello record carrying ``name`` as its SNI."""
    sni = name.encode()
    entry = b"\x00" + len(sni).to_bytes(2, "big") + sni
    ext = b"\x00\x00" + (len(entry) + 2).to_bytes(2, "big") + len(entry).to_bytes(2, "big") + entry
    body = b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
    body += len(ext).to_bytes(2, "big") + ext
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


def _tcp(t: float, sport: int, dst: str, dport: int, first: bytes, upload: int) -> list:
    from scapy.all import IP, TCP, Ether, Raw

    up = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=PHONE, dst=dst)
    down = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / IP(src=dst, dst=PHONE)
    seq, ack = 1000, 5000
    packets = [
        (t, up / TCP(sport=sport, dport=dport, flags="S", seq=seq - 1)),
        (t + 0.01, down / TCP(sport=dport, dport=sport, flags="SA", seq=ack - 1, ack=seq)),
        (t + 0.02, up / TCP(sport=sport, dport=dport, flags="A", seq=seq, ack=ack)),
        (t + 0.03, up / TCP(sport=sport, dport=dport, flags="PA", seq=seq, ack=ack) / Raw(first)),
    ]
    seq += len(first)
    for i in range(upload // 1400):
        packets.append(
            (
                t + 0.05 + i * 0.001,
                up / TCP(sport=sport, dport=dport, flags="A", seq=seq, ack=ack) / Raw(bytes(1400)),
            )
        )
        seq += 1400
    packets.append((t + 2, up / TCP(sport=sport, dport=dport, flags="FA", seq=seq, ack=ack)))
    return packets


def write_hostile_pcap(path: Path, t0: float = 1772406000.0) -> Path:
    """A capture whose DNS answer, TLS SNI and HTTP Host are markup, script and a formula."""
    from scapy.all import DNS, DNSQR, DNSRR, IP, UDP, Ether, wrpcap

    name = REPLAYED["dns"]
    answer = DNS(
        id=1,
        qr=1,
        qd=DNSQR(qname=name),
        an=DNSRR(rrname=name, type="A", rdata="203.0.113.50", ttl=60),
    )
    packets = [(t0, Ether() / IP(src="10.0.0.1", dst=PHONE) / UDP(sport=53, dport=40000) / answer)]
    packets += _tcp(
        t0 + 1, 41000, "203.0.113.50", 443, b"\x17\x03\x03\x00\x10" + bytes(16), 300_000
    )
    packets += _tcp(t0 + 10, 41001, "203.0.113.7", 443, _client_hello(REPLAYED["sni"]), 300_000)
    request = f"POST /up HTTP/1.1\r\nHost: {REPLAYED['http']}\r\nContent-Length: 9\r\n\r\n"
    packets += _tcp(t0 + 20, 41002, "198.51.100.80", 80, request.encode(), 300_000)
    packets += _tcp(t0 + 30, 41003, "203.0.113.9", 443, _client_hello(REPLAYED["formula"]), 99_000)
    frames = []
    for t, packet in packets:
        packet.time = t
        frames.append(packet)
    wrpcap(str(path), frames)
    return path


@pytest.fixture(scope="module")
def replayed_report(tmp_path_factory) -> Path:
    """observer replay + observer report (which runs the analysis) on the hostile capture."""
    pytest.importorskip("observer.sources.pipeline")
    tmp = tmp_path_factory.mktemp("replayed")
    pcap = write_hostile_pcap(tmp / "hostile.pcap")
    from observer.sources import replay

    stats = replay([pcap], tmp / "records", config=LabConfig(timezone=TZ), overwrite=True)
    assert stats.rows["connections"] >= 4
    result = _observer("report", str(tmp / "records"), "-o", str(tmp / "report"))
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())


def test_replayed_hostile_names_come_out_escaped(replayed_report):
    from observer.records import read_table

    names = set(
        read_table(replayed_report.parents[1] / "records", "connections")["server_name"].dropna()
    )
    assert set(REPLAYED.values()) <= names  # the replay really named them; now the report(s):
    root = replayed_report.parent  # report.html, or index.html over one report per device
    pages = sorted(root.rglob("report.html"))
    html = "".join(p.read_text(encoding="utf-8") for p in [*pages, replayed_report])
    assert "<script" not in html.lower() and "<svg" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#34;sni&#34;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(3)&gt;.dns.test" in html
    assert "&#34;&gt;&lt;svg onload=alert(1)&gt;" in html
    for page in [*pages, replayed_report]:
        parser = _Tags()
        parser.feed(page.read_text(encoding="utf-8"))
        policy = next(a["content"] for _, a in parser.tags if a.get("http-equiv"))
        assert policy.startswith("default-src 'none'; img-src data:; style-src 'sha256-")
    markdown = "".join(p.read_text(encoding="utf-8") for p in root.rglob("report.md"))
    assert "<script" not in markdown and "<svg" not in markdown and "<img" not in markdown
    cells = []
    for table in root.rglob("endpoints.csv"):
        with table.open(newline="", encoding="utf-8") as fh:
            cells += [cell for row in csv.reader(fh) for cell in row]
    assert "'" + REPLAYED["formula"] in cells and REPLAYED["formula"] not in cells
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in cells)


# --- the command ---------------------------------------------------------------------------------


def _observer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "observer", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )


def test_report_command_uses_fresh_findings_and_never_stale_ones(tmp_path):
    records = synthetic_records(days=3, browsing_per_day=5)
    rdir = tmp_path / "records"
    for table, df in records.items():
        write_table(rdir, table, df)
    findings = synthetic_findings(records)
    findings["records"] = asdict(records_stamp(rdir))
    findings["findings"][0]["summary"] = "A sentence only the stored findings hold."
    (rdir / "findings.json").write_text(json.dumps(findings))
    result = _observer("report", str(rdir), "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    html_path = Path(result.stdout.strip())
    assert html_path == tmp_path / "out" / "report.html"
    html = html_path.read_text(encoding="utf-8")
    # The stored findings were used: their zone and their own sentence.
    assert "times in Europe/Berlin" in html and "Google Drive backup (Google)" in html
    assert findings["findings"][0]["summary"] in html
    assert findings["records"]["fingerprint"] in html
    assert {p.name for p in html_path.parent.iterdir()} == {
        "report.html",
        "report.md",
        "findings.json",
        "endpoints.csv",
    }
    # New records arrive after the analysis: the stored findings no longer describe them.
    more = synthetic_records(days=1, browsing_per_day=1)["connections"].assign(
        conn_id=lambda c: "late-" + c["conn_id"])
    write_table(rdir, "connections", more)
    result = _observer("report", str(rdir), "-o", str(tmp_path / "again"))
    assert result.returncode == 0, result.stderr
    assert "analysing again (the records changed" in result.stderr
    html = (tmp_path / "again" / "report.html").read_text(encoding="utf-8")
    assert findings["findings"][0]["summary"] not in html
    # The lab's time zone (a setting, not a result) carries over to the new analysis.
    assert "times in Europe/Berlin" in html and "no time zone was configured" not in html
    saved = json.loads((tmp_path / "again" / "findings.json").read_text())
    assert saved["records"] == asdict(records_stamp(rdir)) != findings["records"]


def test_report_command_refuses_empty_records(tmp_path):
    (tmp_path / "records").mkdir()
    result = _observer("report", str(tmp_path / "records"), "-o", str(tmp_path / "out"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "no connection records, nothing to report" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and not (tmp_path / "out").exists()


def test_report_command_errors_are_one_line(tmp_path):
    result = _observer("report", str(tmp_path / "missing"), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    rdir = tmp_path / "records"
    write_table(rdir, "connections", synthetic_records(days=1, browsing_per_day=1)["connections"])
    (rdir / "findings.json").write_text('{"findings": [')
    result = _observer("report", str(rdir), "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "findings.json: not valid JSON" in result.stderr


def test_empty_records_say_nothing_was_observed(tmp_path):
    page = write_report({}, {"findings": []}, tmp_path)
    html = page.read_text(encoding="utf-8")
    assert "No connection records: nothing was observed" in html
    assert "No session records, so coverage is unknown." in html
    assert len(re.findall(r'src="data:image/svg\+xml;base64,', html)) == 3


def test_app_findings_name_the_app_and_carry_the_evidence_note():
    finding = {
        "group": "WhatsApp", "group_kind": "app", "names": ["sync.example.net"],
        "verdict": "periodic bulk upload", "period_s": 86400.0, "phase_local": "02:00",
        "typical_bytes": 30e6, "occurrences": 7, "expected": 7, "p_value": 1e-5,
        "confidence": "high", "evidence_note": "Events come from connection totals.",
    }
    sentence = verdict_sentence(finding, "Europe/Berlin")
    assert sentence.startswith("The app WhatsApp uploaded about 30.0 MB to sync.example.net")
    assert sentence.endswith("Events come from connection totals.")
    finding.update(group_kind="service", label="Acme", evidence_note=None)
    assert verdict_sentence(finding, "UTC").startswith("The phone uploaded about 30.0 MB to Acme")


# --- bounds, empty input, fleets -----------------------------------------------------------------


def test_absurd_timestamps_are_left_out_and_the_report_stays_small(tmp_path):
    records = synthetic_records(days=3, browsing_per_day=2)
    findings = synthetic_findings(records)
    conns = records["connections"]
    absurd = [0.0, 1e10, 1.6e10, 1e15, -5e9]  # 1970, 2286, 2477, year ~31 million, 1811
    bad = conns.head(len(absurd)).assign(
        conn_id=[f"absurd-{i}" for i in range(len(absurd))], ts_start=absurd,
        ts_end=[t + 60 for t in absurd], bytes_up=5_000_000)
    records["connections"] = conform("connections", pd.concat([conns, bad], ignore_index=True))
    bins = records["activity"].head(len(absurd)).assign(
        conn_id=bad["conn_id"].to_numpy(), ts_bin=absurd)
    records["activity"] = conform("activity", pd.concat([records["activity"], bins]))
    findings["coverage"]["gaps"].append([1e15, 1e15 + 10])
    t = datetime.now().timestamp()
    page = write_report(records, findings, tmp_path)
    assert datetime.now().timestamp() - t < 30
    html = page.read_text(encoding="utf-8")
    assert page.stat().st_size < 3_000_000
    assert "5 connections with times outside 1990–2100" in html
    assert "Jan 1970" not in html and "2286" not in html
    # The bins themselves are bounded whatever the span the records claim.
    flow = aggregate.traffic(records, labelled(records["connections"])["label"])
    lo, hi = aggregate.SANE_WINDOW
    tl = aggregate.timeline(flow, lo, hi, [])
    assert len(tl.starts) <= aggregate.MAX_BINS + 2
    heat = aggregate.heatmap(flow, ZoneInfo(TZ), lo, hi)
    assert len(heat.days) <= aggregate.MAX_DAY_ROWS and heat.up.sum() == flow["bytes_up"].sum()


def test_long_names_are_shortened_in_titles_and_kept_whole_in_tables(tmp_path):
    long = "x" * 300 + ".example-analytics.net"
    records = synthetic_records(days=7, browsing_per_day=2, names={"export": long})
    findings = synthetic_findings(records, names={"export": long})
    findings["findings"][1]["group"] = findings["findings"][1]["label"] = long
    html = write_report(records, findings, tmp_path).read_text(encoding="utf-8")
    headline = re.search(r'<p class="headline" id="headline">(.*?)</p>', html, re.S)[1]
    assert long not in headline and "x" * 70 in headline and "…" in headline
    titles = re.findall(r"<h3>(.*?)<", html)
    assert all(len(t) <= 90 for t in titles)
    assert long in html  # the endpoint table and the names list keep it whole
    with (tmp_path / "endpoints.csv").open(newline="", encoding="utf-8") as fh:
        assert long in {cell for row in csv.reader(fh) for cell in row}


def test_fleet_report_has_an_index_a_report_per_device_and_one_summary(tmp_path):
    one = synthetic_records(days=7, browsing_per_day=2)
    two = {t: df.assign(device="../evil <b>phone</b>") if "device" in df.columns else df
           for t, df in synthetic_records(days=7, browsing_per_day=2).items()}
    # The second phone has no nightly export: drop its tracker connections and their bins.
    gone = two["connections"]["conn_id"].str.startswith("export-")
    two["connections"] = two["connections"][~gone]
    two["activity"] = two["activity"][~two["activity"]["conn_id"].str.startswith("export-")]
    rdir = tmp_path / "records"
    for records in (one, two):
        for table, df in records.items():
            write_table(rdir, table, df.assign(conn_id="b-" + df["conn_id"])
                        if records is two and "conn_id" in df.columns else df)
    cfg = tmp_path / "lab.yaml"
    cfg.write_text(f"timezone: {TZ}\n")
    result = _observer("report", str(rdir), "-o", str(tmp_path / "out"), "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    index = Path(result.stdout.strip())
    assert index == tmp_path / "out" / "index.html"
    fleet = json.loads((tmp_path / "out" / "fleet.json").read_text(encoding="utf-8"))
    rows = {d["device"]: d for d in fleet["devices"]}
    assert set(rows) == {"pixel-7", "../evil <b>phone</b>"}
    assert fleet["records"] == asdict(records_stamp(rdir))
    assert rows["pixel-7"]["answer"] == "export"
    assert "tracker-example.com" in rows["pixel-7"]["largest_schedule"]["label"]
    assert rows["../evil <b>phone</b>"]["answer"] != "export"
    for row in rows.values():
        page = tmp_path / "out" / row["report"]
        assert page.is_file() and page.resolve().is_relative_to((tmp_path / "out").resolve())
        assert 0 < row["coverage"]["covered_s"] <= row["coverage"]["span_s"]
    html = index.read_text(encoding="utf-8")
    assert "&lt;b&gt;phone&lt;/b&gt;" in html and "<b>phone" not in html
    assert html.count("<tr class=") == 2 and 'href="pixel-7/report.html"' in html
    assert "1 of 2 devices show a periodic bulk upload" in html
    mine = (tmp_path / "out" / rows["pixel-7"]["report"]).read_text(encoding="utf-8")
    assert "evil" not in mine  # each device's report is that device's only


def test_csv_export_follows_rfc_4180_and_defuses_formulas(tmp_path):
    from observer.cli import main

    conns = synthetic_records(days=2, browsing_per_day=4)["connections"].head(6).copy()
    tricky = ["two\r\nlines", "  leading spaces", 'a "quoted", name', "=1+1", " @SUM(A1)",
              "plain.example.net"]
    conns["server_name"] = tricky
    rdir = tmp_path / "records"
    write_table(rdir, "connections", conns)
    out = tmp_path / "conns.csv"
    assert main(["export", str(rdir), "--format", "csv", "-o", str(out)]) == 0
    raw = out.read_bytes().decode("utf-8")
    assert raw.count("\r\n") == len(conns) + 2  # header, rows, and the one inside a quoted cell
    assert '"two\r\nlines"' in raw and '"  leading spaces"' in raw
    assert '"a ""quoted"", name"' in raw and ",plain.example.net," in raw
    with out.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    names = sorted(r["server_name"] for r in rows)
    assert names == sorted(["two\r\nlines", "  leading spaces", 'a "quoted", name', "'=1+1",
                            "' @SUM(A1)", "plain.example.net"])
    assert all(r["bytes_up"].lstrip("-").isdigit() for r in rows)
