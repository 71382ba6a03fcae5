"""Sources: turn saved captures and other tools' logs into record tables.

The public face is ``replay`` (write records) and ``replay_tables`` (return them as DataFrames).
They are loaded on first use so that importing a sibling module (an importer) stays cheap and does
not depend on the replay pipeline.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ReplayStats", "replay", "replay_tables"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from observer.sources import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'observer.sources' has no attribute {name!r}")
