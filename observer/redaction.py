"""One redaction policy for what records keep of a URL, built from the lab config and used by
every source (proxy, flow files, HAR, Zeek) and by the exports.

A URL keeps its path and its query's parameter names; each value is replaced by ``MARKER``,
because values are often ids or tokens while the names say what kind of request it was
(``/v1/upload?device=*&token=*``).  Fragments are dropped always: browsers never send them.
``redact_query: false`` in the lab config (or ``--keep-query`` on the proxy) keeps queries whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from observer.config import LabConfig

MARKER = "*"


@dataclass(frozen=True)
class Redaction:
    """How URL queries are written into records."""

    keep_query: bool = False

    @classmethod
    def of(cls, config: LabConfig | None, *, keep_query: bool = False) -> Redaction:
        """The policy of a lab config (redacting when there is none); ``keep_query`` overrides."""
        return cls(keep_query or (config is not None and not config.redact_query))

    def path(self, url: str) -> str:
        """The path and (redacted) query of a URL or of a request target (``/p?q``)."""
        url = url.split("#", 1)[0]
        if "://" in url.split("?", 1)[0]:
            parts = urlsplit(url)
            path, query, has_query = parts.path or "/", parts.query, "?" in url
        else:
            path, has_query, query = url.partition("?")
        if not has_query:
            return path
        return f"{path}?{self.query(query)}"

    def query(self, query: str) -> str:
        """``a=1&b`` -> ``a=*&*``, or the query as it was when queries are kept."""
        if self.keep_query:
            return query
        return "&".join(f"{name}={MARKER}" if sep else MARKER
                        for name, sep, _ in (item.partition("=") for item in query.split("&")))
