"""Subcommands of the ``observer`` CLI: argument parsing and wiring only, no logic."""

from observer import ObserverError


def not_built(what: str, issue: int) -> ObserverError:
    """The error of a stage that does not exist yet (never a fake result)."""
    return ObserverError(f"{what} is not built yet (issue #{issue})")
