"""Plan a scenario, write its pcap day by day in time order, and its ground truth beside it."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, BinaryIO

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
from observer.simulate.plan import Plan, Upload, plan_scenario
from observer.simulate.scenario import Job, Scenario

CHUNK_S = 6 * 3600  # packets are generated, sorted and written six hours at a time


def truth_path(out_pcap: Path) -> Path:
    """``capture.pcap`` -> ``capture.truth.json`` (a rotated capture's folder ``fleet`` ->
    ``fleet.truth.json`` beside it)."""
    return out_pcap.with_name(out_pcap.stem + ".truth.json")


def rotated_name(scenario: Scenario, ts: float) -> str:
    """The file of a rotated capture that starts at ``ts``: ``<name>-YYYYmmddTHHMMSSZ.pcap``."""
    utc = dt.datetime.fromtimestamp(ts, dt.UTC)
    return f"{_stem(scenario)}-{utc:%Y%m%dT%H%M%SZ}.pcap"


def _stem(scenario: Scenario) -> str:
    """The scenario's name as a safe file name part (a name is free text)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", scenario.name).lstrip(".") or "capture"


def simulate(scenario: Scenario, out_pcap: Path, progress: bool | None = None) -> Path:
    """Write the scenario's capture to ``out_pcap`` and its ground truth; returns the truth path.

    A scenario with ``rotate`` writes a folder ``out_pcap`` of files, one per rotation period
    (none for a period without packets, as when the capture host was down)."""
    out_pcap = Path(out_pcap)
    if out_pcap.is_dir() and not scenario.rotate_s:
        raise ObserverError(f"{out_pcap} is a directory; give a file name such as week.pcap")
    if scenario.rotate_s and out_pcap.exists() and not out_pcap.is_dir():
        raise ObserverError(f"{out_pcap} is a file; scenario {scenario.name!r} rotates its "
                            "capture and needs a folder name such as fleet/")
    plan = plan_scenario(scenario)
    device_ips = [wire.ip_to_int(phone.ip) for phone in scenario.phones]
    v6 = V6Addresses()
    tables = build_tables(plan.conns, device_ips, v6,
                          plan.datagram_rows(device_ips, wire.ip_to_int(scenario.gateway_ip)))

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

    sink = _RotatingSink(out_pcap, scenario, plan.t0) if scenario.rotate_s else \
        _SingleSink(out_pcap)
    try:
        writer = PcapWriter(sink.open_first(), plan.blobs, v6,
                            [phone.mac for phone in scenario.phones], scenario.gateway_mac)
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
            sink.write(writer, packets[:cut])
            carry = packets[cut:]
        files = sink.close()
    except OSError as exc:
        sink.discard()
        raise ObserverError(f"cannot write {out_pcap}: {exc.strerror or exc}") from None
    except BaseException:  # interrupted: leave no half-written capture behind
        sink.discard()
        raise
    truth = ground_truth(plan, writer.packets, writer.wire_bytes, files)
    path = truth_path(out_pcap)
    path.write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    return path


