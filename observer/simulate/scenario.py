"""Scenario files: what the simulated phone does, and which scheduled jobs it runs.

A scenario is YAML (``yaml.safe_load`` only) or a dict built in code (``Scenario.from_dict``), so a
benchmark can generate many.  Every error names the file (or scenario name) and the key.
docs/scenarios.md documents each key.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from observer import ObserverError
from observer.config import MAC, Device, LabConfig
from observer.yamlfile import located_error, parse_yaml

BUNDLED_DIR = Path(__file__).with_name("scenarios")
MAX_UPLOAD = 2e9  # bytes; one upload's packets are generated at once, so this bounds memory
JOB_KINDS = ("export", "backup", "other")
JITTER_KINDS = ("uniform", "normal")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 3600.0}
_CLOCK = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class Job:
    """A scheduled upload: ``size_bytes`` every ``every_s`` at local ``at`` +- jitter."""

    name: str
    kind: str = "export"
    server_name: str = "sync.example-analytics.net"
    port: int = 443
    size_bytes: int = 50_000_000
    size_jitter: float = 0.1  # each upload's size varies uniformly by this fraction
    at_s: float = 2 * 3600.0  # local time of day (seconds after midnight) of the nominal start
    every_s: float = 86400.0  # periods of whole hours follow the local wall clock
    first_day: int = 0  # local day index of the first occurrence (periods >= 1 day)
    jitter_min: float = 0.0
    jitter: str = "uniform"  # uniform: +-jitter_min; normal: standard deviation jitter_min
    skip: tuple[int, ...] = ()  # occurrence indices (0-based) skipped on purpose
    skip_dates: tuple[dt.date, ...] = ()  # local dates whose occurrences are skipped
    miss_rate: float = 0.0  # chance that any other occurrence is skipped
    inside_long_lived: bool = False  # send the bytes through the chat connection
    response_bytes: int = 600


@dataclass(frozen=True)
class Chat:
    """The messenger's long-lived connection."""

    server_name: str = "g.whatsapp.net"
    port: int = 443
    keepalive_s: float = 240.0
    reconnects_per_day: float = 3.0


@dataclass(frozen=True)
class Activity:
    """Confounders: the user's messages and media, and the OS's own telemetry."""

    messages_per_day: float = 150.0
    media_per_day: float = 40.0
    media_upload_share: float = 0.3
    media_median_kb: float = 600.0
    telemetry_interval_s: float = 270.0
    doze_start_s: float = 0.5 * 3600  # local time the phone is left idle (Doze starts)
    doze_end_s: float = 7 * 3600.0
    quic_per_day: float = 20.0
    ipv6_share: float = 0.3  # share of media and telemetry connections over IPv6
    uplink_mbps: float = 20.0
    downlink_mbps: float = 60.0


@dataclass(frozen=True)
class Gap:
    """A stretch of the capture with no packets at all (capture host down)."""

    day: int
    at_s: float
    hours: float


@dataclass(frozen=True)
class Scenario:
    name: str = "week"
    description: str = ""
    days: int = 7
    start: dt.date = dt.date(2026, 3, 2)  # local date; the capture starts at local midnight
    timezone: str = "Europe/Berlin"
    seed: int = 1
    device: str = "pixel7"
    device_ip: str = "192.168.50.23"
    device_ipv6: str = "2001:db8:50::23"
    device_mac: str = "02:00:5e:10:00:23"
    gateway_ip: str = "192.168.50.1"  # router and DNS resolver
    gateway_mac: str = "02:00:5e:10:00:01"
    chat: Chat = field(default_factory=Chat)
    activity: Activity = field(default_factory=Activity)
    gaps: tuple[Gap, ...] = ()
    jobs: tuple[Job, ...] = ()
    source: str = ""  # the file it came from, for messages

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def with_seed(self, seed: int) -> Scenario:
        return dataclasses.replace(self, seed=int(seed))

    def with_days(self, days: int) -> Scenario:
        if days < 1:
            raise ObserverError(f"{self.source or self.name}: days must be at least 1, not {days}")
        return dataclasses.replace(self, days=int(days))

    def lab_config(self) -> LabConfig:
        """The lab config a replay of this scenario's capture needs."""
        return LabConfig(
            timezone=self.timezone,
            devices=(Device(self.device, (self.device_ip, self.device_ipv6), (self.device_mac,)),),
        )

    def local_midnight(self, day: int) -> float:
        """UTC epoch seconds of local midnight at the start of ``day`` (0-based)."""
        date = self.start + dt.timedelta(days=day)
        return dt.datetime(date.year, date.month, date.day, tzinfo=self.tz).timestamp()

    @classmethod
    def from_dict(cls, data: Any, name: str = "scenario", lines: dict[str, int] | None = None
                  ) -> Scenario:
        """Validate a parsed scenario; errors name ``name`` (a file or label) and the key."""
        return _Parser(name, lines or {}).scenario(data)


