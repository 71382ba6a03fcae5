"""Record a device's live traffic into rotating pcap files, with coverage (sessions) records.

Examples:
  observer capture --iface br-lab --device pixel7 --config lab.yaml
  observer capture --iface wg0 --filter "host 10.0.0.2" --dir captures/ --files 48
  observer capture --iface br-lab --device pixel7 --config lab.yaml --records records-live/

Files go to DIR/<device>/<device>-<UTC time>-<n>.pcap (sorted by name = by time); a new run
resumes in the same directory.  Stop with Ctrl-C or SIGTERM.  Needs root or CAP_NET_RAW and
CAP_NET_ADMIN.  See docs/capture.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iface", required=True, help="interface to capture on (bridge, AP, wg0)")
    parser.add_argument("--device", help="device name from the lab config (names the files)")
    parser.add_argument("--config", help="lab config: the device's IPs and MACs make the filter")
    parser.add_argument("--filter", dest="bpf", help="BPF filter given by hand instead")
    parser.add_argument("--dir", default="captures", type=Path,
                        help="capture directory; files go to DIR/<device>/ (default: captures)")
    parser.add_argument("--filesize", type=float, default=100.0, metavar="MB",
                        help="start a new file after this many MB (default 100; 0 = no limit)")
    parser.add_argument("--duration", type=float, default=3600.0, metavar="S",
                        help="start a new file every S seconds (default 3600; 0 = never)")
    parser.add_argument("--files", type=int, default=0, metavar="N",
                        help="keep only the newest N files of this device (default 0 = all)")
    parser.add_argument("--stop-after", type=float, metavar="S",
                        help="stop after S seconds (default: run until Ctrl-C or SIGTERM)")
    parser.add_argument("--backend", choices=["scapy", "tcpdump"], default="scapy",
                        help="scapy packet socket (default) or tcpdump for very high rates")
    parser.add_argument("--buffer", type=float, default=32.0, metavar="MB",
                        help="kernel capture buffer in MB (default 32: about a second of "
                             "full-size packets at 20,000/s)")
    parser.add_argument("--records", type=Path, metavar="DIR",
                        help="also write live activity bins and connections (JSONL) here, "
                             "and the sessions record (default: the capture directory)")


def run(args: argparse.Namespace) -> int:
    from observer import ObserverError
    from observer.config import load_config
    from observer.devices import DeviceMap
    from observer.sources.engine import FlowSettings
    from observer.sources.live import CaptureOptions, StopFlag, device_filter, run_capture

    if args.filesize < 0 or args.duration < 0 or args.files < 0 or args.buffer <= 0:
        raise ObserverError(
            "--filesize, --duration and --files must be 0 or more, --buffer above 0"
        )
    config = load_config(args.config) if args.config else None
    bpf = args.bpf
    if config is not None and args.device:
        known = {d.name: d for d in config.devices}
        if args.device not in known:
            names = ", ".join(known) or "none"
            raise ObserverError(
                f"no device {args.device!r} in {args.config} (devices: {names})"
            )
        bpf = bpf or device_filter(known[args.device])
    if not bpf:
        raise ObserverError("give --device NAME with --config LAB.yaml, or --filter BPF")
    name = args.device or args.iface
    opts = CaptureOptions(
        iface=args.iface, bpf=bpf, directory=args.dir / name, device=name,
        devices=DeviceMap.from_config(config), backend=args.backend,
        filesize=int(args.filesize * 1_000_000) or None, duration_s=args.duration or None,
        max_files=args.files or None, stop_after_s=args.stop_after, records_dir=args.records,
        buffer_bytes=int(args.buffer * 1024 * 1024), flow=FlowSettings.of(config),
    )
    stop = StopFlag()
    stop.install()

    def started() -> None:
        print(f"observer capture: capturing on {args.iface} ({args.backend}), filter {bpf!r}, "
              f"into {opts.directory}/; stop with Ctrl-C", file=sys.stderr, flush=True)

    result = run_capture(opts, stop, started)
    dropped = "unknown" if result.dropped is None else result.dropped
    removed = f", {result.deleted} old file(s) removed" if result.deleted else ""
    print(
        f"observer capture: {result.note}: {result.packets} packets, {dropped} dropped by the "
        f"kernel, {result.ts_end - result.ts_start:.1f} s, {len(result.files)} file(s) in "
        f"{opts.directory}/{removed}",
        file=sys.stderr,
    )
    return 0
