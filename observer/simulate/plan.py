"""The traffic model: what each Android phone does over days, planned at the level of messages.

Each part draws from its own random stream (seed + part name, + phone index after the first), so
adding a job to a scenario does not change the chat traffic, adding a phone does not change the
others, and the same seed always plans the same week.
"""

from __future__ import annotations

import bisect
import datetime as dt
import ipaddress
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from observer.simulate import wire
from observer.simulate.packets import DOWN, MSS, PACKET, UDP, UP, Blobs, Conn, to_us
from observer.simulate.scenario import Job, Phone, Scenario

# Relative user activity per local hour (messages, media): quiet nights, busy evenings.
HOURLY = np.array([0.30, 0.15, 0.08, 0.05, 0.05, 0.10, 0.40, 1.00, 1.40, 1.20, 1.10, 1.20,
                   1.50, 1.30, 1.10, 1.10, 1.20, 1.40, 1.60, 1.80, 2.00, 1.90, 1.40, 0.80])
MEDIA_NAMES = ("mmg.whatsapp.net", "media-ber1-1.cdn.whatsapp.net", "media-fra3-2.cdn.whatsapp.net",
               "scontent.xx.fbcdn.net", "scontent-ber1-1.xx.fbcdn.net", "scontent.cdninstagram.com",
               "i.ytimg.com", "www.youtube.com")
TELEMETRY_NAMES = ("play.googleapis.com", "android.clients.google.com", "www.googleapis.com",
                   "mtalk.google.com", "firebaselogging-pa.googleapis.com",
                   "connectivitycheck.gstatic.com", "app-measurement.com")
TELEMETRY_WEIGHTS = np.array([0.25, 0.2, 0.15, 0.15, 0.1, 0.1, 0.05])
QUIC_NAMES = ("www.youtube.com", "i.ytimg.com", "www.googleapis.com")


@dataclass
class Upload:
    """A scheduled-job upload the simulator emitted (ground truth)."""

    dev: int  # index of the phone in the scenario
    job: Job
    occurrence: int
    nominal: float
    payload_bytes: int
    conn: Conn | None = None  # set when the upload is planned into a connection
    msg_index: int | None = None  # inside the chat connection: which message


@dataclass
class QuicFlow:
    """A short QUIC flow: a client Initial stored whole, then datagrams stored as headers."""

    t_open: float
    server_name: str
    times: list[float]
    up: list[int]
    sizes: list[int]
    blob: int
    dev: int = 0
    client_port: int = 0
    server_ip: str = ""


@dataclass
class Plan:
    scenario: Scenario
    t0: float
    t_end: float
    conns: list[Conn] = field(default_factory=list)
    dns: list[tuple[float, int, int, int, int]] = field(default_factory=list)  # ts, up?, port,
    # blob, phone
    quic: list[QuicFlow] = field(default_factory=list)
    blobs: Blobs = field(default_factory=Blobs)
    uploads: list[Upload] = field(default_factory=list)
    missed: list[dict[str, Any]] = field(default_factory=list)
    chat_sessions: list[Conn] = field(default_factory=list)
    gaps: list[tuple[float, float]] = field(default_factory=list)
    # per phone: (preferred from, address) of its temporary IPv6 addresses, oldest first
    temporary: list[list[tuple[float, str]]] = field(default_factory=list)

    def datagram_rows(self, device_ips: list[int], resolver_ip: int) -> np.ndarray:
        """DNS and QUIC datagrams as PACKET rows."""
        datagrams = [(ts, up, resolver_ip, port, 53, len(self.blobs.data[blob]), blob, dev)
                     for ts, up, port, blob, dev in self.dns]
        for flow in self.quic:
            server = wire.ip_to_int(flow.server_ip)
            for i, (ts, up, size) in enumerate(zip(flow.times, flow.up, flow.sizes, strict=True)):
                datagrams.append((ts, up, server, flow.client_port, 443, size,
                                  flow.blob if i == 0 else -1, flow.dev))
        rows = np.zeros(len(datagrams), PACKET)
        for i, (ts, up, server, port, server_port, size, blob, dev) in enumerate(datagrams):
            device_ip = device_ips[dev]
            source, dest = (device_ip, server) if up else (server, device_ip)
            rows[i] = (to_us(ts), up, 0, UDP, source, dest, port if up else server_port,
                       server_port if up else port, 0, 0, 0, size, blob, dev)
        return rows


