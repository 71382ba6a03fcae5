"""Endpoint catalog: names and address blocks -> service, organization and category.

Rules match DNS names by suffix on label boundaries (``whatsapp.net`` matches ``mmg.whatsapp.net``
but not ``evilwhatsapp.net``); the longest matching suffix wins, and a user's catalog files are
consulted before the bundled one, so they can override it.  Address blocks name connections that
carry no name at all.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from observer.yamlfile import read_yaml

BUNDLED = Path(__file__).with_name("catalog.yaml")
CATEGORIES = {
    "messaging", "media-cdn", "backup", "cloud", "os-telemetry", "analytics", "ads", "push", "cdn",
    "social", "other",
}
SERVICE_KEYS = {"service", "organization", "category", "suffixes", "networks"}


@dataclass(frozen=True)
class Endpoint:
    service: str
    organization: str
    category: str
    rule: str  # the suffix or network that matched, for the report's evidence

    @property
    def is_backup(self) -> bool:
        return self.category == "backup"


class Catalog:
    """Suffix and network rules loaded from one or more YAML catalog files."""

    def __init__(self, paths: list[Path] | tuple[Path, ...] = ()) -> None:
        self._suffixes: dict[str, Endpoint] = {}
        self._networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Endpoint]] = []
        # Later files override earlier ones, so load the bundled catalog first.
        for path in (BUNDLED, *paths):
            self._load(Path(path))
        self._networks.sort(key=lambda item: item[0].prefixlen, reverse=True)

    def _load(self, path: Path) -> None:
        doc = read_yaml(path, "catalog")
        check = doc.shape()
        if not isinstance(doc.data, dict) or not isinstance(doc.data.get("services"), list):
            raise check.fail("services", "a catalog needs a top-level 'services:' list")
        for i, entry in enumerate(doc.data["services"]):
            key = f"services.{i}"
            entry = check.mapping(entry, key, SERVICE_KEYS)
            if not isinstance(entry.get("service"), str):
                raise check.fail(key, "each entry needs a 'service' name")
            service = entry["service"]
            category = entry.get("category", "other")
            if category not in CATEGORIES:
                raise check.fail(f"{key}.category", f"unknown category {category!r}; "
                                 f"use one of {', '.join(sorted(CATEGORIES))}")
            org = str(entry.get("organization", service))
            suffixes = check.sequence(entry, "suffixes", f"{key}.", "DNS suffixes")
            for j, suffix in enumerate(suffixes):
                name = normalize(str(suffix))
                if not name:
                    raise check.fail(f"{key}.suffixes.{j}", "empty suffix")
                self._suffixes[name] = Endpoint(service, org, category, name)
            for j, net in enumerate(check.sequence(entry, "networks", f"{key}.", "address blocks")):
                try:
                    network = ipaddress.ip_network(str(net), strict=False)
                except ValueError:
                    raise check.fail(f"{key}.networks.{j}", f"{net!r} is not an address block")
                self._networks.append((network, Endpoint(service, org, category, str(network))))

    def match_name(self, name: str | None) -> Endpoint | None:
        """The endpoint of a DNS name, by longest suffix on label boundaries."""
        if not name:
            return None
        labels = normalize(name).split(".")
        for i in range(len(labels)):
            hit = self._suffixes.get(".".join(labels[i:]))
            if hit is not None:
                return hit
        return None

    def match_ip(self, ip: str | None) -> Endpoint | None:
        """The endpoint of an address, by the most specific catalogued block."""
        if not ip:
            return None
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for network, endpoint in self._networks:
            if addr.version == network.version and addr in network:
                return endpoint
        return None

    def match(self, name: str | None, ip: str | None = None) -> Endpoint | None:
        return self.match_name(name) or self.match_ip(ip)


def normalize(name: str) -> str:
    """Lower-case, without a trailing dot or a leading wildcard label."""
    name = name.strip().lower().rstrip(".")
    return name[2:] if name.startswith("*.") else name


@lru_cache(maxsize=8)
def load_catalog(paths: tuple[Path, ...] = ()) -> Catalog:
    return Catalog(paths)