def load_scenario(path: str | Path | None = None) -> Scenario:
    """Load a scenario file; ``None`` is the bundled week, a bare name a bundled scenario."""
    if path is None:
        path = BUNDLED_DIR / "week.yaml"
    path = Path(path)
    bundled = BUNDLED_DIR / f"{path.stem}.yaml"
    if not path.exists() and path.parent == Path(".") and bundled.is_file():
        path = bundled
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        known = ", ".join(bundled_names())
        raise ObserverError(
            f"cannot read scenario {path}: {exc.strerror or exc} (bundled scenarios: {known})"
        ) from None
    data, lines = parse_yaml(text, str(path))
    if data is None:
        data = {}
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return Scenario.from_dict(data, name=str(path), lines=lines)


def bundled_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml"))


class _Parser:
    """Typed reads from a scenario mapping, failing with the file, line and key."""

    def __init__(self, source: str, lines: dict[str, int]) -> None:
        self.source = source
        self.lines = lines

    def fail(self, key: str, message: str) -> ObserverError:
        return located_error(self.source, self.lines, key, message)

    def mapping(self, value: Any, key: str, known: set[str]) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key or "(top level)",
                            f"must be a mapping of keys, not {type(value).__name__}")
        prefix = f"{key}." if key else ""
        for name in value:
            if name not in known:
                hint = ", ".join(sorted(known))
                raise self.fail(f"{prefix}{name}", f"unknown key (known keys: {hint})")
        return value

    def number(self, data: dict, key: str, prefix: str, default: float, *, low: float = 0.0,
               high: float | None = None, integer: bool = False, strict: bool = False) -> Any:
        if key not in data:
            return default
        value = data[key]
        full = f"{prefix}{key}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(full, f"must be a number, not {value!r}")
        if integer and value != int(value):
            raise self.fail(full, f"must be a whole number, not {value!r}")
        if value < low or (strict and value == low):
            raise self.fail(full, f"must be {'above' if strict else 'at least'} {low}, not {value}")
        if high is not None and value > high:
            raise self.fail(full, f"must be at most {high}, not {value}")
        return int(value) if integer else float(value)

    def string(self, data: dict, key: str, prefix: str, default: str,
               choices: tuple[str, ...] = ()) -> str:
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{prefix}{key}", f"must be a text value, not {value!r}")
        if choices and value not in choices:
            raise self.fail(f"{prefix}{key}", f"must be one of {', '.join(choices)}, not {value!r}")
        return value.strip()

    def boolean(self, data: dict, key: str, prefix: str, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"{prefix}{key}", f"must be true or false, not {value!r}")
        return value

    def clock(self, data: dict, key: str, prefix: str, default: float) -> float:
        """A local time of day "HH:MM" -> seconds after midnight."""
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 24 * 60:
            return value * 60.0  # YAML 1.1 reads an unquoted 02:00 as 120 (sexagesimal minutes)
        match = _CLOCK.match(str(value).strip())
        if not match:
            raise self.fail(f"{prefix}{key}", f"must be a local time like \"02:00\", not {value!r}")
        return int(match.group(1)) * 3600.0 + int(match.group(2)) * 60.0

    def duration(self, data: dict, key: str, prefix: str, default: float) -> float:
        """ "24h", "4.5m", "7d", "90s" or a number of hours -> seconds."""
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value) * 3600.0
        else:
            match = _DURATION.match(str(value))
            if not match:
                raise self.fail(f"{prefix}{key}",
                                f"must be a duration like 24h, 6h, 4.5m or 7d, not {value!r}")
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
        if seconds < 30:
            raise self.fail(f"{prefix}{key}", f"must be at least 30 seconds, not {value!r}")
        return seconds

    def ip(self, data: dict, key: str, prefix: str, default: str, version: int = 4) -> str:
        value = data.get(key, default)
        try:
            addr = ipaddress.ip_address(str(value))
        except ValueError:
            addr = None
        if addr is None or addr.version != version:
            raise self.fail(f"{prefix}{key}", f"{value!r} is not an IPv{version} address")
        return str(addr)

    def mac(self, data: dict, key: str, prefix: str, default: str) -> str:
        value = data.get(key, default)
        if not isinstance(value, str) or not MAC.match(value.lower()):
            raise self.fail(f"{prefix}{key}", f"{value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
        return value.lower()

    def date(self, data: dict, key: str, default: dt.date) -> dt.date:
        value = data.get(key, default)
        if isinstance(value, dt.datetime):
            return value.date()
        if isinstance(value, dt.date):
            return value
        try:
            return dt.date.fromisoformat(str(value))
        except ValueError:
            raise self.fail(key, f"must be a date like 2026-03-02, not {value!r}")

    def hostname(self, data: dict, key: str, prefix: str, default: str) -> str:
        value = self.string(data, key, prefix, default).lower().rstrip(".")
        labels = value.split(".")
        if len(value) > 253 or len(labels) < 2 or not all(
            re.match(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", label) for label in labels
        ):
            raise self.fail(f"{prefix}{key}", f"{value!r} is not a DNS name like sync.example.net")
        return value

    def scenario(self, data: Any) -> Scenario:
        known = {f.name for f in dataclasses.fields(Scenario)} - {
            "source", "device_ip", "device_ipv6", "device_mac", "gateway_ip", "gateway_mac"}
        data = self.mapping(data, "", known | {"network"})
        d = Scenario()
        device = data.get("device", {})
        device = self.mapping(device, "device", {"name", "ip", "ipv6", "mac"})
        name = self.string(device, "name", "device.", d.device)
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", name):
            raise self.fail("device.name", f"{name!r}: use letters, digits, '.', '_' or '-'")
        network = self.mapping(data.get("network", {}), "network", {"gateway_ip", "gateway_mac"})
        timezone = self.string(data, "timezone", "", d.timezone)
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise self.fail("timezone", f"unknown time zone {timezone!r} (use e.g. Europe/Berlin)")
        days = self.number(data, "days", "", d.days, low=1, high=400, integer=True)
        gaps = data.get("gaps", []) or []
        if not isinstance(gaps, list):
            raise self.fail("gaps", "must be a list of {day, at, hours}")
        jobs = data.get("jobs", []) or []
        if not isinstance(jobs, list):
            raise self.fail("jobs", "must be a list of scheduled jobs")
        chat = self.chat(data.get("chat", {}))
        parsed_jobs = tuple(self.job(raw, f"jobs.{i}") for i, raw in enumerate(jobs))
        # A job inside the long-lived connection goes where the chat goes.
        parsed_jobs = tuple(
            dataclasses.replace(job, server_name=chat.server_name, port=chat.port)
            if job.inside_long_lived else job for job in parsed_jobs)
        names = [job.name for job in parsed_jobs]
        for i, job_name in enumerate(names):
            if job_name in names[:i]:
                raise self.fail(f"jobs.{i}.name", f"job {job_name!r} is listed twice")
        return Scenario(
            name=self.string(data, "name", "", "scenario"),
            description=str(data.get("description", "") or ""),
            days=days,
            start=self.date(data, "start", d.start),
            timezone=timezone,
            seed=self.number(data, "seed", "", d.seed, integer=True),
            device=name,
            device_ip=self.ip(device, "ip", "device.", d.device_ip),
            device_ipv6=self.ip(device, "ipv6", "device.", d.device_ipv6, version=6),
            device_mac=self.mac(device, "mac", "device.", d.device_mac),
            gateway_ip=self.ip(network, "gateway_ip", "network.", d.gateway_ip),
            gateway_mac=self.mac(network, "gateway_mac", "network.", d.gateway_mac),
            chat=chat,
            activity=self.activity(data.get("activity", {})),
            gaps=tuple(self.gap(raw, f"gaps.{i}", days) for i, raw in enumerate(gaps)),
            jobs=parsed_jobs,
            source=self.source,
        )

    def chat(self, raw: Any) -> Chat:
        c = Chat()
        data = self.mapping(raw, "chat", {f.name for f in dataclasses.fields(Chat)})
        return Chat(
            server_name=self.hostname(data, "server_name", "chat.", c.server_name),
            port=self.number(data, "port", "chat.", c.port, low=1, high=65535, integer=True),
            keepalive_s=self.number(data, "keepalive_s", "chat.", c.keepalive_s, low=10),
            reconnects_per_day=self.number(data, "reconnects_per_day", "chat.",
                                           c.reconnects_per_day, high=200),
        )

    def activity(self, raw: Any) -> Activity:
        a = Activity()
        known = {f.name for f in dataclasses.fields(Activity)} - {"doze_start_s", "doze_end_s"}
        data = self.mapping(raw, "activity", known | {"doze_start", "doze_end"})
        p = "activity."
        return Activity(
            messages_per_day=self.number(data, "messages_per_day", p, a.messages_per_day, high=1e5),
            media_per_day=self.number(data, "media_per_day", p, a.media_per_day, high=1e4),
            media_upload_share=self.number(data, "media_upload_share", p, a.media_upload_share,
                                           high=1),
            media_median_kb=self.number(data, "media_median_kb", p, a.media_median_kb, low=1,
                                        high=1e6),
            telemetry_interval_s=self.number(data, "telemetry_interval_s", p,
                                             a.telemetry_interval_s, low=10),
            doze_start_s=self.clock(data, "doze_start", p, a.doze_start_s),
            doze_end_s=self.clock(data, "doze_end", p, a.doze_end_s),
            quic_per_day=self.number(data, "quic_per_day", p, a.quic_per_day, high=1e4),
            ipv6_share=self.number(data, "ipv6_share", p, a.ipv6_share, high=1),
            uplink_mbps=self.number(data, "uplink_mbps", p, a.uplink_mbps, low=0.1, high=10000),
            downlink_mbps=self.number(data, "downlink_mbps", p, a.downlink_mbps, low=0.1,
                                      high=10000),
        )

    def gap(self, raw: Any, key: str, days: int) -> Gap:
        data = self.mapping(raw, key, {"day", "at", "hours"})
        for required in ("day", "hours"):
            if required not in data:
                raise self.fail(f"{key}.{required}", "is required")
        return Gap(
            day=self.number(data, "day", f"{key}.", 0, high=days - 1, integer=True),
            at_s=self.clock(data, "at", f"{key}.", 12 * 3600.0),
            hours=self.number(data, "hours", f"{key}.", 1.0, low=0, high=24 * days, strict=True),
        )

    def job(self, raw: Any, key: str) -> Job:
        j = Job(name="job")
        known = {f.name for f in dataclasses.fields(Job)} - {"at_s", "every_s", "skip_dates",
                                                             "size_bytes"}
        data = self.mapping(raw, key, known | {"at", "every", "size_mb", "size_kb", "size_bytes"})
        p = f"{key}."
        if "name" not in data:
            raise self.fail(f"{key}.name", "is required (a short label such as nightly-export)")
        sizes = [k for k in ("size_mb", "size_kb", "size_bytes") if k in data]
        if len(sizes) > 1:
            raise self.fail(f"{p}{sizes[1]}", "give only one of size_mb, size_kb, size_bytes")
        size = j.size_bytes
        if sizes:
            scale = {"size_mb": 1e6, "size_kb": 1e3, "size_bytes": 1}[sizes[0]]
            size = round(self.number(data, sizes[0], p, 0, low=0, high=MAX_UPLOAD / scale,
                                     strict=True) * scale)
        skip, skip_dates = [], []
        raw_skip = data.get("skip", []) or []
        if not isinstance(raw_skip, list):
            raise self.fail(f"{p}skip", "must be a list of occurrence numbers or local dates")
        for i, item in enumerate(raw_skip):
            if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
                skip.append(item)
            elif isinstance(item, dt.date):
                skip_dates.append(item)
            else:
                try:
                    skip_dates.append(dt.date.fromisoformat(str(item)))
                except ValueError:
                    raise self.fail(f"{p}skip.{i}", f"{item!r} is neither an occurrence number "
                                                    "(0, 1, ...) nor a date like 2026-03-04")
        inside = self.boolean(data, "inside_long_lived", p, j.inside_long_lived)
        if inside and "server_name" in data:
            raise self.fail(f"{p}server_name", "a job inside the long-lived connection goes to the "
                                               "chat server; leave server_name out")
        return Job(
            name=self.string(data, "name", p, j.name),
            kind=self.string(data, "kind", p, j.kind, JOB_KINDS),
            server_name=self.hostname(data, "server_name", p, j.server_name),
            port=self.number(data, "port", p, j.port, low=1, high=65535, integer=True),
            size_bytes=size,
            size_jitter=self.number(data, "size_jitter", p, j.size_jitter, high=0.9),
            at_s=self.clock(data, "at", p, j.at_s),
            every_s=self.duration(data, "every", p, j.every_s),
            first_day=self.number(data, "first_day", p, j.first_day, integer=True, high=400),
            jitter_min=self.number(data, "jitter_min", p, j.jitter_min, high=24 * 60),
            jitter=self.string(data, "jitter", p, j.jitter, JITTER_KINDS),
            skip=tuple(skip),
            skip_dates=tuple(skip_dates),
            miss_rate=self.number(data, "miss_rate", p, j.miss_rate, high=1),
            inside_long_lived=inside,
            response_bytes=self.number(data, "response_bytes", p, j.response_bytes, integer=True,
                                       high=1e7),
        )
