"""Live capture: a device's packets into rotating pcap files, with session (coverage) records."""

from observer.sources.live.capture import (
    CaptureOptions,
    CaptureResult,
    StopFlag,
    device_filter,
    run_capture,
)
from observer.sources.live.ring import RotatingPcapWriter, ring_files

__all__ = [
    "CaptureOptions",
    "CaptureResult",
    "RotatingPcapWriter",
    "StopFlag",
    "device_filter",
    "ring_files",
    "run_capture",
]
