"""The mitmproxy source: count every proxied connection and write it as records.

``traffic`` and ``records`` are plain Python (counters, rows); ``counting`` wraps mitmproxy's layer
stack; ``addon`` holds the addon classes that ``addons/telemetry.py`` loads; ``jsonl_import``
reads the live JSONL files back.  Nothing here is imported by later stages.
"""
