"""The per-device analysis (one device's records per process: --jobs, --dask) finds exactly what
the in-process analysis of the whole tables finds, on a simulated lab of 10 phones x 30 days."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from observer import ObserverError
from observer.analysis import analyze, records_stamp, scale
from observer.analysis.findings import Analysis
from observer.catalog import load_catalog
from observer.cli import main
from observer.config import LabConfig
from observer.records import read_records
from observer.simulate import fleet_scenario, simulate

PHONES, DAYS = 10, 30
N_SIM = 100  # the null's Monte Carlo runs: equal in both paths, few for speed


def quiet_fleet(phones: int = PHONES, days: int = DAYS):
    """The simulator's fleet with few connections a day: its scheduled jobs (1 MB each), a few
    messages, no chat, no telemetry, no 15-minute heartbeat; one pcap file."""
    scenario = replace(fleet_scenario(phones=phones, days=days, seed=1), rotate_s=0.0)
    phones = tuple(
        replace(phone, chat=replace(phone.chat, enabled=False),
                activity=replace(phone.activity, messages_per_day=2, media_per_day=1,
                                 telemetry_interval_s=0, quic_per_day=0),
                jobs=tuple(replace(job, size_bytes=min(job.size_bytes, 1_000_000))
                           for job in phone.jobs if job.name != "heartbeat"))
        for phone in scenario.phones)
    return replace(scenario, phones=phones)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Records of the fleet (simulate + replay: about 25 s wall on a busy 2-core machine)."""
    from observer.sources import replay

    scenario = quiet_fleet()
    out = tmp_path_factory.mktemp("fleet")
    started = time.monotonic()
    simulate(scenario, out / "fleet.pcap", progress=False)
    replay([out / "fleet.pcap"], out / "records", config=scenario.lab_config(), progress=False)
    print(f"fleet dataset built in {time.monotonic() - started:.0f} s")
    config = replace(scenario.lab_config(), timezone=scenario.timezone)
    return out / "records", config, load_catalog(config.catalogs)


@pytest.fixture(scope="module")
def whole(fleet):
    """The in-process path: every table read at once, analysed in this process."""
    root, config, catalog = fleet
    return analyze(read_records(root), config, catalog, n_sim=N_SIM, source=records_stamp(root))


def same(a, b) -> bool:
    """Findings equal in everything but the run's timestamp."""
    a, b = a.to_dict(), b.to_dict()
    a.pop("generated_at")
    b.pop("generated_at")
    return a == b


def test_fleet_is_ten_phones_with_schedules(fleet, whole):
    root, _, _ = fleet
    assert len(scale.record_devices(root)) == PHONES
    assert {f.device for f in whole.findings} == set(scale.record_devices(root))
    periodic = [f for f in whole.findings if f.verdict == "periodic bulk upload"]
    assert len({f.device for f in periodic}) >= PHONES // 2


def test_a_device_task_reads_only_its_device(fleet, monkeypatch):
    root, config, catalog = fleet
    device = scale.record_devices(root)[3]
    reads = []
    real = scale.read_table

    def spy(root, table, *, devices=None, problems=None):
        frame = real(root, table, devices=devices, problems=problems)
        reads.append((table, devices, set(frame["device"])))
        return frame

    monkeypatch.setattr(scale, "read_table", spy)
    parts, problems = scale.DeviceTask(str(root), Analysis(config, catalog, n_sim=N_SIM))(device)
    assert [part.device for part in parts] == [device] and problems == []
    assert [table for table, _, _ in reads] == list(scale.ANALYSED_TABLES)
    for table, devices, seen in reads:
        assert devices == [device] and seen <= {device}, (table, seen)


def test_dask_local_cluster_finds_the_same(fleet, whole):
    pytest.importorskip("distributed")
    root, config, catalog = fleet
    found = scale.analyze_devices(root, config, catalog, n_sim=N_SIM, dask="local", workers=2)
    assert same(found, whole)


def test_process_pool_finds_the_same(fleet, whole):
    root, config, catalog = fleet
    assert same(scale.analyze_devices(root, config, catalog, n_sim=N_SIM, jobs=2), whole)


def test_no_records_is_one_clear_error(tmp_path):
    with pytest.raises(ObserverError, match="no connection records"):
        scale.analyze_devices(tmp_path, LabConfig(), load_catalog(()), n_sim=N_SIM)


@pytest.mark.parametrize("options", [["--jobs", "0"], ["--workers", "2"],
                                     ["--jobs", "2", "--dask"],
                                     ["--dask", "tcp://127.0.0.1:9", "--workers", "2"]])
def test_contradicting_options_are_one_line(tmp_path, capsys, options):
    (tmp_path / "rec").mkdir()
    assert main(["analyze", str(tmp_path / "rec"), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("observer analyze: error:") and "\n" not in err
