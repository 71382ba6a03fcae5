"""Findings end to end on synthetic record tables, and the `observer analyze` command."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict
from html import escape

import numpy as np
import pandas as pd
import pytest
from test_analysis_synth import TZ, Records, local, phone_week

from observer.analysis import (
    FINDINGS_VERSION,
    Findings,
    analyze_records,
    read_findings,
    records_stamp,
    write_findings,
)
from observer.catalog import Catalog
from observer.cli import main
from observer.config import LabConfig
from observer.records import conform, read_records, write_table
from observer.report import write_report

CONFIG = LabConfig(timezone=TZ)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog()


def by_group(findings: dict) -> dict[str, dict]:
    return {f["group"]: f for f in findings["findings"] if f["group_kind"] != "app"}


@pytest.fixture(scope="module")
def week(catalog):
    records, truth = phone_week(export_inside_chat=True)
    return analyze_records(records.tables(), CONFIG, catalog, n_sim=300), truth


def test_nightly_export_inside_the_chat_connection(week):
    findings, truth = week
    f = by_group(findings)["WhatsApp"]
    assert f["verdict"] == "periodic bulk upload" and not f["is_backup"]
    assert f["period_s"] == 86400.0
    hh, mm = map(int, f["phase_local"].split(":"))
    assert abs(hh * 60 + mm - 120) <= 15
    assert (f["occurrences"], f["expected"]) == (6, 7)
    assert f["p_value"] < 0.01 and f["confidence"] in ("high", "medium")
    assert 45e6 <= f["typical_bytes"] <= 56e6
    on = [e for e in f["events"] if e["on_schedule"]]
    starts = np.array([e["ts_start"] for e in on])
    assert len(starts) == len(truth) and np.all(np.abs(starts - np.array(truth)) <= 10)
    assert all(e["conn_ids"] == ["chat"] and e["local_time"].endswith("+01:00") for e in on)
    assert "every 24 hours (daily) at about 0" in f["summary"]


def test_backup_is_named_as_a_backup_and_others_get_their_verdicts(week):
    findings, _ = week
    groups = by_group(findings)
    backup = groups["Google Drive backup"]
    assert backup["verdict"] == "periodic bulk upload" and backup["is_backup"]
    assert backup["summary"].startswith("A scheduled backup: the phone uploaded")
    assert groups["WhatsApp media"]["verdict"] == "irregular uploads"
    checks = groups["WhatsApp media"]["schedule_checks"]
    assert checks is None or not all(checks.values())
    assert all(groups["WhatsApp"]["schedule_checks"].values())
    assert all(f["evidence_note"] is None for f in findings["findings"])  # activity bins
    assert groups["Google Play services"]["verdict"] == "periodic heartbeat"
    assert groups["Google Play services"]["period_s"] == pytest.approx(270, abs=10)
    assert findings["findings"][0]["verdict"] == "periodic bulk upload"
    json.dumps(findings, allow_nan=False)  # plain JSON, no numpy scalars


def test_findings_are_one_typed_versioned_table(week):
    findings, _ = week
    typed = Findings.from_dict(findings)
    assert typed.to_dict() == findings  # the JSON form is exactly the typed table
    assert typed.schema_version == FINDINGS_VERSION == findings["schema_version"]
    for f in typed.findings:
        assert f.label and f.device == "phone" and f.covered_s > 0
        assert all(e.ts_start <= e.ts_end for e in f.events)
    labels = {x.label for x in typed.labels}
    assert {f.label for f in typed.findings if f.group_kind != "app"} <= labels


def test_no_export_means_no_periodic_upload(catalog):
    records, _ = phone_week(skip=tuple(range(7)), seed=3)
    findings = analyze_records(records.tables(), CONFIG, catalog, n_sim=300)
    periodic = [f for f in findings["findings"]
                if f["verdict"] == "periodic bulk upload" and not f["is_backup"]]
    assert periodic == []


def test_nights_outside_the_sessions_are_not_missed(catalog):
    records, _ = phone_week(days=9, skip=(), backup=False, media=False, seed=5)
    t = records.tables()
    start = dt.date(2026, 3, 2)
    # Two sessions with a two-day hole; drop everything recorded in the hole.
    s1, e1 = local(start, 0), local(start + dt.timedelta(days=4), 0)
    s2, e2 = local(start + dt.timedelta(days=6), 0), local(start + dt.timedelta(days=9), 0)
    act = t["activity"]
    t["activity"] = act[(act["ts_bin"] < e1) | (act["ts_bin"] >= s2)]
    t["sessions"] = conform("sessions", pd.DataFrame({
        "session_id": ["a", "b"], "device": "phone", "ts_start": [s1, s2], "ts_end": [e1, e2]}))
    findings = analyze_records(t, CONFIG, catalog, n_sim=300)
    f = by_group(findings)["WhatsApp"]
    assert f["verdict"] == "periodic bulk upload"
    assert (f["occurrences"], f["expected"]) == (7, 7)
    assert findings["coverage"]["gaps"] == [[e1, s2]]


def test_connection_totals_only_still_find_the_schedule(catalog):
    r = Records()
    start = dt.date(2026, 3, 2)
    rng = np.random.default_rng(2)
    for d in range(7):
        at = local(start + dt.timedelta(days=d), 2.0) + rng.uniform(-600, 600)
        r.connection(f"x{d}", "sync.example-analytics.net", "203.0.113.7", at, at + 40,
                     binned=False, up=30_000_000, down=8_000)
        for k in range(30):
            t0 = local(start + dt.timedelta(days=d), 8 + k / 2)
            r.connection(f"c{d}-{k}", "g.whatsapp.net", "157.240.1.53", t0, t0 + 60,
                         binned=False, up=3_000, down=9_000)
    findings = analyze_records(r.tables(), CONFIG, catalog, n_sim=300)
    f = by_group(findings)["example-analytics.net"]
    assert f["verdict"] == "periodic bulk upload"
    assert all(e["from_totals"] for e in f["events"])


def sparse_import_week(*, sessions: bool) -> dict[str, pd.DataFrame]:
    """A week of PCAPdroid-CSV-like records: connection totals only, an app per connection, and
    8-hour silences on both sides of a nightly 02:00 upload."""
    r = Records()
    start = dt.date(2026, 3, 2)
    rng = np.random.default_rng(4)
    for d in range(7):
        day = start + dt.timedelta(days=d)
        at = local(day, 2.0) + rng.uniform(-300, 300)
        r.connection(f"x{d}", "sync.example-analytics.net", "203.0.113.7", at, at + 40,
                     binned=False, up=30_000_000, down=8_000, app="Tracker")
        for k in range(8):
            t0 = local(day, 10 + k)
            r.connection(f"c{d}-{k}", "g.whatsapp.net", "157.240.1.53", t0, t0 + 60,
                         binned=False, up=3_000, down=9_000, app="WhatsApp")
    t = r.tables()
    c = t["connections"].assign(source="import")
    t["connections"] = c
    if sessions:
        t["sessions"] = conform("sessions", pd.DataFrame({
            "session_id": ["csv"], "source": ["import"], "ts_start": [c["ts_start"].min()],
            "ts_end": [c["ts_end"].max()]}))
    return t


@pytest.mark.parametrize("sessions", [True, False])
def test_sparse_imports_are_covered_over_their_whole_span(catalog, sessions):
    t = sparse_import_week(sessions=sessions)
    findings = analyze_records(t, CONFIG, catalog, n_sim=200)
    span = t["connections"]["ts_end"].max() - t["connections"]["ts_start"].min()
    assert findings["coverage"]["covered_s"] == pytest.approx(span)
    assert findings["coverage"]["devices"]["phone"]["silent_gaps"] == []
    f = by_group(findings)["example-analytics.net"]
    assert f["verdict"] == "periodic bulk upload"
    assert (f["occurrences"], f["expected"]) == (7, 7)
    assert "seen on 7 of 7 expected nights" in f["summary"]
    assert f["evidence_note"].startswith("All bulk upload events come from connection totals")
    assert f["evidence_note"] in f["summary"]
    app = next(g for g in findings["findings"] if g["group_kind"] == "app"
               and g["group"] == "Tracker")
    assert app["verdict"] == "periodic bulk upload"
    assert app["summary"].startswith("The app Tracker uploaded about 30.0 MB to "
                                     "sync.example-analytics.net every 24 hours (daily) at about 0")
    assert app["evidence_note"] in app["summary"]


def test_empty_records_give_no_findings(catalog):
    findings = analyze_records({}, CONFIG, catalog, n_sim=100)
    assert findings["findings"] == []


def test_cli_writes_findings_and_prints_a_line_per_notable_group(tmp_path, capsys):
    records, _ = phone_week(export_inside_chat=False, media=False, seed=8)
    for table, frame in records.tables().items():
        write_table(tmp_path / "rec", table, frame)
    cfg = tmp_path / "lab.yaml"
    cfg.write_text(f"timezone: {TZ}\n")
    assert main(["analyze", str(tmp_path / "rec"), "--config", str(cfg), "--simulations",
                 "200"]) == 0
    out = capsys.readouterr().out
    assert "example-analytics.net every 24 hours (daily) at about 0" in out
    assert "A scheduled backup" in out
    saved = json.loads((tmp_path / "rec" / "findings.json").read_text())
    assert saved["timezone"] == TZ and saved["findings"][0]["verdict"] == "periodic bulk upload"
    assert saved["records"] == asdict(records_stamp(tmp_path / "rec"))
    # One voice: the lines printed are the stored sentences, and the report shows the same.
    notable = [f for f in saved["findings"] if f["verdict"] != "nothing notable"]
    printed = [line[3:] for line in out.splitlines() if line[:2].strip() in ("!!", "~", "+")]
    assert printed == [f["summary"] for f in notable]
    report = write_report(read_records(tmp_path / "rec"),
                          read_findings(tmp_path / "rec" / "findings.json"), tmp_path / "report")
    html = report.read_text(encoding="utf-8")
    assert all(escape(f["summary"], quote=True) in html for f in notable)


def test_without_a_time_zone_local_times_say_utc_and_how_to_set_it(tmp_path, capsys):
    records, _ = phone_week(export_inside_chat=False, media=False, seed=8)
    for table, frame in records.tables().items():
        write_table(tmp_path / "rec", table, frame)
    assert main(["analyze", str(tmp_path / "rec"), "--simulations", "200"]) == 0
    out = capsys.readouterr().out
    assert "UTC (no time zone configured)" in out
    assert "note: Times are UTC: no time zone was configured." in out
    assert "'timezone: Europe/Berlin'" in out and "local time (UTC)" not in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("observer analyze: error:") and "does not exist" in err
    assert "\n" not in err


def test_write_findings_is_atomic_json(tmp_path):
    findings = Findings(findings=[], parameters={"x": np.float64(1.5), "y": float("nan")})
    path = write_findings(findings, tmp_path / "f.json")
    saved = json.loads(path.read_text())
    assert saved["parameters"] == {"x": 1.5, "y": None}
    assert saved["schema_version"] == FINDINGS_VERSION
    assert not (tmp_path / "f.json.tmp").exists()
