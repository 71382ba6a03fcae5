"""The report stage: render findings and records as HTML, Markdown, JSON and CSV."""

from observer.report.writer import write_report

__all__ = ["write_report"]
