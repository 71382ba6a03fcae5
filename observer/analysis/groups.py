"""Endpoint groups: which connections talk to the same party, and what a reader calls that party.

A connection's group is its catalog service (from the server name, else the address block the
catalog knows), else the registrable domain of its name (from the Public Suffix List, so
``a.example.co.uk`` and ``b.example.co.uk`` are one party, ``example.co.uk``), else the network of
its address (IPv4 /24, IPv6 /48 or the configured prefixes).  A network is labelled as such
("unnamed addresses in 10.0.3.0/24"), never as a domain: an address literal given as a name (an
HTTP Host of ``10.0.3.4``) is an address too.  When the source attributes connections to apps
(PCAPdroid), each app is a group as well.  The label is decided here, once, and carried in the
findings and the report.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import NamedTuple

import pandas as pd
from publicsuffixlist import PublicSuffixList

from observer.catalog import Catalog, normalize

GROUP_COLUMNS = ["conn_id", "device", "group", "group_kind", "label", "service", "organization",
                 "category", "is_backup"]
DEFAULT_PREFIXES = (24, 48)  # IPv4, IPv6 network of an unnamed address


class Group(NamedTuple):
    """One endpoint group: its identity (group, kind), its label for people, catalog facts."""

    group: str
    kind: str  # "service", "name", "network" or "app"
    label: str
    service: str | None = None
    organization: str | None = None
    category: str | None = None
    is_backup: bool = False


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    """The package's bundled snapshot of the Public Suffix List (no network access)."""
    return PublicSuffixList()


def as_address(text: str | None) -> str | None:
    """The address in its usual text form if ``text`` is an IP literal ("[::1]" too), else None."""
    if not text:
        return None
    try:
        return str(ipaddress.ip_address(text.strip().strip("[]")))
    except ValueError:
        return None


def registrable_domain(name: str) -> str:
    """The registrable domain of a DNS name by the Public Suffix List (ICANN and private
    sections, so ``x.blogspot.com`` is its own party); a name that has none (``localhost``, a
    public suffix itself) is its own group."""
    name = normalize(name)
    return _psl().privatesuffix(name) or name


def network_of(ip: str, prefixes: tuple[int, int] = DEFAULT_PREFIXES) -> str | None:
    """The network of an address in CIDR form (``10.0.3.0/24``), None if it is not an address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    prefix = prefixes[0] if addr.version == 4 else prefixes[1]
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def network_label(network: str) -> str:
    return f"unnamed addresses in {network}"


def group_of(name: str | None, ip: str | None, catalog: Catalog,
             prefixes: tuple[int, int] = DEFAULT_PREFIXES) -> Group:
    """The group of one (server name, server address) pair."""
    literal = as_address(name)
    if literal is not None:
        name, ip = None, ip or literal
    endpoint = catalog.match(name, ip)
    if endpoint is not None:
        return Group(endpoint.service, "service", endpoint.service, endpoint.service,
                     endpoint.organization, endpoint.category, endpoint.is_backup)
    if name:
        domain = registrable_domain(name)
        return Group(domain, "name", domain)
    network = network_of(ip, prefixes) if ip else None
    if network is None:
        return Group("unknown", "network", "unknown addresses")
    return Group(network, "network", network_label(network))


def endpoint_groups(connections: pd.DataFrame, catalog: Catalog,
                    prefixes: tuple[int, int] = DEFAULT_PREFIXES) -> pd.DataFrame:
    """One row per (connection, group): the endpoint group, plus an app group where known."""
    conns = connections[["conn_id", "device", "server_name", "server_ip", "app"]].copy()
    conns["device"] = conns["device"].fillna("unknown")
    names = conns["server_name"].str.strip().str.lower().str.rstrip(".")
    conns["_name"] = names.where(names.str.len() > 0)
    pairs = conns[["_name", "server_ip"]].drop_duplicates()
    classes = [
        group_of(None if pd.isna(n) else str(n), None if pd.isna(i) else str(i), catalog,
                 prefixes)
        for n, i in zip(pairs["_name"], pairs["server_ip"], strict=True)
    ]
    labels = pd.DataFrame(classes, columns=list(Group._fields), index=pairs.index)
    labels = labels.rename(columns={"kind": "group_kind"})
    labelled = pd.concat([pairs, labels], axis=1)
    out = conns.merge(labelled, on=["_name", "server_ip"], how="left")
    frames = [out[GROUP_COLUMNS]]
    apps = conns[conns["app"].notna() & (conns["app"].str.len() > 0)]
    if len(apps):
        frames.append(pd.DataFrame({
            "conn_id": apps["conn_id"], "device": apps["device"], "group": apps["app"],
            "group_kind": "app", "label": apps["app"], "service": None, "organization": None,
            "category": None, "is_backup": False,
        }))
    groups = pd.concat(frames, ignore_index=True)
    groups["is_backup"] = groups["is_backup"].fillna(False).astype(bool)
    for col in ("group", "group_kind", "label", "service", "organization", "category"):
        groups[col] = groups[col].astype("string")
    groups["key"] = groups["device"] + "\x1f" + groups["group_kind"] + "\x1f" + groups["group"]
    return groups
