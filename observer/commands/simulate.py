"""Write a simulated capture of one phone over days, with the ground truth of its scheduled uploads.

The capture (classic pcap, Ethernet) holds DNS look-ups, TLS connections with SNI, a long-lived chat
connection with keepalives, user messages and media, OS telemetry with night-time Doze batching,
capture gaps and the scheduled jobs of the scenario (e.g. a nightly export at 02:00 +- 20 min).
Payload bytes are never stored: data segments keep their headers and their true length.

Beside OUT.pcap it writes OUT.truth.json: every scheduled upload it emitted (time, endpoint, size,
ports) and every occurrence it skipped, so a replay and an analysis can be checked against it.

examples:
  observer simulate -o week.pcap                  the bundled 7-day default (week.yaml)
  observer simulate hidden -o hidden.pcap         a bundled scenario by name (see --list)
  observer simulate my.yaml -o my.pcap --days 2 --seed 3
  observer simulate fleet -o fleet/               8 phones, hourly rotated files in fleet/
  observer replay week.pcap                       then turn the capture into records

Scenario keys are documented in docs/scenarios.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "scenario", nargs="?", default=None, metavar="SCENARIO",
        help="scenario YAML file, or the name of a bundled one (default: week)",
    )
    parser.add_argument("-o", "--out", type=Path, default=None, metavar="OUT.pcap",
                        help="pcap file to write (default: <scenario name>.pcap)")
    parser.add_argument("--days", type=int, default=None, help="override the number of days")
    parser.add_argument("--seed", type=int, default=None,
                        help="override the random seed (same seed, same bytes)")
    parser.add_argument("--list", action="store_true", help="list the bundled scenarios and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import time

    from observer.simulate import bundled_names, load_scenario, simulate

    if args.list:
        for name in bundled_names():
            scenario = load_scenario(name)
            print(f"{name:10} {scenario.days:3} days  {scenario.description}")
        return 0
    scenario = load_scenario(args.scenario)
    if args.days is not None:
        scenario = scenario.with_days(args.days)
    if args.seed is not None:
        scenario = scenario.with_seed(args.seed)
    # A scenario with `rotate:` writes a folder of files (docs/scenarios.md).
    out = args.out or Path(scenario.name if scenario.rotate_s else f"{scenario.name}.pcap")
    started = time.monotonic()
    truth_file = simulate(scenario, out, progress=False if args.no_progress else None)
    elapsed = time.monotonic() - started

    import json

    truth = json.loads(truth_file.read_text(encoding="utf-8"))
    capture = truth["capture"]
    files = [out / f["file"] for f in capture["files"]] or [out]
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    where = f"{out} ({len(files)} files" if capture["files"] else f"{out} ("
    print(f"wrote {where}{', ' if capture['files'] else ''}{size_mb:.1f} MB): "
          f"{capture['packets']:,} packets, "
          f"{capture['wire_bytes']:,} bytes on the wire, {scenario.days} days, in {elapsed:.1f} s")
    print(f"ground truth: {truth_file} ({len(truth['uploads'])} scheduled uploads, "
          f"{len(truth['missed'])} missed)")
    return 0
