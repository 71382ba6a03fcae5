"""Every sentence and number format a person reads: sizes, durations, periods, local times,
verdict sentences and headlines.

`observer analyze` prints, findings.json stores and the report renders the same sentences, built
here and nowhere else.  Pure functions on plain values (no pandas, no matplotlib), so the wording
can be tested alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime
from zoneinfo import ZoneInfo

DAY = 86400.0
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_SIZE_UNITS = ("bytes", "kB", "MB", "GB", "TB")
# A finding as the words see it: a typed Finding's fields or its JSON form.
FindingLike = Mapping[str, object]


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def human_bytes(n: float | int | None) -> str:
    """Decimal units (1 MB = 1,000,000 bytes), as a journalist would quote them."""
    if _missing(n):
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
    if _missing(seconds):
        return "–"
    s = abs(float(seconds))
    for unit, size, floor in (("day", 86400, 2 * 86400), ("hour", 3600, 3600), ("minute", 60, 60)):
        if s >= floor:
            value = s / size
            text = f"{value:.0f}" if abs(value - round(value)) < 0.05 else f"{value:.1f}"
            return f"{text} {unit}{'' if text == '1' else 's'}"
    text = f"{s:.0f}"
    return f"{text} second{'' if text == '1' else 's'}"


_NAMED_PERIODS = {
    86400: "every 24 hours (daily)",
    604800: "every 7 days (weekly)",
    43200: "every 12 hours (twice a day)",
    3600: "every hour (hourly)",
}


def period_words(period_s: float | None) -> str:
    """ "every 24 hours (daily)" and friends."""
    if _missing(period_s):
        return "at no fixed interval"
    for seconds, words in _NAMED_PERIODS.items():
        if abs(period_s - seconds) <= 0.02 * seconds:
            return words
    return f"every {human_duration(period_s)}"


def clock_phase(phase_s: float, period_s: float) -> str:
    """A local-clock phase as a reader says it: "02:03", or "Mon 02:03" for a weekly period."""
    seconds = round(phase_s) % int(DAY)
    clock = f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}"
    if period_s >= 7 * DAY - 1:
        day = (3 + int(phase_s // DAY)) % 7  # wall-clock day 0 (1970-01-01) was a Thursday
        return f"{WEEKDAYS[day]} {clock}"
    return clock


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
    if _missing(ts):
        return "–"
    dt = local_dt(ts, tz)
    clock = dt.strftime("%H:%M:%S" if seconds else "%H:%M")
    month = dt.strftime("%b %Y" if year else "%b")
    day = f"{dt.strftime('%a')} {dt.day}" if weekday else str(dt.day)
    return f"{day} {month} {clock}"


def local_day(ts: float, tz: ZoneInfo) -> str:
    dt = local_dt(ts, tz)
    return f"{dt.strftime('%a')} {dt.day} {dt.strftime('%b')}"


def zone_note(tz_name: str, configured: bool) -> str | None:
    """What a reader must know when "local time" is only UTC because no zone was configured."""
    if configured:
        return None
    return (f"Times are {tz_name}: no time zone was configured. Set the phone owner's zone with "
            f"'timezone: Europe/Berlin' (for example) in the lab config and pass --config.")


def p_value_text(p: float | None) -> str:
    if _missing(p):
        return "not tested"
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2f}"


def who(finding: FindingLike) -> str:
    """ "WhatsApp (Meta)", or the group's own label when the catalog does not know it."""
    label = finding.get("label") or finding.get("group") or "an unnamed endpoint"
    org = finding.get("organization")
    return f"{label} ({org})" if org and org != label else str(label)


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


def evidence_note(from_totals: int, n_events: int) -> str | None:
    """What the reader must know when events come from connection totals, not activity bins."""
    if not from_totals:
        return None
    which = "All" if from_totals == n_events else f"{from_totals} of {n_events}"
    return (f"{which} bulk upload events come from connection totals (the source, such as a "
            f"PCAPdroid CSV or a Zeek conn.log, had no per-10-second activity): each is a whole "
            f"connection treated as one block, timed by its start.")


