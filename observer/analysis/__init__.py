"""Analysis: bulk upload events, their periodicity, and one finding per endpoint group.

Reads record tables (observer.records), never a source or the report.  Everything is pandas and
numpy on whole tables, so the same functions run on one device's partition at a time.
"""

from observer.analysis.findings import VERDICTS, analyze_records, write_findings

__all__ = ["VERDICTS", "analyze_records", "write_findings"]
