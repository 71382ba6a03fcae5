"""Do a group's events recur with a period and a stable phase?  With a calibrated p-value.

A scheduled job ("every night at 02:00") is a clock: its events keep their phase in the owner's
local time, may jitter, and may skip cycles.  The score of a period P is the best "window" of the
folded phases: the most distinct cycles that fall inside a phase window of width w*P, scored by
how unlikely that count is for the same number of events under a binomial model.  The p-value of
the best score (over windows, widths and periods tried) comes from Monte Carlo: the same number
of events placed at random over the covered time (following the device's day profile: people
sleep), scored the same way.  The reported period is then resolved among the harmonics of the
clock (a 6-hourly job also fits "daily at one of its times", a weekly one "daily, most days
missed") toward the period that explains its events; that step describes, the p-value stays that
of the test.  See docs/analysis.md for the formulas.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import pandas as pd

DAY = 86_400.0
# Wall-clock periods a scheduler uses, tested in local time (so "02:00" survives a DST change).
CLOCK_PERIODS = (3600.0, 7200.0, 10800.0, 14400.0, 21600.0, 28800.0, 43200.0, DAY, 2 * DAY, 7 * DAY)
# Window widths as fractions of the period (for 24 h: 30 min, 1 h, 2 h, 4 h).
WIDTHS = (1 / 48, 1 / 24, 1 / 12, 1 / 6)
# The 24 h period, the mission's first question, is also scanned with windows of 7.5 and 15 min
# (on the activity clock, below, where a quiet night hour is a thin slice): a nightly job stands
# out from a busy group's daytime uploads, and three nights within minutes of each other are
# far stronger evidence than three within half an hour.  A chance triple within minutes makes
# the null's tail lumpy for small groups, so their null is simulated deeper (DEEP, below) rather
# than extrapolated.
WIDTHS_24H = (1 / 192, 1 / 96, *WIDTHS)
SLOTS = 48  # the day profile's resolution: 30-minute slots of the local day
# A profile from N events gets the weight N^2 / (N^2 + PROFILE_HALF^2) against uniform: a
# histogram of a few dozen events is mostly noise, and noise in the null is a false alarm.
PROFILE_HALF = 100.0
SAMPLE_CELL_S = 300.0
FREE_MIN_S = 600.0
FREE_MAX_S = 7 * DAY
MAX_EVENTS = 400  # a group with more bulk events is tested on its largest ones
MIN_SIM = 200  # fewest Monte Carlo runs of the null, for the largest groups
# When fewer than 10 null runs reach the observed score, the null is extended to this many
# times its runs before a tail is fitted: narrow windows make the score's tail lumpy.
EXTEND = 5
# A group of at most DEEP_MAX_EVENTS events whose score is still beyond 10 null runs gets
# DEEP[0] times the runs (cheap for so few events), and DEEP[1] times while 1 to 9 runs reach
# it: there a chance triple within minutes makes the tail lumpy (3 of 10 user uploads within 7
# minutes on 3 evenings: p ~ 2e-3 simulated, 6e-5 fitted), so the p-value must come from the
# simulation, down to ~(10/DEEP[1])/n_sim.  A score beyond all DEEP[0] * n_sim runs is far out
# whatever the tail (every nightly job of a week: going on to DEEP[1] tripled a fleet's time).
DEEP_MAX_EVENTS = 12
DEEP = (10, 40)
P_FLOOR = 1e-12  # an extrapolated tail says "smaller than this", not an exact figure
# Weighted Bonferroni over the three families: 24 h alone first, other clock periods, free search.
FAMILY_WEIGHTS = {"24h": 0.5, "clock": 0.25, "free": 0.25}
FREE_QUALITY_PENALTY = 0.8
# A schedule has about one event per cycle near its phase: a period whose window holds more (a
# busy evening folded onto 8 h) is reported only when no period looks like a schedule.
MAX_ON_SCHEDULE_PER_CYCLE = 2.0
# Harmonics.  A multiple k*P of the found period P explains its occurrences as well when at least
# this share of them falls on one cycle in k (a weekly job seen as "daily, most days missed").
MULTIPLE_SHARE = 0.9
# A divisor P/k explains them when it keeps this share of P's on-schedule events, its own
# cycles are at least DIVISOR_FILL as often occupied as P's (a 6-hourly job seen as "daily at
# 12:44"; a daily job leaves 3 of 4 six-hour cycles empty), and in at least DIVISOR_EXCESS more of
# its cycles than the same window half a cycle away is (a busy group's user uploads fill any wide
# window, and a schedule is one in most of its cycles).
DIVISOR_KEEP = 0.8
DIVISOR_FILL = 0.75
DIVISOR_EXCESS = 0.5
# Half-width of the on-schedule window at a harmonic P: a few robust spreads of the schedule's
# events, at least min(P/24, 1 h) (a narrow best window underestimates the spread), at most P/4.
HARMONIC_JITTERS = 3.0
HARMONIC_MIN_S = 3600.0
# A data-driven period is checked against its divisors P/2 ... P/FREE_MAX_DIVISOR.
FREE_MAX_DIVISOR = 4


@dataclass(frozen=True)
class Coverage:
    """Disjoint, sorted [start, end) UTC intervals during which events could have been seen."""

    intervals: tuple[tuple[float, float], ...]

    @property
    def total_s(self) -> float:
        return float(sum(b - a for a, b in self.intervals))

    @property
    def span(self) -> tuple[float, float]:
        return (self.intervals[0][0], self.intervals[-1][1]) if self.intervals else (0.0, 0.0)

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Uniform random instants over the covered time."""
        starts = np.array([a for a, _ in self.intervals])
        lengths = np.array([b - a for a, b in self.intervals])
        cum = np.concatenate([[0.0], np.cumsum(lengths)])
        u = rng.uniform(0.0, cum[-1], size=shape)
        k = np.clip(np.searchsorted(cum, u, side="right") - 1, 0, len(lengths) - 1)
        return starts[k] + (u - cum[k])

    def cells(self, step: float) -> tuple[np.ndarray, np.ndarray]:
        """The covered time cut into pieces of at most ``step`` seconds: (starts, lengths)."""
        starts = [np.arange(a, b, step) for a, b in self.intervals]
        ends = [np.minimum(st + step, b) for st, (_, b) in zip(starts, self.intervals, strict=True)]
        if not starts:
            return np.array([]), np.array([])
        start = np.concatenate(starts)
        return start, np.concatenate(ends) - start

    def contains(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=float)
        if not self.intervals:
            return np.zeros(t.shape, dtype=bool)
        starts = np.array([a for a, _ in self.intervals])
        ends = np.array([b for _, b in self.intervals])
        k = np.searchsorted(starts, t, side="right") - 1
        return (k >= 0) & (t < ends[np.clip(k, 0, None)])


