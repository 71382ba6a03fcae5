"""Messaging telemetry observer: record what a test phone sends, find periodic bulk uploads."""

__version__ = "0.1.0"


class ObserverError(Exception):
    """An error meant for people: the CLI prints it on one line and exits non-zero."""
