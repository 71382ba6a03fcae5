"""The analysis of a records directory one device at a time: in this process, in a process pool
(``jobs``), or on a Dask cluster (``dask``: a scheduler's address, or "local").

Records are partitioned by device, and every step of the analysis but the final correction
works on one device's records (``Analysis.parts``).  So a worker reads one device's partitions,
analyses them and sends back only its small ``DevicePart``; this process corrects the tests of
all devices together (``Analysis.combine``).  No process holds more than one device's records,
and the findings are those of ``analyze`` on the whole tables.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from observer import ObserverError
from observer.analysis.findings import Analysis, DevicePart
from observer.catalog import Catalog
from observer.config import LabConfig
from observer.records import partition_devices, read_table
from observer.records.findings import Findings, records_stamp
from observer.records.location import Location

ANALYSED_TABLES = ("connections", "activity", "sessions")
LOCAL = "local"  # --dask without an address: a LocalCluster on this machine


def record_devices(root: str | Path | Location) -> list[str]:
    """The devices a records directory holds, from its partition directories (no reads)."""
    return partition_devices(root, "connections", "activity")


@dataclass(frozen=True)
class DeviceTask:
    """Read one device's records and analyse them: what a worker runs, once per device."""

    root: str
    analysis: Analysis

    def __call__(self, device: str) -> tuple[list[DevicePart], list[str]]:
        problems: list[str] = []
        records = {table: read_table(self.root, table, devices=[device], problems=problems)
                   for table in ANALYSED_TABLES}
        return self.analysis.parts(records), problems


def available_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the host's)."""
    return len(os.sched_getaffinity(0))


def analyze_devices(root: str | Path | Location, config: LabConfig, catalog: Catalog, *,
                    n_sim: int = 1000, seed: int = 0, jobs: int = 1, dask: str | None = None,
                    workers: int | None = None, problems: list[str] | None = None,
                    progress: Callable[[Iterable], Iterable] | None = None) -> Findings:
    """The findings of a records directory, analysed device by device (see the module
    docstring).  ``root`` is a directory or an fsspec URL (a cluster's workers read it
    themselves).  Unreadable parts are skipped and listed in ``problems``."""
    root = Location.of(root)
    stamp = records_stamp(root)  # before reading: a part added meanwhile makes it stale
    devices = record_devices(root)
    if not devices:
        raise ObserverError(f"{root}: no connection records (run observer replay first)")
    analysis = Analysis(config, catalog, n_sim=n_sim, seed=seed)
    task = DeviceTask(str(root), analysis)
    if dask is not None:
        results = _on_dask(task, devices, dask, workers)
    elif jobs > 1:
        results = _on_pool(task, devices, jobs)
    else:
        results = map(task, devices)
    parts: list[DevicePart] = []
    for device_parts, found in (progress or iter)(results):
        parts.extend(device_parts)
        if problems is not None:  # meta.json's problem comes with every read: list it once
            problems.extend(p for p in dict.fromkeys(found) if p not in problems)
    return analysis.combine(parts, stamp)


def _on_pool(task: DeviceTask, devices: list[str], jobs: int) -> Iterable:
    # forkserver: workers start from a clean process, not a fork of one with Arrow's threads.
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=min(jobs, len(devices)), mp_context=context) as pool:
        yield from pool.map(task, devices)


def _on_dask(task: DeviceTask, devices: list[str], address: str,
             workers: int | None) -> Iterable:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ObserverError("--dask needs dask.distributed: "
                            "pip install 'telemetry-observer[dask]'") from None
    if address == LOCAL:
        cluster = LocalCluster(n_workers=workers or available_cores(), threads_per_worker=1,
                               processes=True, dashboard_address=None)
    else:
        cluster = None
    try:
        with Client(cluster if cluster is not None else address, timeout="20s") as client:
            # One task per device; the workers read the records themselves (a shared path).
            for future in as_completed(client.map(task, devices, pure=False)):
                yield future.result()
    except OSError as exc:  # no scheduler at that address, or it went away
        raise ObserverError(f"Dask scheduler {address}: {exc}") from None
    finally:
        if cluster is not None:
            cluster.close()
