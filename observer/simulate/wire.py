"""The few packets stored whole: DNS queries and answers, TLS ClientHellos and QUIC Initials.

Everything else is headers only; these are the packets a replay dissects to name connections, so
they must be real protocol messages that scapy and tshark decode.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct

import numpy as np

# name -> (addresses, CNAME chain the resolver returns before the A record, TTL seconds)
ENDPOINTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], int]] = {
    "g.whatsapp.net": (("157.240.17.53",), (), 60),
    "mmg.whatsapp.net": (("157.240.17.60",), ("mmg.fna.whatsapp.net",), 300),
    "media-ber1-1.cdn.whatsapp.net": (("157.240.223.60",), (), 300),
    "media-fra3-2.cdn.whatsapp.net": (("157.240.0.60",), (), 300),
    "scontent.xx.fbcdn.net": (("31.13.84.4",), (), 3600),
    "scontent-ber1-1.xx.fbcdn.net": (("31.13.84.16",), ("scontent.xx.fbcdn.net",), 3600),
    "static.whatsapp.net": (("157.240.17.61",), (), 3600),
    "backup.googleapis.com": (("142.250.185.74",), (), 300),
    "play.googleapis.com": (("142.250.186.42",), (), 300),
    "android.clients.google.com": (("142.250.185.110",), ("android.l.google.com",), 300),
    "www.googleapis.com": (("142.250.184.234",), (), 300),
    "mtalk.google.com": (("142.250.102.188",), ("mobile-gtalk.l.google.com",), 300),
    "firebaselogging-pa.googleapis.com": (("142.250.186.74",), (), 300),
    "connectivitycheck.gstatic.com": (("142.250.181.227",), (), 300),
    "app-measurement.com": (("142.250.185.142",), (), 300),
    "www.youtube.com": (("142.250.186.78",), ("youtube-ui.l.google.com",), 300),
    "i.ytimg.com": (("142.250.185.246",), (), 300),
    "scontent.cdninstagram.com": (("157.240.0.63",), (), 300),
}
RESOLVER_TTL_DEFAULT = 300
ALPN_H2 = (b"h2", b"http/1.1")


def endpoint(name: str) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """Addresses, CNAME chain and TTL of a name; unknown names get a stable documentation IP."""
    if name in ENDPOINTS:
        return ENDPOINTS[name]
    digest = hashlib.sha256(name.encode()).digest()
    return (f"203.0.113.{10 + digest[0] % 240}",), (), 60


def endpoint6(name: str) -> tuple[str, ...]:
    """IPv6 addresses of a name: Google's and Meta's own names have them, unknown names not."""
    if name not in ENDPOINTS:
        return ()
    a, b, c, d = (int(x) for x in ENDPOINTS[name][0][0].split("."))
    if (a, b) == (142, 250):
        return (f"2a00:1450:4001:{0x800 + c:x}::{0x2000 + d:x}",)
    if (a, b) in ((157, 240), (31, 13)):
        return (f"2a03:2880:f0{c:02x}:{d:x}:face:b00c:0:167",)
    return ()


def documentation6(name: str) -> str:
    """A stable IPv6 address (documentation prefix, one /48 per name) for a name that a
    scenario's job reaches over IPv6."""
    digest = hashlib.sha256(name.encode()).digest()
    return f"2001:db8:{0xf000 + digest[1] * 16 + digest[2] % 16:x}::{10 + digest[0] % 240:x}"


