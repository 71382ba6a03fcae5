"""``write_report``: records + findings -> report.html, report.md, findings.json, endpoints.csv.

The report shows what the analysis decided and never decides anything itself: labels, verdicts,
sentences and coverage come from the findings (observer.records.findings), sizes and times from
the records.  The HTML is one self-contained file: plots are SVG ``data:`` images, the
stylesheet is inline and pinned by its hash in a Content-Security-Policy that allows nothing else
(no script at all, no network).  Every name that comes from the network goes through Jinja2's
autoescaping (HTML), ``md_escape`` (Markdown) or ``csv_line`` (spreadsheets).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from zoneinfo import ZoneInfo

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

from observer import ObserverError, __version__, words
from observer.records.export import csv_line
from observer.records.findings import Finding, Findings
from observer.records.schema import TABLES, empty
from observer.report import aggregate, plots
from observer.report.text import clip, md_escape

MAX_EVENT_ROWS = 60
MAX_GAP_ROWS = 200
TITLE_WIDTH = 80  # a name longer than this is shortened in titles and the headline
# The CSV says which clock its times are on.
CSV_COLUMNS = [f"{c}_utc" if c.endswith("_seen") else c for c in aggregate.ENDPOINT_COLUMNS]
VERDICT_ORDER = {"periodic bulk upload": 0, "periodic heartbeat": 1, "irregular uploads": 2,
                 "nothing notable": 3}
CONFIDENCE_ORDER = {"high": 0, "medium": 1, "low": 2, "none": 3}


def _css() -> str:
    return resources.files("observer.report").joinpath("style.css").read_text(encoding="utf-8")


def csp(css: str) -> str:
    """The page's policy: data: images, the one inline stylesheet by hash, nothing else."""
    digest = base64.b64encode(hashlib.sha256(css.encode("utf-8")).digest()).decode("ascii")
    return (
        "default-src 'none'; img-src data:; "
        f"style-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )


def environment(markdown: bool) -> jinja2.Environment:
    loader = jinja2.PackageLoader("observer.report", "templates")
    if markdown:
        # Every {{ value }} is Markdown-escaped on output, so no name can add syntax or HTML.
        return jinja2.Environment(loader=loader, autoescape=False, finalize=md_escape,
                                  keep_trailing_newline=True, trim_blocks=True,
                                  lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return jinja2.Environment(loader=loader, autoescape=True, trim_blocks=True,
                              lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def render_html(template: str, context: dict) -> str:
    css = _css()
    return environment(markdown=False).get_template(template).render(
        **context, css=Markup(css), csp=csp(css))


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Most important first: periodic uploads (exports before backups), by confidence, by size."""
    return sorted(findings, key=lambda f: (
        VERDICT_ORDER.get(f.verdict, 9), f.is_backup, CONFIDENCE_ORDER.get(f.confidence, 9),
        -(f.typical_bytes or 0)))


def verdict_class(finding: Finding) -> str:
    if finding.verdict == "periodic bulk upload":
        return "backup" if finding.is_backup else "export"
    return {"periodic heartbeat": "heartbeat", "irregular uploads": "irregular"}.get(
        finding.verdict, "quiet")


def _facts(finding: Finding, *, device: bool) -> list[tuple[str, str]]:
    """The card's key numbers; unknown ones are left out rather than shown as dashes."""
    occ, exp = finding.occurrences, finding.expected
    confidence = f"{finding.confidence} ({words.p_value_text(finding.p_value)})"
    if finding.verdict == "periodic heartbeat":
        confidence = "not scored (heartbeat)"
    if finding.verdict == "irregular uploads":
        return [
            ("Bulk uploads", f"{finding.bulk_events:,}"),
            ("Typical size", words.human_bytes(finding.typical_bytes)),
            ("Total up", words.human_bytes(finding.bytes_up)),
            ("Schedule", "none found"),
        ]
    facts = [
        ("Period", words.period_words(finding.period_s).removeprefix("every ")),
        ("Local time", finding.phase_local or "–"),
        ("Spread", words.human_duration(finding.jitter_s) if finding.jitter_s else "–"),
        ("Typical size", words.human_bytes(finding.typical_bytes)),
        _occurrences(finding.verdict, occ, exp),
        ("Device", finding.device if device else "–"),
        ("Confidence", confidence),
    ]
    return [(k, v) for k, v in facts if v not in ("–", "None", "at no fixed interval")]


def _occurrences(verdict: str, occ: int | None, exp: int | None) -> tuple[str, str]:
    """"6 of 7 expected" for a schedule; a heartbeat's count alone, since its interval wanders
    (reconnects, Doze) and "2,833 of 2,629 expected" would read as a contradiction."""
    if verdict == "periodic heartbeat" or occ is None or not exp:
        return ("Contacts" if verdict == "periodic heartbeat" else "Occurrences",
                f"{occ:,}" if isinstance(occ, int) else "–")
    return ("Occurrences", f"{occ:,} of {exp:,} expected")


def missed_nights(finding: Finding, events: list[dict], tz: ZoneInfo, t0: float, t1: float,
                  gaps: list[tuple[float, float]]) -> list[tuple[float, bool]]:
    """For a daily finding: (expected time, during a capture gap) of each night with no event.

    A night counts when its expected time (local midnight + typical time) lies inside the capture.
    """
    clock = re.fullmatch(r"(\d{1,2}):(\d{2})", finding.phase_local or "")
    period = finding.period_s
    if not clock or not period or abs(period - 86400) > 0.02 * 86400 or not events:
        return []
    seen = {words.local_dt(e["ts_start"], tz).date() for e in events}
    day = words.local_dt(t0, tz).date()
    last = min(words.local_dt(t1, tz).date(), day + timedelta(days=MAX_EVENT_ROWS + len(events)))
    out = []
    while day <= last:
        expected = datetime(day.year, day.month, day.day, int(clock[1]), int(clock[2]), tzinfo=tz)
        ts = expected.timestamp()
        if t0 <= ts <= t1 and day not in seen:
            out.append((ts, any(a <= ts <= b for a, b in gaps)))
        day += timedelta(days=1)
    return out


def _event_rows(events: list[dict], tz: ZoneInfo, missed: list[tuple[float, bool]]) -> list[dict]:
    rows = [{"ts": ts, "day": words.local_day(ts, tz),
             "missed": "capture gap" if in_gap else "no upload"} for ts, in_gap in missed]
    for event in events:
        start, end = event["ts_start"], event["ts_end"]
        rows.append({
            "ts": start, "missed": "", "day": words.local_day(start, tz),
            "start": words.local_time(start, tz, seconds=True).rsplit(" ", 1)[-1],
            "duration": words.human_duration(end - start),
            "bytes_up": words.human_bytes(event["bytes_up"]),
            "bytes_down": words.human_bytes(event["bytes_down"]),
            "server_name": event["server_name"] or "–",
            "on_schedule": {True: "yes", False: "no"}.get(event["on_schedule"], "–"),
        })
    return sorted(rows, key=lambda r: r["ts"])[:MAX_EVENT_ROWS]


def _parameters(findings: Findings) -> list[tuple[str, str]]:
    """The settings behind the findings, as the analysis recorded them."""
    out: list[tuple[str, str]] = [("timezone", findings.timezone)]

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

    walk("", findings.parameters)
    return out


def _endpoint_rows(table: pd.DataFrame, tz: ZoneInfo) -> list[dict]:
    return [
        {
            "name": row.name, "named": bool(row.named), "service": row.service,
            "organization": row.organization or "–", "addresses": int(row.addresses),
            "connections": int(row.connections),
            "bytes_up": words.human_bytes(row.bytes_up),
            "bytes_down": words.human_bytes(row.bytes_down),
            "first_seen": words.local_time(row.first_seen, tz, year=False, weekday=False),
            "last_seen": words.local_time(row.last_seen, tz, year=False, weekday=False),
        }
        for row in table.head(aggregate.TOP_ENDPOINTS).itertuples(index=False)
    ]


def _utc(ts: float) -> str | None:
    return None if ts != ts else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def write_endpoints_csv(table: pd.DataFrame, path: Path) -> None:
    """All endpoints as RFC 4180 CSV, spreadsheet formula cells neutralised."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        fh.write(csv_line(CSV_COLUMNS))
        for row in table.itertuples(index=False):
            fh.write(csv_line([
                row.name, bool(row.named), row.service, row.organization, int(row.addresses),
                int(row.connections), int(row.bytes_up), int(row.bytes_down),
                _utc(row.first_seen), _utc(row.last_seen),
            ]))


def _events(finding: Finding) -> list[dict]:
    """A finding's events the report can draw (inside ``aggregate.SANE_WINDOW``)."""
    return [asdict(e) for e in finding.events
            if aggregate.sane(np.array([e.ts_start, e.ts_end], dtype="float64")).all()]


@dataclass
class Page:
    """The reduced tables one report draws, computed once from records and findings."""

    findings: Findings
    records: dict[str, pd.DataFrame]
    tz: ZoneInfo
    t0: float
    t1: float
    flow: pd.DataFrame
    table: pd.DataFrame
    coverage: aggregate.Coverage
    left_out: int  # connections with instants outside SANE_WINDOW

    @classmethod
    def build(cls, records: dict[str, pd.DataFrame], findings: Findings) -> Page:
        records = {t: records[t] if records.get(t) is not None else empty(t) for t in TABLES}
        conns = records["connections"]
        labels = aggregate.label_connections(conns, findings.labels)
        flow = aggregate.traffic(records, labels["label"])
        bounds = aggregate.span(records)
        if bounds is None and findings.coverage.get("ts_start") is not None:
            start = float(findings.coverage["ts_start"])
            bounds = (start, float(findings.coverage.get("ts_end") or start))
        t0, t1 = bounds or (time.time() - 86400, time.time())
        starts = conns["ts_start"].to_numpy(dtype="float64", na_value=np.nan)
        return cls(
            findings, records, ZoneInfo(findings.timezone), t0, t1, flow,
            aggregate.endpoints(conns, labels),
            aggregate.coverage(findings.coverage, records["sessions"], t0, t1),
            int((~aggregate.sane(starts)).sum()),
        )

    def timeline(self, notable: list[Finding]) -> aggregate.Timeline:
        """The timeline's series: the labels of the notable findings first, then the largest."""
        keep = aggregate.top_services(self.flow, [f.label for f in notable])
        return aggregate.timeline(self.flow, self.t0, self.t1, keep)


def _card(finding: Finding, colour: str, page: Page, several: bool) -> dict:
    events = _events(finding)
    periodic = finding.verdict.startswith("periodic") and bool(events)
    tz = page.tz
    missed = missed_nights(finding, events, tz, page.t0, page.t1, page.coverage.gaps)
    return {
        "who": clip(words.who(finding), TITLE_WIDTH),
        "kind": verdict_class(finding),
        "verdict": finding.verdict,
        "sentence": finding.summary or words.verdict_sentence(
            finding, page.findings.timezone, tz_configured=page.findings.timezone_configured),
        "facts": _facts(finding, device=several),
        "names": [clip(n, TITLE_WIDTH) for n in finding.names[:8]],
        "periodic": periodic,
        "clock": plots.clock_svg(events, tz, finding.phase_local, colour) if periodic else None,
        "events": _event_rows(events, tz, missed),
        "events_total": len(events),
        "has_schedule": any(e["on_schedule"] is not None for e in events),
    }


def _coverage(cov: aggregate.Coverage, found: dict, tz: ZoneInfo) -> dict:
    return {
        "known": cov.known,
        "covered": words.human_duration(cov.covered_s),
        "span": words.human_duration(cov.ts_end - cov.ts_start),
        "percent": f"{100 * cov.covered_s / max(cov.ts_end - cov.ts_start, 1):.0f}",
        "gaps": [(words.local_time(a, tz), words.local_time(b, tz), words.human_duration(b - a))
                 for a, b in cov.gaps[:MAX_GAP_ROWS]],
        "gaps_total": len(cov.gaps),
        "dropped": f"{cov.dropped:,}",
        "sessions": len(cov.sessions),
        "inferred": cov.inferred,
        "silent": [(words.local_time(a, tz), words.local_time(b, tz),
                    words.human_duration(b - a))
                   for a, b in (found.get("silent_gaps") or [])[:MAX_GAP_ROWS]
                   if aggregate.sane(np.array([a, b], dtype="float64")).all()],
    }


def report_context(page: Page) -> dict:
    """Everything the templates show, from the page's records and findings only."""
    findings = page.findings
    tz, conns = page.tz, page.records["connections"]
    listed = sort_findings(findings.findings)
    notable = [f for f in listed if f.verdict != "nothing notable"]
    timeline = page.timeline(notable)
    palette = plots.colours(timeline.services)
    colour_of = [palette.get(f.label, plots.GREY) for f in notable]
    markers = [{**e, "colour": c} for f, c in zip(notable, colour_of, strict=True)
               for e in _events(f)]
    devices = sorted(set(conns["device"].dropna().astype(str))) or ["(unknown device)"]
    stamp = findings.records
    return {
        "version": __version__,
        "devices": [clip(d, TITLE_WIDTH) for d in devices],
        "tz": findings.timezone,
        "zone_note": words.zone_note(findings.timezone, findings.timezone_configured),
        "period": f"{words.local_time(page.t0, tz)} – {words.local_time(page.t1, tz)}",
        "span_days": f"{(page.t1 - page.t0) / 86400:.1f}",
        "generated": words.local_time(time.time(), tz),
        "headline": words.headline([_short(f) for f in listed])
        if len(conns) or listed else words.NOTHING_OBSERVED,
        "cards": [_card(f, c, page, len(devices) > 1)
                  for f, c in zip(notable, colour_of, strict=True)],
        "quiet": [clip(words.who(f), TITLE_WIDTH) for f in listed if f not in notable],
        "tested": len(listed),
        "timeline_series": timeline.services,
        "timeline": plots.timeline_svg(timeline, markers, tz, palette),
        "timeline_bin": "hour" if timeline.bin_s == 3600 else words.human_duration(timeline.bin_s),
        "heatmap": plots.heatmap_svg(aggregate.heatmap(page.flow, tz, page.t0, page.t1),
                                     findings.timezone),
        "coverage_plot": plots.coverage_svg(page.coverage, tz),
        "coverage": _coverage(page.coverage, findings.coverage, tz),
        "left_out": page.left_out,
        "endpoints": _endpoint_rows(page.table, tz),
        "endpoints_total": len(page.table),
        "unnamed_total": int((~page.table["named"]).sum()) if len(page.table) else 0,
        "totals": {
            "connections": f"{len(conns):,}",
            "up": words.human_bytes(int(conns["bytes_up"].fillna(0).sum())),
            "down": words.human_bytes(int(conns["bytes_down"].fillna(0).sum())),
        },
        "parameters": _parameters(findings),
        "source": {
            "fingerprint": stamp.fingerprint if stamp else "unknown",
            "analysed": words.local_time(findings.generated_at, tz)
            if findings.generated_at else "–",
        },
    }


def _short(finding: Finding) -> dict:
    """A finding for the headline, its names shortened so no name can swallow the answer."""
    return {"label": clip(finding.label, TITLE_WIDTH), "organization": finding.organization,
            "verdict": finding.verdict, "is_backup": finding.is_backup}


def write_report(records: dict[str, pd.DataFrame], findings: Findings | dict,
                 out_dir: Path) -> Path:
    """Write the timing report into ``out_dir`` and return the path of report.html."""
    if isinstance(findings, dict):
        findings = Findings.from_dict(findings)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ObserverError(f"cannot create report directory {out_dir}: {exc.strerror or exc}")
    page = Page.build(records, findings)
    context = report_context(page)
    html = render_html("report.html.j2", context)
    markdown = environment(markdown=True).get_template("report.md.j2").render(**context)
    html_path = out_dir / "report.html"
    try:
        html_path.write_text(html, encoding="utf-8")
        (out_dir / "report.md").write_text(markdown, encoding="utf-8")
        (out_dir / "findings.json").write_text(
            json.dumps(findings.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
            encoding="utf-8")
        write_endpoints_csv(page.table, out_dir / "endpoints.csv")
    except OSError as exc:
        raise ObserverError(f"cannot write the report into {out_dir}: {exc.strerror or exc}")
    return html_path
