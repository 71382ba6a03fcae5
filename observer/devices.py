"""Which device an address belongs to: decided here, once, for every source and stage.

In order: the lab config (a device's addresses, MACs and prefixes), then the link layer (every
address seen with the same lab-side MAC is one device, across IPv4 and rotating IPv6 addresses),
then the proxy's client (the WireGuard peer), and only then the bare address.  A device's name is
human: the configured name, else the MAC (``aa:bb:cc:dd:ee:ff``) or the address in its usual text
form.  Records keep the address actually used (``client_ip``) beside the device.

Addresses are handled as the flow engine stores them: two uint64 halves of a 16-byte address,
IPv4 as ``::ffff:a.b.c.d``; MACs as a uint64 (0 where the link layer has none).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from observer.config import Device, LabConfig

V4_MAPPED = 0xFFFF00000000
ALL = (1 << 64) - 1


def address_key(ip: str) -> tuple[int, int]:
    """The (hi, lo) pair the decoder uses for an address."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return 0, V4_MAPPED | int(addr)
    value = int(addr)
    return value >> 64, value & ALL


def address_text(hi: int, lo: int) -> str:
    """An address in its usual text form (IPv4-mapped ones as dotted quads)."""
    if hi == 0 and lo >> 32 == 0xFFFF:
        return str(ipaddress.IPv4Address(lo & 0xFFFFFFFF))
    return str(ipaddress.IPv6Address((hi << 64) | lo))


