"""Hand-made record tables for the analysis tests (no simulator, no replay), and the whole
analysis run on them."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from observer.records import conform

TZ = "Europe/Berlin"
DEVICE = "phone"


def local(day: dt.date, hour: float, tz: str = TZ) -> float:
    """UTC epoch seconds of a local wall-clock time."""
    midnight = dt.datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(tz))
    wall = midnight + dt.timedelta(hours=hour)  # wall-clock arithmetic: DST shifts the instant
    return wall.timestamp()


class Records:
    """Builds connections and activity rows; ``tables()`` returns conformed frames."""

    def __init__(self, bin_s: float = 10.0) -> None:
        self.bin_s = bin_s
        self.conns: list[dict] = []
        self.bins: list[pd.DataFrame] = []
        self.sessions: list[dict] = []

    def connection(self, conn_id: str, name: str | None, ip: str, start: float, end: float,
                   *, binned: bool = True, up: int = 0, down: int = 0, app: str | None = None
                   ) -> str:
        self.conns.append({"conn_id": conn_id, "source": "pcap", "device": DEVICE, "proto": "tcp",
                           "client_ip": "10.0.0.2", "server_ip": ip, "server_port": 443,
                           "ts_start": start, "ts_end": end, "server_name": name,
                           "bytes_up": up, "bytes_down": down, "app": app,
                           "_binned": binned})
        return conn_id

    def send(self, conn_id: str, start: float, total_up: int, *, rate: float = 2e6,
             down: int = 0) -> None:
        """Upstream bytes from ``start`` at ``rate`` bytes/s, spread over bins."""
        nbins = max(1, int(np.ceil(total_up / (rate * self.bin_s))))
        t0 = np.floor(start / self.bin_s) * self.bin_s
        ups = np.full(nbins, total_up // nbins)
        ups[-1] += total_up - ups.sum()
        downs = np.full(nbins, down // nbins)
        self._add(conn_id, t0 + np.arange(nbins) * self.bin_s, ups, downs)

    def ticks(self, conn_id: str, times: np.ndarray, up: int = 120, down: int = 80) -> None:
        """Small packets (keepalives, beacons) at the given times."""
        t = np.unique(np.floor(np.asarray(times) / self.bin_s) * self.bin_s)
        self._add(conn_id, t, np.full(len(t), up), np.full(len(t), down))

    def _add(self, conn_id: str, ts: np.ndarray, up: np.ndarray, down: np.ndarray) -> None:
        self.bins.append(pd.DataFrame({"conn_id": conn_id, "device": DEVICE, "ts_bin": ts,
                                       "bin_s": self.bin_s, "bytes_up": up, "bytes_down": down}))

    def session(self, start: float, end: float) -> None:
        self.sessions.append({"session_id": f"s{len(self.sessions)}", "source": "pcap",
                              "device": DEVICE, "ts_start": start, "ts_end": end})

    def tables(self) -> dict[str, pd.DataFrame]:
        act = pd.concat(self.bins, ignore_index=True) if self.bins else pd.DataFrame()
        if len(act):
            act = act.groupby(["conn_id", "device", "ts_bin", "bin_s"], as_index=False).sum()
        conns = pd.DataFrame(self.conns)
        binned = set(conns.loc[conns["_binned"], "conn_id"])
        if len(act):
            totals = act.groupby("conn_id")[["bytes_up", "bytes_down"]].sum()
            for col in ("bytes_up", "bytes_down"):
                known = conns["conn_id"].map(totals[col])
                conns[col] = known.where(conns["conn_id"].isin(binned), conns[col]).fillna(0)
            act = act[act["conn_id"].isin(binned)]
        return {
            "connections": conform("connections", conns.drop(columns="_binned")),
            "activity": conform("activity", act),
            "sessions": conform("sessions", pd.DataFrame(self.sessions)),
        }


def phone_week(days: int = 7, *, export_inside_chat: bool = True, export_hour: float = 2.0,
               jitter_min: float = 15.0, skip: tuple[int, ...] = (3,), backup: bool = True,
               media: bool = True, seed: int = 1, start: dt.date = dt.date(2026, 3, 2)
               ) -> tuple[Records, list[float]]:
    """A week of one phone: chat keepalives, beacons, daytime media, a nightly export, a backup.

    Returns the records and the true export start times.
    """
    rng = np.random.default_rng(seed)
    r = Records()
    t0, t1 = local(start, 0), local(start + dt.timedelta(days=days), 0)
    r.session(t0, t1)
    chat = r.connection("chat", "g.whatsapp.net", "157.240.1.53", t0, t1)
    keepalives = np.arange(t0 + 60, t1, 240.0)
    r.ticks(chat, keepalives + rng.uniform(-20, 20, len(keepalives)))
    beacon = r.connection("beacon", "play.googleapis.com", "142.250.1.1", t0, t1)
    r.ticks(beacon, np.arange(t0 + 30, t1, 270.0), up=900, down=400)
    truth = []
    for d in range(days):
        day = start + dt.timedelta(days=d)
        if d not in skip:
            at = local(day, export_hour) + rng.uniform(-jitter_min, jitter_min) * 60
            truth.append(at)
            if export_inside_chat:
                r.send(chat, at, int(rng.uniform(45e6, 55e6)), down=20_000)
            else:
                c = r.connection(f"exp{d}", "sync.example-analytics.net", "203.0.113.7", at,
                                 at + 60)
                r.send(c, at, int(rng.uniform(45e6, 55e6)), down=20_000)
        if backup:
            at = local(day, 3.5) + rng.normal(0, 300)
            c = r.connection(f"bk{d}", "backup.googleapis.com", "142.250.2.2", at, at + 30)
            r.send(c, at, int(rng.uniform(8e6, 16e6)), down=5_000)
        if media:
            for k in range(int(rng.poisson(12))):
                at = local(day, rng.uniform(8, 23))
                c = r.connection(f"m{d}-{k}", "mmg.whatsapp.net", "157.240.9.9", at, at + 20)
                if rng.random() < 0.3:
                    r.send(c, at, int(rng.lognormal(np.log(2e6), 0.8)), down=3_000)
                else:
                    r.ticks(c, [at], up=800, down=int(rng.lognormal(np.log(7e5), 0.8)))
    return r, truth


def quiet_phone(weeks: int = 5, seed: int = 2) -> Records:
    """A phone that sends little besides its jobs: a push ping every 3 hours, a 3 MB sync every
    6 hours from 00:45 and an 80 MB upload on Sundays at 04:15, both at 150 kB/s (so upload bins
    outnumber the others and set the device's median rate)."""
    rng = np.random.default_rng(seed)
    start = dt.date(2026, 3, 2)  # a Monday
    r = Records()
    t0, t1 = local(start, 0), local(start + dt.timedelta(days=7 * weeks), 0)
    r.session(t0, t1)
    push = r.connection("push", "mtalk.google.com", "142.250.3.3", t0, t1)
    r.ticks(push, np.arange(t0 + 100, t1, 3 * 3300.0))
    for k in range(7 * weeks * 4):
        at = local(start, 0.75 + 6 * k) + rng.normal(0, 120)
        c = r.connection(f"sync{k}", f"api{k % 3}.sync-partner.co.uk", "198.51.100.9", at, at + 20)
        r.send(c, at, 3_000_000, rate=150_000, down=8_000)
    for w in range(weeks):
        at = local(start + dt.timedelta(days=7 * w + 6), 4.25) + rng.normal(0, 300)
        c = r.connection(f"week{w}", "weekly.metrics-collector.io", "203.0.113.80", at, at + 300)
        r.send(c, at, 80_000_000, rate=150_000, down=50_000)
    return r


def test_quiet_phone_six_hourly_and_weekly_jobs_end_to_end():
    from observer.analysis import analyze_records
    from observer.catalog import Catalog
    from observer.config import LabConfig

    config = LabConfig(timezone=TZ, timezone_configured=True)
    out = analyze_records(quiet_phone().tables(), config, Catalog(), n_sim=300)
    assert out["timezone"] == TZ and out["timezone_configured"] is True
    by_group = {f["group"]: f for f in out["findings"]}
    sync, weekly = by_group["sync-partner.co.uk"], by_group["metrics-collector.io"]
    assert sync["verdict"] == weekly["verdict"] == "periodic bulk upload"
    assert sync["label"] == "sync-partner.co.uk"
    assert sync["period_s"] == 6 * 3600 and sync["bulk_events"] == 140
    assert sync["phase_local"].split(", ")[0] in {"00:43", "00:44", "00:45", "00:46", "00:47"}
    assert len(sync["phase_local"].split(", ")) == 4
    assert weekly["period_s"] == 7 * 86400 and weekly["occurrences"] == 5
    assert weekly["phase_local"].startswith("Sun 04:")
    periodic = {f["group"] for f in out["findings"] if f["verdict"] == "periodic bulk upload"}
    assert periodic == {"sync-partner.co.uk", "metrics-collector.io"}
