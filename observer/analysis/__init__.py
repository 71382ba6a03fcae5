"""Analysis: bulk upload events, their periodicity, and one finding per endpoint group.

Reads record tables (observer.records), never a source or the report.  Everything is pandas and
numpy on whole tables, so the same functions run on one device's partition at a time.  The result
is a typed ``Findings`` (observer.records.findings), stored as findings.json beside the records.
"""

from observer.analysis.findings import analyze, analyze_records
from observer.records.findings import (
    FINDINGS_VERSION,
    VERDICTS,
    Findings,
    RecordsStamp,
    read_findings,
    records_stamp,
    write_findings,
)

__all__ = [
    "FINDINGS_VERSION",
    "VERDICTS",
    "Findings",
    "RecordsStamp",
    "analyze",
    "analyze_records",
    "read_findings",
    "records_stamp",
    "write_findings",
]
