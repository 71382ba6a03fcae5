"""Coverage: when could the observer have seen an upload at all?

The sessions table says when each capture, proxy run or import was recording.  Inside a session
of a packet source (pcap replay, live capture), a stretch of at least ``silence_s`` with no
packet at all from the device is taken as a capture gap too: a phone with a chat app sends
keepalives every few minutes, so hours of total silence mean the capture missed them (rotated
files with holes, a Wi-Fi outage).  That holds only for a device that is chatty: one that sent
nothing in most hours of its capture (a phone without a chat app, nearly silent apart from its
uploads) is silent by habit, so its silences are not gaps.  Silence means nothing in a source that
only knows connection totals (a Zeek conn.log, a PCAPdroid CSV: a connection open for hours leaves
no trace between its start and end) or that sees only what the apps route to it (a proxy), so
their sessions are covered whole.  Without any session rows the records' own span is the
session, and silence is inferred only when the device has activity bins (packet-level data).  A
night without coverage is then not a missed occurrence, and the null model of the periodicity
test places its random events only in covered time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from observer.analysis.periodicity import Coverage

SILENCE_S = 4 * 3600.0
PACKET_SOURCES = ("pcap", "live")
# Silences are capture gaps only for a device with packets in at least this share of the hours
# of its packet sessions.
CHATTY_HOURS = 0.5


def _union(starts: np.ndarray, ends: np.ndarray) -> list[tuple[float, float]]:
    order = np.argsort(starts)
    out: list[list[float]] = []
    for a, b in zip(starts[order], ends[order], strict=True):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([float(a), float(b)])
    return [(a, b) for a, b in out]


def _silences(seen: np.ndarray, base: list[tuple[float, float]],
              silence_s: float) -> list[tuple[float, float]]:
    """Stretches of at least ``silence_s`` inside ``base`` with no packet (base edges anchor),
    for a device that is usually chatty (packets in most hours of ``base``)."""
    edges = np.array([x for ab in base for x in ab])
    inside = Coverage(tuple(base)).contains(seen)
    hours = sum(np.ceil((b - a) / 3600.0) for a, b in base)
    if hours <= 0 or len(np.unique(np.floor(seen[inside] / 3600.0))) < CHATTY_HOURS * hours:
        return []
    points = np.sort(np.concatenate([seen[inside], edges]))
    gaps = np.diff(points)
    at = np.flatnonzero(gaps >= silence_s)
    silent = [(float(points[i]), float(points[i + 1])) for i in at]
    return [(x, y) for x, y in silent if any(a <= x and y <= b for a, b in base)]


def _cut(base: list[tuple[float, float]], holes: list[tuple[float, float]]
         ) -> list[tuple[float, float]]:
    out = []
    for a, b in base:
        cursor = a
        for x, y in holes:
            if x >= a and y <= b:
                if x > cursor:
                    out.append((cursor, x))
                cursor = max(cursor, y)
        if b > cursor:
            out.append((cursor, b))
    return out


def device_coverage(
    sessions: pd.DataFrame, blk: pd.DataFrame, device: str, *, silence_s: float = SILENCE_S
) -> tuple[Coverage, list[tuple[float, float]]]:
    """The device's covered intervals, and the gaps inferred from silence (for the evidence)."""
    mine = blk[blk["device"] == device]
    seen = np.sort(np.concatenate([mine["ts"].to_numpy(), (mine["ts"] + mine["dur"]).to_numpy()]))
    packets = mine[~mine["from_totals"].astype(bool)]
    packet_seen = np.sort(np.concatenate([packets["ts"].to_numpy(),
                                          (packets["ts"] + packets["dur"]).to_numpy()]))
    sess = sessions[sessions["device"].isna() | (sessions["device"] == device)]
    sess = sess.dropna(subset=["ts_start"])
    if len(sess):
        ends = sess["ts_end"].fillna(seen[-1] if len(seen) else sess["ts_start"].max())
        is_packet = sess["source"].isin(PACKET_SOURCES).to_numpy()
        starts, stops = sess["ts_start"].to_numpy(float), ends.to_numpy(float)
        packet_base = _union(starts[is_packet], stops[is_packet])
        whole = _union(starts[~is_packet], stops[~is_packet])
    elif len(seen):
        span = [(float(seen[0]), float(seen[-1]))]
        packet_base, whole = (span, []) if len(packet_seen) else ([], span)
    else:
        return Coverage(()), []
    silent = _silences(packet_seen, packet_base, silence_s) if packet_base else []
    covered = _cut(packet_base, silent) + whole
    merged = _union(np.array([a for a, _ in covered]), np.array([b for _, b in covered]))
    return Coverage(tuple(merged)), silent
