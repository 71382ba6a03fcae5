"""The one flow engine: packets -> connections and activity, for replay and live capture alike.

decode (``decode.Decoder``) -> track and bin (``flows.Tracker``) -> plugins (extra columns and
tables: server names from SNI/DNS/QUIC, PCAPdroid's app) -> device names (``observer.devices``).
One ``FlowSettings`` holds every number the rules use, so a live capture and the replay of its
own files give the same records.  ``flush`` hands what is finished to a sink: connections that
can take no more packets and activity bins that are complete; memory follows the connections
open at a time, not the length of the capture.  ``checkpoint`` hands out open connections as they
stand, for a source that can be killed (live capture).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd

from observer import ObserverError
from observer.devices import DeviceMap
from observer.sources.decode import Decoder, Packets
from observer.sources.flows import Tracker
from observer.sources.names import Namer
from observer.sources.pcapfile import Batch

if TYPE_CHECKING:
    from observer.config import LabConfig

WRITE_ROWS = 1 << 14  # rows per table slice handed to the sink
ACTIVITY_SLACK_S = 60.0  # replay: a bin is complete this long after the newest packet passed it

Sink = Callable[[str, pd.DataFrame], None]


@dataclass(frozen=True)
class FlowSettings:
    """The numbers of the connection rules, one set for every source that sees packets."""

    bin_s: float = 10.0  # activity bin width
    udp_idle_s: float = 120.0  # a UDP flow idle this long ends its connection
    tcp_quiet_s: float = 300.0  # a closed TCP connection is finished after this long quiet
    tunnel_depth: int = 2  # nested tunnels decapsulated at most (Zeek's Tunnel::max_depth)
    # Zeek's rules, off by default: a bad TCP/UDP checksum (offloading makes many on the capturing
    # host) or a TCP header cut by the snap length (headers-only captures) counts no packet
    checksums: bool = False
    cut_headers: bool = False
    tcp_idle_s: float | None = None  # a TCP flow idle this long ends (Zeek: 300 s); None: never
    close_delay_s: float | None = None  # this long after a RST or both FINs a TCP connection is
    # gone and a later packet opens a new one (Zeek: 5 s); None: only a new SYN does

    @classmethod
    def of(cls, config: LabConfig | None, *, bin_s: float | None = None,
           udp_idle_s: float | None = None) -> FlowSettings:
        """The config's settings, with command-line overrides."""
        base = cls() if config is None else cls(bin_s=config.bin_seconds,
                                                 udp_idle_s=config.udp_idle_timeout_s)
        settings = cls(bin_s=base.bin_s if bin_s is None else bin_s,
                       udp_idle_s=base.udp_idle_s if udp_idle_s is None else udp_idle_s,
                       tcp_quiet_s=base.tcp_quiet_s)
        if settings.udp_idle_s <= 0 or settings.bin_s <= 0:
            raise ObserverError("--udp-idle and --bin must be greater than 0")
        return settings


class FlowPlugin(Protocol):
    """Columns and tables only some sources can fill, computed beside the one tracker.

    ``batch`` sees every decoded batch with each packet's connection serial and direction;
    ``prepare`` runs before each flush; ``waiting`` counts the rows it holds for ``tables``;
    ``columns`` adds columns to connections handed out;
    ``tables`` returns extra rows (with a ``client_ip`` column, the engine adds ``device``);
    ``forget`` drops what is kept for connections handed out.
    """

    skipped: Counter[str]

    def batch(self, pk: Packets, serials: np.ndarray, up: np.ndarray) -> None: ...
    def prepare(self, tracker: Tracker, now: float | None) -> None: ...
    def waiting(self) -> int: ...
    def columns(self, conns: pd.DataFrame, serials: np.ndarray) -> pd.DataFrame: ...
    def tables(self) -> dict[str, pd.DataFrame]: ...
    def forget(self, serials: np.ndarray) -> None: ...