class _SingleSink:
    """One pcap file, written under a temporary name and renamed when complete."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.partial = out.with_name(out.name + ".partial")
        self.handle: BinaryIO | None = None

    def open_first(self) -> BinaryIO:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.partial, "wb")  # noqa: SIM115 (closed by close or discard)
        return self.handle

    def write(self, writer: PcapWriter, packets: np.ndarray) -> None:
        writer.write(packets)

    def close(self) -> list[dict[str, Any]]:
        self.handle.close()
        os.replace(self.partial, self.out)
        return []

    def discard(self) -> None:
        if self.handle:
            self.handle.close()
        self.partial.unlink(missing_ok=True)


class _RotatingSink:
    """One file per rotation period (``tcpdump -G``), named by its UTC start; a file is renamed
    from ``.partial`` when the next one starts."""

    def __init__(self, folder: Path, scenario: Scenario, t0: float) -> None:
        self.folder = folder
        self.scenario = scenario
        self.t0 = t0
        self.every_us = int(to_us(scenario.rotate_s))
        self.current = -1
        self.handle: BinaryIO | None = None
        self.files: list[dict[str, Any]] = []
        self.pending = b""

    def open_first(self) -> BinaryIO:
        """The writer's header goes to a buffer until the first file opens."""
        import io

        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob(f"{_stem(self.scenario)}-*T*Z.pcap"):
            old.unlink()  # an earlier run of the same scenario
        return io.BytesIO()

    def write(self, writer: PcapWriter, packets: np.ndarray) -> None:
        if not len(packets):
            return
        index = (packets["ts_us"] - int(to_us(self.t0))) // self.every_us
        for k in np.unique(index):
            if k != self.current:
                self.next_file(writer, int(k))
            before = writer.packets
            writer.write(packets[index == k])
            self.files[-1]["packets"] += writer.packets - before

    def next_file(self, writer: PcapWriter, k: int) -> None:
        self.finish()
        start = self.t0 + k * self.scenario.rotate_s
        name = rotated_name(self.scenario, start)
        self.handle = open(self.folder / (name + ".partial"), "wb")  # noqa: SIM115 (see finish)
        writer.switch(self.handle)
        self.current = k
        self.files.append({"file": name, "ts_start": _ts(start),
                           "ts_end": _ts(start + self.scenario.rotate_s), "packets": 0})

    def finish(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
            partial = self.folder / (self.files[-1]["file"] + ".partial")
            os.replace(partial, partial.with_suffix(""))

    def close(self) -> list[dict[str, Any]]:
        self.finish()
        return self.files

    def discard(self) -> None:
        if self.handle is not None:
            self.handle.close()
        for partial in self.folder.glob("*.pcap.partial"):
            partial.unlink()


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
        "device": scenario.phones[upload.dev].name,
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
        "client_ip": conn.client_ip6 if conn.v6 else scenario.phones[upload.dev].ip,
        "client_port": conn.client_port,
        "family": "ipv6" if conn.v6 else "ipv4",
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


def ground_truth(plan: Plan, packets: int, wire_bytes: int, files: list[dict[str, Any]]
                 ) -> dict[str, Any]:
    s = plan.scenario
    uploads, missed = [], list(plan.missed)
    for upload in sorted(plan.uploads, key=lambda u: u.conn.t_open if u.msg_index is None
                         else u.conn.msg_t[u.msg_index]):
        record = upload_record(upload, s)
        if any(record["ts_start"] < e and record["ts_end"] >= g for g, e in plan.gaps):
            missed.append({"device": record["device"], "job": record["job"],
                           "kind": record["kind"], "occurrence": record["occurrence"],
                           "nominal_ts": _ts(upload.nominal), "local_time": record["local_time"],
                           "reason": "in a capture gap"})
        else:
            uploads.append(record)
    missed.sort(key=lambda m: m["nominal_ts"])
    phones = [phone_truth(plan, i) for i in range(len(s.phones))]
    return {
        "generator": f"observer {__version__} simulate",
        "scenario": {
            "name": s.name, "description": s.description, "source": s.source, "days": s.days,
            "start": s.start.isoformat(), "seed": s.seed, "rotate_s": s.rotate_s,
            "jobs": [job_dict(job, phone.name) for phone in s.phones for job in phone.jobs],
            "chat": s.chat.__dict__, "activity": s.activity.__dict__,
        },
        "timezone": s.timezone,
        "device": {key: phones[0][key] for key in ("name", "ip", "ipv6", "mac")},
        "phones": phones,
        "resolver_ip": s.gateway_ip,
        "capture": {"ts_start": _ts(plan.t0), "ts_end": _ts(plan.t_end), "packets": packets,
                    "wire_bytes": wire_bytes, "files": files},
        "capture_gaps": [[_ts(a), _ts(b)] for a, b in plan.gaps],
        "dst_changes": dst_changes(s, plan.t0, plan.t_end),
        "chat": phones[0]["chat"],
        "uploads": uploads,
        "missed": missed,
    }


def job_dict(job: Job, device: str) -> dict[str, Any]:
    return {"device": device, **job.__dict__, "skip_dates": [d.isoformat() for d in job.skip_dates],
            "skip": list(job.skip)}


def phone_truth(plan: Plan, index: int) -> dict[str, Any]:
    """One phone: its identity, every IPv6 address it used, its chat sessions and jobs."""
    s = plan.scenario
    phone = s.phones[index]
    temporary = plan.temporary[index]
    addresses = [{"address": phone.ipv6, "kind": "stable", "from": _ts(plan.t0),
                  "until": _ts(plan.t_end)}]
    addresses += [{"address": address, "kind": "temporary", "from": _ts(max(start, plan.t0)),
                   "until": _ts(min(temporary[k + 1][0] if k + 1 < len(temporary) else plan.t_end,
                                    plan.t_end))}
                  for k, (start, address) in enumerate(temporary)]
    sessions = [{"client_port": c.client_port, "ts_start": _ts(c.t_open),
                 "ts_end": _ts(c.t_last if c.close != "none" else c.cursor), "close": c.close}
                for c in plan.chat_sessions if c.dev == index]
    chat = phone.chat
    return {
        "name": phone.name, "ip": phone.ip, "ipv6": phone.ipv6, "mac": phone.mac,
        "ipv6_addresses": addresses,
        "exports": sorted({job.name for job in phone.jobs if job.kind == "export"}),
        "jobs": [job.name for job in phone.jobs],
        "chat": {"enabled": chat.enabled, "server_name": chat.server_name,
                 "server_ip": wire.endpoint(chat.server_name)[0][0],
                 "server_port": chat.port, "sessions": sessions},
    }
