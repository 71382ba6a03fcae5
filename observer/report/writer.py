"""``write_report``: records + findings -> report.html, report.md, findings.json, endpoints.csv.

The HTML is one self-contained file: plots are SVG ``data:`` images, the stylesheet is inline and
pinned by its hash in a Content-Security-Policy that allows nothing else (no script at all, no
network).  Every name that comes from the network goes through Jinja2's autoescaping (HTML),
``md_escape`` (Markdown) or ``csv_cell`` (spreadsheets).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import math
import re
import time
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from zoneinfo import ZoneInfo

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

from observer import ObserverError, __version__
from observer.catalog import load_catalog
from observer.config import LabConfig
from observer.records.schema import TABLES, empty
from observer.report import aggregate, plots
from observer.report.text import (
    csv_cell,
    human_bytes,
    human_duration,
    local_day,
    local_dt,
    local_time,
    md_escape,
    p_value_text,
    period_words,
    sort_findings,
    verdict_sentence,
    who,
)

MAX_EVENT_ROWS = 60
# The CSV says which clock its times are on.
CSV_COLUMNS = [f"{c}_utc" if c.endswith("_seen") else c for c in aggregate.ENDPOINT_COLUMNS]


def _css() -> str:
    return resources.files("observer.report").joinpath("style.css").read_text(encoding="utf-8")


def csp(css: str) -> str:
    """The page's policy: data: images, the one inline stylesheet by hash, nothing else."""
    digest = base64.b64encode(hashlib.sha256(css.encode("utf-8")).digest()).decode("ascii")
    return (
        "default-src 'none'; img-src data:; "
        f"style-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )


def _environment(markdown: bool) -> jinja2.Environment:
    loader = jinja2.PackageLoader("observer.report", "templates")
    if markdown:
        # Every {{ value }} is Markdown-escaped on output, so no name can add syntax or HTML.
        return jinja2.Environment(
            loader=loader,
            autoescape=False,
            finalize=md_escape,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.StrictUndefined,
        )
    return jinja2.Environment(
        loader=loader,
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )


def _json_safe(value: object) -> object:
    """Findings as strict JSON: numpy scalars unwrapped, NaN and infinity as null."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _verdict_class(finding: dict) -> str:
    verdict = finding.get("verdict", "")
    if verdict == "periodic bulk upload":
        return "backup" if finding.get("is_backup") else "export"
    return {"periodic heartbeat": "heartbeat", "irregular uploads": "irregular"}.get(
        verdict, "quiet"
    )


def _headline(findings: list[dict]) -> str:
    periodic = [f for f in findings if f.get("verdict") == "periodic bulk upload"]
    exports = [f for f in periodic if not f.get("is_backup")]
    backups = [f for f in periodic if f.get("is_backup")]
    if exports:
        targets = ", ".join(who(f) for f in exports)
        n = len(exports)
        text = (
            f"Yes: {n} periodic bulk upload{'s' if n > 1 else ''} that {'are' if n > 1 else 'is'} "
            f"not a known backup, to {targets}."
        )
        if backups:
            text += f" Also {len(backups)} scheduled backup{'s' if len(backups) > 1 else ''}."
        return text
    if backups:
        targets = ", ".join(who(f) for f in backups)
        return f"Only scheduled backups recur: {targets}. No other periodic bulk upload was found."
    return "No periodic bulk upload was found in this capture."


def _facts(finding: dict, *, device: bool) -> list[tuple[str, str]]:
    """The card's key numbers; unknown ones are left out rather than shown as dashes."""
    occ, exp = finding.get("occurrences"), finding.get("expected")
    confidence = f"{finding.get('confidence') or 'none'} ({p_value_text(finding.get('p_value'))})"
    if finding.get("verdict") == "periodic heartbeat":
        confidence = "not scored (heartbeat)"
    if finding.get("verdict") == "irregular uploads":
        n = finding.get("bulk_events", occ)
        return [
            ("Bulk uploads", f"{n:,}" if isinstance(n, int) else "–"),
            ("Typical size", human_bytes(finding.get("typical_bytes"))),
            ("Total up", human_bytes(finding.get("bytes_up"))),
            ("Schedule", "none found"),
        ]
    facts = [
        ("Period", period_words(finding.get("period_s")).removeprefix("every ")),
        ("Local time", finding.get("phase_local") or "–"),
        ("Spread", human_duration(finding.get("jitter_s")) if finding.get("jitter_s") else "–"),
        ("Typical size", human_bytes(finding.get("typical_bytes"))),
        _occurrences(finding.get("verdict"), occ, exp),
        ("Device", str(finding.get("device") or "–") if device else "–"),
        ("Confidence", confidence),
    ]
    return [(k, v) for k, v in facts if v not in ("–", "None", "at no fixed interval")]


def _occurrences(verdict: str | None, occ: int | None, exp: int | None) -> tuple[str, str]:
    """"6 of 7 expected" for a schedule; a heartbeat's count alone, since its interval wanders
    (reconnects, Doze) and "2,833 of 2,629 expected" would read as a contradiction."""
    if verdict == "periodic heartbeat" or occ is None or not exp:
        return ("Contacts" if verdict == "periodic heartbeat" else "Occurrences", f"{occ:,}"
                if isinstance(occ, int) else "–")
    return ("Occurrences", f"{occ:,} of {exp:,} expected")


def missed_nights(
    finding: dict,
    events: list[dict],
    tz: ZoneInfo,
    t0: float,
    t1: float,
    gaps: list[tuple[float, float]],
) -> list[tuple[float, bool]]:
    """For a daily finding: (expected time, during a capture gap) of each night with no event.

    A night counts when its expected time (local midnight + typical time) lies inside the capture.
    """
    period = finding.get("period_s")
    clock = re.fullmatch(r"(\d{1,2}):(\d{2})", str(finding.get("phase_local") or ""))
    if not clock or not period or abs(period - 86400) > 0.02 * 86400:
        return []
    seen = {local_dt(e["ts_start"], tz).date() for e in events}
    day = local_dt(t0, tz).date()
    last = local_dt(t1, tz).date()
    out = []
    while day <= last:
        expected = datetime(day.year, day.month, day.day, int(clock[1]), int(clock[2]), tzinfo=tz)
        ts = expected.timestamp()
        if t0 <= ts <= t1 and day not in seen:
            out.append((ts, any(a <= ts <= b for a, b in gaps)))
        day += timedelta(days=1)
    return out


def _event_rows(events: list[dict], tz: ZoneInfo, missed: list[tuple[float, bool]]) -> list[dict]:
    rows = []
    for ts, in_gap in missed:
        rows.append(
            {"ts": ts, "day": local_day(ts, tz), "missed": "capture gap" if in_gap else "no upload"}
        )
    for event in events:
        start, end = event.get("ts_start"), event.get("ts_end")
        rows.append(
            {
                "ts": start,
                "missed": "",
                "day": local_day(start, tz),
                "start": local_time(start, tz, seconds=True).rsplit(" ", 1)[-1],
                "duration": human_duration(end - start)
                if start is not None and end is not None
                else "–",
                "bytes_up": human_bytes(event.get("bytes_up")),
                "bytes_down": human_bytes(event.get("bytes_down")),
                "server_name": event.get("server_name") or "–",
                "on_schedule": {True: "yes", False: "no"}.get(event.get("on_schedule"), "–"),
            }
        )
    return sorted(rows, key=lambda r: r["ts"])[:MAX_EVENT_ROWS]


def _parameters(findings: dict, config: LabConfig) -> list[tuple[str, str]]:
    """The settings behind the findings: the analysis's own record, else the lab config's."""
    out: list[tuple[str, str]] = [("timezone", config.timezone)]

    def text(value: object) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return str(value)
        return f"{value:,}" if isinstance(value, int) else f"{value:.6g}"

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)):
            shown = ", ".join(text(v) for v in value[:12])
            out.append((prefix, shown + (f", … ({len(value)} in all)" if len(value) > 12 else "")))
        else:
            out.append((prefix, text(value)))

    recorded = findings.get("parameters") or {}
    if not recorded:
        recorded = {"bin_seconds": config.bin_seconds, **config.thresholds.__dict__}
    walk("", recorded)
    return out


