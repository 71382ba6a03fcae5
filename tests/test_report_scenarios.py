"""Every bundled scenario, simulated short, replayed, analysed and reported: each finding shows in
the report's timeline under the label the analysis gave it (the report never relabels)."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from html import escape
from pathlib import Path

import pytest

from observer.analysis import analyze
from observer.catalog import load_catalog
from observer.report.fleet import devices, records_of
from observer.report.text import clip
from observer.report.writer import Page, report_context, sort_findings
from observer.simulate import load_scenario, simulate
from observer.simulate.scenario import BUNDLED_DIR

SCENARIOS = sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml"))
DAYS = 4  # long enough for a daily schedule (min_occurrences), short enough for seconds


@pytest.fixture(scope="module", params=SCENARIOS)
def analysed(request, tmp_path_factory):
    pytest.importorskip("observer.sources.pipeline")
    from observer.sources import replay_tables

    scenario = load_scenario(request.param)
    scenario = replace(scenario, days=min(scenario.days, DAYS))
    config = scenario.lab_config()
    out = tmp_path_factory.mktemp(request.param) / "capture"
    if not scenario.rotate_s:
        out = out.with_suffix(".pcap")
    simulate(scenario, out, progress=False)
    files = sorted(out.glob("*.pcap")) if out.is_dir() else [out]
    records = replay_tables(files, config=config)
    findings = analyze(records, config, load_catalog(config.catalogs), n_sim=200)
    return request.param, records, findings


def _timeline_svg(context: dict) -> str:
    return base64.b64decode(context["timeline"].split(",", 1)[1]).decode("utf-8")


def test_each_finding_is_in_the_timeline_under_its_own_label(analysed):
    name, records, findings = analysed
    assert findings.findings, f"{name}: the analysis found no groups at all"
    for device in devices(records):
        mine = records_of(records, device)
        found = findings.for_device(device)
        notable = [f for f in sort_findings(found.findings) if f.verdict != "nothing notable"
                   and f.group_kind != "app"]
        page = Page.build(mine, found)
        timeline = page.timeline(notable)
        for finding in notable:
            assert finding.label in timeline.services, (name, device, finding.label)
            row = timeline.services.index(finding.label)
            for event in finding.events:
                col = int((event.ts_start - timeline.starts[0]) // timeline.bin_s)
                # The event's upload is drawn in its own series, in the bin where it started.
                assert timeline.up[row, col] > 0, (name, device, finding.label, event.ts_start)
        context = report_context(page)
        svg = _timeline_svg(context)
        for finding in notable:
            assert escape(clip(finding.label, 32), quote=False) in svg, (name, finding.label)
            card = next(c for c in context["cards"] if c["sentence"] == finding.summary)
            assert card["who"].startswith(clip(finding.label, 80).rstrip("…"))


def test_scenario_labels_are_the_analysis_labels(analysed):
    """The endpoint table's group column holds only labels the analysis decided."""
    name, records, findings = analysed
    decided = {x.label for x in findings.labels}
    for device in devices(records):
        page = Page.build(records_of(records, device), findings.for_device(device))
        shown = set(page.table["service"])
        assert shown <= decided, (name, shown - decided)
        assert not any(re.fullmatch(r"\d+\.\d+", s) for s in shown)  # never a fake "3.4" domain


def test_the_scenario_list_is_complete():
    assert {"week", "month", "fleet"} <= set(SCENARIOS)
    assert all(Path(BUNDLED_DIR / f"{s}.yaml").is_file() for s in SCENARIOS)


@pytest.mark.parametrize("analysed", ["fleet"], indirect=True)
def test_fleet_scenario_gets_an_index_with_every_phone(analysed, tmp_path):
    name, records, findings = analysed
    assert len(devices(records)) >= 2, f"{name} should hold several phones"
    from observer.report import write_fleet

    index = write_fleet(records, findings, tmp_path)
    fleet = json.loads((tmp_path / "fleet.json").read_text(encoding="utf-8"))
    assert [d["device"] for d in fleet["devices"]] == devices(records)
    html = index.read_text(encoding="utf-8")
    for line in fleet["devices"]:
        assert (tmp_path / line["report"]).is_file() and f'href="{line["report"]}"' in html
        mine = [f for f in findings.findings if f.device == line["device"]]
        exports = [f for f in mine if f.verdict == "periodic bulk upload" and not f.is_backup]
        assert (line["answer"] == "export") == bool(exports)
        if exports:
            top = max(exports, key=lambda f: f.typical_bytes or 0)
            assert line["largest_schedule"]["label"] == top.label
