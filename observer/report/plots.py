"""Plots as SVG ``data:`` URIs, so the page needs no script and no file beside it.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot state).  Text stays text in the SVG
(``svg.fonttype: none``, escaped by matplotlib's XML writer) and math parsing is off, so a hostile
server name is drawn literally and can never be read as mathtext or markup.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from zoneinfo import ZoneInfo

import matplotlib
import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from observer.report.aggregate import OTHER, Coverage, Heatmap, Timeline
from observer.report.text import clip

# Okabe-Ito: distinguishable with colour-blindness; grey for the remainder.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#8C6D31"]
GREY = "#B0B0B0"
INK = "#222222"
GAP = "#D55E00"

_RC = {
    "svg.fonttype": "none",
    "svg.hashsalt": "observer-report",
    "text.parse_math": False,
    "text.usetex": False,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial", "sans-serif"],
    "font.size": 9,
    "axes.edgecolor": "#888888",
    "axes.labelcolor": INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#E6E6E6",
    "grid.linewidth": 0.6,
    "xtick.color": "#444444",
    "ytick.color": "#444444",
    "legend.frameon": False,
}


@contextmanager
def style() -> Iterator[None]:
    with matplotlib.rc_context(_RC):
        yield


def svg_uri(fig: Figure) -> str:
    """The figure as a base64 SVG data URI (no date, stable ids: same input, same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def colours(services: list[str]) -> dict[str, str]:
    out = {}
    for i, service in enumerate(services):
        out[service] = GREY if service == OTHER else PALETTE[i % len(PALETTE)]
    return out


def _local(ts: np.ndarray | list[float], tz: ZoneInfo) -> pd.DatetimeIndex:
    return pd.to_datetime(np.asarray(ts, dtype="float64"), unit="s", utc=True).tz_convert(tz)


def _date_axis(ax, tz: ZoneInfo, days: float) -> None:
    """Local midnights labelled "Mon 02 Nov" for up to two weeks, automatic ticks beyond."""
    if days <= 15:
        ax.xaxis.set_major_locator(mdates.DayLocator(tz=tz))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%a %d %b", tz=tz))
        ax.xaxis.set_minor_locator(mdates.HourLocator(byhour=[6, 12, 18], tz=tz))
    else:
        locator = mdates.AutoDateLocator(tz=tz, minticks=4, maxticks=12)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=tz))


def timeline_svg(tl: Timeline, events: list[dict], tz: ZoneInfo, palette: dict[str, str]) -> str:
    """Stacked upload (top) and download (bottom) volume per service, events marked above."""
    with style():
        fig = Figure(figsize=(10, 5.2))
        up_ax, down_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
        x = _local(tl.starts, tz)
        scale = 1e6
        labels = [clip(s, 32) for s in tl.services]
        cols = [palette[s] for s in tl.services]
        if tl.services:
            up_ax.stackplot(x, tl.up / scale, labels=labels, colors=cols, step="post", linewidth=0)
            down_ax.stackplot(x, tl.down / scale, colors=cols, step="post", linewidth=0)
        per_bin = "hour" if tl.bin_s == 3600 else f"{tl.bin_s / 3600:.0f} hours"
        up_ax.set_ylabel(f"uploaded, MB per {per_bin}")
        down_ax.set_ylabel(f"downloaded,\nMB per {per_bin}")
        top = max(float(tl.up.sum(axis=0).max()) / scale if tl.up.size else 0.0, 1e-3)
        up_ax.set_ylim(0, top * 1.18)
        if events:
            ex = _local([e["ts_start"] for e in events], tz)
            up_ax.scatter(
                ex,
                [top * 1.09] * len(events),
                marker="v",
                s=34,
                zorder=5,
                color=[e["colour"] for e in events],
                edgecolor=INK,
                linewidth=0.5,
                label="bulk-upload event",
            )
        if tl.services or events:
            up_ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        _date_axis(down_ax, tz, (tl.starts[-1] - tl.starts[0]) / 86400)
        down_ax.set_xlim(x[0], x[-1] + pd.Timedelta(seconds=tl.bin_s))
        fig.align_ylabels()
        return svg_uri(fig)


