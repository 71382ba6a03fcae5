"""Safe text for the report's outputs: Markdown cells and plot labels.

The words themselves (sizes, times, verdict sentences) live in observer.words; CSV cells are made
safe by observer.records.export (one rule for every CSV this project writes).
"""

from __future__ import annotations

import re

# Brackets are escaped, so parentheses can never form a link and stay readable.
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]#+|~])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def md_escape(value: object) -> str:
    """Text for a Markdown table cell or line: no HTML, no Markdown syntax, no line breaks."""
    text = _CONTROL.sub(" ", "" if value is None else str(value))
    text = (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )
    return _MD_SPECIAL.sub(r"\\\1", text)


def clip(text: str, width: int = 40) -> str:
    """Shorten a name for a plot legend, a heading or a card (the tables and CSV keep it whole)."""
    text = _CONTROL.sub(" ", text)
    return text if len(text) <= width else text[: width - 1] + "…"
