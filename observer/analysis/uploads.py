"""Bulk upload events: runs of activity bins in which a device sends much more than it usually does.

A bin is "hot" when its upstream rate is at least ``baseline_factor`` times the device's baseline
(the median upstream rate of its bins that sent anything), or at least the absolute
``absolute_rate_bytes_per_s`` whatever the baseline: a device that sends little besides its
uploads has its uploads as its baseline, and the relative rule alone would call none of them hot.
Hot bins towards one endpoint group (across all its connections, including a chat connection that
stays open for days) merge into one run while they are less than ``merge_gap_s`` apart.  A run is
a bulk upload event when it moved at least ``upload_floor_bytes`` upstream and ``upload_ratio``
times more up than down.

A connection without activity rows (a Zeek or PCAPdroid import knows only totals) is treated as
one block spread evenly over its duration, and its events say so (``from_totals``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from observer.config import Thresholds

EVENT_COLUMNS = ["key", "device", "ts_start", "ts_end", "bytes_up", "bytes_down", "server_name",
                 "conn_ids", "bins", "from_totals"]


def blocks(activity: pd.DataFrame, connections: pd.DataFrame, bin_s: float) -> pd.DataFrame:
    """Activity bins, plus one pseudo-bin per connection that has no activity rows."""
    activity = activity.reset_index(drop=True)
    act = pd.DataFrame({
        "conn_id": activity["conn_id"].astype("string"),
        "ts": activity["ts_bin"].astype(float),
        "dur": activity["bin_s"].fillna(bin_s).astype(float),
        "up": activity["bytes_up"].fillna(0).astype(float),
        "down": activity["bytes_down"].fillna(0).astype(float),
        "from_totals": False,
    })
    binned = set(act["conn_id"].dropna().unique())
    bare = connections[~connections["conn_id"].isin(binned)]
    dur = (bare["ts_end"].fillna(bare["ts_start"]) - bare["ts_start"]).astype(float)
    totals = pd.DataFrame({
        "conn_id": bare["conn_id"].astype("string"),
        "ts": bare["ts_start"].astype(float),
        "dur": np.maximum(dur.to_numpy(), bin_s),
        "up": bare["bytes_up"].fillna(0).astype(float),
        "down": bare["bytes_down"].fillna(0).astype(float),
        "from_totals": True,
    })
    frames = [f for f in (act, totals) if len(f)]
    out = pd.concat(frames, ignore_index=True) if frames else act
    names = connections.drop_duplicates("conn_id").set_index("conn_id")
    out["server_name"] = out["conn_id"].map(names["server_name"]).astype("string")
    device = out["conn_id"].map(names["device"])
    if len(activity):
        device = device.fillna(pd.Series(activity["device"].to_numpy(), index=act.index))
    out["device"] = device.fillna("unknown").astype("string")
    return out


def device_baseline(blk: pd.DataFrame) -> pd.Series:
    """Median upstream rate (bytes/s) of each device's blocks that sent anything."""
    sending = blk[blk["up"] > 0]
    return (sending["up"] / sending["dur"]).groupby(sending["device"]).median()


def bulk_events(blk: pd.DataFrame, groups: pd.DataFrame, thresholds: Thresholds) -> pd.DataFrame:
    """Bulk upload events per endpoint group key (see the module docstring).

    ``blk`` comes from :func:`blocks` with a ``device`` column; ``groups`` from
    :func:`observer.analysis.groups.endpoint_groups` (a connection may sit in two groups: its
    endpoint and its app).
    """
    if blk.empty:
        return pd.DataFrame(columns=EVENT_COLUMNS)
    base = device_baseline(blk)
    rate = blk["up"] / blk["dur"]
    relative = blk["device"].map(base).fillna(0.0) * thresholds.baseline_factor
    floor = np.minimum(relative, thresholds.absolute_rate_bytes_per_s)
    hot = blk[(blk["up"] > 0) & (rate >= floor)]
    hot = hot.merge(groups[["conn_id", "key"]], on="conn_id", how="inner")
    if hot.empty:
        return pd.DataFrame(columns=EVENT_COLUMNS)
    hot = hot.sort_values(["key", "ts"], kind="stable").reset_index(drop=True)
    end = hot["ts"] + hot["dur"]
    prev_end = end.groupby(hot["key"]).cummax().groupby(hot["key"]).shift()
    new = prev_end.isna() | (hot["ts"] - prev_end > thresholds.merge_gap_s)
    hot["event"] = new.cumsum()
    hot["end"] = end
    by_event = hot.groupby("event", sort=True)
    events = by_event.agg(
        key=("key", "first"), device=("device", "first"), ts_start=("ts", "min"),
        ts_end=("end", "max"), bytes_up=("up", "sum"), bytes_down=("down", "sum"),
        bins=("ts", "size"), from_totals=("from_totals", "any"),
    )
    keep = (events["bytes_up"] >= thresholds.upload_floor_bytes) & (
        events["bytes_up"] >= thresholds.upload_ratio * events["bytes_down"]
    )
    events = events[keep]
    if events.empty:
        return pd.DataFrame(columns=EVENT_COLUMNS)
    mine = hot[hot["event"].isin(events.index)]
    events["conn_ids"] = mine.groupby("event")["conn_id"].unique().map(sorted)
    per_name = mine.groupby(["event", "server_name"], dropna=False)["up"].sum().reset_index()
    per_name = per_name.sort_values("up", ascending=False).drop_duplicates("event")
    events["server_name"] = per_name.set_index("event")["server_name"]
    events["bytes_up"] = events["bytes_up"].round().astype("int64")
    events["bytes_down"] = events["bytes_down"].round().astype("int64")
    return events.reset_index(drop=True)[EVENT_COLUMNS]


def contacts(blk: pd.DataFrame, groups: pd.DataFrame, min_gap_s: float) -> pd.DataFrame:
    """Times a device sent anything to a group (for heartbeats): sending blocks and connection
    starts, those closer than ``min_gap_s`` merged.  Returns columns key, ts."""
    sending = blk.loc[blk["up"] > 0, ["conn_id", "ts"]]
    sending = sending.merge(groups[["conn_id", "key"]], on="conn_id", how="inner")
    sending = sending.sort_values(["key", "ts"], kind="stable")
    gap = sending["ts"] - sending.groupby("key")["ts"].shift()
    first = gap.isna() | (gap >= min_gap_s)
    return sending.loc[first, ["key", "ts"]].reset_index(drop=True)