def heatmap_svg(hm: Heatmap, tz_name: str) -> str:
    """Days down, local hours across: a nightly job is a vertical stripe."""
    with style():
        rows = len(hm.days)
        fig = Figure(figsize=(10, min(1.4 + 0.24 * rows, 12)))
        ax = fig.subplots()
        ax.grid(False)
        data = hm.up / 1e6
        # A square-root scale keeps a 9 MB nightly job visible beside a 50 MB one.
        norm = PowerNorm(0.5, vmin=0, vmax=max(float(data.max()), 1e-3))
        mesh = ax.pcolormesh(
            np.arange(25),
            np.arange(rows + 1),
            data,
            cmap="Blues",
            norm=norm,
            edgecolors="white",
            linewidth=0.6,
        )
        ax.invert_yaxis()
        ax.set_xticks(np.arange(0, 24, 2) + 0.5, [f"{h:02d}:00" for h in range(0, 24, 2)])
        step = max(1, math.ceil(rows / 40))
        ticks = np.arange(0, rows, step)
        fmt = "%a %d %b" if hm.days_per_row == 1 else "%d %b %Y"
        ax.set_yticks(ticks + 0.5, [f"{hm.days[i]:{fmt}}" for i in ticks])
        rows_are = "" if hm.days_per_row == 1 else f"; each row {hm.days_per_row} days"
        ax.set_xlabel(f"local hour of day ({tz_name}){rows_are}")
        ax.tick_params(length=0)
        for side in ("left", "bottom"):
            ax.spines[side].set_visible(False)
        bar = fig.colorbar(mesh, ax=ax, pad=0.01, fraction=0.03)
        bar.set_label("MB uploaded in the hour")
        bar.outline.set_visible(False)
        return svg_uri(fig)


def clock_svg(events: list[dict], tz: ZoneInfo, phase_local: str | None, colour: str) -> str:
    """A 24 h dial: each event at its local time of day, one ring per day, dot area ~ size."""
    with style():
        fig = Figure(figsize=(4.2, 4.2))
        ax = fig.add_subplot(projection="polar")
        ax.set_theta_zero_location("N")
        ax.set_theta_direction(-1)
        ax.set_xticks(
            np.linspace(0, 2 * np.pi, 8, endpoint=False), [f"{h:02d}:00" for h in range(0, 24, 3)]
        )
        if events:
            local = _local([e["ts_start"] for e in events], tz)
            hours = local.hour + local.minute / 60 + local.second / 3600
            theta = 2 * np.pi * hours.to_numpy() / 24
            day0 = local.normalize().min()
            radius = ((local.normalize() - day0) // pd.Timedelta(days=1)).to_numpy() + 1
            size = np.array([e.get("bytes_up") or 0 for e in events], dtype="float64")
            area = (
                20 + 180 * np.sqrt(size / size.max()) if size.max() > 0 else np.full(len(size), 40)
            )
            # Events the analysis counted off its schedule are drawn hollow.
            off = np.array([e.get("on_schedule") is False for e in events])
            for mask, face in ((~off, colour), (off, "none")):
                if mask.any():
                    ax.scatter(
                        theta[mask],
                        radius[mask],
                        s=area[mask],
                        facecolor=face,
                        alpha=0.8,
                        edgecolor=colour if face == "none" else INK,
                        linewidth=1.2 if face == "none" else 0.5,
                        zorder=3,
                    )
            ax.set_ylim(0, radius.max() + 0.8)
            # A ring per day, per week for long captures; never more than about 30 rings.
            ring = 1 if radius.max() <= 10 else max(7, math.ceil(radius.max() / 30))
            ax.set_yticks(np.arange(1, radius.max() + 1, ring), [])
        # "02:03", or "Wed 04:10" for a weekly finding: the clock shows the time of day.
        clock = re.search(r"(\d{1,2}):(\d{2})", phase_local or "")
        if clock:
            angle = 2 * np.pi * (int(clock[1]) + int(clock[2]) / 60) / 24
            ax.plot(
                [angle, angle],
                [0, ax.get_ylim()[1]],
                color=INK,
                linewidth=1,
                linestyle="--",
                zorder=2,
            )
        ax.grid(color="#DDDDDD")
        ax.spines["polar"].set_color("#AAAAAA")
        return svg_uri(fig)


MAX_GAPS_DRAWN = 500  # beyond this the shading is a solid band anyway


def coverage_svg(cov: Coverage, tz: ZoneInfo) -> str:
    """One bar per recording lane; stretches nothing recorded are shaded."""
    with style():
        lanes = list(cov.lanes) or ["(no session records)"]
        fig = Figure(figsize=(10, 0.9 + 0.35 * len(lanes)))
        ax = fig.subplots()
        ax.grid(False)
        for i, lane in enumerate(lanes):
            spans = cov.lanes.get(lane, [])
            bars = [(mdates.date2num(_local([a], tz)[0]), (b - a) / 86400) for a, b in spans]
            ax.broken_barh(bars, (i - 0.3, 0.6), color=PALETTE[0])
        for a, b in cov.gaps[:MAX_GAPS_DRAWN]:
            ax.axvspan(
                _local([a], tz)[0],
                _local([b], tz)[0],
                color=GAP,
                alpha=0.35,
                linewidth=0,
                label="gap" if (a, b) == cov.gaps[0] else None,
            )
        if cov.gaps:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        ax.set_yticks(range(len(lanes)), [clip(lane, 36) for lane in lanes])
        ax.set_ylim(-0.7, len(lanes) - 0.3)
        ax.set_xlim(_local([cov.ts_start], tz)[0], _local([cov.ts_end], tz)[0])
        _date_axis(ax, tz, (cov.ts_end - cov.ts_start) / 86400)
        ax.tick_params(axis="y", length=0)
        ax.spines["left"].set_visible(False)
        return svg_uri(fig)