def plan_scenario(scenario: Scenario) -> Plan:
    """Every phone's connections in one plan (shared blobs, capture gaps)."""
    plan = Plan(scenario, scenario.local_midnight(0), scenario.local_midnight(scenario.days))
    for gap in scenario.gaps:
        start = scenario.local_midnight(gap.day) + gap.at_s
        if start < plan.t_end:  # a gap may lie beyond a shortened run (--days)
            plan.gaps.append((start, min(start + gap.hours * 3600, plan.t_end)))
    # Names a job sends to over IPv6 get AAAA records (on every phone's resolver alike).
    v6_names = {job.server_name for job in scenario.jobs if job.family != "ipv4"}
    for index in range(len(scenario.phones)):
        Planner(scenario, index, plan, v6_names).run()
    return plan


class Planner:
    """Plans every connection of one phone, then names them (DNS) and numbers them (ports)."""

    def __init__(self, scenario: Scenario, index: int, plan: Plan, v6_names: set[str]) -> None:
        self.s = scenario
        self.index = index
        self.phone: Phone = scenario.phones[index]
        self.plan = plan
        self.v6_names = v6_names
        self.first_conn = len(plan.conns)
        self.first_quic = len(plan.quic)
        self.up_rate = self.phone.activity.uplink_mbps * 1e6 / 8
        self.down_rate = self.phone.activity.downlink_mbps * 1e6 / 8
        self.hidden: list[tuple[float, Upload]] = []
        self.temporary = self.temporary_addresses()
        plan.temporary.append(self.temporary)

    def rng(self, part: str) -> np.random.Generator:
        key = [self.s.seed, zlib.crc32(part.encode())]
        return np.random.default_rng([*key, self.index] if self.index else key)

    def temporary_addresses(self) -> list[tuple[float, str]]:
        """RFC 8981 temporary addresses in the stable address's /64: one in use when the capture
        starts, then a new random interface identifier every ``temporary_every_s``."""
        if not self.phone.temporary_ipv6:
            return []
        rng = self.rng("ipv6-temporary")
        every = self.phone.temporary_every_s
        prefix = int(ipaddress.IPv6Address(self.phone.ipv6)) >> 64 << 64
        starts = [self.plan.t0 - float(rng.uniform(0, every))]
        while starts[-1] + every < self.plan.t_end:
            starts.append(starts[-1] + every)
        return [(t, str(ipaddress.IPv6Address(prefix | int(rng.integers(1, 2**63)))))
                for t in starts]

    def source6(self, t: float) -> str:
        """The phone's IPv6 address for a connection opened at ``t``."""
        if not self.temporary:
            return self.phone.ipv6
        k = max(0, bisect.bisect_right([start for start, _ in self.temporary], t) - 1)
        return self.temporary[k][1]

    def addresses6(self, name: str) -> tuple[str, ...]:
        return wire.endpoint6(name) or (
            (wire.documentation6(name),) if name in self.v6_names else ())

    def rtt(self, name: str, rng: np.random.Generator) -> float:
        base = 0.012 + (zlib.crc32(name.encode()) % 30) / 1000
        return base * (1 + 0.3 * rng.random())

    def run(self) -> None:
        for job in self.phone.jobs:
            self.job(job)
        if self.phone.chat.enabled:
            self.chat()
        self.media()
        if self.phone.activity.telemetry_interval_s:
            self.telemetry()
        self.quic()
        self.name_and_number()

    # -- building blocks -------------------------------------------------------------------------

    def tls(self, tag: str, t: float, name: str, port: int, rng: np.random.Generator) -> Conn:
        """A TLS connection whose handshake is queued: ClientHello, server flight, Finished."""
        conn = Conn(tag, name, port, t, self.rtt(name, rng), dev=self.index)
        blob = self.plan.blobs.add(wire.client_hello(name, rng))
        conn.send(t + conn.rtt + 0.0004, UP, len(self.plan.blobs.data[blob]), self.up_rate, blob)
        conn.send(t + 2 * conn.rtt + 0.002, DOWN, int(rng.integers(2600, 5400)), self.down_rate)
        conn.send(conn.cursor + 0.001, UP, 64, self.up_rate)
        self.plan.conns.append(conn)
        return conn

    def exchange(self, conn: Conn, t: float, up: int, down: int, think: float = 0.02) -> float:
        """A request of ``up`` bytes and its response of ``down`` bytes; returns the end time."""
        conn.send(max(t, conn.cursor), UP, up, self.up_rate)
        return conn.send(conn.cursor + think, DOWN, down, self.down_rate)

    def finish(self, conn: Conn, idle: float, rng: np.random.Generator) -> None:
        conn.t_close = min(conn.cursor + idle, self.plan.t_end + 30)
        conn.close = "rst" if rng.random() < 0.1 else "fin"

    def daily_times(self, per_day: float, rng: np.random.Generator) -> np.ndarray:
        """Event times following the user's day (``HOURLY``) in local time."""
        weights = HOURLY / HOURLY.sum()
        out = []
        for day in range(self.s.days):
            n = rng.poisson(per_day)
            hours = rng.choice(24, size=n, p=weights)
            out.append(self.s.local_midnight(day) + (hours + rng.random(n)) * 3600)
        times = np.sort(np.concatenate(out)) if out else np.zeros(0)
        return times[(times > self.plan.t0 + 60) & (times < self.plan.t_end - 600)]

    def local_time_of_day(self, t: float) -> float:
        local = dt.datetime.fromtimestamp(t, self.s.tz)
        return local.hour * 3600 + local.minute * 60 + local.second

    # -- scheduled jobs --------------------------------------------------------------------------

    def occurrences(self, job: Job) -> list[float]:
        """Nominal UTC start times: whole-hour periods on the local wall clock, others elapsed."""
        times = []
        if job.every_s % 3600 == 0:
            base = dt.datetime.combine(self.s.start, dt.time()) + dt.timedelta(
                days=job.first_day, seconds=job.at_s)
            k = 0
            while True:
                wall = base + dt.timedelta(seconds=k * job.every_s)
                t = wall.replace(tzinfo=self.s.tz).timestamp()
                if t >= self.plan.t_end:
                    return times
                times.append(t)
                k += 1
        t = self.plan.t0 + job.first_day * 86400 + job.at_s
        while t < self.plan.t_end:
            times.append(t)
            t += job.every_s
        return times

    def job(self, job: Job) -> None:
        rng = self.rng(f"job:{job.name}")
        rate = self.up_rate
        for k, nominal in enumerate(self.occurrences(job)):
            local = dt.datetime.fromtimestamp(nominal, self.s.tz)
            if job.jitter == "normal":
                offset = float(np.clip(rng.normal(0, job.jitter_min), -3 * job.jitter_min,
                                       3 * job.jitter_min)) * 60
            else:
                offset = float(rng.uniform(-job.jitter_min, job.jitter_min)) * 60
            size = int(job.size_bytes * (1 + job.size_jitter * rng.uniform(-1, 1)))
            size = max(size, 1)
            missed = {"device": self.phone.name, "job": job.name, "kind": job.kind, "occurrence": k,
                      "nominal_ts": round(nominal, 6), "local_time": local.isoformat()}
            miss_draw = rng.random()
            if k in job.skip or local.date() in job.skip_dates:
                self.plan.missed.append({**missed, "reason": "skipped (listed in the scenario)"})
                continue
            if miss_draw < job.miss_rate:
                self.plan.missed.append({**missed, "reason": "skipped (miss_rate)"})
                continue
            t = nominal + offset
            duration = -(-size // MSS) * MSS / rate + 30
            if t < self.plan.t0 + 30 or t + duration > self.plan.t_end - 60:
                self.plan.missed.append({**missed, "reason": "outside the capture"})
                continue
            if job.inside_long_lived:
                self.hidden.append((t, Upload(self.index, job, k, nominal, size)))
                continue
            conn = self.tls(f"job:{job.name}", t, job.server_name, job.port, rng)
            conn.v6 = job.family == "ipv6" or (job.family == "alternate" and k % 2 == 1) or (
                job.family == "mixed" and rng.random() < 0.5)
            header = int(rng.integers(500, 900))
            conn.send(conn.cursor + 0.01, UP, size + header, rate)
            conn.send(conn.cursor + 0.05, DOWN, job.response_bytes, self.down_rate)
            conn.t_close = conn.cursor + float(rng.uniform(0.2, 3))
            conn.close = "fin"
            self.plan.uploads.append(Upload(self.index, job, k, nominal, size, conn))

    # -- the messenger's long-lived connection ---------------------------------------------------

    def chat(self) -> None:
        """Sessions of the chat connection between reconnects, each with its share of the
        keepalives, user messages and hidden uploads."""
        rng = self.rng("chat")
        p = self.plan
        windows = self.hidden_windows()
        # Reconnects: a Poisson process, kept clear of the hidden uploads.
        n = rng.poisson(self.phone.chat.reconnects_per_day * self.s.days)
        cuts = np.sort(rng.uniform(p.t0 + 600, p.t_end - 600, n))
        cuts = [x for x in cuts if not any(s - 120 < x < e + 120 for s, e, _ in windows)]
        bounds = [p.t0 + float(rng.uniform(2, 30)), *cuts, p.t_end]
        events = self.chat_messages(rng)
        event_times = np.array([e[0] for e in events])
        for i in range(len(bounds) - 1):
            start, stop = bounds[i] + (float(rng.uniform(1, 15)) if i else 0.0), bounds[i + 1]
            conn = self.tls("chat", start, self.phone.chat.server_name, self.phone.chat.port, rng)
            p.chat_sessions.append(conn)
            conn.send(conn.cursor + 0.01, UP, int(rng.integers(300, 700)), self.up_rate)
            conn.send(conn.cursor + 0.02, DOWN, int(rng.integers(500, 4000)), self.down_rate)
            lo, hi = np.searchsorted(event_times, [conn.cursor, stop - 2])
            here = [w for w in windows if start <= w[0] < stop or (i == 0 and w[0] < start)]
            self.chat_session(conn, stop, events[lo:hi], here, rng)

    def hidden_windows(self) -> list[tuple[float, float, Upload]]:
        """When each hidden upload runs (start, end); one at a time."""
        windows: list[tuple[float, float, Upload]] = []
        for t, upload in sorted(self.hidden, key=lambda item: item[0]):
            if windows and t < windows[-1][1] + 10:
                t = windows[-1][1] + 10
            end = t + -(-upload.payload_bytes // MSS) * MSS / self.up_rate + 1
            windows.append((t, end, upload))
        return windows

    def chat_messages(self, rng: np.random.Generator) -> list[tuple[float, int, int]]:
        """User messages (time, direction, bytes) in bursts through the day, each answered by a
        small receipt."""
        events = []
        for start in self.daily_times(self.phone.activity.messages_per_day / 5, rng):
            t = float(start)
            for _ in range(int(rng.integers(1, 10))):
                direction = int(rng.random() < 0.5)
                size = int(np.clip(rng.lognormal(np.log(350), 1.0), 60, 16000))
                events.append((t, direction, size))
                events.append((t + 0.05 + float(rng.exponential(0.3)), 1 - direction, 61))
                t += float(rng.exponential(25))
        return sorted(events)

    def chat_session(self, conn: Conn, stop: float, messages: list[tuple[float, int, int]],
                     hidden: list[tuple[float, float, Upload]], rng: np.random.Generator) -> None:
        """Keepalives every few minutes with the messages between; a hidden upload holds the
        rest back while it runs."""
        keepalive = self.phone.chat.keepalive_s
        ka = np.arange(conn.cursor + keepalive, stop - 5, keepalive)
        ka = ka + rng.uniform(-0.1, 0.1, len(ka)) * keepalive
        items: list[tuple[float, int, int, Upload | None]] = [
            *((float(t), UP, -1, None) for t in ka),
            *((t, direction, size, None) for t, direction, size in messages),
        ]
        for ws, we, _ in hidden:
            items = [it for it in items if not ws - 3 < it[0] < we + 5]
        items += [(ws, UP, upload.payload_bytes, upload) for ws, _, upload in hidden]
        for t, direction, size, upload in sorted(items, key=lambda it: it[0]):
            if size < 0:  # keepalive ping and pong
                conn.send(max(t, conn.cursor), UP, 41, self.up_rate)
                conn.send(conn.cursor + 0.001, DOWN, 41, self.down_rate)
            elif upload is None:
                rate = self.up_rate if direction == UP else self.down_rate
                conn.send(max(t, conn.cursor), direction, size, rate)
            else:
                upload.conn = conn
                upload.msg_index = len(conn.msg_t)
                conn.send(max(t, conn.cursor), UP, size, self.up_rate)
                conn.send(conn.cursor + 0.05, DOWN, 61, self.down_rate)
                self.plan.uploads.append(upload)
        if stop >= self.plan.t_end:
            conn.close, conn.t_close = "none", conn.cursor
        else:
            conn.close = "rst" if rng.random() < 0.5 else "fin"
            conn.t_close = max(stop, conn.cursor + 0.01)

    # -- confounders -----------------------------------------------------------------------------

    def media(self) -> None:
        """Photos, voice notes and videos: mostly downloads, irregular, mostly by day."""
        rng = self.rng("media")
        a = self.phone.activity
        for t in self.daily_times(a.media_per_day, rng):
            name = MEDIA_NAMES[int(rng.integers(len(MEDIA_NAMES)))]
            conn = self.tls("media", float(t), name, 443, rng)
            size = int(np.clip(rng.lognormal(np.log(a.media_median_kb * 1000), 1.3), 3000, 60e6))
            if rng.random() < a.media_upload_share:
                self.exchange(conn, conn.cursor + 0.01, size + 700, int(rng.integers(300, 900)))
            else:
                self.exchange(conn, conn.cursor + 0.01, int(rng.integers(400, 900)), size)
            self.finish(conn, float(rng.uniform(2, 60)), rng)

    def doze_windows(self) -> list[tuple[float, float, list[float]]]:
        """Per night: idle start and end, and the maintenance windows (after 1, 2, 4, then 6 h)."""
        a = self.phone.activity
        out = []
        for day in range(-1, self.s.days):
            midnight = self.s.local_midnight(day)
            start = midnight + a.doze_start_s + (86400 if a.doze_start_s < 12 * 3600 else 0)
            end = midnight + 86400 + a.doze_end_s if a.doze_end_s < a.doze_start_s else \
                midnight + a.doze_end_s
            if start >= end:
                continue
            windows, t, steps = [], start, [3600, 7200, 14400]
            while True:
                t += steps.pop(0) if steps else 6 * 3600
                if t >= end:
                    break
                windows.append(t)
            out.append((start, end, windows))
        return out

    def telemetry(self) -> None:
        """OS beacons every ~4.5 min while awake; batched into maintenance windows in Doze."""
        rng = self.rng("telemetry")
        p = self.plan
        interval = self.phone.activity.telemetry_interval_s
        dozes = self.doze_windows()
        starts: list[float] = []
        t = p.t0 + float(rng.uniform(5, interval))
        while t < p.t_end - 60:
            if not any(s <= t < e for s, e, _ in dozes):
                starts.append(t)
            t += interval * float(rng.uniform(0.7, 1.3))
        for s, e, windows in dozes:
            for w in [s, *windows, e]:
                if p.t0 < w < p.t_end - 300:
                    starts += list(w + np.sort(rng.uniform(0, 60, int(rng.integers(3, 9)))))
        weights = TELEMETRY_WEIGHTS / TELEMETRY_WEIGHTS.sum()
        for t in sorted(starts):
            name = TELEMETRY_NAMES[int(rng.choice(len(TELEMETRY_NAMES), p=weights))]
            conn = self.tls("telemetry", float(t), name, 443, rng)
            for _ in range(int(rng.integers(1, 3))):
                self.exchange(conn, conn.cursor + float(rng.uniform(0.01, 2)),
                              int(rng.integers(300, 6000)), int(rng.integers(200, 12000)))
            self.finish(conn, float(rng.uniform(0.5, 20)), rng)

    def quic(self) -> None:
        """Short QUIC flows (video previews): a real client Initial, then mostly downloads."""
        rng = self.rng("quic")
        for t in self.daily_times(self.phone.activity.quic_per_day, rng):
            name = QUIC_NAMES[int(rng.integers(len(QUIC_NAMES)))]
            blob = self.plan.blobs.add(wire.quic_initial(name, rng))
            n = int(rng.integers(6, 80))
            times = float(t) + np.concatenate([[0.0], np.cumsum(rng.exponential(0.02, n - 1))])
            up = [1] + [int(i % 4 == 0) for i in range(1, n)]
            sizes = [len(self.plan.blobs.data[blob])] + [
                int(rng.integers(30, 60)) if u else int(rng.integers(200, 1252)) for u in up[1:]]
            self.plan.quic.append(QuicFlow(float(t), name, times.tolist(), up, sizes, blob,
                                           self.index))

    # -- naming and numbering --------------------------------------------------------------------

    def name_and_number(self) -> None:
        """In time order: a DNS lookup when the cached answer expired, a client port, ISNs."""
        rng = self.rng("dns")
        p = self.plan
        cache: dict[str, float] = {}
        port = int(rng.integers(32768, 61000))
        flows: list[Conn | QuicFlow] = [*p.conns[self.first_conn:], *p.quic[self.first_quic:]]
        for conn in sorted(flows, key=lambda c: c.t_open):
            addresses, cnames, ttl = wire.endpoint(conn.server_name)
            conn.server_ip = addresses[0]
            addresses6 = self.addresses6(conn.server_name)
            if isinstance(conn, Conn) and conn.v6:  # a job's chosen family
                conn.server_ip = addresses6[0]
            elif (isinstance(conn, Conn) and conn.tag in ("media", "telemetry") and addresses6
                    and rng.random() < self.phone.activity.ipv6_share):
                conn.v6, conn.server_ip = True, addresses6[0]
            if isinstance(conn, Conn) and conn.v6:
                conn.client_ip6 = self.source6(conn.t_open)
            if cache.get(conn.server_name, -1.0) < conn.t_open:
                q = conn.t_open - float(rng.uniform(0.03, 0.2))
                answered = q + float(rng.uniform(0.002, 0.025))
                for qtype in (1, 28):
                    txid = int(rng.integers(0, 65536))
                    qport = int(rng.integers(32768, 61000))  # Android ephemeral ports
                    query = p.blobs.add(wire.dns_query(txid, conn.server_name, qtype))
                    answer = p.blobs.add(wire.dns_answer(
                        txid, conn.server_name, qtype,
                        addresses if qtype == 1 else addresses6, cnames, ttl))
                    p.dns.append((q, 1, qport, query, self.index))
                    p.dns.append((answered + (0.0007 if qtype == 28 else 0), 0, qport, answer,
                                  self.index))
                cache[conn.server_name] = answered + ttl
            port += int(rng.integers(1, 40))
            if port > 60999:
                port -= 60999 - 32768
            conn.client_port = port
            if isinstance(conn, Conn):
                conn.isn = (int(rng.integers(0, 2**32)), int(rng.integers(0, 2**32)))
