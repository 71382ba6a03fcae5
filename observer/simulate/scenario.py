"""Scenario files: which phones are on the lab network, what each does, and its scheduled jobs.

A scenario is YAML (``yaml.safe_load`` only) or a dict built in code (``Scenario.from_dict``), so a
benchmark can generate many.  Every error names the file (or scenario name) and the key.
docs/scenarios.md documents each key.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from observer import ObserverError
from observer.config import Device, LabConfig
from observer.yamlfile import Shape, read_yaml

BUNDLED_DIR = Path(__file__).with_name("scenarios")
MAX_UPLOAD = 2e9  # bytes; one upload's packets are generated at once, so this bounds memory
MAX_PHONES = 200  # a phone's address is .(23 + index) in the lab's /24 unless given
JOB_KINDS = ("export", "backup", "other")
JITTER_KINDS = ("uniform", "normal")
FAMILIES = ("ipv4", "ipv6", "alternate", "mixed")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 3600.0}
_CLOCK = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEVICE_KEYS = {"name", "ip", "ipv6", "mac", "temporary_ipv6", "temporary_every"}
PHONE_KEYS = DEVICE_KEYS | {"chat", "activity", "jobs"}


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
    family: str = "ipv4"  # ipv4 | ipv6 | alternate (by occurrence) | mixed (a coin per run)
    response_bytes: int = 600


@dataclass(frozen=True)
class Chat:
    """The messenger's long-lived connection (``enabled: false``: the phone has none)."""

    server_name: str = "g.whatsapp.net"
    port: int = 443
    keepalive_s: float = 240.0
    reconnects_per_day: float = 3.0
    enabled: bool = True


@dataclass(frozen=True)
class Activity:
    """Confounders: the user's messages and media, and the OS's own telemetry."""

    messages_per_day: float = 150.0
    media_per_day: float = 40.0
    media_upload_share: float = 0.3
    media_median_kb: float = 600.0
    telemetry_interval_s: float = 270.0  # 0: no OS telemetry at all
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
class Phone:
    """One phone on the lab network: its link-layer and IP identity, and what it does.

    With ``temporary_ipv6`` its outgoing IPv6 connections leave from a temporary ("privacy")
    address that is replaced every ``temporary_every_s`` (RFC 8981), as Android does by default;
    the stable address stays configured but carries none of them."""

    name: str = "pixel7"
    ip: str = "192.168.50.23"
    ipv6: str = "2001:db8:50::23"
    mac: str = "02:00:5e:10:00:23"
    temporary_ipv6: bool = False
    temporary_every_s: float = 86400.0
    chat: Chat = field(default_factory=Chat)
    activity: Activity = field(default_factory=Activity)
    jobs: tuple[Job, ...] = ()


