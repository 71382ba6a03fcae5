"""The lab config (YAML): devices, time zone, bin width, thresholds, catalog files.

Loaded with ``yaml.safe_load`` only.  Every error names the key and the line of the file it comes
from, so ``observer config check lab.yaml`` tells a user exactly what to fix.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from observer.yamlfile import read_yaml

DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Device:
    name: str
    ips: tuple[str, ...] = ()
    macs: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()  # networks (CIDR) whose every address is this device's


@dataclass(frozen=True)
class Thresholds:
    """Analysis thresholds; docs/analysis.md explains each."""

    upload_floor_bytes: int = 500_000  # a bulk upload moves at least this much upstream
    baseline_factor: float = 10.0  # ... and at least this many times the device's typical bin
    upload_ratio: float = 3.0  # ... and upstream at least this many times downstream
    merge_gap_s: float = 120.0  # runs closer than this merge into one event
    alpha: float = 0.01  # family-wise false-alarm rate for "periodic"
    min_occurrences: int = 3  # fewer events than this are never called periodic
    # A bin sending at least this fast is hot whatever the device's baseline (1 MB per 10-s bin):
    # a device that sends little besides its uploads has its uploads as its baseline.
    absolute_rate_bytes_per_s: float = 100_000.0
    network_prefix_v4: int = 24  # unnamed IPv4 addresses group by this network
    network_prefix_v6: int = 48  # ... and IPv6 addresses by this one


@dataclass(frozen=True)
class TimeWindow:
    """Record times every reader accepts; the rest are counted as skipped, because a wrong clock
    or a damaged timestamp (1970, 2500) would otherwise stretch every table and plot over centuries.
    """

    earliest: float = 788_918_400.0  # 1995-01-01 00:00 UTC
    ahead_s: float = 86_400.0  # how far after "now" a record may lie (clock skew)

    @classmethod
    def of(cls, config: LabConfig | None) -> TimeWindow:
        return config.time_window if config is not None else cls()

    def bounds(self) -> tuple[float, float]:
        """Earliest and latest accepted epoch seconds, the latest counted from now."""
        return self.earliest, time.time() + self.ahead_s


@dataclass(frozen=True)
class LabConfig:
    timezone: str = "UTC"
    timezone_configured: bool = False  # the config set `timezone:` (else "local time" is UTC)
    bin_seconds: float = 10.0
    udp_idle_timeout_s: float = 120.0
    redact_query: bool = True
    devices: tuple[Device, ...] = ()
    catalogs: tuple[Path, ...] = ()
    thresholds: Thresholds = field(default_factory=Thresholds)
    time_window: TimeWindow = field(default_factory=TimeWindow)
    path: Path | None = None

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def device_of(self, ip: str, mac: str | None = None) -> str | None:
        """The configured device that owns an address (its ips or prefixes) or MAC, if any;
        ``observer.devices`` decides, and adds the link layer and the proxy peer."""
        from observer.devices import DeviceMap

        return DeviceMap(self.devices).configured_name(ip, mac)


def _network(check, value: object, key: str) -> str:
    """A device's prefix (``prefixes:``) in its usual text form."""
    try:
        return str(ipaddress.ip_network(str(value), strict=False))
    except ValueError:
        raise check.fail(key, f"{value!r} is not a network (e.g. 10.7.0.0/24, fd00:7::/64)")