class LocalClock:
    """UTC -> local wall-clock seconds (as if the zone were UTC), vectorised by a step table."""

    STEP = 900.0

    def __init__(self, timezone: str, start: float, end: float) -> None:
        lo = np.floor(start / self.STEP) * self.STEP - self.STEP
        hi = np.ceil(end / self.STEP) * self.STEP + self.STEP
        self.grid = np.arange(lo, hi + self.STEP, self.STEP)
        utc = pd.to_datetime(self.grid, unit="s", utc=True)
        wall = utc.tz_convert(timezone).tz_localize(None)
        self.offsets = np.asarray((wall - utc.tz_localize(None)) / pd.Timedelta(seconds=1))

    def wall(self, t: np.ndarray) -> np.ndarray:
        k = np.clip(np.searchsorted(self.grid, t, side="right") - 1, 0, len(self.grid) - 1)
        return t + self.offsets[k]

    def utc(self, wall: np.ndarray) -> np.ndarray:
        """Inverse of wall() (the earlier instant where a wall time occurs twice)."""
        guess = wall - self.offsets[np.clip(np.searchsorted(self.grid, wall, "right") - 1, 0, None)]
        return wall - self.offsets[np.clip(np.searchsorted(self.grid, guess, "right") - 1, 0, None)]


@lru_cache(maxsize=16)
def _log_tail_table(n_max: int, w: float) -> np.ndarray:
    """-log10 P(Binomial(n, w) >= k) for 0 <= k <= n <= n_max, as an (n_max+1, n_max+2) table."""
    logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n_max + 1)))])
    n = np.arange(n_max + 1)[:, None]
    j = np.arange(n_max + 1)[None, :]
    with np.errstate(invalid="ignore"):
        logpmf = logfact[n] - logfact[j] - logfact[np.clip(n - j, 0, None)] + j * np.log(w) + (
            n - j
        ) * np.log1p(-w)
    logpmf = np.where(j <= n, logpmf, -np.inf)
    # tail[n, k] = log sum_{j>=k} pmf, by a reversed cumulative log-add-exp.
    tail = np.flip(np.logaddexp.accumulate(np.flip(logpmf, axis=1), axis=1), axis=1)
    table = np.full((n_max + 1, n_max + 2), np.inf)
    table[:, : n_max + 1] = -tail / np.log(10)
    table[:, 0] = 0.0
    return np.maximum(table, 0.0)