@dataclass(frozen=True)
class Scenario:
    name: str = "week"
    description: str = ""
    days: int = 7
    start: dt.date = dt.date(2026, 3, 2)  # local date; the capture starts at local midnight
    timezone: str = "Europe/Berlin"
    seed: int = 1
    phones: tuple[Phone, ...] = (Phone(),)
    gateway_ip: str = "192.168.50.1"  # router and DNS resolver
    gateway_mac: str = "02:00:5e:10:00:01"
    gaps: tuple[Gap, ...] = ()
    rotate_s: float = 0.0  # > 0: one pcap file per this many seconds (like tcpdump -G)
    source: str = ""  # the file it came from, for messages

    # The first phone, for scenarios of one phone (most of them).
    @property
    def device(self) -> str:
        return self.phones[0].name

    @property
    def device_ip(self) -> str:
        return self.phones[0].ip

    @property
    def device_ipv6(self) -> str:
        return self.phones[0].ipv6

    @property
    def device_mac(self) -> str:
        return self.phones[0].mac

    @property
    def chat(self) -> Chat:
        return self.phones[0].chat

    @property
    def activity(self) -> Activity:
        return self.phones[0].activity

    @property
    def jobs(self) -> tuple[Job, ...]:
        """Every phone's jobs."""
        return tuple(job for phone in self.phones for job in phone.jobs)

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
        """The lab config a user of this lab would write: each phone's name, MAC and stable
        addresses (temporary IPv6 addresses are not known in advance; the MAC ties them)."""
        return LabConfig(
            timezone=self.timezone,
            timezone_configured=True,
            devices=tuple(Device(p.name, (p.ip, p.ipv6), (p.mac,)) for p in self.phones),
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
    if not path.is_file():
        known = ", ".join(bundled_names())
        raise ObserverError(f"cannot read scenario {path}: no such file (bundled scenarios: "
                            f"{known})")
    doc = read_yaml(path, "scenario")
    data = {} if doc.data is None else doc.data
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return Scenario.from_dict(data, name=doc.source, lines=doc.lines)


def bundled_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml"))


def fleet_scenario(phones: int = 10, days: int = 30, seed: int = 1, with_export: int | None = None,
                   rotate: str = "1h", name: str = "fleet") -> Scenario:
    """A lab of ``phones`` phones, each running its apps' schedules, ``with_export`` of them
    (default: half) also a nightly export; hourly rotated files by default (docs/scenarios.md)."""
    fleet: dict[str, Any] = {"phones": phones}
    if with_export is not None:
        fleet["with_export"] = with_export
    return Scenario.from_dict({"name": name, "days": days, "seed": seed, "rotate": rotate,
                               "fleet": fleet}, name=name)


# What the phones of a generated fleet run: each phone draws a few of these apps; the first
# (an export) only the phones chosen to have one.  Sizes in MB; "every" as in a scenario file.
FLEET_APPS: tuple[dict[str, Any], ...] = (
    {"name": "nightly-export", "kind": "export", "server_name": "sync.example-analytics.net",
     "size_mb": 25, "at": "02:00", "every": "24h", "jitter_min": 20, "miss_rate": 0.1},
    {"name": "drive-backup", "kind": "backup", "server_name": "backup.googleapis.com",
     "size_mb": 10, "size_jitter": 0.3, "at": "03:30", "every": "24h", "jitter_min": 10,
     "jitter": "normal"},
    {"name": "partner-sync", "kind": "other", "server_name": "api.sync-partner.com",
     "size_mb": 3, "at": "00:45", "every": "6h", "jitter_min": 5},
    {"name": "weekly-metrics", "kind": "other", "server_name": "weekly.metrics-collector.io",
     "size_mb": 60, "at": "04:15", "every": "7d", "jitter_min": 5},
    {"name": "ad-sdk-batch", "kind": "other", "server_name": "batch.adnet-sdk.com",
     "size_mb": 2, "at": "01:10", "every": "12h", "jitter_min": 10},
    {"name": "heartbeat", "kind": "other", "server_name": "hb.example-analytics.net",
     "size_kb": 2, "size_jitter": 0.2, "at": "00:00", "every": "15m", "jitter_min": 0.5},
)
FLEET_ACTIVITY = {"messages_per_day": 40, "media_per_day": 10, "media_median_kb": 300,
                  "telemetry_interval_s": 900, "quic_per_day": 5}


def _fleet_phones(fleet: dict, seed: int) -> list[dict]:
    """Phone entries of a generated fleet: deterministic in the seed."""
    rng = np.random.default_rng([seed, zlib.crc32(b"fleet")])
    n = fleet["phones"]
    exporting = set(rng.choice(n, size=fleet.get("with_export", n // 2), replace=False).tolist())
    out = []
    for i in range(n):
        apps = [a for a in FLEET_APPS[1:] if rng.random() < 0.5]
        if i in exporting:
            apps.insert(0, FLEET_APPS[0])
        jobs = []
        for app in apps:
            shift = int(rng.integers(-40, 41))  # each phone's own minute of the schedule
            if not app["every"].endswith(("h", "d")):
                shift = 0  # a heartbeat counts from midnight of the first day
            hour, minute = (int(x) for x in app["at"].split(":"))
            total = (hour * 60 + minute + shift) % (24 * 60)
            jobs.append({**app, "at": f"{total // 60:02d}:{total % 60:02d}"})
        out.append({
            "name": f"phone{i + 1:02d}", "temporary_ipv6": bool(rng.random() < 0.5),
            "activity": {"ipv6_share": round(float(rng.uniform(0.1, 0.5)), 2)},
            "chat": {"enabled": bool(rng.random() < 0.8)}, "jobs": jobs,
        })
    return out


class _Parser(Shape):
    """Typed reads from a scenario mapping (observer.yamlfile's shape checks, plus the scenario's
    own kinds of value), failing with the file, line and key."""

    def number(self, data: dict, key: str, prefix: str, default: float, *, low: float = 0.0,
               high: float | None = None, integer: bool = False, strict: bool = False) -> Any:
        """As ``Shape.number``, never below 0 unless told, and a float unless ``integer``."""
        value = super().number(data, key, prefix, default, low=low, high=high, integer=integer,
                               strict=strict)
        return value if integer else float(value)

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

    def duration(self, data: dict, key: str, prefix: str, default: float, low: float = 30.0
                 ) -> float:
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
        if seconds < low:
            raise self.fail(f"{prefix}{key}", f"must be at least {low:g} seconds, not {value!r}")
        return seconds

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
        known = {f.name for f in dataclasses.fields(Scenario)} - {"source", "rotate_s",
                                                                  "gateway_ip", "gateway_mac"}
        data = self.mapping(data, "", known | {"network", "device", "chat", "activity", "jobs",
                                               "fleet", "rotate"})
        d = Scenario()
        network = self.mapping(data.get("network", {}), "network", {"gateway_ip", "gateway_mac"})
        gateway_ip = self.ip(network, "gateway_ip", "network.", d.gateway_ip, version=4)
        timezone = self.string(data, "timezone", "", d.timezone)
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise self.fail("timezone", f"unknown time zone {timezone!r} (use e.g. Europe/Berlin)")
        days = self.number(data, "days", "", d.days, low=1, high=400, integer=True)
        seed = self.number(data, "seed", "", d.seed, integer=True)
        gaps = data.get("gaps", []) or []
        if not isinstance(gaps, list):
            raise self.fail("gaps", "must be a list of {day, at, hours}")
        chat = self.chat(data.get("chat", {}), "chat", Chat())
        defaults = self.mapping(data.get("activity"), "activity")  # checked per phone below
        entries, key = self.phone_entries(data, seed, defaults)
        phones = []
        for i, entry in enumerate(entries):
            if key:
                phone_key = f"{key}.{i}"
                entry = self.mapping(entry, phone_key, PHONE_KEYS)
                own = self.mapping(entry.get("activity"), f"{phone_key}.activity")
                activity = self.activity({**defaults, **own}, f"{phone_key}.activity")
            else:
                phone_key = ""
                activity = self.activity(defaults, "activity")
            phones.append(self.phone(entry, phone_key, i, gateway_ip, chat, activity))
        for attr in ("name", "ip", "ipv6", "mac"):
            seen = [getattr(p, attr) for p in phones]
            for i, value in enumerate(seen):
                if value in seen[:i]:
                    raise self.fail(f"{key}.{i}.{attr}", f"{value!r} is used by two phones")
        return Scenario(
            name=self.string(data, "name", "", "scenario"),
            description=str(data.get("description", "") or ""),
            days=days,
            start=self.date(data, "start", d.start),
            timezone=timezone,
            seed=seed,
            phones=tuple(phones),
            gateway_ip=gateway_ip,
            gateway_mac=self.mac(network, "gateway_mac", "network.", d.gateway_mac),
            gaps=tuple(self.gap(raw, f"gaps.{i}", days) for i, raw in enumerate(gaps)),
            rotate_s=self.duration(data, "rotate", "", 0.0, low=60.0) if "rotate" in data else 0.0,
            source=self.source,
        )

    def phone_entries(self, data: dict, seed: int, activity: dict) -> tuple[list[Any], str]:
        """The raw phone entries and their key (``phones``, ``fleet``; "" for the one phone of
        ``device`` and ``jobs``)."""
        given = [k for k in ("phones", "fleet") if k in data]
        if len(given) > 1:
            raise self.fail("fleet", "give either phones or fleet, not both")
        if not given:
            device = self.mapping(data.get("device", {}), "device", DEVICE_KEYS)
            return [{**device, "jobs": data.get("jobs", [])}], ""
        key = given[0]
        for single in ("device", "jobs"):
            if single in data:
                raise self.fail(single, f"with {key}, put {single} keys under each phone")
        if key == "fleet":
            fleet = self.mapping(data["fleet"], "fleet", {"phones", "with_export"})
            n = self.number(fleet, "phones", "fleet.", 10, low=1, high=MAX_PHONES, integer=True)
            k = self.number(fleet, "with_export", "fleet.", n // 2, high=n, integer=True)
            defaults = {**FLEET_ACTIVITY, **activity}
            phones = _fleet_phones({"phones": n, "with_export": k}, seed)
            for phone in phones:
                phone["activity"] = {**defaults, **phone["activity"]}
            return phones, "fleet"
        phones = data["phones"]
        if not isinstance(phones, list) or not phones:
            raise self.fail("phones", "must be a list of phones ({name, ip, mac, jobs, ...})")
        if len(phones) > MAX_PHONES:
            raise self.fail("phones", f"at most {MAX_PHONES} phones, not {len(phones)}")
        return phones, "phones"

    def phone(self, data: dict, key: str, index: int, gateway_ip: str, chat: Chat,
              activity: Activity) -> Phone:
        """One phone; without addresses it gets .23, .24, ... in the gateway's /24."""
        p = f"{key}." if key else "device."
        net = ipaddress.ip_network(f"{gateway_ip}/24", strict=False)
        ip = str(net.network_address + 23 + index)
        d = Phone(name=f"phone{index + 1}" if key else "pixel7", ip=ip,
                  ipv6=f"2001:db8:50::{0x23 + index:x}", mac=f"02:00:5e:10:00:{0x23 + index:02x}")
        name = self.string(data, "name", p, d.name)
        if not _NAME.match(name):
            raise self.fail(f"{p}name", f"{name!r}: use letters, digits, '.', '_' or '-'")
        jobs_key = f"{p}jobs" if key else "jobs"
        jobs = data.get("jobs", []) or []
        if not isinstance(jobs, list):
            raise self.fail(jobs_key, "must be a list of scheduled jobs")
        if key:
            own = self.mapping(data.get("chat"), f"{p}chat")
            chat = self.chat({**chat.__dict__, **own}, f"{p}chat", Chat())
        parsed = tuple(self.job(raw, f"{jobs_key}.{i}") for i, raw in enumerate(jobs))
        for i, job in enumerate(parsed):
            if job.inside_long_lived and not chat.enabled:
                raise self.fail(f"{jobs_key}.{i}.inside_long_lived",
                                "this phone has no chat connection (chat.enabled is false)")
            if job.name in [j.name for j in parsed[:i]]:
                raise self.fail(f"{jobs_key}.{i}.name", f"job {job.name!r} is listed twice")
        # A job inside the long-lived connection goes where the chat goes.
        parsed = tuple(dataclasses.replace(job, server_name=chat.server_name, port=chat.port)
                       if job.inside_long_lived else job for job in parsed)
        return Phone(
            name=name,
            ip=self.ip(data, "ip", p, d.ip, version=4),
            ipv6=self.ip(data, "ipv6", p, d.ipv6, version=6),
            mac=self.mac(data, "mac", p, d.mac),
            temporary_ipv6=self.boolean(data, "temporary_ipv6", p, d.temporary_ipv6),
            temporary_every_s=self.duration(data, "temporary_every", p, d.temporary_every_s,
                                            low=600.0),
            chat=chat,
            activity=activity,
            jobs=parsed,
        )

    def chat(self, raw: Any, key: str, c: Chat) -> Chat:
        data = self.mapping(raw, key, {f.name for f in dataclasses.fields(Chat)})
        p = f"{key}."
        return Chat(
            server_name=self.hostname(data, "server_name", p, c.server_name),
            port=self.number(data, "port", p, c.port, low=1, high=65535, integer=True),
            keepalive_s=self.number(data, "keepalive_s", p, c.keepalive_s, low=10),
            reconnects_per_day=self.number(data, "reconnects_per_day", p, c.reconnects_per_day,
                                           high=200),
            enabled=self.boolean(data, "enabled", p, c.enabled),
        )

    def activity(self, raw: Any, key: str) -> Activity:
        a = Activity()
        known = {f.name for f in dataclasses.fields(Activity)} - {"doze_start_s", "doze_end_s"}
        data = self.mapping(raw, key, known | {"doze_start", "doze_end"})
        p = f"{key}."
        telemetry = self.number(data, "telemetry_interval_s", p, a.telemetry_interval_s)
        if 0 < telemetry < 10:
            raise self.fail(f"{p}telemetry_interval_s", f"must be 0 (none) or at least 10, "
                                                       f"not {telemetry}")
        return Activity(
            messages_per_day=self.number(data, "messages_per_day", p, a.messages_per_day, high=1e5),
            media_per_day=self.number(data, "media_per_day", p, a.media_per_day, high=1e4),
            media_upload_share=self.number(data, "media_upload_share", p, a.media_upload_share,
                                           high=1),
            media_median_kb=self.number(data, "media_median_kb", p, a.media_median_kb, low=1,
                                        high=1e6),
            telemetry_interval_s=telemetry,
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
        family = self.string(data, "family", p, j.family, FAMILIES)
        if inside and family != "ipv4":
            raise self.fail(f"{p}family", "a job inside the long-lived connection goes where the "
                                          "chat goes (IPv4); leave family out")
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
            family=family,
            response_bytes=self.number(data, "response_bytes", p, j.response_bytes, integer=True,
                                       high=1e7),
        )
