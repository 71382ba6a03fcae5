"""Records: the schema and its Parquet (analysis) and JSONL (live) stores."""

from observer.records.jsonl import JsonlRead, JsonlWriter, read_jsonl
from observer.records.manifest import records_fingerprint
from observer.records.parquet import (
    RecordRun,
    device_dir,
    device_name,
    partition_devices,
    partitions,
    read_records,
    read_table,
    write_table,
)
from observer.records.schema import SCHEMA_VERSION, TABLES, TIME_COLUMN, conform, empty

__all__ = [
    "SCHEMA_VERSION",
    "TABLES",
    "TIME_COLUMN",
    "JsonlRead",
    "JsonlWriter",
    "RecordRun",
    "conform",
    "device_dir",
    "device_name",
    "empty",
    "partition_devices",
    "partitions",
    "read_jsonl",
    "read_records",
    "read_table",
    "records_fingerprint",
    "write_table",
]
