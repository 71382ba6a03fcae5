"""Plan a scenario, write its pcap day by day in time order, and its ground truth beside it."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from observer import ObserverError, __version__
from observer.simulate import wire
from observer.simulate.packets import (
    PACKET,
    UP,
    Conn,
    PcapWriter,
    V6Addresses,
    build_tables,
    expand,
    to_us,
)
from observer.simulate.plan import Plan, Planner, Upload
from observer.simulate.scenario import Scenario

CHUNK_S = 6 * 3600  # packets are generated, sorted and written six hours at a time


def truth_path(out_pcap: Path) -> Path:
    """``capture.pcap`` -> ``capture.truth.json``."""
    return out_pcap.with_name(out_pcap.stem + ".truth.json")


def simulate(scenario: Scenario, out_pcap: Path, progress: bool | None = None) -> Path:
    """Write the scenario's capture to ``out_pcap`` and its ground truth; returns the truth path."""
    out_pcap = Path(out_pcap)
    if out_pcap.is_dir():
        raise ObserverError(f"{out_pcap} is a directory; give a file name such as week.pcap")
    plan = Planner(scenario).run()
    device_ip = wire.ip_to_int(scenario.device_ip)
    v6 = V6Addresses(scenario.device_ipv6)
    tables = build_tables(plan.conns, device_ip, v6,
                          plan.datagram_rows(device_ip, wire.ip_to_int(scenario.gateway_ip)))

    # Time chunks: every message, control packet and datagram goes to the chunk of its own start
    # time, and all of its packets come later, so packets before a chunk's end are final.
    ends = to_us(plan.t0 + CHUNK_S * np.arange(1, scenario.days * 86400 // CHUNK_S + 1))
    msg_chunk = np.searchsorted(ends, to_us(tables.msg_t), side="right")
    ctl_chunk = np.searchsorted(ends, tables.ctl["ts_us"], side="right")
    udp_chunk = np.searchsorted(ends, tables.datagrams["ts_us"], side="right")
    gaps = [(int(to_us(s)), int(to_us(e))) for s, e in plan.gaps]
    if progress is None:
        progress = sys.stderr.isatty()
    chunks = range(len(ends) + 1)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc=f"simulating {scenario.name}", unit="chunk", leave=False)

    out_pcap.parent.mkdir(parents=True, exist_ok=True)
    partial = out_pcap.with_name(out_pcap.name + ".partial")
    try:
        with open(partial, "wb") as out:
            writer = PcapWriter(out, plan.blobs, v6, scenario.device_mac, scenario.gateway_mac)
            carry = np.zeros(0, PACKET)
            for k in chunks:
                fresh = np.concatenate([tables.ctl[ctl_chunk == k],
                                        tables.datagrams[udp_chunk == k],
                                        expand(tables, msg_chunk == k)])
                packets = np.concatenate([carry, fresh])
                packets = packets[np.argsort(packets["ts_us"], kind="stable")]
                for start, end in gaps:
                    ts = packets["ts_us"]
                    packets = packets[(ts < start) | (ts >= end)]
                cut = len(packets) if k >= len(ends) else int(
                    np.searchsorted(packets["ts_us"], ends[k], side="left"))
                writer.write(packets[:cut])
                carry = packets[cut:]
        os.replace(partial, out_pcap)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ObserverError(f"cannot write {out_pcap}: {exc.strerror or exc}") from None
    except BaseException:  # interrupted: leave no half-written capture behind
        partial.unlink(missing_ok=True)
        raise
    truth = ground_truth(plan, writer.packets, writer.wire_bytes)
    path = truth_path(out_pcap)
    path.write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    return path


def _ts(seconds: float) -> float:
    return int(to_us(seconds)) / 1e6


def _local(seconds: float, scenario: Scenario) -> str:
    return dt.datetime.fromtimestamp(seconds, scenario.tz).isoformat(timespec="seconds")


def upload_record(upload: Upload, scenario: Scenario) -> dict[str, Any]:
    conn: Conn = upload.conn
    if upload.msg_index is None:
        start, end = conn.t_open, conn.t_last
        bytes_up = sum(n for n, d in zip(conn.msg_len, conn.msg_dir, strict=True) if d == UP)
    else:
        i = upload.msg_index
        start = conn.msg_t[i]
        bytes_up = conn.msg_len[i]
        end = start + (-(-bytes_up // 1460) - 1) * conn.msg_spacing[i]
    return {
        "job": upload.job.name,
        "kind": upload.job.kind,
        "occurrence": upload.occurrence,
        "ts_start": _ts(start),
        "ts_end": _ts(end),
        "local_time": _local(start, scenario),
        "nominal_local_time": _local(upload.nominal, scenario),
        "bytes_up": int(bytes_up),
        "payload_bytes": upload.payload_bytes,
        "server_name": conn.server_name,
        "server_ip": conn.server_ip,
        "server_port": conn.server_port,
        "client_port": conn.client_port,
        "inside_long_lived": upload.msg_index is not None,
    }


def dst_changes(scenario: Scenario, t0: float, t_end: float) -> list[dict[str, Any]]:
    """Clock changes inside the capture, found to the second."""
    tz = scenario.tz

    def offset(t: float) -> float:
        return dt.datetime.fromtimestamp(t, tz).utcoffset().total_seconds()

    out = []
    t = t0
    while t < t_end:
        step = min(900.0, t_end - t)
        if offset(t + step) != offset(t):
            lo, hi = t, t + step
            while hi - lo > 1:
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if offset(mid) == offset(t) else (lo, mid)
            out.append({"ts": round(hi), "utc": dt.datetime.fromtimestamp(round(hi), dt.UTC)
                        .isoformat(), "offset_before_s": offset(t), "offset_after_s": offset(hi)})
        t += step
    return out


def ground_truth(plan: Plan, packets: int, wire_bytes: int) -> dict[str, Any]:
    s = plan.scenario
    uploads, missed = [], list(plan.missed)
    for upload in sorted(plan.uploads, key=lambda u: u.conn.t_open if u.msg_index is None
                         else u.conn.msg_t[u.msg_index]):
        record = upload_record(upload, s)
        if any(record["ts_start"] < e and record["ts_end"] >= g for g, e in plan.gaps):
            missed.append({"job": record["job"], "kind": record["kind"],
                           "occurrence": record["occurrence"], "nominal_ts": _ts(upload.nominal),
                           "local_time": record["local_time"], "reason": "in a capture gap"})
        else:
            uploads.append(record)
    missed.sort(key=lambda m: m["nominal_ts"])
    chat = [{"client_port": c.client_port, "ts_start": _ts(c.t_open),
             "ts_end": _ts(c.t_last if c.close != "none" else c.cursor), "close": c.close}
            for c in plan.chat_sessions]
    return {
        "generator": f"observer {__version__} simulate",
        "scenario": {
            "name": s.name, "description": s.description, "source": s.source, "days": s.days,
            "start": s.start.isoformat(), "seed": s.seed,
            "jobs": [{**job.__dict__, "skip_dates": [d.isoformat() for d in job.skip_dates],
                      "skip": list(job.skip)} for job in s.jobs],
            "chat": s.chat.__dict__, "activity": s.activity.__dict__,
        },
        "timezone": s.timezone,
        "device": {"name": s.device, "ip": s.device_ip, "ipv6": s.device_ipv6,
                   "mac": s.device_mac},
        "resolver_ip": s.gateway_ip,
        "capture": {"ts_start": _ts(plan.t0), "ts_end": _ts(plan.t_end), "packets": packets,
                    "wire_bytes": wire_bytes},
        "capture_gaps": [[_ts(a), _ts(b)] for a, b in plan.gaps],
        "dst_changes": dst_changes(s, plan.t0, plan.t_end),
        "chat": {"server_name": s.chat.server_name,
                 "server_ip": wire.endpoint(s.chat.server_name)[0][0],
                 "server_port": s.chat.port, "sessions": chat},
        "uploads": uploads,
        "missed": missed,
    }