@dataclass
class WindowFit:
    """The best phase window of one period for one event list (the evidence of a score)."""

    score: float
    period_s: float
    width: float
    hits: int  # distinct cycles with an event in the window
    kept: int  # events left after merging those closer than the window
    start_frac: float  # window start as a fraction of the period


def uniform_profile() -> np.ndarray:
    return np.full(SLOTS, 1.0 / SLOTS)


def slot_counts(wall: np.ndarray) -> np.ndarray:
    """How many of some local wall-clock times fall in each 30-minute slot of the day."""
    slot = (np.mod(np.asarray(wall, dtype=float), DAY) // (DAY / SLOTS)).astype(int)
    return np.bincount(slot, minlength=SLOTS)[:SLOTS].astype(float)


def day_profile(counts: np.ndarray, half: float = PROFILE_HALF) -> np.ndarray:
    """Share of activity per 30-minute slot of the local day: the slot counts smoothed over
    neighbouring slots (circularly), mixed with uniform by how many events there are."""
    counts = np.asarray(counts, dtype=float)
    n = counts.sum()
    if n <= 0:
        return uniform_profile()
    smooth = (np.roll(counts, 1) + 2 * counts + np.roll(counts, -1)) / (4 * n)
    weight = n**2 / (n**2 + half**2)
    return weight * smooth + (1 - weight) / SLOTS


def activity_clock(wall: np.ndarray, profile: np.ndarray) -> np.ndarray:
    """Local wall time with each day re-timed by the profile's cumulative share (probability
    integral transform): under the profile, the time of day on this clock is uniform, so a
    window of one width is equally likely to catch an event at 02:00 or at 20:00."""
    wall = np.asarray(wall, dtype=float)
    cum = np.concatenate([[0.0], np.cumsum(profile)])
    day = np.floor(wall / DAY)
    share = np.interp((wall - day * DAY) / DAY * SLOTS, np.arange(SLOTS + 1), cum)
    return (day + share) * DAY


def window_scores(
    tau: np.ndarray, periods: np.ndarray, widths: tuple[float, ...] = WIDTHS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best window score per row and period.

    ``tau``: (S, n) event times (already in the clock of the family); ``periods``: (S, G) or (G,).
    Returns (score, width_index, hits) arrays of shape (S, G).
    """
    tau = np.sort(np.atleast_2d(np.asarray(tau, dtype=float)), axis=1)
    s, n = tau.shape
    periods = np.broadcast_to(np.asarray(periods, dtype=float), (s, np.shape(periods)[-1]))
    g = periods.shape[1]
    best = np.zeros((s, g))
    best_w = np.zeros((s, g), dtype=int)
    best_hits = np.zeros((s, g), dtype=int)
    if n == 0:
        return best, best_w, best_hits
    gaps = np.diff(tau, axis=1)
    offsets = (np.arange(s) * 10.0)[:, None]
    base = (np.arange(s) * n)[:, None]
    ranks = np.broadcast_to(np.arange(n), (s, n))
    tables = [_log_tail_table(n, w) for w in widths]
    for gi in range(g):
        p = periods[:, gi : gi + 1]
        phase = np.mod(tau, p) / p
        order = np.argsort(phase, axis=1)
        ph = np.take_along_axis(phase, order, axis=1)
        flat = (ph + offsets).ravel()
        for wi, w in enumerate(widths):
            # Events closer than the window belong to one occurrence: keep the first of each run.
            keep = np.concatenate([np.ones((s, 1), bool), gaps >= w * p], axis=1)
            kept_sorted = np.take_along_axis(keep, order, axis=1)
            cum = np.concatenate([np.zeros((s, 1), int), np.cumsum(kept_sorted, axis=1)], axis=1)
            # Kept events in [phase_j, phase_j + w), wrapping past the end of the period.
            hi = np.searchsorted(flat, (ph + w + offsets).ravel()).reshape(s, n) - base
            wrap = np.searchsorted(flat, (ph + w - 1.0 + offsets).ravel()).reshape(s, n) - base
            counts = (np.take_along_axis(cum, np.clip(hi, 0, n), axis=1)
                      - np.take_along_axis(cum, ranks, axis=1)
                      + np.take_along_axis(cum, np.clip(wrap, 0, n), axis=1))
            hits = np.where(kept_sorted, counts, 0).max(axis=1)
            score = tables[wi][keep.sum(axis=1), hits]
            better = score > best[:, gi]
            best[:, gi] = np.where(better, score, best[:, gi])
            best_w[:, gi] = np.where(better, wi, best_w[:, gi])
            best_hits[:, gi] = np.where(better, hits, best_hits[:, gi])
    return best, best_w, best_hits


def fit_window(tau: np.ndarray, period: float, widths: tuple[float, ...] = WIDTHS) -> WindowFit:
    """The best window of one period, with its position (for the reported phase and jitter)."""
    tau = np.sort(np.asarray(tau, dtype=float))
    best = WindowFit(0.0, period, widths[0], 0, len(tau), 0.0)
    if len(tau) == 0:
        return best
    gaps = np.diff(tau)
    for w in widths:
        keep = np.concatenate([[True], gaps >= w * period])
        phase = np.sort(np.mod(tau[keep], period) / period)
        ext = np.concatenate([phase, phase + 1.0])
        counts = np.searchsorted(ext, phase + w, side="left") - np.arange(len(phase))
        j = int(np.argmax(counts))
        score = float(_log_tail_table(len(tau), w)[int(keep.sum()), int(counts[j])])
        if score > best.score:
            best = WindowFit(score, period, w, int(counts[j]), int(keep.sum()), float(phase[j]))
    return best


def free_candidates(tau: np.ndarray) -> np.ndarray:
    """Data-driven periods per row (quartiles of the intervals), refined by a least-squares fit of
    event time on cycle number, so that jittered intervals still give a drift-free period."""
    tau = np.sort(np.atleast_2d(tau), axis=1)
    s, n = tau.shape
    if n < 3:
        return np.full((s, 3), np.nan)
    intervals = np.diff(tau, axis=1)
    intervals = np.sort(np.where(intervals >= FREE_MIN_S / 2, intervals, np.inf), axis=1)
    valid = np.isfinite(intervals).sum(axis=1, keepdims=True)
    at = np.floor(np.array([0.25, 0.5, 0.75])[None, :] * np.maximum(valid - 1, 0)).astype(int)
    p0 = np.take_along_axis(intervals, at, axis=1)  # (S, 3) lower quartile, median, upper
    p0 = np.where(np.isfinite(p0) & (valid >= 2), p0, np.nan)
    out = np.empty_like(p0)
    for c in range(p0.shape[1]):
        p = p0[:, c : c + 1]
        for _ in range(2):
            cycles = np.round((tau - tau[:, :1]) / p)
            resid = (tau - tau[:, :1]) - cycles * p
            ok = np.abs(resid) <= p / 4
            cm = np.where(ok, cycles, np.nan)
            tm = np.where(ok, tau, np.nan)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                cbar = np.nanmean(cm, axis=1, keepdims=True)
                tbar = np.nanmean(tm, axis=1, keepdims=True)
                slope = np.nansum((cm - cbar) * (tm - tbar), axis=1, keepdims=True) / np.nansum(
                    (cm - cbar) ** 2, axis=1, keepdims=True
                )
            p = np.where(np.isfinite(slope) & (slope > 0), slope, p)
        out[:, c] = p[:, 0]
    out = np.where((out >= FREE_MIN_S) & (out <= FREE_MAX_S), out, np.nan)
    return out


@dataclass
class FamilyScores:
    """Best score per family, with the periods that produced it."""

    score: dict[str, np.ndarray] = field(default_factory=dict)
    period: dict[str, np.ndarray] = field(default_factory=dict)
    per_clock_period: np.ndarray | None = None


def family_scores(utc: np.ndarray, clock: LocalClock, profile: np.ndarray) -> FamilyScores:
    """Scores of the three families for (S, n) UTC event times; 24 h on the activity clock."""
    utc = np.atleast_2d(utc)
    wall = clock.wall(utc)
    out = FamilyScores()
    sc, _, _ = window_scores(wall, np.array(CLOCK_PERIODS))
    day = list(CLOCK_PERIODS).index(DAY)
    sc[:, day] = window_scores(activity_clock(wall, profile), np.array([DAY]), WIDTHS_24H)[0][:, 0]
    out.score["24h"] = sc[:, day]
    out.score["clock"] = sc.max(axis=1)
    out.per_clock_period = sc
    cands = free_candidates(utc)
    valid = np.isfinite(cands)
    fs, _, _ = window_scores(utc, np.where(valid, cands, DAY))
    fs = np.where(valid, fs, 0.0)
    out.score["free"] = fs.max(axis=1)
    out.period["free"] = np.where(valid, cands, np.nan)[np.arange(len(fs)), fs.argmax(axis=1)]
    return out


def tail_p(observed: float, null: np.ndarray) -> float:
    """Monte Carlo p-value of a max-score; beyond the simulated range, an exponential tail fitted
    to the top 10% of the null scores (the max of many -log p values has an exponential tail)."""
    null = np.asarray(null, dtype=float)
    count = int(np.sum(null >= observed - 1e-12))
    empirical = (count + 1) / (len(null) + 1)
    if count >= 10:
        return empirical
    u = float(np.quantile(null, 0.9))
    excess = null[null > u] - u
    beta = float(excess.mean()) if len(excess) else 1.0
    beta = max(beta, 1e-6)
    return float(max(P_FLOOR, min(empirical, 0.1 * np.exp(-(observed - u) / beta))))


@dataclass
class PeriodicityResult:
    """What the test says about one event list."""

    n_events: int
    p_value_raw: float = 1.0
    family: str = ""
    period_s: float | None = None
    phase_s: float | None = None  # seconds into the period, in the family's clock
    local_clock: bool = True  # phase measured on local wall time
    jitter_s: float | None = None
    occurrences: int = 0
    expected: int = 0
    on_schedule: list[int] = field(default_factory=list)  # indices of events in the window
    family_p: dict[str, float] = field(default_factory=dict)

    @property
    def phases_s(self) -> list[float]:
        """Every phase within one local day for a local-clock period that divides a day (a
        6-hourly job runs at 00:45, 06:45, 12:45 and 18:45), else just the phase."""
        if self.period_s is None or self.phase_s is None:
            return []
        per_day = DAY / self.period_s
        if self.local_clock and self.period_s < DAY and abs(per_day - round(per_day)) < 1e-6:
            return sorted((self.phase_s + k * self.period_s) % DAY for k in range(round(per_day)))
        return [self.phase_s]


class Schedule(NamedTuple):
    """One period's best window, as evidence: phase, jitter, which events are on schedule."""

    phase_s: float
    jitter_s: float
    inside: np.ndarray
    occurrences: int
    expected: int


class PeriodicityTest:
    """Periodicity test for one device's coverage and time zone.

    The null places events at random over the covered time, weighted by a day profile (the
    share of the device's activity in each 30-minute slot of the local day; uniform by default):
    people upload in the evening, so evening clusters are expected and a nightly one is not.
    Null simulations are cached per event count and profile, so groups of equal size share them.
    """

    def __init__(
        self, coverage: Coverage, timezone: str, *, n_sim: int = 1000, seed: int = 0
    ) -> None:
        self.coverage = coverage
        start, end = coverage.span
        self.clock = LocalClock(timezone, start - 2 * DAY, end + 2 * DAY)
        self.n_sim = n_sim
        self.seed = seed
        self._null: dict[tuple[int, bytes], FamilyScores] = {}
        self._cells = coverage.cells(SAMPLE_CELL_S)
        mids = self.clock.wall(self._cells[0] + self._cells[1] / 2)
        self._cell_slot = (np.mod(mids, DAY) // (DAY / SLOTS)).astype(int)
        self.profile = uniform_profile()

    def slot_counts(self, times: np.ndarray) -> np.ndarray:
        """Slot counts (for :func:`day_profile`) of some UTC times on this device's clock."""
        return slot_counts(self.clock.wall(np.asarray(times, dtype=float)))

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...],
               profile: np.ndarray) -> np.ndarray:
        """Random instants over the covered time, weighted by the day profile."""
        starts, lengths = self._cells
        weight = lengths * profile[self._cell_slot]
        cum = np.cumsum(weight)
        k = np.minimum(np.searchsorted(cum, rng.uniform(0.0, cum[-1], size=shape), side="right"),
                       len(cum) - 1)
        return starts[k] + rng.uniform(0.0, 1.0, size=shape) * lengths[k]

    def null(self, n: int, batches: int = 1) -> FamilyScores:
        """Scores of ``n`` events placed at random (by the profile) over the covered time, in
        ``batches`` batches of runs.  Large groups get fewer runs per batch (at least MIN_SIM):
        their cost grows with n, and the fitted tail covers the rest."""
        key = (n, self.profile.tobytes())
        runs = int(np.clip(self.n_sim * 20 / max(n, 1), MIN_SIM, self.n_sim))
        have = self._null.get(key)
        done = 0 if have is None else len(have.score["24h"]) // runs
        for batch in range(done, batches):
            rng = np.random.default_rng([self.seed, n, batch])
            more = family_scores(self.sample(rng, (runs, n), self.profile), self.clock,
                                 self.profile)
            if have is not None:
                for attr in ("score", "period"):
                    for fam, values in getattr(more, attr).items():
                        getattr(more, attr)[fam] = np.concatenate([getattr(have, attr)[fam],
                                                                   values])
                more.per_clock_period = np.concatenate([have.per_clock_period,
                                                        more.per_clock_period])
            have = more
        self._null[key] = have
        return have

    def test(self, times: np.ndarray, sizes: np.ndarray | None = None,
             profile: np.ndarray | None = None) -> PeriodicityResult:
        """Test one event list; ``profile`` is the day profile of the null (uniform if None)."""
        self.profile = uniform_profile() if profile is None else profile
        times = np.asarray(times, dtype=float)
        order = np.argsort(times)
        if len(times) > MAX_EVENTS and sizes is not None:
            order = np.sort(np.argsort(-np.asarray(sizes, dtype=float))[:MAX_EVENTS])
            order = order[np.argsort(times[order])]
        times = times[order]
        n = len(times)
        result = PeriodicityResult(n_events=n)
        if n < 2 or self.coverage.total_s <= 0:
            return result
        observed = family_scores(times[None, :], self.clock, self.profile)
        null = self.null(n)
        def reached(null: FamilyScores) -> list[int]:
            """Null runs scoring at least the observed score, per family."""
            return [int(np.sum(null.score[f] >= observed.score[f][0] - 1e-12))
                    for f in FAMILY_WEIGHTS]

        if min(reached(null)) < 10:
            null = self.null(n, EXTEND)
        if n <= DEEP_MAX_EVENTS and min(reached(null)) < 10:
            null = self.null(n, DEEP[0])
            if any(0 < r < 10 for r in reached(null)):
                null = self.null(n, DEEP[1])
        weighted = {}
        for fam, weight in FAMILY_WEIGHTS.items():
            p = tail_p(float(observed.score[fam][0]), null.score[fam])
            result.family_p[fam] = p
            weighted[fam] = min(1.0, p / weight)
        result.p_value_raw = min(weighted.values())
        if min(weighted, key=weighted.__getitem__) == "24h" and observed.score["24h"][0] > 0:
            # The evidence is for a daily schedule: report that one, not a busy hour folded
            # onto a shorter period.
            best: tuple[float, bool, Schedule] | None = (DAY, True,
                                                         self._describe(times, DAY, True))
        else:
            best = self._choose_period(times, observed)
        if best is None:
            return result
        period, local, fit = best
        if not local:
            period, fit = self._resolve_free(times, period, fit)
            near = [c for c in CLOCK_PERIODS if abs(period - c) <= 0.01 * c]
            if near:  # a divisor of a free period may be a clock period: told as one
                period, local, fit = near[0], True, self._describe(times, near[0], True)
        if local:
            period, fit = self._resolve_harmonics(times, period, fit)
        result.period_s = period
        result.local_clock = local
        result.family = ("24h" if period == DAY else "clock") if local else "free"
        result.phase_s, result.jitter_s = fit.phase_s, fit.jitter_s
        result.occurrences, result.expected = fit.occurrences, fit.expected
        result.on_schedule = [int(i) for i in order[fit.inside]]
        return result

    def _choose_period(
        self, times: np.ndarray, observed: FamilyScores
    ) -> tuple[float, bool, Schedule] | None:
        """The period to report: among those scoring at least half the best score, the one whose
        window best explains the data, hits^2 / (events * expected cycles).  A daily job also
        fits 12 h, 8 h, ... 1 h (every divisor: many expected cycles stay empty) and half of it
        fits 48 h (half the events are off the window); the product favours the fundamental.
        A fitted free period pays a penalty (it can absorb a DST shift as drift); ties go to the
        local clock, then to the longer period.  Periods with at most two on-schedule events per
        occurrence (a schedule, not a busy hour) come first."""
        assert observed.per_clock_period is not None
        cands = [(p, True, float(sc)) for p, sc in zip(CLOCK_PERIODS,
                                                        observed.per_clock_period[0], strict=True)]
        free = float(observed.period["free"][0])
        if np.isfinite(free):
            cands.append((free, False, float(observed.score["free"][0])))
        top = max(sc for _, _, sc in cands)
        if top <= 0:
            return None
        ranked = []
        for period, local, sc in cands:
            if sc < 0.5 * top:
                continue
            fit = self._describe(times, period, local)
            quality = fit.occurrences**2 / (len(times) * max(fit.expected, fit.occurrences, 1))
            if not local:
                quality *= FREE_QUALITY_PENALTY
            per_cycle = int(fit.inside.sum()) <= MAX_ON_SCHEDULE_PER_CYCLE * fit.occurrences
            ranked.append((per_cycle, round(quality, 2), local, period, fit))
        _, _, local, period, fit = max(ranked, key=lambda r: r[:4])
        near = [c for c in CLOCK_PERIODS if abs(period - c) <= 0.01 * c]
        if not local and near:
            # Within 1% of a clock period: a reader expects "every day at 02:00", not 23.97 h.
            period, local = near[0], True
            fit = self._describe(times, period, local)
        return period, local, fit

    def _resolve_harmonics(self, times: np.ndarray, period: float,
                           fit: Schedule) -> tuple[float, Schedule]:
        """The clock period that explains the schedule found at ``period``: first the longest
        multiple on which its occurrences keep one cycle in k (weekly, not "daily with misses"),
        then the shortest divisor that keeps its events and fills its own cycles as well (every
        6 hours, not "daily at one of its four times")."""
        if not fit.inside.any():
            return period, fit
        wall = self.clock.wall(times)
        cycles = np.unique(np.floor((wall[fit.inside] - fit.phase_s) / period + 0.5))
        for multiple in sorted((c for c in CLOCK_PERIODS if c > period), reverse=True):
            k = multiple / period
            if abs(k - round(k)) > 1e-6 or len(cycles) < 2:
                continue
            residues, counts = np.unique(np.mod(cycles, round(k)), return_counts=True)
            if counts.max() >= MULTIPLE_SHARE * len(cycles):
                cycle = np.floor((wall - fit.phase_s) / period + 0.5)
                mine = fit.inside & (np.mod(cycle, round(k)) == residues[counts.argmax()])
                period, fit = multiple, self._schedule_near(wall, multiple,
                                                            *_anchor(wall[mine], multiple))
                break
        fill = fit.occurrences / max(fit.expected, 1)
        for divisor in sorted(c for c in CLOCK_PERIODS if c < period):
            k = period / divisor
            if abs(k - round(k)) > 1e-6:
                continue
            near, away = self._on_divisor(wall, divisor, fit, local=True)
            kept = np.sum(near.inside & fit.inside)
            near_fill = near.occurrences / max(near.expected, 1)
            away_fill = away.occurrences / max(away.expected, 1)
            if (kept >= DIVISOR_KEEP * fit.inside.sum()
                    and near_fill >= DIVISOR_FILL * fill
                    and near_fill - away_fill >= DIVISOR_EXCESS
                    and near.inside.sum() <= MAX_ON_SCHEDULE_PER_CYCLE * near.occurrences):
                return divisor, near
        return period, fit

    def _resolve_free(self, times: np.ndarray, period: float,
                      fit: Schedule) -> tuple[float, Schedule]:
        """The shortest divisor P/k of a data-driven period that explains its events better.

        A 31 h job that ran on only some cycles also fits 62 h, at the runs that fell on even
        cycles.  P/k is taken when its window keeps most of P's on-schedule events, adds at
        least two that P's window missed (more than the same window half a cycle away holds:
        the other runs of the job, not chance), holds at most two events per occurrence, and
        explains the schedule at least as well, occurrences^2 / expected (the fundamental has
        more cycles, and fills them)."""
        if not fit.inside.any():
            return period, fit
        score = fit.occurrences**2 / max(fit.expected, 1)
        for k in range(FREE_MAX_DIVISOR, 1, -1):  # the shortest period first
            divisor = period / k
            if divisor < FREE_MIN_S:
                continue
            near, away = self._on_divisor(times, divisor, fit, local=False)
            kept = int(np.sum(near.inside & fit.inside))
            gained = int(np.sum(near.inside & ~fit.inside))
            if (kept >= DIVISOR_KEEP * fit.inside.sum()
                    and gained >= 2 and gained > away.inside.sum()
                    and near.inside.sum() <= MAX_ON_SCHEDULE_PER_CYCLE * near.occurrences
                    and near.occurrences**2 / max(near.expected, 1) >= score):
                return divisor, near
        return period, fit

    def _on_divisor(self, wall: np.ndarray, divisor: float, fit: Schedule,
                    local: bool) -> tuple[Schedule, Schedule]:
        """The schedule where ``fit``'s on-schedule events sit on the divisor's clock (a 6-hourly
        job's events at 00:45 and 06:45, both on a 24 h scan of the quiet night, coincide on a
        6 h clock), and the same window half a divisor away (what chance alone puts there)."""
        phase, half = _anchor(wall[fit.inside], divisor)
        near = self._schedule_near(wall, divisor, phase, half, local=local)
        away = self._schedule_near(wall, divisor, (phase + divisor / 2) % divisor, half,
                                   local=local)
        return near, away

    def _schedule_near(self, wall: np.ndarray, period: float, phase_s: float,
                       half_s: float, local: bool = True) -> Schedule:
        """The schedule of events within ``half_s`` of a given phase (``wall``: local-clock
        times, or UTC ones for a free period with ``local=False``)."""
        dev = (wall - phase_s + period / 2) % period - period / 2
        inside = np.abs(dev) <= half_s
        if inside.any():
            phase_s = (phase_s + float(np.angle(np.mean(np.exp(2j * np.pi * dev[inside] / period)))
                                       / (2 * np.pi) * period)) % period
        spread = ((wall[inside] - phase_s + period / 2) % period - period / 2)
        jitter = float(np.sqrt(np.mean(spread**2))) if inside.any() else 0.0
        cycles = np.unique(np.floor((wall[inside] - phase_s) / period + 0.5))
        expected = len(np.union1d(self.covered_cycles(period, phase_s, local), cycles))
        return Schedule(phase_s, jitter, inside, len(cycles), expected)

    def _describe(self, times: np.ndarray, period: float, local: bool) -> Schedule:
        """Phase, jitter, on-schedule mask, occurrences seen and expected for one period."""
        tau = self.clock.wall(times) if local else times
        # A day is scanned on the activity clock (as in the test); phase and jitter are told on
        # the wall clock.
        scan = activity_clock(tau, self.profile) if local and period == DAY else tau
        fit = fit_window(scan, period, WIDTHS_24H if scan is not tau else WIDTHS)
        # Events in a window twice as wide as the best one, centred on it, are "on schedule".
        centre = (fit.start_frac + fit.width / 2) % 1.0
        dev = (np.mod(scan, period) / period - centre + 0.5) % 1.0 - 0.5
        inside = np.abs(dev) <= fit.width
        frac = np.mod(tau, period) / period
        phase = float(np.angle(np.mean(np.exp(2j * np.pi * frac[inside]))) / (2 * np.pi)) % 1.0
        spread = ((frac[inside] - phase + 0.5) % 1.0 - 0.5) * period
        jitter = float(np.sqrt(np.mean(spread**2)))
        cycles = np.unique(np.floor((tau[inside] - phase * period) / period + 0.5))
        # A cycle with an event was observed, whatever the coverage inference says about its
        # scheduled instant: occurrences never exceed expected.
        expected = len(np.union1d(self.covered_cycles(period, phase * period, local), cycles))
        return Schedule(phase * period, jitter, inside, len(cycles), expected)

    def covered_cycles(self, period: float, phase_s: float, local: bool) -> np.ndarray:
        """Numbers of the cycles whose scheduled instant falls inside the covered time."""
        start, end = self.coverage.span
        if local:
            start, end = self.clock.wall(np.array([start, end]))
        first = np.ceil((start - phase_s) / period)
        last = np.floor((end - phase_s) / period)
        if last < first:
            return np.array([])
        k = np.arange(first, last + 1)
        instants = k * period + phase_s
        if local:
            instants = self.clock.utc(instants)
        return k[self.coverage.contains(instants)]


def _anchor(wall: np.ndarray, period: float) -> tuple[float, float]:
    """Phase (circular mean) and window half-width of some local-clock events on a clock of
    ``period``: a few robust spreads (1.4826 MAD), at least min(P/24, 1 h), at most P/4."""
    angle = 2 * np.pi * np.mod(wall, period) / period
    phase = float(np.angle(np.mean(np.exp(1j * angle))) / (2 * np.pi) * period) % period
    dev = (wall - phase + period / 2) % period - period / 2
    spread = 1.4826 * float(np.median(np.abs(dev))) if len(dev) else 0.0
    half = max(HARMONIC_JITTERS * spread, min(period / 24, HARMONIC_MIN_S))
    return phase, min(period / 4, half)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error control across groups)."""
    m = len(p_values)
    order = np.argsort(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return [float(x) for x in adjusted]


def interval_regularity(times: np.ndarray, coverage: Coverage, *, tolerance: float = 0.1,
                        null_rate: float = 0.1) -> tuple[float, float, int, float]:
    """A heartbeat is a timer restarted after each beat: regular intervals, drifting phase.

    Returns (median interval, fraction of intervals within +-tolerance of it, number of intervals,
    p-value).  Under the null (events uniform in time, so exponential intervals) an interval falls
    within +-10% of the median with probability ~0.07; ``null_rate`` = 0.1 is a conservative bound,
    and the p-value is the binomial tail of the observed count.
    """
    times = np.sort(np.asarray(times, dtype=float))
    if len(times) < 3:
        return 0.0, 0.0, 0, 1.0
    d = np.diff(times)
    mids = times[:-1] + d / 2
    d = d[coverage.contains(times[:-1]) & coverage.contains(mids) & coverage.contains(times[1:])]
    if len(d) < 2:
        return 0.0, 0.0, len(d), 1.0
    median = float(np.median(d))
    near = int(np.sum(np.abs(d - median) <= tolerance * median))
    n = len(d)
    logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])
    j = np.arange(near, n + 1)
    logpmf = logfact[n] - logfact[j] - logfact[n - j] + j * np.log(null_rate) + (n - j) * np.log1p(
        -null_rate
    )
    top = logpmf.max()
    p = float(min(1.0, np.exp(top) * np.sum(np.exp(logpmf - top))))
    return median, near / n, n, max(p, P_FLOOR)