class PcapdroidApps:
    """The ``app`` column from PCAPdroid's per-packet trailer (uid and app name)."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        self.apps: dict[int, str] = {}  # uid -> app name
        self.uid_of: dict[int, int] = {}  # connection serial -> uid

    def batch(self, pk: Packets, serials: np.ndarray, up: np.ndarray) -> None:
        if not pk.apps:
            return
        self.apps.update(pk.apps)
        tagged = pk.uid >= 0
        pairs = np.unique(np.stack([serials[tagged], pk.uid[tagged]], axis=1), axis=0)
        self.uid_of.update((s, u) for s, u in pairs.tolist())

    def prepare(self, tracker: Tracker, now: float | None) -> None:
        return None

    def waiting(self) -> int:
        return 0

    def columns(self, conns: pd.DataFrame, serials: np.ndarray) -> pd.DataFrame:
        if self.uid_of:
            uid_of, apps = self.uid_of, self.apps
            conns["app"] = [apps.get(uid_of.get(s, -1)) for s in serials.tolist()]
        return conns

    def tables(self) -> dict[str, pd.DataFrame]:
        return {}

    def forget(self, serials: np.ndarray) -> None:
        if self.uid_of:
            for s in serials.tolist():
                self.uid_of.pop(s, None)


class FlowEngine:
    """Decode, track and bin batches of packets; hand finished records to ``sink``."""

    def __init__(self, settings: FlowSettings, sink: Sink, *, devices: DeviceMap | None = None,
                 plugins: Iterable[FlowPlugin] | None = None, source: str = "pcap") -> None:
        self.settings = settings
        self.sink = sink
        self.source = source
        self.devices = devices or DeviceMap()
        self.decoder = Decoder(tunnel_depth=settings.tunnel_depth, checksums=settings.checksums,
                               cut_headers=settings.cut_headers)
        self.tracker = Tracker(udp_idle_s=settings.udp_idle_s, bin_s=settings.bin_s,
                               devices=self.devices, tcp_idle_s=settings.tcp_idle_s,
                               close_delay_s=settings.close_delay_s)
        self.plugins: list[FlowPlugin] = list(plugins) if plugins is not None else [
            Namer(), PcapdroidApps()]
        self.last_ts: float | None = None  # newest packet time seen

    def feed(self, batch: Batch) -> Packets:
        """Decode and account one batch of captured packets."""
        packets = self.decoder.decode(batch)
        self.track(packets, float(batch.ts.max()) if batch.ts.size else None)
        return packets

    def track(self, packets: Packets, newest: float | None) -> None:
        """Account one decoded batch (``newest``: its latest capture time, None if empty);
        ``feed`` without the decoding, for packets decoded elsewhere (observer.sources.workers)."""
        if newest is not None:
            self.last_ts = newest if self.last_ts is None else max(self.last_ts, newest)
        serials, up = self.tracker.add(packets)
        for plugin in self.plugins:
            plugin.batch(packets, serials, up)

    @property
    def skipped(self) -> Counter[str]:
        total = Counter(self.decoder.skipped)
        for plugin in self.plugins:
            total.update(plugin.skipped)
        return total

    def flush(self, now: float | None, *, slack_s: float = ACTIVITY_SLACK_S,
              min_rows: int = 0) -> None:
        """Hand out connections finished by ``now`` and activity bins that ended ``slack_s``
        before it, once at least ``min_rows`` rows are ready; everything when ``now`` is None
        (the end of the input)."""
        tracker = self.tracker
        for plugin in self.plugins:
            plugin.prepare(tracker, now)
        if now is None:
            done, before = np.arange(tracker.conns.n), np.inf
            end = self.last_ts if self.last_ts is not None else 0.0
        else:
            done = tracker.finished(now, self.settings.tcp_quiet_s)
            ready = done.size + tracker.pending_activity() + sum(
                p.waiting() for p in self.plugins)
            if not ready or ready < min_rows:
                return
            before, end = np.floor((now - slack_s) / self.settings.bin_s), now
        done = done[np.argsort(tracker.conns["ts_start"][done], kind="stable")]  # few days a slice
        serials = tracker.serials(done)
        self._connections(done, serials, end)
        for part in tracker.activity(serials, before, WRITE_ROWS):
            self.sink("activity", part)
        link = self.decoder.link_activity(self.settings.bin_s, before)
        if len(link):
            self.sink("link_activity", link)
        for plugin in self.plugins:
            for name, frame in plugin.tables().items():
                frame["device"] = self.devices.names_of(frame["client_ip"])
                for start in range(0, len(frame), WRITE_ROWS):
                    self.sink(name, frame.iloc[start : start + WRITE_ROWS])
            plugin.forget(serials)
        tracker.drop(done)

    def checkpoint(self) -> None:
        """Hand out the connections still open that had packets since their last row, as they
        stand (``close_reason`` "open"), so a source that can be killed keeps them; the row
        written when one finishes (same ``conn_id``) replaces it.  Call after ``flush``."""
        tracker = self.tracker
        c = tracker.conns
        rows = np.flatnonzero(c.view("ts_end") > c.view("shown"))
        if not rows.size:
            return
        c["shown"][rows] = c["ts_end"][rows]
        self._connections(rows, tracker.serials(rows), self.last_ts or 0.0, still_open=True)

    def _connections(self, rows: np.ndarray, serials: np.ndarray, end: float, *,
                     still_open: bool = False) -> None:
        """Connection rows ``rows`` (serials ``serials``) with the plugins' columns, to the sink."""
        self.tracker.issue(rows)
        for start in range(0, rows.size, WRITE_ROWS):
            part = slice(start, start + WRITE_ROWS)
            conns = self.tracker.connections(rows[part], capture_end=end)
            conns["source"] = self.source
            if still_open:
                conns["close_reason"] = "open"
            for plugin in self.plugins:
                conns = plugin.columns(conns, serials[part])
            self.sink("connections", conns)
