"""Run mitmdump with the telemetry addon: every connection of the test phone becomes records.

Examples:
  observer proxy --mode wireguard --out records/ --config lab.yaml
  observer proxy --mode regular --listen-port 8080 --out records/
  observer proxy --mode transparent --out records/ -- --set confdir=/srv/mitm --showhost

Records land as JSONL in OUT/live/ while the proxy runs (flushed every half second) and become
Parquet tables in OUT/ when it stops: Ctrl-C (exit status 130) or SIGTERM (exit status 0); any
other status means the run did not end cleanly.  Arguments after "--" go to mitmdump unchanged.
See docs/proxy.md for each mode and for setting up the phone.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

MODES = ["regular", "transparent", "wireguard", "socks5", "local"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, default="regular",
                        help="how traffic reaches the proxy (default: regular)")
    parser.add_argument("--listen-host", metavar="ADDR",
                        help="address to listen on (default: all interfaces, with a warning)")
    parser.add_argument("--listen-port", type=int, metavar="P",
                        help="port to listen on (default: mitmproxy's, 8080; WireGuard 51820)")
    parser.add_argument("--out", type=Path, default=Path("records"), metavar="DIR",
                        help="records directory (default: records)")
    parser.add_argument("--config", type=Path, metavar="LAB.YAML",
                        help="lab config: device names, bin width, query redaction")
    parser.add_argument("--proxyauth", metavar="USER:PASS",
                        help="require proxy authentication (regular and socks5 modes; "
                             "mitmproxy's proxyauth option, e.g. user:pass or @htpasswd-file)")
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


def mitmdump_command(args: argparse.Namespace, mitmdump: str, run: str = "") -> list[str]:
    cmd = [mitmdump, "-s", str(addon_script()), "--mode", args.mode]
    if args.listen_host:
        cmd += ["--listen-host", args.listen_host]
    if args.listen_port is not None:
        cmd += ["--listen-port", str(args.listen_port)]
    if args.proxyauth:
        cmd += ["--proxyauth", args.proxyauth]
    cmd += [
        "--set", f"observer_dir={args.out}",
        "--set", f"tcp_timeout={args.idle_timeout}",
        # Stream big bodies instead of buffering them: a 200 MB backup upload stays off the heap.
        "--set", "stream_large_bodies=1m",
        # mitmproxy's own flow lines print whole URLs; the addon prints them redacted instead.
        "--set", "flow_detail=0",
        "--set", "observer_console=true",
    ]
    if run:
        # This command converts the run to Parquet itself once mitmdump has exited, whatever
        # way it exited, and so knows whether the conversion worked.
        cmd += ["--set", f"observer_run={run}", "--set", "observer_parquet=false"]
    if args.config:
        cmd += ["--set", f"observer_config={args.config}"]
    if args.keep_query:
        cmd += ["--set", "observer_keep_query=true"]
    extra = list(args.mitmdump_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return cmd + extra


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the mitmdump child: get SIGTERM when this command dies, even by ``kill -9``, so no
    proxy is left listening unattended; and keep every file it writes private to its owner."""
    os.umask(0o077)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class StopOnSignal:
    """Turns the first SIGINT or SIGTERM into one request to mitmdump to stop, then waits.

    mitmdump runs in its own process group, so a terminal's Ctrl-C reaches only this command,
    which asks mitmdump to stop exactly once: a second signal arriving while mitmdump writes its
    last records would cut that short.
    """

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.signal: int | None = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.handle)

    def handle(self, signum: int, _frame: Any) -> None:
        if self.signal is None:
            self.signal = signum
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)


def warn_if_open(args: argparse.Namespace) -> None:
    """Say loudly when the proxy would accept anyone on the network."""
    if args.listen_host in (None, "", "0.0.0.0", "::") and args.mode != "local":
        auth = "with --proxyauth" if args.proxyauth else "WITHOUT authentication"
        print(f"observer proxy: WARNING: listening on ALL interfaces {auth}: anyone who can "
              f"reach this host can use the proxy; pass --listen-host ADDR to limit it",
              file=sys.stderr)


def summary(written: dict[str, int]) -> str:
    return ", ".join(f"{n} {table}" for table, n in written.items() if n) or "no records"


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
    run_id = uuid.uuid4().hex[:12]
    cmd = mitmdump_command(args, found, run_id)
    print(f"observer proxy: {args.mode} mode; records go to {args.out}/live/*.jsonl while "
          f"running and to Parquet tables in {args.out}/ when stopped (Ctrl-C)", flush=True)
    print("observer proxy: " + " ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    warn_if_open(args)
    os.umask(0o077)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, process_group=0,
                            preexec_fn=die_with_parent)
    stop = StopOnSignal(proc)
    status = proc.wait()
    from observer.sources.proxy.store import convert

    try:
        written = convert(args.out, run_id)
    except ObserverError as exc:
        print(f"observer proxy: error: {exc}", file=sys.stderr)
        return 1
    # Stopped before it could install its own handlers, mitmdump dies of the SIGTERM itself.
    stopped = stop.signal is not None and status in (0, -signal.SIGTERM)
    if not stopped:
        print(f"observer proxy: mitmdump exited with status {status}; the records up to then are "
              f"in {args.out} ({summary(written)})", file=sys.stderr)
        return 128 - status if status < 0 else status or 1
    name = signal.Signals(stop.signal).name
    print(f"observer proxy: stopped by {name}; wrote {summary(written)} to {args.out}",
          file=sys.stderr)
    return 130 if stop.signal == signal.SIGINT else 0
