"""Endpoint groups: which connections talk to the same party.

A connection's group is its catalog service (from the server name, else the address block the
catalog knows), else the registrable part of its name, else its /24 (IPv4) or /48 (IPv6) block.
Services are what a reader cares about ("WhatsApp", "Google Drive backup"), and a name that the
catalog does not know still groups its sibling hosts (``up1.example.com``, ``up2.example.com``).
When the source attributes connections to apps (PCAPdroid), each app is a group too.
"""

from __future__ import annotations

import ipaddress

import pandas as pd

from observer.catalog import Catalog, normalize

GROUP_COLUMNS = ["conn_id", "device", "group", "group_kind", "service", "organization",
                 "category", "is_backup"]
# Second-level labels under which registrations happen one level deeper (example.co.uk).
_SHARED_SLDS = {"co", "com", "net", "org", "gov", "ac", "edu", "ne", "or"}


def base_domain(name: str) -> str:
    """The registrable part of a name, by a small heuristic (no public-suffix list bundled)."""
    labels = normalize(name).split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SHARED_SLDS:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def address_block(ip: str) -> str | None:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def _classify(name: str | None, ip: str | None, catalog: Catalog) -> tuple:
    endpoint = catalog.match(name, ip)
    if endpoint is not None:
        return (endpoint.service, "service", endpoint.service, endpoint.organization,
                endpoint.category, endpoint.is_backup)
    if name:
        return (base_domain(name), "name", None, None, None, False)
    block = address_block(ip) if ip else None
    return (block or "unknown", "network", None, None, None, False)


def endpoint_groups(connections: pd.DataFrame, catalog: Catalog) -> pd.DataFrame:
    """One row per (connection, group): the endpoint group, plus an app group where known."""
    conns = connections[["conn_id", "device", "server_name", "server_ip", "app"]].copy()
    conns["device"] = conns["device"].fillna("unknown")
    names = conns["server_name"].str.strip().str.lower().str.rstrip(".")
    conns["_name"] = names.where(names.str.len() > 0)
    pairs = conns[["_name", "server_ip"]].drop_duplicates()
    classes = [
        _classify(None if pd.isna(n) else str(n), None if pd.isna(i) else str(i), catalog)
        for n, i in zip(pairs["_name"], pairs["server_ip"], strict=True)
    ]
    labels = pd.DataFrame(classes, columns=GROUP_COLUMNS[2:], index=pairs.index)
    labelled = pd.concat([pairs, labels], axis=1)
    out = conns.merge(labelled, on=["_name", "server_ip"], how="left")
    frames = [out[GROUP_COLUMNS]]
    apps = conns[conns["app"].notna() & (conns["app"].str.len() > 0)]
    if len(apps):
        frames.append(pd.DataFrame({
            "conn_id": apps["conn_id"], "device": apps["device"], "group": apps["app"],
            "group_kind": "app", "service": None, "organization": None, "category": None,
            "is_backup": False,
        }))
    groups = pd.concat(frames, ignore_index=True)
    groups["is_backup"] = groups["is_backup"].fillna(False).astype(bool)
    for col in ("group", "group_kind", "service", "organization", "category"):
        groups[col] = groups[col].astype("string")
    groups["key"] = groups["device"] + "\x1f" + groups["group_kind"] + "\x1f" + groups["group"]
    return groups
