"""Words and numbers for people: sizes, local times, periods, verdict sentences, safe cells.

Everything here is pure (no pandas, no matplotlib) so the wording can be tested alone and shared by
the HTML and Markdown reports.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from zoneinfo import ZoneInfo

VERDICT_ORDER = {
    "periodic bulk upload": 0,
    "periodic heartbeat": 1,
    "irregular uploads": 2,
    "nothing notable": 3,
}
CONFIDENCE_ORDER = {"high": 0, "medium": 1, "low": 2, "none": 3}

_SIZE_UNITS = ("bytes", "kB", "MB", "GB", "TB")


def human_bytes(n: float | int | None) -> str:
    """Decimal units (1 MB = 1,000,000 bytes), as a journalist would quote them."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    n = float(n)
    unit = 0
    while abs(n) >= 1000 and unit < len(_SIZE_UNITS) - 1:
        n /= 1000
        unit += 1
    if unit == 0:
        return f"{int(n):,} bytes"
    return f"{n:.1f} {_SIZE_UNITS[unit]}" if n < 100 else f"{n:.0f} {_SIZE_UNITS[unit]}"


def human_duration(seconds: float | None) -> str:
    """A duration in the largest unit that keeps it readable ("24 hours", "90 minutes")."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "–"
    s = abs(float(seconds))
    for unit, size, floor in (("day", 86400, 2 * 86400), ("hour", 3600, 3600), ("minute", 60, 60)):
        if s >= floor:
            value = s / size
            text = f"{value:.0f}" if abs(value - round(value)) < 0.05 else f"{value:.1f}"
            return f"{text} {unit}{'' if text == '1' else 's'}"
    text = f"{s:.0f}"
    return f"{text} second{'' if text == '1' else 's'}"


def period_words(period_s: float | None) -> str:
    """ "every 24 hours (daily)" and friends."""
    if period_s is None or (isinstance(period_s, float) and math.isnan(period_s)):
        return "at no fixed interval"
    named = {
        86400: "every 24 hours (daily)",
        604800: "every 7 days (weekly)",
        43200: "every 12 hours (twice a day)",
        3600: "every hour (hourly)",
    }
    for seconds, words in named.items():
        if abs(period_s - seconds) <= 0.02 * seconds:
            return words
    return f"every {human_duration(period_s)}"


def local_dt(ts: float, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(float(ts), tz)


def local_time(
    ts: float | None,
    tz: ZoneInfo,
    *,
    seconds: bool = False,
    year: bool = True,
    weekday: bool = True,
) -> str:
    """ "Tue 3 Nov 2026 02:03" in the lab's time zone."""
    if ts is None or (isinstance(ts, float) and math.isnan(ts)):
        return "–"
    dt = local_dt(ts, tz)
    clock = dt.strftime("%H:%M:%S" if seconds else "%H:%M")
    month = dt.strftime("%b %Y" if year else "%b")
    day = f"{dt.strftime('%a')} {dt.day}" if weekday else str(dt.day)
    return f"{day} {month} {clock}"


def local_day(ts: float, tz: ZoneInfo) -> str:
    dt = local_dt(ts, tz)
    return f"{dt.strftime('%a')} {dt.day} {dt.strftime('%b')}"


def p_value_text(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "not tested"
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2f}"


def who(finding: dict) -> str:
    """ "WhatsApp (Meta)", or the group's own name when the catalog does not know it."""
    service = finding.get("service") or finding.get("group") or "an unnamed endpoint"
    org = finding.get("organization")
    return f"{service} ({org})" if org and org != service else str(service)


def occasions(period_s: float | None, n: int | None) -> str:
    word = "periods"
    if period_s and abs(period_s - 86400) <= 0.02 * 86400:
        word = "nights"
    elif period_s and abs(period_s - 604800) <= 0.02 * 604800:
        word = "weeks"
    return word if n != 1 else word[:-1]


