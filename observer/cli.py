"""The ``observer`` command: one subcommand per user task, wired to the stages.

Each subcommand lives in ``observer/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; the modules import their heavy stages lazily so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from observer import ObserverError, __version__

COMMANDS = {
    "demo": "simulate a week of one phone, replay it, analyse it and write the report",
    "simulate": "write a simulated multi-day capture of one phone, with its ground truth",
    "replay": "turn saved captures (pcap, pcapng, mitmproxy flows, logs) into records",
    "capture": "record a device's live traffic into rotating pcap files",
    "proxy": "run mitmproxy with the telemetry addon and record every connection",
    "analyze": "find bulk uploads in records and test them for periodicity",
    "report": "write the HTML, Markdown and JSON timing report of a records directory",
    "export": "write records as a Zeek conn.log or CSV for other tools",
    "config": "check a lab config file",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="observer",
        description=(
            "Record what a test phone sends and when, and find out whether any app makes "
            "periodic bulk uploads (a 'nightly export'): to which endpoints, how large, at what "
            "local time, how regularly, and how sure we are."
        ),
        epilog="Start with 'observer demo'. Each command has its own --help.",
    )
    parser.add_argument("--version", action="version", version=f"observer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in COMMANDS.items():
        module = importlib.import_module(f"observer.commands.{name}")
        command = sub.add_parser(
            name, help=summary, description=module.__doc__ or summary,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ObserverError as exc:
        print(f"observer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"observer {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a full disk, a read-only directory: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"observer {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
