"""The findings table: typed, versioned, and stamped with the records it was computed from.

The contract between the analysis (which writes it) and the report (which reads it), so it lives
with the records and imports neither stage.  One ``Finding`` per (device, endpoint group);
``Findings`` holds them with the run's coverage, parameters, the label of every endpoint (so the
report never relabels) and a ``RecordsStamp`` (so a report never uses findings of records that
have changed since).  Serialised as findings.json; docs/findings.md documents every field.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from observer import ObserverError
from observer.records.location import Location, is_url, read_file, write_object
from observer.records.manifest import records_fingerprint, write_atomic

FINDINGS_VERSION = 2
VERDICTS = ("periodic bulk upload", "periodic heartbeat", "irregular uploads", "nothing notable")
CONFIDENCE = ("high", "medium", "low", "none")


@dataclass(frozen=True)
class Event:
    """One bulk upload event of a group: when, how much, through which connections."""

    ts_start: float
    ts_end: float
    local_time: str = ""
    bytes_up: int = 0
    bytes_down: int = 0
    server_name: str | None = None
    conn_ids: list[str] = field(default_factory=list)
    on_schedule: bool | None = None
    from_totals: bool = False


@dataclass
class Finding:
    """The verdict on one endpoint group of one device, with the numbers and events behind it."""

    group: str
    group_kind: str = "name"
    label: str = ""
    device: str = "unknown"
    service: str | None = None
    organization: str | None = None
    category: str | None = None
    names: list[str] = field(default_factory=list)
    server_ips: list[str] = field(default_factory=list)
    verdict: str = "nothing notable"
    is_backup: bool = False
    period_s: float | None = None
    phase_s: float | None = None
    phase_local: str | None = None
    jitter_s: float | None = None
    period_family: str | None = None
    occurrences: int | None = None
    expected: int | None = None
    typical_bytes: int | None = None
    p_value: float | None = None
    p_value_raw: float | None = None
    confidence: str = "none"
    regular_fraction: float | None = None
    heartbeat_s: float | None = None  # the group's heartbeat interval, whatever its verdict
    schedule_checks: dict[str, bool] | None = None
    null_profile_events: int | None = None
    covered_s: float | None = None
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    bulk_events: int = 0
    summary: str = ""
    evidence_note: str | None = None
    events: list[Event] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        """Field access by name, so the wording (observer.words) reads a Finding or its JSON."""
        return getattr(self, key, default)


@dataclass(frozen=True)
class EndpointLabel:
    """The group and label the analysis gave one (device, server name, address)."""

    device: str
    server_name: str | None
    server_ip: str | None
    group: str
    group_kind: str
    label: str
    service: str | None = None
    organization: str | None = None


@dataclass(frozen=True)
class RecordsStamp:
    """Which records findings were computed from: the records directory's content fingerprint
    (observer.records.records_fingerprint; equal fingerprints, equal records)."""

    fingerprint: str


@dataclass
class Findings:
    """One analysis run: its findings, coverage, parameters, labels and the records it read."""

    findings: list[Finding]
    timezone: str = "UTC"
    timezone_configured: bool = False
    generated_at: float = 0.0
    records: RecordsStamp | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    coverage: dict[str, Any] = field(default_factory=dict)
    labels: list[EndpointLabel] = field(default_factory=list)
    schema_version: int = FINDINGS_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (docs/findings.md): plain types, no NaN."""
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "findings") -> Findings:
        """Read the JSON form; fields it lacks take their defaults, unknown keys are ignored."""
        if not isinstance(data, dict) or not isinstance(data.get("findings", []), list):
            raise ObserverError(f"{where}: expected an object with a 'findings' list "
                                "(docs/findings.md)")
        try:
            findings = [_finding(f) for f in data.get("findings", []) if isinstance(f, dict)]
            stamp = data.get("records")
            return cls(
                findings=findings,
                timezone=str(data.get("timezone") or "UTC"),
                timezone_configured=bool(data.get("timezone_configured", True)),
                generated_at=float(data.get("generated_at") or 0.0),
                records=_known(RecordsStamp, stamp) if isinstance(stamp, dict) else None,
                parameters=dict(data.get("parameters") or {}),
                coverage=dict(data.get("coverage") or {}),
                labels=[_known(EndpointLabel, x) for x in data.get("labels") or []],
                schema_version=int(data.get("schema_version") or 0),
            )
        except (TypeError, ValueError) as exc:
            raise ObserverError(f"{where}: not a findings file of this observer: {exc}") from None

    def for_device(self, device: str) -> Findings:
        """The same run seen from one device: its findings, labels and coverage only."""
        devices = self.coverage.get("devices") or {}
        return Findings(
            findings=[f for f in self.findings if f.device == device],
            timezone=self.timezone, timezone_configured=self.timezone_configured,
            generated_at=self.generated_at, records=self.records, parameters=self.parameters,
            coverage=devices.get(device) or {},
            labels=[x for x in self.labels if x.device == device],
            schema_version=self.schema_version,
        )


def _known(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _finding(data: dict[str, Any]) -> Finding:
    finding = _known(Finding, data)
    finding.events = [_known(Event, e) for e in data.get("events") or []
                      if isinstance(e, dict) and "ts_start" in e and "ts_end" in e]
    if not finding.label:
        finding.label = str(finding.group)
    return finding


def _plain(value: object) -> object:
    """Strict JSON values: numpy scalars unwrapped, NaN and infinity as null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def records_stamp(root: str | Path | Location) -> RecordsStamp:
    """The stamp of a records directory as it is now (a directory listing, no reads)."""
    return RecordsStamp(records_fingerprint(root))


def write_findings(findings: Findings, path: str | Path) -> str | Path:
    """Write findings as UTF-8 JSON (atomically, so a reader never sees half a file); ``path``
    may be a URL beside records on object storage (``observer.records.location``)."""
    data = json.dumps(findings.to_dict(), indent=1, allow_nan=False, ensure_ascii=False)
    if is_url(path):
        try:
            write_object(path, data.encode("utf-8"))
        except OSError as exc:
            raise ObserverError(f"cannot write findings {path}: {exc}") from None
        return path
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data.encode("utf-8"))
    except OSError as exc:
        raise ObserverError(f"cannot write findings {path}: {exc.strerror or exc}") from None
    return path


def read_findings(path: str | Path) -> Findings:
    """Read findings.json (a path or a URL); one clear line when it is not one."""
    try:
        data = json.loads(read_file(path).decode("utf-8"))
    except OSError as exc:
        raise ObserverError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ObserverError(f"{path}: not valid JSON: {exc}") from None
    return Findings.from_dict(data, where=str(path))