def ip_to_int(ip: str) -> int:
    a, b, c, d = (int(x) for x in ip.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def _qname(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"


def dns_query(txid: int, name: str, qtype: int) -> bytes:
    head = struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0)
    return head + _qname(name) + struct.pack("!HH", qtype, 1)


def dns_answer(txid: int, name: str, qtype: int, addresses: tuple[str, ...],
               cnames: tuple[str, ...], ttl: int) -> bytes:
    """A resolver's answer: the CNAME chain, then the A or AAAA records (none: no such address)."""
    records = []
    owner = name
    for target in cnames:
        rdata = _qname(target)
        records.append(_qname(owner) + struct.pack("!HHIH", 5, 1, ttl, len(rdata)) + rdata)
        owner = target
    for address in addresses:
        rdata = ipaddress.ip_address(address).packed
        records.append(_qname(owner) + struct.pack("!HHIH", qtype, 1, ttl, len(rdata)) + rdata)
    head = struct.pack("!HHHHHH", txid, 0x8180, 1, len(records), 0, 0)
    return head + _qname(name) + struct.pack("!HH", qtype, 1) + b"".join(records)


def _ext(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def client_hello(server_name: str, rng: np.random.Generator, alpn: tuple[bytes, ...] = ALPN_H2,
                 quic: bool = False) -> bytes:
    """A TLS 1.3 ClientHello with SNI and ALPN as Android's BoringSSL sends it: a TLS record, or
    for QUIC the bare handshake message with transport parameters."""
    host = server_name.encode()
    sni = _ext(0, struct.pack("!HBH", len(host) + 3, 0, len(host)) + host)
    alpn_list = b"".join(bytes([len(p)]) + p for p in alpn)
    key = rng.bytes(32)
    extensions = b"".join([
        sni,
        _ext(23, b""),  # extended master secret
        _ext(65281, b"\0"),  # renegotiation info
        _ext(10, struct.pack("!H", 6) + struct.pack("!HHH", 0x001D, 0x0017, 0x0018)),
        _ext(11, b"\x01\x00"),  # EC point formats: uncompressed
        _ext(35, b""),  # session ticket
        _ext(16, struct.pack("!H", len(alpn_list)) + alpn_list),
        _ext(5, b"\x01\x00\x00\x00\x00"),  # status request (OCSP)
        _ext(13, struct.pack("!H", 16) + struct.pack("!8H", 0x0403, 0x0804, 0x0401, 0x0503,
                                                      0x0805, 0x0501, 0x0806, 0x0601)),
        _ext(18, b""),  # signed certificate timestamps
        _ext(51, struct.pack("!HHH", 36, 0x001D, 32) + key),  # key share x25519
        _ext(45, b"\x01\x01"),  # PSK modes
        _ext(43, b"\x02\x03\x04" if quic else b"\x04\x03\x04\x03\x03"),  # TLS 1.3 (, 1.2)
        # QUIC transport parameters: max idle timeout 30 s, initial max data 15 MB.
        _ext(57, b"\x01\x02\x75\x30\x04\x04\x80\xe4\xe1\xc0") if quic else b"",
    ])
    suites = struct.pack("!15H", 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9,
                         0xCCA8, 0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035)
    body = (b"\x03\x03" + rng.bytes(32) + b"\x20" + rng.bytes(32)
            + struct.pack("!H", len(suites)) + suites + b"\x01\x00"
            + struct.pack("!H", len(extensions)) + extensions)
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    if quic:
        return handshake
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


QUIC_V1_SALT = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """TLS 1.3 HKDF-Expand-Label for outputs of one SHA-256 block."""
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\0"
    return hmac.new(secret, info + b"\x01", hashlib.sha256).digest()[:length]


def quic_initial(server_name: str, rng: np.random.Generator) -> bytes:
    """A QUIC v1 client Initial carrying a ClientHello (ALPN h3), protected with the public
    Initial keys (RFC 9001) exactly as a client does, so readers can recover the SNI."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    dcid, scid = rng.bytes(8), rng.bytes(8)
    initial = hmac.new(QUIC_V1_SALT, dcid, hashlib.sha256).digest()
    secret = _expand_label(initial, b"client in", 32)
    key, iv = _expand_label(secret, b"quic key", 16), _expand_label(secret, b"quic iv", 12)
    hp = _expand_label(secret, b"quic hp", 16)
    hello = client_hello(server_name, rng, (b"h3",), quic=True)
    crypto = b"\x06\x00" + struct.pack("!H", 0x4000 | len(hello)) + hello
    header_len = 1 + 4 + 1 + 8 + 1 + 8 + 1 + 2 + 4
    payload = crypto + b"\0" * max(0, 1200 - header_len - len(crypto) - 16)
    pn = 0
    header = (bytes([0xC3]) + b"\0\0\0\x01" + bytes([8]) + dcid + bytes([8]) + scid + b"\0"
              + struct.pack("!H", 0x4000 | (4 + len(payload) + 16)) + struct.pack("!I", pn))
    nonce = bytes(a ^ b for a, b in zip(iv, pn.to_bytes(12, "big"), strict=True))
    sealed = AESGCM(key).encrypt(nonce, payload, header)
    encryptor = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = encryptor.update(sealed[:16]) + encryptor.finalize()
    protected = bytearray(header)
    protected[0] ^= mask[0] & 0x0F
    for i in range(4):
        protected[-4 + i] ^= mask[1 + i]
    return bytes(protected) + sealed
