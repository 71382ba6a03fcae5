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

import yaml

from observer import ObserverError

BUNDLED = Path(__file__).with_name("catalog.yaml")
CATEGORIES = {
    "messaging", "media-cdn", "backup", "cloud", "os-telemetry", "analytics", "ads", "push", "cdn",
    "social", "other",
}


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
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ObserverError(f"cannot read catalog {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ObserverError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        entries = (data or {}).get("services", []) if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ObserverError(f"{path}: a catalog needs a top-level 'services:' list")
        for i, entry in enumerate(entries):
            where = f"{path}: services[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("service"), str):
                raise ObserverError(f"{where}: each entry needs a 'service' name")
            category = entry.get("category", "other")
            if category not in CATEGORIES:
                raise ObserverError(
                    f"{where} ({entry['service']}): unknown category {category!r}; "
                    f"use one of {', '.join(sorted(CATEGORIES))}"
                )
            org = str(entry.get("organization", entry["service"]))
            for suffix in entry.get("suffixes", []) or []:
                key = normalize(str(suffix))
                if not key:
                    raise ObserverError(f"{where}: empty suffix")
                self._suffixes[key] = Endpoint(entry["service"], org, category, key)
            for net in entry.get("networks", []) or []:
                try:
                    network = ipaddress.ip_network(str(net), strict=False)
                except ValueError:
                    raise ObserverError(f"{where}: {net!r} is not an address block") from None
                endpoint = Endpoint(entry["service"], org, category, str(network))
                self._networks.append((network, endpoint))

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
