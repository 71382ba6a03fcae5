"""Records read through fsspec URLs (memory://, file://: real fsspec filesystems, in process) give
the same fingerprint, findings and fleet report as the local directory; a fleet's report reads
one device's records at a time and writes what the whole-tables report writes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from test_analysis_scale import quiet_fleet

from observer.analysis import read_findings, records_stamp
from observer.cli import main
from observer.records import read_records
from observer.records.location import Location, is_url
from observer.simulate import simulate

fsspec = pytest.importorskip("fsspec")

PHONES, DAYS, N_SIM = 3, 5, "100"
FOOTER = re.compile(r"Written by observer .*? on .*? from")  # the report's own write time


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A quiet 3-phone fleet (its scheduled jobs and a few messages), 5 days, one pcap."""
    from observer.sources import replay

    scenario = quiet_fleet(PHONES, DAYS)
    out = tmp_path_factory.mktemp("loc")
    simulate(scenario, out / "fleet.pcap", progress=False)
    replay([out / "fleet.pcap"], out / "records", config=scenario.lab_config(), progress=False)
    return out / "records"


@pytest.fixture
def memory_url(fleet):
    """The fleet's records copied into fsspec's in-memory filesystem."""
    fs = fsspec.filesystem("memory")
    root = f"/lab-{os.getpid()}/records"
    fs.put(str(fleet), root, recursive=True)
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def _findings(place) -> dict:
    data = read_findings(place).to_dict()
    data.pop("generated_at")
    return data


def _report(out: Path) -> dict[str, str]:
    """Every file a report wrote, by relative path, with its write time taken out."""
    return {p.relative_to(out).as_posix(): FOOTER.sub("", p.read_text(encoding="utf-8"))
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_urls_are_told_from_paths():
    assert is_url("s3://bucket/lab/records") and is_url("memory://x") and is_url("file:///tmp/r")
    assert not is_url("records") and not is_url("/data/s3:/x") and not is_url(Path("s3://b"))
    local = Location.of("some/records")
    assert local.fs is None and local.root == Path("some/records")


def test_memory_and_file_urls_read_the_same_records(fleet, memory_url):
    local = read_records(fleet)
    for url in (memory_url, f"file://{fleet}"):
        assert Location.of(url).fs is not None
        assert records_stamp(url) == records_stamp(fleet)  # same parts, same fingerprint
        remote = read_records(url)
        for table, frame in local.items():
            assert frame.equals(remote[table]), (url, table)
    assert len(local["connections"]["device"].unique()) == PHONES


def test_export_over_a_url_writes_the_same_csv(fleet, memory_url, tmp_path, capsys):
    assert main(["export", str(fleet), "--format", "csv", "-o", str(tmp_path / "a.csv")]) == 0
    assert main(["export", memory_url, "--format", "csv", "-o", str(tmp_path / "b.csv")]) == 0
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert len((tmp_path / "a.csv").read_text().splitlines()) > 100
    capsys.readouterr()


def test_analyze_and_report_over_a_url_find_and_write_the_same(fleet, memory_url, tmp_path,
                                                               capsys):
    assert main(["analyze", str(fleet), "-o", str(tmp_path / "local.json"),
                 "--simulations", N_SIM]) == 0
    assert main(["analyze", memory_url, "--simulations", N_SIM]) == 0  # beside the records
    assert f"{memory_url}/findings.json" in capsys.readouterr().out
    found = _findings(f"{memory_url}/findings.json")
    assert found == _findings(tmp_path / "local.json")
    assert any(f["verdict"] == "periodic bulk upload" for f in found["findings"])

    fs = fsspec.filesystem("memory")
    fs.pipe_file(memory_url.removeprefix("memory://") + "/findings.json",
                 (tmp_path / "local.json").read_bytes())
    (fleet / "findings.json").write_bytes((tmp_path / "local.json").read_bytes())
    try:
        assert main(["report", str(fleet), "-o", str(tmp_path / "by-path")]) == 0
        for name, url in (("memory", memory_url), ("file", f"file://{fleet}")):
            assert main(["report", url, "-o", str(tmp_path / name)]) == 0
            assert "analysing again" not in capsys.readouterr().err  # findings.json was fresh
            assert _report(tmp_path / name) == _report(tmp_path / "by-path"), name
    finally:
        (fleet / "findings.json").unlink()
    fleet_json = json.loads((tmp_path / "by-path" / "fleet.json").read_text())
    assert len(fleet_json["devices"]) == PHONES


def test_url_problems_are_one_line(tmp_path, capsys):
    assert main(["analyze", "memory://no-such-lab/records"]) == 2
    assert main(["report", "nosuchscheme://bucket/records", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not exist" in err[0]
    assert err[1].startswith("observer report: error:") and "nosuchscheme" in err[1]


def test_fleet_report_reads_one_device_at_a_time(fleet, tmp_path, monkeypatch):
    """Every read is of one device's partitions (sessions also of no device) or of a table kept
    for no device, and the reports are those of the whole-tables path."""
    from observer.analysis import analyze
    from observer.catalog import load_catalog
    from observer.config import LabConfig
    from observer.report import fleet as fleet_module
    from observer.report import write_fleet

    records = read_records(fleet)
    findings = analyze(records, LabConfig(), load_catalog(()), n_sim=100,
                       source=records_stamp(fleet))
    write_fleet(records, findings, tmp_path / "whole")

    reads = []
    real = fleet_module.read_table

    def spy(root, table, *, devices=None, problems=None):
        frame = real(root, table, devices=devices, problems=problems)
        reads.append((table, devices, len(frame)))
        return frame

    monkeypatch.setattr(fleet_module, "read_table", spy)
    problems: list[str] = []
    write_fleet(fleet_module.device_records(fleet, problems), findings, tmp_path / "by-device")
    assert problems == []
    assert _report(tmp_path / "by-device") == _report(tmp_path / "whole")
    per_device = [devices for table, devices, _ in reads if table == "connections"]
    assert sorted(d for (d,) in per_device) == sorted(set(records["connections"]["device"]))
    for table, devices, _ in reads:
        assert (devices is None and table == "link_activity") or len(devices) == 1 or (
            table == "sessions" and devices[1] == "unknown"), (table, devices)


def test_dask_workers_read_the_records_by_url(fleet):
    """Each worker opens the URL itself (no shared path needed): same findings as in process."""
    pytest.importorskip("distributed")
    from observer.analysis.scale import analyze_devices
    from observer.catalog import load_catalog
    from observer.config import LabConfig

    catalog = load_catalog(())
    local = analyze_devices(fleet, LabConfig(), catalog, n_sim=100).to_dict()
    remote = analyze_devices(f"file://{fleet}", LabConfig(), catalog, n_sim=100, dask="local",
                             workers=2).to_dict()
    local.pop("generated_at")
    remote.pop("generated_at")
    assert remote == local and local["findings"]


@pytest.mark.parametrize("command", [["replay", "x.pcap", "-o", "s3://bucket/records"],
                                     ["report", "records", "-o", "memory://report"]])
def test_outputs_are_local_directories_not_urls(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main(command)
    assert stop.value.code == 2
    assert "write to a local directory" in capsys.readouterr().err
