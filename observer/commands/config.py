"""Check a lab config file: devices, time zone, bin width, thresholds, catalog files.

Prints a summary when the file is valid; otherwise one line naming the file, line and key.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="validate a lab config YAML file")
    check.add_argument("path", help="the lab config, e.g. docs/lab.example.yaml")


def run(args: argparse.Namespace) -> int:
    from observer.catalog import load_catalog
    from observer.config import load_config

    config = load_config(args.path)
    load_catalog(config.catalogs)
    print(f"{args.path}: ok")
    print(f"  time zone {config.timezone}, activity bins of {config.bin_seconds:g} s")
    for device in config.devices:
        print(f"  device {device.name}: {', '.join(device.ips + device.prefixes + device.macs)}")
    for catalog in config.catalogs:
        print(f"  catalog {catalog}")
    return 0
