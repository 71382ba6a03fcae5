"""Report: records + findings -> a self-contained HTML page, Markdown, findings.json and CSV;
for several devices, a report per device with an index page and fleet.json."""

from observer.report.fleet import write_fleet
from observer.report.writer import write_report

__all__ = ["write_fleet", "write_report"]