def load_config(path: str | Path) -> LabConfig:
    """Load and validate a lab config file."""
    path = Path(path)
    doc = read_yaml(path, "config")
    if doc.data is None:
        return LabConfig(path=path)
    check = doc.shape()
    data = check.mapping(
        doc.data, "",
        {"timezone", "bin_seconds", "udp_idle_timeout_s", "redact_query", "devices", "catalogs",
         "analysis", "time_window"},
    )

    timezone = data.get("timezone", "UTC")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        raise check.fail("timezone", f"unknown time zone {timezone!r} (use e.g. Europe/Berlin)")

    devices = []
    seen: set[str] = set()
    for i, raw in enumerate(check.sequence(data, "devices", "", "devices")):
        key = f"devices.{i}"
        raw = check.mapping(raw, key, {"name", "ips", "macs", "prefixes"})
        name = raw.get("name")
        if not isinstance(name, str) or not DEVICE_NAME.match(name):
            raise check.fail(
                f"{key}.name" if "name" in raw else key,
                "needs a name of letters, digits, '.', '_' or '-' (at most 64)",
            )
        if name in seen:
            raise check.fail(f"{key}.name", f"device {name!r} is listed twice")
        seen.add(name)
        ips = check.sequence(raw, "ips", f"{key}.", "IP addresses")
        macs = check.sequence(raw, "macs", f"{key}.", "MAC addresses")
        prefixes = check.sequence(raw, "prefixes", f"{key}.", "networks (e.g. fd00:7::/64)")
        if not ips and not macs and not prefixes:
            raise check.fail(key, f"device {name!r} needs at least one IP or MAC address, "
                                  "or a prefix")
        devices.append(Device(
            name,
            tuple(check.ip_value(ip, f"{key}.ips.{j}") for j, ip in enumerate(ips)),
            tuple(check.mac_value(mac, f"{key}.macs.{j}") for j, mac in enumerate(macs)),
            tuple(_network(check, net, f"{key}.prefixes.{j}") for j, net in enumerate(prefixes)),
        ))

    catalog_paths = []
    for i, entry in enumerate(check.sequence(data, "catalogs", "", "catalog file paths")):
        if not isinstance(entry, str) or not entry.strip():
            raise check.fail(f"catalogs.{i}", f"must be the path of a catalog file, not {entry!r}")
        catalog = path.parent / entry
        try:
            found = catalog.resolve().is_file()
        except (OSError, RuntimeError):  # a name too long, a symlink loop
            found = False
        if not found:
            raise check.fail(f"catalogs.{i}", f"catalog file {catalog} does not exist")
        catalog_paths.append(catalog.resolve())

    defaults = Thresholds()
    known = set(Thresholds.__dataclass_fields__)
    analysis = check.mapping(data.get("analysis"), "analysis", known)
    values = {
        k: check.number(analysis, k, "analysis.", getattr(defaults, k), low=0, strict=True)
        for k in known
    }
    if values["alpha"] >= 1:
        raise check.fail("analysis.alpha", "must be below 1 (a probability, e.g. 0.01)")
    values["min_occurrences"] = int(values["min_occurrences"])
    for key, bits in (("network_prefix_v4", 32), ("network_prefix_v6", 128)):
        if values[key] != int(values[key]) or not 1 <= values[key] <= bits:
            raise check.fail(f"analysis.{key}", f"must be a whole number from 1 to {bits}")
        values[key] = int(values[key])

    window = check.mapping(data.get("time_window"), "time_window", {"earliest", "ahead_s"})
    earliest = window.get("earliest", dt.date(1995, 1, 1))
    if isinstance(earliest, dt.date) and not isinstance(earliest, dt.datetime):
        earliest = dt.datetime(earliest.year, earliest.month, earliest.day, tzinfo=dt.UTC)
    if isinstance(earliest, dt.datetime):
        earliest = (earliest if earliest.tzinfo else earliest.replace(tzinfo=dt.UTC)).timestamp()
    earliest = check.number({"earliest": earliest}, "earliest", "time_window.", 0.0, low=0)

    return LabConfig(
        timezone=str(timezone),
        timezone_configured="timezone" in data,
        bin_seconds=check.number(data, "bin_seconds", "", 10.0, low=0, strict=True),
        udp_idle_timeout_s=check.number(data, "udp_idle_timeout_s", "", 120.0, low=0, strict=True),
        redact_query=check.boolean(data, "redact_query", "", True),
        devices=tuple(devices),
        catalogs=tuple(catalog_paths),
        thresholds=Thresholds(**values),
        time_window=TimeWindow(
            earliest, check.number(window, "ahead_s", "time_window.", 86_400.0, low=0)),
        path=path,
    )