def phase_words(phase_local: str, period_s: float | None) -> str:
    """ "00:44", or "00:44, 06:44, 12:44 and 18:44" for a job that runs several times a day."""
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", phase_local.strip())
    if not match or not period_s or period_s < 4 * 3600 or 86400 % round(period_s) != 0:
        return phase_local
    first = int(match[1]) * 60 + int(match[2])
    step = round(period_s) // 60
    times = [
        f"{(first + k * step) // 60 % 24:02d}:{(first + k * step) % 60:02d}"
        for k in range(86400 // round(period_s))
    ]
    times.sort()
    return times[0] if len(times) == 1 else ", ".join(times[:-1]) + " and " + times[-1]


def verdict_sentence(finding: dict, tz_name: str) -> str:
    """One sentence a journalist can quote, built only from the finding's own numbers.

    The analysis's ``evidence_note`` (e.g. events taken from connection totals of a log without
    timing inside connections) follows the sentence, so the limit travels with the claim.
    """
    sentence = _verdict_sentence(finding, tz_name)
    note = finding.get("evidence_note")
    return f"{sentence} {note}" if note else sentence


def _subject_and_target(finding: dict) -> tuple[str, str]:
    """Who sends and to whom: "the phone" to a service, or an app (PCAPdroid) to its endpoints."""
    if finding.get("group_kind") == "app":
        names = list(finding.get("names") or [])
        target = ", ".join(names[:3]) + (" and others" if len(names) > 3 else "")
        return f"the app {finding.get('group')}", target or "its endpoints"
    return "the phone", who(finding)


def _verdict_sentence(finding: dict, tz_name: str) -> str:
    verdict = finding.get("verdict", "nothing notable")
    subject, target = _subject_and_target(finding)
    opener = subject[:1].upper() + subject[1:]
    size = human_bytes(finding.get("typical_bytes"))
    occ, exp = finding.get("occurrences"), finding.get("expected")
    period = finding.get("period_s")
    seen = ""
    if occ is not None and exp:
        seen = f", seen on {occ} of {exp} expected {occasions(period, exp)}"
    elif occ is not None:
        seen = f", seen {occ} times"
    at = (
        f" at about {phase_words(finding['phase_local'], period)} local time ({tz_name})"
        if finding.get("phase_local")
        else ""
    )
    jitter = finding.get("jitter_s")
    spread = f", give or take {human_duration(jitter)}" if jitter else ""
    conf = finding.get("confidence") or "none"
    if verdict == "periodic bulk upload":
        lead = f"A scheduled backup: {subject}" if finding.get("is_backup") else opener
        when = f"{period_words(period)}{at}{spread}{seen}"
        text = f"{lead} uploaded about {size} to {target} {when}."
    elif verdict == "periodic heartbeat":
        about = f" (about {size} each)" if finding.get("typical_bytes") else ""
        times = f", {occ:,} times" if occ else ""
        # A heartbeat is reported, not scored: its p-value says nothing about an export.
        return (
            f"{opener} contacts {target} {period_words(period)} with small amounts of "
            f"data{about}{times}: a heartbeat, not a bulk upload."
        )
    elif verdict == "irregular uploads":
        n = finding.get("bulk_events", occ)
        count = f"{n} bulk upload{'' if n == 1 else 's'}" if n is not None else "bulk uploads"
        return (
            f"{opener} made {count} to {target} (typically {size}) at irregular times."
            f"{_why_irregular(finding)}"
        )
    else:
        return f"Nothing notable: no bulk uploads to {target}."
    return f"{text} Confidence: {conf} ({p_value_text(finding.get('p_value'))}, corrected)."


# The analysis's conditions for a schedule (docs/findings.md, schedule_checks), in words.
CHECK_WORDS = {
    "enough_occurrences": "too few occurrences",
    "most_cycles_seen": "too many cycles without an upload",
    "one_upload_per_cycle": "several uploads in one cycle",
    "tight_timing": "the time of day varies too much",
}


def _why_irregular(finding: dict) -> str:
    """Why a group with bulk uploads has no schedule: the failed checks, or an insignificant fit."""
    period, p = finding.get("period_s"), finding.get("p_value")
    if not period or p is None:
        return ""
    named = period_words(period)
    closest = (
        f"a {named[named.index('(') + 1 : -1]} schedule"
        if named.endswith(")")
        else f"a schedule {named}"
    )
    checks = finding.get("schedule_checks") or {}
    if checks.get("significant"):
        failed = [words for key, words in CHECK_WORDS.items() if checks.get(key) is False]
        reason = f": {', '.join(failed)}" if failed else ""
        return (
            f" Their timing is not random ({p_value_text(p)}, corrected), but they do not follow "
            f"{closest}{reason}."
        )
    return f" The closest fit, {closest}, is not significant ({p_value_text(p)}, corrected)."


def sort_findings(findings: list[dict]) -> list[dict]:
    """Most important first: periodic uploads (exports before backups), by confidence, by size."""
    return sorted(
        findings,
        key=lambda f: (
            VERDICT_ORDER.get(f.get("verdict", ""), 9),
            bool(f.get("is_backup")),
            CONFIDENCE_ORDER.get(f.get("confidence") or "none", 9),
            -(f.get("typical_bytes") or 0),
        ),
    )


# Brackets are escaped, so parentheses can never form a link and stay readable.
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]#+|~])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def md_escape(value: object) -> str:
    """Text for a Markdown table cell or line: no HTML, no Markdown syntax, no line breaks."""
    text = _CONTROL.sub(" ", "" if value is None else str(value))
    text = (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )
    return _MD_SPECIAL.sub(r"\\\1", text)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A spreadsheet-safe cell: text starting with a formula character gets a leading quote."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def clip(text: str, width: int = 40) -> str:
    """Shorten a label for a plot legend (the tables keep the full name)."""
    text = _CONTROL.sub(" ", text)
    return text if len(text) <= width else text[: width - 1] + "…"
