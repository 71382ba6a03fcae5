"""The lab config (YAML): devices, time zone, bin width, thresholds, catalog files.

Loaded with ``yaml.safe_load`` only.  Every error names the key and the line of the file it comes
from, so ``observer config check lab.yaml`` tells a user exactly what to fix.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from observer import ObserverError
from observer.yamlfile import located_error, parse_yaml

MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Device:
    name: str
    ips: tuple[str, ...] = ()
    macs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Thresholds:
    """Analysis thresholds; docs/analysis.md explains each."""

    upload_floor_bytes: int = 500_000  # a bulk upload moves at least this much upstream
    baseline_factor: float = 10.0  # ... and at least this many times the device's typical bin
    upload_ratio: float = 3.0  # ... and upstream at least this many times downstream
    merge_gap_s: float = 120.0  # runs closer than this merge into one event
    alpha: float = 0.01  # family-wise false-alarm rate for "periodic"
    min_occurrences: int = 3  # fewer events than this are never called periodic


@dataclass(frozen=True)
class LabConfig:
    timezone: str = "UTC"
    bin_seconds: float = 10.0
    udp_idle_timeout_s: float = 120.0
    redact_query: bool = True
    devices: tuple[Device, ...] = ()
    catalogs: tuple[Path, ...] = ()
    thresholds: Thresholds = field(default_factory=Thresholds)
    path: Path | None = None

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def device_of(self, ip: str) -> str | None:
        """The device name that owns an address, if any."""
        for device in self.devices:
            if ip in device.ips:
                return device.name
        return None


class _Checker:
    """Collects typed values from the parsed YAML, raising errors that cite the file line."""

    def __init__(self, path: Path, lines: dict[str, int]) -> None:
        self.path = path
        self.lines = lines

    def fail(self, key: str, message: str) -> ObserverError:
        return located_error(str(self.path), self.lines, key, message)

    def number(self, data: dict, key: str, prefix: str, default: float, *, positive=True) -> float:
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(f"{prefix}{key}", f"must be a number, not {value!r}")
        if positive and value <= 0:
            raise self.fail(f"{prefix}{key}", f"must be greater than 0, not {value}")
        return value

    def mapping(self, value: Any, key: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping of keys to values, not {type(value).__name__}")
        return value

    def unknown(self, data: dict, known: set[str], prefix: str) -> None:
        for key in data:
            if key not in known:
                hint = ", ".join(sorted(known))
                raise self.fail(f"{prefix}{key}", f"unknown key (known keys: {hint})")


def load_config(path: str | Path) -> LabConfig:
    """Load and validate a lab config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ObserverError(f"cannot read config {path}: {exc.strerror or exc}") from None
    data, lines = parse_yaml(text, str(path))
    if data is None:
        return LabConfig(path=path)
    check = _Checker(path, lines)
    data = check.mapping(data, "")
    check.unknown(
        data,
        {"timezone", "bin_seconds", "udp_idle_timeout_s", "redact_query", "devices", "catalogs",
         "analysis"},
        "",
    )

    timezone = data.get("timezone", "UTC")
    try:
        ZoneInfo(str(timezone))
    except (ZoneInfoNotFoundError, ValueError):
        raise check.fail("timezone", f"unknown time zone {timezone!r} (use e.g. Europe/Berlin)")

    redact = data.get("redact_query", True)
    if not isinstance(redact, bool):
        raise check.fail("redact_query", f"must be true or false, not {redact!r}")

    devices = []
    raw_devices = data.get("devices", []) or []
    if not isinstance(raw_devices, list):
        raise check.fail("devices", "must be a list of devices")
    seen: set[str] = set()
    for i, raw in enumerate(raw_devices):
        key = f"devices.{i}"
        raw = check.mapping(raw, key)
        check.unknown(raw, {"name", "ips", "macs"}, f"{key}.")
        name = raw.get("name")
        if not isinstance(name, str) or not DEVICE_NAME.match(name):
            raise check.fail(
                f"{key}.name" if "name" in raw else key,
                "needs a name of letters, digits, '.', '_' or '-' (at most 64)",
            )
        if name in seen:
            raise check.fail(f"{key}.name", f"device {name!r} is listed twice")
        seen.add(name)
        ips = raw.get("ips", [])
        if not isinstance(ips, list):
            raise check.fail(f"{key}.ips", "must be a list of IP addresses")
        for j, ip in enumerate(ips):
            try:
                ipaddress.ip_address(str(ip))
            except ValueError:
                raise check.fail(f"{key}.ips.{j}", f"{ip!r} is not an IPv4 or IPv6 address")
        macs = raw.get("macs", [])
        if not isinstance(macs, list):
            raise check.fail(f"{key}.macs", "must be a list of MAC addresses")
        for j, mac in enumerate(macs):
            if not isinstance(mac, str) or not MAC.match(mac.lower()):
                raise check.fail(
                    f"{key}.macs.{j}", f"{mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)"
                )
        if not ips and not macs:
            raise check.fail(key, f"device {name!r} needs at least one IP or MAC address")
        devices.append(
            Device(name, tuple(str(ipaddress.ip_address(str(ip))) for ip in ips),
                   tuple(m.lower() for m in macs))
        )

    catalogs = data.get("catalogs", []) or []
    if not isinstance(catalogs, list):
        raise check.fail("catalogs", "must be a list of catalog file paths")
    catalog_paths = []
    for i, entry in enumerate(catalogs):
        catalog = (path.parent / str(entry)).resolve()
        if not catalog.is_file():
            raise check.fail(f"catalogs.{i}", f"catalog file {catalog} does not exist")
        catalog_paths.append(catalog)

    analysis = check.mapping(data.get("analysis", {}) or {}, "analysis")
    defaults = Thresholds()
    known = set(Thresholds.__dataclass_fields__)
    check.unknown(analysis, known, "analysis.")
    values = {k: check.number(analysis, k, "analysis.", getattr(defaults, k)) for k in known}
    if values["alpha"] >= 1:
        raise check.fail("analysis.alpha", "must be below 1 (a probability, e.g. 0.01)")
    values["min_occurrences"] = int(values["min_occurrences"])

    return LabConfig(
        timezone=str(timezone),
        bin_seconds=check.number(data, "bin_seconds", "", 10.0),
        udp_idle_timeout_s=check.number(data, "udp_idle_timeout_s", "", 120.0),
        redact_query=redact,
        devices=tuple(devices),
        catalogs=tuple(catalog_paths),
        thresholds=Thresholds(**values),
        path=path,
    )