def address_strings(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Text form of 16-byte addresses, formatted once each."""
    if not hi.size:
        return np.array([], object)
    pairs = np.stack([hi, lo], axis=1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    text = np.array([address_text(int(h), int(low)) for h, low in uniq.tolist()], object)
    return text[inverse.ravel()]


def mac_text(mac: int) -> str:
    return ":".join(f"{(mac >> s) & 0xFF:02x}" for s in range(40, -8, -8))


def mac_value(text: str) -> int:
    return int(text.replace(":", "").replace("-", ""), 16)


def _prefix(network: str) -> tuple[int, int, int, int]:
    """(hi, lo, mask hi, mask lo) of a network in the 16-byte address space."""
    net = ipaddress.ip_network(network, strict=False)
    if net.version == 4:
        net = ipaddress.IPv6Network((V4_MAPPED | int(net.network_address), 96 + net.prefixlen))
    value, mask = int(net.network_address), int(net.netmask)
    return value >> 64, value & ALL, mask >> 64, mask & ALL


class DeviceMap:
    """Device names for addresses (and MACs), from the config first, then what was seen."""

    def __init__(self, devices: Iterable[Device] = ()) -> None:
        self.addresses: dict[tuple[int, int], str] = {}
        self.macs: dict[int, str] = {}
        self.prefixes: list[tuple[tuple[int, int, int, int], str]] = []
        for device in devices:
            self.addresses.update((address_key(ip), device.name) for ip in device.ips)
            self.macs.update((mac_value(m), device.name) for m in device.macs)
            self.prefixes.extend((_prefix(p), device.name) for p in device.prefixes)
        self.learned: dict[tuple[int, int], int] = {}  # address -> lab-side MAC it was seen with
        self.peers: dict[str, str] = {}  # proxy client address -> its WireGuard peer's device
        self._mac_keys = np.array(sorted(self.macs), np.uint64)

    @classmethod
    def from_config(cls, config: LabConfig | None) -> DeviceMap:
        return cls(config.devices if config is not None else ())

    @property
    def configured(self) -> bool:
        return bool(self.addresses or self.macs or self.prefixes)

    # -- the flow engine's (vectorised) --------------------------------------------------------
    def owned(self, hi: np.ndarray, lo: np.ndarray, mac: np.ndarray) -> np.ndarray:
        """Whether each address (seen with ``mac``) is a configured device's."""
        out = np.zeros(hi.size, bool)
        if not hi.size:
            return out
        if self.addresses:
            uniq, inverse = np.unique(np.stack([hi, lo], axis=1), axis=0, return_inverse=True)
            keys = self.addresses
            out |= np.array([(h, low) in keys for h, low in uniq.tolist()], bool)[inverse.ravel()]
        if self.macs:
            out |= np.isin(mac, self._mac_keys)
        for (p_hi, p_lo, m_hi, m_lo), _name in self.prefixes:
            out |= ((hi & np.uint64(m_hi)) == np.uint64(p_hi)) & (
                (lo & np.uint64(m_lo)) == np.uint64(p_lo))
        return out

    def learn(self, hi: np.ndarray, lo: np.ndarray, mac: np.ndarray) -> None:
        """Remember the lab-side MAC each client address was seen with (link layer)."""
        seen = np.flatnonzero(mac != 0)
        if seen.size:
            self.learned.update(zip(zip(hi[seen].tolist(), lo[seen].tolist(), strict=True),
                                    mac[seen].tolist(), strict=True))

    def names(self, hi: np.ndarray, lo: np.ndarray, mac: np.ndarray | None = None) -> np.ndarray:
        """Device names of client addresses ``hi``/``lo`` seen with ``mac`` (0: none)."""
        macs = [0] * hi.size if mac is None else mac.tolist()
        named: dict[tuple[int, int, int], str] = {}
        out = []
        for key in zip(hi.tolist(), lo.tolist(), macs, strict=True):
            name = named.get(key)
            if name is None:
                name = named[key] = self.name_of(*key)
            out.append(name)
        return np.array(out, object)

    def name_of(self, hi: int, lo: int, mac: int = 0) -> str:
        """The device of one address (seen with ``mac``, 0 for none), in the order above."""
        mac = mac or self.learned.get((hi, lo), 0)
        named = self._configured(hi, lo, mac)
        if named:
            return named
        if mac:
            return mac_text(mac)
        text = address_text(hi, lo)
        return self.peers.get(text, text)

    def _configured(self, hi: int, lo: int, mac: int) -> str | None:
        """The config's device: by address, then by MAC, then by prefix."""
        named = self.addresses.get((hi, lo)) or self.macs.get(mac)
        if named:
            return named
        for (p_hi, p_lo, m_hi, m_lo), name in self.prefixes:
            if hi & m_hi == p_hi and lo & m_lo == p_lo:
                return name
        return None

    # -- text addresses (importers, proxy, exports) -----------------------------------------------
    def name(self, ip: str | None, *, mac: str | None = None, peer: str | None = None) -> str:
        """The device of a client address given as text; ``peer`` names the proxy client's
        WireGuard peer (used when neither the config nor the link layer knows the address)."""
        if not ip:
            return peer or (mac.lower() if mac else "unknown")
        try:
            hi, lo = address_key(ip)
        except ValueError:
            return peer or ip
        found = self.name_of(hi, lo, mac_value(mac) if mac else 0)
        if peer and found == address_text(hi, lo):
            return peer
        return found

    def configured_name(self, ip: str | None, mac: str | None = None) -> str | None:
        """The configured device of an address and/or MAC given as text, else None."""
        m = mac_value(mac) if mac else 0
        try:
            return self._configured(*address_key(ip), m) if ip else self.macs.get(m)
        except ValueError:
            return self.macs.get(m)

    def add_peer(self, ip: str, device: str) -> None:
        """The proxy saw client address ``ip`` through the WireGuard peer of ``device``."""
        self.peers[address_text(*address_key(ip))] = device

    def names_of(self, ips: pd.Series) -> np.ndarray:
        """Device names for a column of client addresses (text), each distinct one once."""
        import pandas as pd

        codes, uniques = pd.factorize(ips.astype(object))
        if not len(uniques):
            return np.full(len(ips), None, object)
        named = np.array([self.name(ip) if isinstance(ip, str) else None for ip in uniques],
                         object)
        return np.where(codes >= 0, named[codes], None)