def verdict_sentence(finding: FindingLike, tz_name: str, *, tz_configured: bool = True) -> str:
    """One sentence a journalist can quote, built only from the finding's own numbers.

    The finding's ``evidence_note`` (e.g. events taken from connection totals of a log without
    timing inside connections) follows the sentence, so the limit travels with the claim.
    """
    sentence = _verdict_sentence(finding, tz_name, tz_configured)
    note = finding.get("evidence_note")
    return f"{sentence} {note}" if note else sentence


def _subject_and_target(finding: FindingLike) -> tuple[str, str]:
    """Who sends and to whom: "the phone" to a group, or an app (PCAPdroid) to its endpoints."""
    if finding.get("group_kind") == "app":
        names = list(finding.get("names") or [])
        target = ", ".join(names[:3]) + (" and others" if len(names) > 3 else "")
        return f"the app {finding.get('group')}", target or "its endpoints"
    return "the phone", who(finding)


def _verdict_sentence(finding: FindingLike, tz_name: str, tz_configured: bool) -> str:
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
    at = ""
    if finding.get("phase_local"):
        clock = phase_words(str(finding.get("phase_local")), period)
        at = (f" at about {clock} local time ({tz_name})" if tz_configured
              else f" at about {clock} {tz_name} (no time zone configured)")
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
            f"{_why_irregular(finding)}{_also_heartbeat(finding)}"
        )
    else:
        return f"Nothing notable: no bulk uploads to {target}."
    return (f"{text} Confidence: {conf} ({p_value_text(finding.get('p_value'))}, corrected)."
            f"{_also_heartbeat(finding)}")


def _also_heartbeat(finding: FindingLike) -> str:
    """A group's heartbeat beside its uploads (a chat connection carrying an export): both told."""
    interval = finding.get("heartbeat_s")
    if not interval or finding.get("verdict") == "periodic heartbeat":
        return ""
    return f" It also contacts {who(finding)} {period_words(interval)} with small amounts of data."


# The analysis's conditions for a schedule (docs/findings.md, schedule_checks), in words.
CHECK_WORDS = {
    "enough_occurrences": "too few occurrences",
    "most_cycles_seen": "too many cycles without an upload",
    "one_upload_per_cycle": "several uploads in one cycle",
    "tight_timing": "the time of day varies too much",
}


def _why_irregular(finding: FindingLike) -> str:
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
    few = ""
    occ = finding.get("occurrences")
    if isinstance(occ, int) and occ <= 3 and p < 0.1:
        # Three cycles are told from chance only when they agree within minutes (docs/analysis.md).
        few = (f" With {occ} occurrences only a schedule kept to within minutes stands out; "
               f"a capture of at least {5 if period <= 86400 else 5 * round(period / 86400)} "
               f"days would settle it.")
    return (f" The closest fit, {closest}, is not significant ({p_value_text(p)}, corrected)."
            f"{few}")


def headline(findings: list[FindingLike]) -> str:
    """The answer in one line: is there a periodic bulk upload that is not a known backup?"""
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


NOTHING_OBSERVED = "No connection records: nothing was observed, so nothing can be concluded."


def schedule_words(finding: FindingLike) -> str:
    """The largest schedule of a device in a few words: "49.0 MB to X every 24 hours at 02:00"."""
    at = f" at about {finding.get('phase_local')}" if finding.get("phase_local") else ""
    return (f"{human_bytes(finding.get('typical_bytes'))} to {who(finding)} "
            f"{period_words(finding.get('period_s'))}{at}")


def coverage_words(covered_s: float, span_s: float) -> str:
    """ "6.9 days of 7.0 (98 %)": how much of the span was recorded."""
    percent = 100 * covered_s / span_s if span_s > 0 else 0.0
    return f"{human_duration(covered_s)} of {human_duration(span_s)} ({percent:.0f} %)"
