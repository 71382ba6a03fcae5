"""Byte and packet counters of one proxied connection, binned in time.

Plain Python, no mitmproxy: the counting layer calls ``up``/``down`` for every chunk the client
sent or received, and the recorder takes finished bins out to write them as activity rows.
"""

from __future__ import annotations

from typing import Any

# A bin's counters: bytes_up, bytes_down, packets_up, packets_down.
Bin = list[int]
# Written bins that an aborted connection's undelivered bytes can still be taken off.
MAX_CORRECTED = 16


class Traffic:
    """Totals and per-bin counts of what one client connection sent (up) and received (down).

    ``packets_*`` count reads and writes; they equal datagrams for UDP and are not packets for TCP,
    so the connection row reports them for UDP only.  ``flow_bins``, when enabled, keeps a second
    copy of the bins since the last saved flow, so a ``mitmdump -w`` file can carry them.
    """

    __slots__ = (
        "_bin",
        "_cur",
        "_flow_cur",
        "bin_s",
        "bins",
        "bytes_down",
        "bytes_up",
        "closed_by",
        "corrections",
        "flow_bins",
        "packets_down",
        "packets_up",
        "requests",
        "undelivered",
        "written_down",
    )

    def __init__(self, bin_s: float, *, track_flow_bins: bool = False) -> None:
        self.bin_s = bin_s
        self.bytes_up = 0
        self.bytes_down = 0
        self.packets_up = 0
        self.packets_down = 0
        self.bins: dict[float, Bin] = {}
        self.flow_bins: dict[float, Bin] | None = {} if track_flow_bins else None
        self.closed_by: str | None = None
        self.requests = 0  # HTTP requests the client started (their headers arrived)
        self.undelivered = 0
        self.written_down: dict[float, int] = {}  # bytes_down of recently written bins
        self.corrections: list[tuple[float, Bin]] = []  # to amend bins already written
        self._bin = float("-inf")
        self._cur: Bin = [0, 0, 0, 0]
        self._flow_cur: Bin = [0, 0, 0, 0]

    def _select(self, now: float) -> None:
        start = now - now % self.bin_s
        self._bin = start
        self._cur = self.bins.setdefault(start, [0, 0, 0, 0])
        if self.flow_bins is not None:
            self._flow_cur = self.flow_bins.setdefault(start, [0, 0, 0, 0])

    def up(self, n: int, now: float) -> None:
        """The client sent ``n`` bytes at ``now``."""
        self.bytes_up += n
        self.packets_up += 1
        if not (self._bin <= now < self._bin + self.bin_s):
            self._select(now)
        cur = self._cur
        cur[0] += n
        cur[2] += 1
        if self.flow_bins is not None:
            self._flow_cur[0] += n
            self._flow_cur[2] += 1

    def down(self, n: int, now: float) -> None:
        """The client was sent ``n`` bytes at ``now``."""
        self.bytes_down += n
        self.packets_down += 1
        if not (self._bin <= now < self._bin + self.bin_s):
            self._select(now)
        cur = self._cur
        cur[1] += n
        cur[3] += 1
        if self.flow_bins is not None:
            self._flow_cur[1] += n
            self._flow_cur[3] += 1

    def not_delivered(self, n: int) -> None:
        """The last ``n`` bytes counted down never reached the client (it aborted the
        connection with them still queued): take them off the totals and the latest bins; bins
        already written get a correction row (activity rows are summed per bin)."""
        if n <= 0:
            return
        self.undelivered += n
        self.bytes_down -= n
        for t in sorted(self.bins, reverse=True):
            take = min(n, self.bins[t][1])
            self.bins[t][1] -= take
            n -= take
        for t in sorted(self.written_down, reverse=True):
            take = min(n, self.written_down[t])
            if take:
                self.written_down[t] -= take
                self.corrections.append((t, [0, -take, 0, 0]))
                n -= take

    def closed(self, by: str) -> None:
        """Remember which side closed first (``client`` or ``server``)."""
        if self.closed_by is None:
            self.closed_by = by

    def take_bins(self, before: float | None = None) -> list[tuple[float, Bin]]:
        """Remove and return the bins that start before ``before`` (all bins when None)."""
        if before is None:
            done = sorted(self.bins.items())
            self.bins = {}
        else:
            done = sorted((t, b) for t, b in self.bins.items() if t + self.bin_s <= before)
            for t, _ in done:
                del self.bins[t]
        for t, b in done[-MAX_CORRECTED:]:
            self.written_down[t] = self.written_down.get(t, 0) + b[1]
        while len(self.written_down) > MAX_CORRECTED:
            del self.written_down[min(self.written_down)]
        done += self.corrections
        self.corrections = []
        self._bin = float("-inf")
        return done

    def take_flow_bins(self) -> list[tuple[float, Bin]]:
        """Remove and return the bins counted since the last call (for a saved flow)."""
        if self.flow_bins is None:
            return []
        done = sorted(self.flow_bins.items())
        self.flow_bins = {}
        self._bin = float("-inf")
        return done


def activity_rows(
    conn_id: str, device: str, bin_s: float, bins: list[tuple[float, Bin]]
) -> list[dict[str, Any]]:
    """Activity records for the given bins of one connection."""
    return [
        {
            "conn_id": conn_id,
            "device": device,
            "ts_bin": ts_bin,
            "bin_s": bin_s,
            "bytes_up": b[0],
            "bytes_down": b[1],
            "packets_up": b[2],
            "packets_down": b[3],
        }
        for ts_bin, b in bins
    ]