def _endpoint_rows(table: pd.DataFrame, tz: ZoneInfo) -> list[dict]:
    rows = []
    for row in table.head(aggregate.TOP_ENDPOINTS).itertuples(index=False):
        rows.append(
            {
                "name": row.name,
                "named": bool(row.named),
                "service": row.service if row.organization else "–",
                "organization": row.organization or "–",
                "addresses": int(row.addresses),
                "connections": int(row.connections),
                "bytes_up": human_bytes(row.bytes_up),
                "bytes_down": human_bytes(row.bytes_down),
                "first_seen": local_time(row.first_seen, tz, year=False, weekday=False),
                "last_seen": local_time(row.last_seen, tz, year=False, weekday=False),
            }
        )
    return rows


def write_endpoints_csv(table: pd.DataFrame, path: Path) -> None:
    """All endpoints, with spreadsheet formula characters neutralised in every text cell."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for row in table.itertuples(index=False):
            cells = [
                row.name,
                bool(row.named),
                row.service if row.organization else "",
                row.organization,
                int(row.addresses),
                int(row.connections),
                int(row.bytes_up),
                int(row.bytes_down),
                datetime.fromtimestamp(row.first_seen, UTC).isoformat(timespec="seconds"),
                datetime.fromtimestamp(row.last_seen, UTC).isoformat(timespec="seconds"),
            ]
            writer.writerow([csv_cell(c) for c in cells])


def write_report(
    records: dict[str, pd.DataFrame], findings: dict, config: LabConfig, out_dir: Path
) -> Path:
    """Write the timing report into ``out_dir`` and return the path of report.html."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ObserverError(f"cannot create report directory {out_dir}: {exc.strerror or exc}")
    tz = config.tz
    records = {t: records[t] if records.get(t) is not None else empty(t) for t in TABLES}
    listed = sort_findings([f for f in findings.get("findings", []) if isinstance(f, dict)])
    notable = [f for f in listed if f.get("verdict") != "nothing notable"]
    quiet = [f for f in listed if f.get("verdict") == "nothing notable"]

    conns = records["connections"]
    labels = aggregate.label_connections(conns, load_catalog(tuple(config.catalogs)))
    flow = aggregate.traffic(records, labels["service"])
    cov_raw = findings.get("coverage") or {}
    bounds = aggregate.span(records)
    if bounds is None and cov_raw.get("ts_start") is not None:
        bounds = (float(cov_raw["ts_start"]), float(cov_raw.get("ts_end") or cov_raw["ts_start"]))
    t0, t1 = bounds or (time.time() - 86400, time.time())

    must = [f.get("service") or f.get("group") for f in notable]
    keep = aggregate.top_services(flow, [m for m in must if m])
    timeline = aggregate.timeline(flow, t0, t1, keep)
    palette = plots.colours(timeline.services)
    colour_of = [palette.get(f.get("service") or f.get("group"), plots.GREY) for f in notable]
    events = [
        {**e, "colour": colour}
        for finding, colour in zip(notable, colour_of, strict=True)
        for e in finding.get("events") or []
        if "ts_start" in e
    ]
    heat = aggregate.heatmap(flow, tz, t0, t1)
    cov = aggregate.coverage(records["sessions"], t0, t1)
    if not cov.known:
        cov = aggregate.coverage_from_findings(cov_raw, t0, t1) or cov
    silent = [
        (local_time(a, tz), local_time(b, tz), human_duration(b - a))
        for a, b in (cov_raw.get("silent_gaps") or [])
    ]
    table = aggregate.endpoints(conns, labels)

    devices = sorted(set(conns["device"].dropna().astype(str))) or ["(unknown device)"]
    cards = []
    for finding, colour in zip(notable, colour_of, strict=True):
        finding_events = [e for e in finding.get("events") or [] if "ts_start" in e]
        periodic = str(finding.get("verdict", "")).startswith("periodic") and bool(finding_events)
        cards.append(
            {
                "who": who(finding),
                "kind": _verdict_class(finding),
                "verdict": str(finding.get("verdict", "")),
                "sentence": verdict_sentence(finding, config.timezone),
                "facts": _facts(finding, device=len(devices) > 1),
                "names": list(finding.get("names") or [])[:8],
                "periodic": periodic,
                "clock": plots.clock_svg(finding_events, tz, finding.get("phase_local"), colour)
                if periodic
                else None,
                "events": _event_rows(
                    finding_events, tz, missed_nights(finding, finding_events, tz, t0, t1, cov.gaps)
                ),
                "events_total": len(finding_events),
                "has_schedule": any("on_schedule" in e for e in finding_events),
            }
        )

    span_days = (t1 - t0) / 86400
    context = {
        "version": __version__,
        "devices": devices,
        "tz": config.timezone,
        "period": f"{local_time(t0, tz)} – {local_time(t1, tz)}",
        "span_days": f"{span_days:.1f}",
        "generated": local_time(time.time(), tz),
        "headline": _headline(listed)
        if len(conns) or listed
        else "No connection records: nothing was observed, so nothing can be concluded.",
        "cards": cards,
        "quiet": [who(f) for f in quiet],
        "tested": len(listed),
        "timeline": plots.timeline_svg(timeline, events, tz, palette),
        "timeline_bin": "hour" if timeline.bin_s == 3600 else human_duration(timeline.bin_s),
        "heatmap": plots.heatmap_svg(heat, config.timezone),
        "coverage_plot": plots.coverage_svg(cov, tz),
        "coverage": {
            "known": cov.known,
            "covered": human_duration(cov.covered_s),
            "span": human_duration(cov.ts_end - cov.ts_start),
            "percent": f"{100 * cov.covered_s / max(cov.ts_end - cov.ts_start, 1):.0f}",
            "gaps": [
                (local_time(a, tz), local_time(b, tz), human_duration(b - a)) for a, b in cov.gaps
            ],
            "dropped": f"{cov.dropped:,}",
            "sessions": len(cov.sessions),
            "inferred": cov.inferred,
            "silent": silent,
        },
        "endpoints": _endpoint_rows(table, tz),
        "endpoints_total": len(table),
        "unnamed_total": int((~table["named"]).sum()) if len(table) else 0,
        "totals": {
            "connections": f"{len(conns):,}",
            "up": human_bytes(int(conns["bytes_up"].fillna(0).sum())),
            "down": human_bytes(int(conns["bytes_down"].fillna(0).sum())),
        },
        "parameters": _parameters(findings, config),
    }

    css = _css()
    html = (
        _environment(markdown=False)
        .get_template("report.html.j2")
        .render(**context, css=Markup(css), csp=csp(css))
    )
    markdown = _environment(markdown=True).get_template("report.md.j2").render(**context)
    html_path = out_dir / "report.html"
    html_path.write_text(html, encoding="utf-8")
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    (out_dir / "findings.json").write_text(
        json.dumps(_json_safe(findings), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    write_endpoints_csv(table, out_dir / "endpoints.csv")
    return html_path
