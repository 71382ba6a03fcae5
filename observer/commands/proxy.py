"""Run mitmdump with the telemetry addon: every connection of the test phone becomes records.

Examples:
  observer proxy --mode wireguard --out records/ --config lab.yaml
  observer proxy --mode regular --listen-port 8080 --out records/
  observer proxy --mode transparent --out records/ -- --set confdir=/srv/mitm --showhost

Records land as JSONL in OUT/live/ while the proxy runs (flushed every half second) and become
Parquet tables in OUT/ when it stops (Ctrl-C).  Arguments after "--" go to mitmdump unchanged.
See docs/proxy.md for each mode and for setting up the phone.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
from pathlib import Path

MODES = ["regular", "transparent", "wireguard", "socks5", "local"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, default="regular",
                        help="how traffic reaches the proxy (default: regular)")
    parser.add_argument("--listen-host", metavar="ADDR",
                        help="address to listen on (default: all interfaces)")
    parser.add_argument("--listen-port", type=int, metavar="P",
                        help="port to listen on (default: mitmproxy's, 8080; WireGuard 51820)")
    parser.add_argument("--out", type=Path, default=Path("records"), metavar="DIR",
                        help="records directory (default: records)")
    parser.add_argument("--config", type=Path, metavar="LAB.YAML",
                        help="lab config: device names, bin width, query redaction")
    parser.add_argument("--keep-query", action="store_true",
                        help="keep URL query strings in http records (redacted by default)")
    parser.add_argument("--idle-timeout", type=int, default=86400, metavar="S",
                        help="close idle TCP connections after S seconds (default 86400; "
                             "mitmproxy's own 600 would cut long-lived chat sockets)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the mitmdump command and exit")
    parser.add_argument("mitmdump_args", nargs=argparse.REMAINDER,
                        help='extra mitmdump arguments after "--"')


def addon_script() -> Path:
    """The ``mitmdump -s`` file: the checkout's addons/telemetry.py, else the package's."""
    import observer

    checkout = Path(observer.__file__).resolve().parents[1] / "addons" / "telemetry.py"
    if checkout.is_file():
        return checkout
    return Path(observer.__file__).resolve().parent / "sources" / "proxy" / "script.py"


def mitmdump_command(args: argparse.Namespace, mitmdump: str) -> list[str]:
    cmd = [mitmdump, "-s", str(addon_script()), "--mode", args.mode]
    if args.listen_host:
        cmd += ["--listen-host", args.listen_host]
    if args.listen_port is not None:
        cmd += ["--listen-port", str(args.listen_port)]
    cmd += [
        "--set", f"observer_dir={args.out}",
        "--set", f"tcp_timeout={args.idle_timeout}",
        # Stream big bodies instead of buffering them: a 200 MB backup upload stays off the heap.
        "--set", "stream_large_bodies=1m",
    ]
    if args.config:
        cmd += ["--set", f"observer_config={args.config}"]
    if args.keep_query:
        cmd += ["--set", "observer_keep_query=true"]
    extra = list(args.mitmdump_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return cmd + extra


def run(args: argparse.Namespace) -> int:
    from observer import ObserverError

    if args.config:
        from observer.config import load_config

        load_config(args.config)  # fail here, with the file's line, not inside mitmdump
    if args.listen_port is not None and not 0 <= args.listen_port <= 65535:
        raise ObserverError(f"--listen-port must be 0-65535, not {args.listen_port}")
    if args.idle_timeout <= 0:
        raise ObserverError("--idle-timeout must be a positive number of seconds")
    mitmdump = Path(sys.executable).with_name("mitmdump")
    found = str(mitmdump) if mitmdump.exists() else shutil.which("mitmdump")
    if not found:
        raise ObserverError("mitmdump not found next to this Python or on PATH; "
                            "install the observer with its mitmproxy dependency")
    cmd = mitmdump_command(args, found)
    print(f"observer proxy: {args.mode} mode; records go to {args.out}/live/*.jsonl while "
          f"running and to Parquet tables in {args.out}/ when stopped (Ctrl-C)", file=sys.stderr)
    print("observer proxy: " + " ".join(cmd), file=sys.stderr)
    if args.dry_run:
        return 0
    proc = subprocess.Popen(cmd)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            # Ask mitmdump to stop cleanly (it may have had the Ctrl-C too: stopping twice is
            # harmless) and wait while it writes its Parquet records.
            proc.terminate()
