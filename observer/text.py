"""Text from the network (host names, paths, SNI, DNS names, header values) as records keep it.

Decoded once, at the edge, with one policy: bytes are read as UTF-8 and every invalid byte becomes
U+FFFD; a ``str`` that carries invalid bytes as lone surrogates (mitmproxy's and Python's
``surrogateescape``, JSON's ``\\udc80`` escapes) is treated the same way.  NUL and other control
characters are kept (they are evidence) but never break a later stage: every string that reaches
the records is valid UTF-8, so Parquet, CSV and HTML can always write it.
"""

from __future__ import annotations

import re

import pandas as pd

_SURROGATE = re.compile("[\ud800-\udfff]")


def network_text(value: str | bytes | None) -> str | None:
    """``value`` as valid UTF-8 text under the policy above; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    if value.isascii():
        return value
    return _SURROGATE.sub("\ufffd", value)


def network_texts(values: pd.Series) -> pd.Series:
    """``network_text`` over a column of strings (NA stays NA), as pandas ``string``."""
    return values.map(lambda v: network_text(v) if isinstance(v, (str, bytes)) else pd.NA,
                      na_action="ignore").astype("string")
