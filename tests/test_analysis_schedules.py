"""Schedules on simulated captures (simulate -> replay -> analyze) where a verdict used to hide
or misname a job: a chat connection that both beats and carries a nightly upload, a capture of
only three nights, and jobs whose period is a harmonic of another (31 h seen as 62 h)."""

from __future__ import annotations

from pathlib import Path

import pytest

from observer.analysis import analyze
from observer.records import read_records
from observer.records.findings import Finding
from observer.simulate import Scenario, simulate
from observer.sources import replay

HOUR = 3600.0
EXPORT = {"name": "export", "kind": "export", "server_name": "sync.example-analytics.net",
          "size_mb": 20, "at": "02:00", "every": "24h", "jitter_min": 5}
QUIET = {"activity": {"messages_per_day": 0, "media_per_day": 0, "quic_per_day": 0,
                      "telemetry_interval_s": 3600}, "chat": {"enabled": False}}


def findings(tmp_path: Path, spec: dict) -> list[Finding]:
    from observer.catalog import load_catalog

    scenario = Scenario.from_dict(spec, name="schedules")
    simulate(scenario, tmp_path / "capture.pcap", progress=False)
    config = scenario.lab_config()
    replay([tmp_path / "capture.pcap"], tmp_path / "records", config=config, progress=False)
    return analyze(read_records(tmp_path / "records"), config,
                   load_catalog(config.catalogs)).findings


def local_hours(finding: Finding) -> float:
    return (finding.phase_s or 0.0) % 86400 / HOUR


@pytest.mark.parametrize("inside_chat", [True, False], ids=["in-chat-connection", "own"])
def test_three_nights_of_an_export_are_a_daily_upload(tmp_path, inside_chat):
    job = {**EXPORT, "inside_long_lived": True} if inside_chat else EXPORT
    if inside_chat:
        job = {k: v for k, v in job.items() if k != "server_name"}
    found = findings(tmp_path, {"days": 3, "seed": 36 if inside_chat else 18, "jobs": [job]})
    periodic = [f for f in found if f.verdict == "periodic bulk upload"]
    assert len(periodic) == 1, [(f.group, f.verdict, f.p_value) for f in found]
    f = periodic[0]
    assert f.period_s == 86400 and abs(local_hours(f) - 2.0) < 0.5
    assert (f.occurrences, f.expected) == (3, 3) and f.p_value <= 0.01
    if inside_chat:
        # The chat connection beats every few minutes and carries the export: both are told.
        assert f.service == "WhatsApp"
        assert f.heartbeat_s is not None and 120 < f.heartbeat_s < 600
        assert "also contacts" in f.summary
        assert not [g for g in found if g.group == f.group and g.verdict == "periodic heartbeat"]


def test_a_heartbeat_never_hides_irregular_bulk_uploads(tmp_path):
    job = {k: v for k, v in EXPORT.items() if k != "server_name"}
    job.update(inside_long_lived=True, jitter_min=600, miss_rate=0.3, size_mb=10)
    found = findings(tmp_path, {"days": 5, "seed": 61, "jobs": [job]})
    chat = [f for f in found if f.service == "WhatsApp"]
    assert len(chat) == 1
    f = chat[0]
    assert f.bulk_events >= 3 and f.verdict == "irregular uploads"
    assert f.heartbeat_s is not None and 120 < f.heartbeat_s < 600
    assert f"made {f.bulk_events} bulk uploads" in f.summary and "also contacts" in f.summary


def test_a_31_hour_job_that_missed_runs_is_not_reported_at_62_hours(tmp_path):
    # Seed 11: 7 of 13 runs; 5 fall on even cycles, so 62 h is a data-driven candidate and
    # fits 5 of 7 "every 62 hours"; 31 h explains all seven.
    job = {"name": "odd", "kind": "other", "server_name": "odd.metrics-hub.org", "every": "31h",
           "at": "01:00", "size_mb": 3, "jitter_min": 10, "miss_rate": 0.55}
    found = findings(tmp_path, {"days": 16, "seed": 11, "jobs": [job], **QUIET})
    (f,) = [f for f in found if "odd.metrics-hub.org" in f.names]
    assert f.bulk_events == 7
    assert f.period_family == "free" and abs(f.period_s - 31 * HOUR) < 0.01 * 31 * HOUR
    assert (f.occurrences, f.expected) == (7, 13)


def test_a_six_hourly_job_with_missed_runs_is_never_twelve_hourly_or_daily(tmp_path):
    job = {"name": "sync6h", "kind": "other", "server_name": "api.sync-partner.com",
           "every": "6h", "at": "00:45", "size_mb": 3, "jitter_min": 15, "miss_rate": 0.3}
    found = findings(tmp_path, {"days": 5, "seed": 62, "jobs": [job]})
    (f,) = [f for f in found if "api.sync-partner.com" in f.names]
    assert f.verdict == "periodic bulk upload" and f.period_s == 6 * HOUR
    assert f.phase_local is not None and len(f.phase_local.split(", ")) == 4


def test_an_insignificant_three_night_fit_says_what_capture_would_settle_it():
    from observer.words import verdict_sentence

    base = {"verdict": "irregular uploads", "group": "example.net", "label": "example.net",
            "bulk_events": 3, "occurrences": 3, "expected": 3, "period_s": 86400.0,
            "p_value": 0.019, "typical_bytes": 20_000_000, "schedule_checks": {}}
    assert "at least 5 days would settle it" in verdict_sentence(base, "Europe/Berlin")
    weekly = {**base, "period_s": 7 * 86400.0}
    assert "at least 35 days" in verdict_sentence(weekly, "Europe/Berlin")
    # Seven cycles, or no hint of a schedule: nothing to add.
    assert "settle" not in verdict_sentence({**base, "occurrences": 7, "expected": 7},
                                            "Europe/Berlin")
    assert "settle" not in verdict_sentence({**base, "p_value": 0.6}, "Europe/Berlin")
