"""Synthetic records and findings for the report tests, and a test that they mean what they say.

A phone on a lab network for some days: a chat socket with keepalives, a nightly backup to Google
Drive, a nightly upload to an unknown analytics host, daytime browsing, some unnamed addresses, and
capture sessions with one gap.  Used until a full simulate -> replay -> analyze path is available.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from observer.analysis.findings import endpoint_labels
from observer.analysis.groups import endpoint_groups
from observer.catalog import Catalog
from observer.records import conform
from observer.words import verdict_sentence

TZ = "Europe/Berlin"
T0 = datetime(2026, 11, 2, 0, 0, tzinfo=ZoneInfo(TZ)).timestamp()
BIN = 10.0


def _bins(conn_id: str, start: float, seconds: float, up: float, down: float) -> dict:
    n = max(1, int(seconds // BIN))
    ts = np.floor(start / BIN) * BIN + BIN * np.arange(n)
    return {
        "conn_id": np.full(n, conn_id, dtype=object),
        "ts_bin": ts,
        "bin_s": np.full(n, BIN),
        "bytes_up": np.full(n, int(up / n)),
        "bytes_down": np.full(n, int(down / n)),
    }


def synthetic_records(
    days: int = 7,
    seed: int = 1,
    *,
    browsing_per_day: int = 120,
    names: dict[str, str] | None = None,
) -> dict[str, pd.DataFrame]:
    """Records of ``days`` days; ``names`` overrides server names (for hostile-name tests)."""
    rng = np.random.default_rng(seed)
    names = {
        "backup": "backup.googleapis.com",
        "export": "collect.tracker-example.com",
        "chat": "g.whatsapp.net",
        **(names or {}),
    }
    conns: list[dict] = []
    bins: list[dict] = []

    def conn(cid, name, ip, start, seconds, up, down, proto="tcp", port=443):
        conns.append(
            {
                "conn_id": cid,
                "source": "pcap",
                "device": "pixel-7",
                "proto": proto,
                "client_ip": "10.0.0.23",
                "client_port": int(rng.integers(30000, 60000)),
                "server_ip": ip,
                "server_port": port,
                "ts_start": start,
                "ts_end": start + seconds,
                "bytes_up": int(up),
                "bytes_down": int(down),
                "server_name": name,
                "name_source": "sni" if name else "none",
                "tls": "passthrough",
            }
        )
        bins.append(_bins(cid, start, seconds, up, down))

    end = T0 + days * 86400
    # The chat socket: one connection per day with a keepalive every ~270 s.
    for d in range(days):
        cid = f"chat-{d}"
        ts = T0 + d * 86400 + np.arange(0, 86400, 270.0)
        conns.append(
            {
                "conn_id": cid,
                "source": "pcap",
                "device": "pixel-7",
                "proto": "tcp",
                "client_ip": "10.0.0.23",
                "client_port": 40000 + d,
                "server_ip": "157.240.1.53",
                "server_port": 5222,
                "ts_start": float(ts[0]),
                "ts_end": float(ts[-1] + BIN),
                "bytes_up": 90 * len(ts),
                "bytes_down": 120 * len(ts),
                "server_name": names["chat"],
                "name_source": "sni",
                "tls": "passthrough",
            }
        )
        bins.append(
            {
                "conn_id": np.full(len(ts), cid, dtype=object),
                "ts_bin": ts,
                "bin_s": np.full(len(ts), BIN),
                "bytes_up": np.full(len(ts), 90),
                "bytes_down": np.full(len(ts), 120),
            }
        )
    for d in range(days):
        day = T0 + d * 86400
        if d != 3:  # one night without a backup
            conn(
                f"backup-{d}",
                names["backup"],
                "142.250.1.95",
                day + 2 * 3600 + rng.normal(0, 300),
                300,
                48e6 + rng.normal(0, 2e6),
                0.4e6,
            )
        conn(
            f"export-{d}",
            names["export"],
            "203.0.113.7",
            day + 3.5 * 3600 + rng.normal(0, 120),
            60,
            9e6 + rng.normal(0, 5e5),
            0.05e6,
        )
        for k in range(browsing_per_day):
            start = day + 7 * 3600 + rng.uniform(0, 15 * 3600)
            host = [
                "www.example.org",
                "cdn.fastly-example.net",
                "mmg.whatsapp.net",
                "i.ytimg.com",
                None,
            ][k % 5]
            ip = f"198.51.100.{k % 50}" if host is None else f"192.0.2.{k % 200}"
            conn(
                f"web-{d}-{k}",
                host,
                ip,
                start,
                rng.uniform(10, 120),
                rng.uniform(2e3, 40e3),
                rng.uniform(2e4, 2e6),
            )
    sessions = pd.DataFrame(
        [
            {
                "session_id": "s1",
                "source": "live",
                "device": "pixel-7",
                "ts_start": T0 - 600,
                "ts_end": T0 + 3 * 86400 + 12 * 3600,
                "interface": "veth-lab",
                "packets_captured": 1_000_000,
                "packets_dropped": 12,
            },
            {
                "session_id": "s2",
                "source": "live",
                "device": "pixel-7",
                "ts_start": T0 + 3 * 86400 + 15 * 3600,
                "ts_end": end + 600,
                "interface": "veth-lab",
                "packets_captured": 1_200_000,
                "packets_dropped": 0,
            },
        ]
    )
    activity = pd.DataFrame({k: np.concatenate([b[k] for b in bins]) for k in bins[0]})
    activity["device"] = "pixel-7"
    return {
        "connections": conform("connections", pd.DataFrame(conns)),
        "activity": conform("activity", activity),
        "sessions": conform("sessions", sessions),
    }


def synthetic_findings(
    records: dict[str, pd.DataFrame], names: dict[str, str] | None = None
) -> dict:
    """Findings as docs/findings.md describes them, for the synthetic records above."""
    conns = records["connections"]
    names = {
        "backup": "backup.googleapis.com",
        "export": "collect.tracker-example.com",
        "chat": "g.whatsapp.net",
        **(names or {}),
    }

    def events(prefix: str) -> list[dict]:
        rows = conns[conns["conn_id"].str.startswith(prefix)]
        return [
            {
                "ts_start": float(r.ts_start),
                "ts_end": float(r.ts_end),
                "bytes_up": int(r.bytes_up),
                "bytes_down": int(r.bytes_down),
                "server_name": r.server_name,
                "conn_ids": [r.conn_id],
            }
            for r in rows.itertuples()
        ]

    days = round(float(conns["ts_end"].max() - T0) / 86400)
    findings = {
        "schema_version": 2,
        "timezone_configured": True,
        # The analysis's own labels of every endpoint, as analyze would store them.
        "labels": [asdict(x) for x in endpoint_labels(conns, endpoint_groups(conns, Catalog()))],
        "generated_at": T0 + days * 86400,
        "timezone": TZ,
        "parameters": {
            "periods_tried_s": [3600, 21600, 43200, 86400, 604800],
            "groups_tested": 7,
            "upload_floor_bytes": 1_000_000,
        },
        "coverage": {
            "ts_start": T0,
            "ts_end": T0 + days * 86400,
            "covered_s": days * 86400 - 10800,
            "gaps": [[T0 + 3 * 86400 + 12 * 3600, T0 + 3 * 86400 + 15 * 3600]],
        },
        "findings": [
            {
                "group": "Google Drive backup",
                "group_kind": "service",
                "service": "Google Drive backup",
                "organization": "Google",
                "category": "backup",
                "names": [names["backup"]],
                "server_ips": ["142.250.1.95"],
                "verdict": "periodic bulk upload",
                "is_backup": True,
                "period_s": 86400.0,
                "phase_s": 3600.0,
                "phase_local": "02:00",
                "jitter_s": 300.0,
                "occurrences": days - 1,
                "expected": days,
                "typical_bytes": 48_000_000,
                "p_value": 0.0004,
                "p_value_raw": 0.00001,
                "confidence": "high",
                "summary": "",
                "connections": days - 1,
                "bytes_up": 0,
                "bytes_down": 0,
                "events": events("backup-"),
            },
            {
                "group": "tracker-example.com",
                "group_kind": "name",
                "service": "tracker-example.com",
                "organization": None,
                "category": None,
                "names": [names["export"]],
                "server_ips": ["203.0.113.7"],
                "verdict": "periodic bulk upload",
                "is_backup": False,
                "period_s": 86400.0,
                "phase_s": 9000.0,
                "phase_local": "03:30",
                "jitter_s": 120.0,
                "occurrences": days,
                "expected": days,
                "typical_bytes": 9_000_000,
                "p_value": 0.0002,
                "p_value_raw": 0.000005,
                "confidence": "high",
                "summary": "",
                "connections": days,
                "bytes_up": 0,
                "bytes_down": 0,
                "events": events("export-"),
            },
            {
                "group": "WhatsApp",
                "group_kind": "service",
                "service": "WhatsApp",
                "organization": "Meta",
                "category": "messaging",
                "names": [names["chat"]],
                "server_ips": ["157.240.1.53"],
                "verdict": "nothing notable",
                "is_backup": False,
                "period_s": None,
                "phase_s": None,
                "phase_local": None,
                "jitter_s": None,
                "occurrences": 0,
                "expected": None,
                "typical_bytes": None,
                "p_value": None,
                "p_value_raw": None,
                "confidence": "none",
                "summary": "",
                "connections": days,
                "bytes_up": 0,
                "bytes_down": 0,
                "events": [],
            },
        ],
    }
    for finding in findings["findings"]:  # the sentence the analysis would store
        finding["summary"] = verdict_sentence(finding, TZ)
    return findings


def test_synthetic_records_follow_the_schema_and_hold_the_nightly_uploads():
    records = synthetic_records(days=3, browsing_per_day=5)
    conns = records["connections"]
    assert list(conns.columns) == list(conform("connections", pd.DataFrame()).columns)
    backups = conns[conns["conn_id"].str.startswith("backup-")]
    assert len(backups) == 3 and (backups["bytes_up"] > 40e6).all()
    act = records["activity"]
    per_conn = act.groupby("conn_id")["bytes_up"].sum()
    assert abs(per_conn["backup-0"] - backups.iloc[0]["bytes_up"]) < 100
