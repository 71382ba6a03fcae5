"""Importers of other tools' files: Zeek logs, HAR archives, PCAPdroid's connections CSV.

Each is one module with ``sniff(head, path)`` and ``read(path, config)``, registered with the other
input formats in ``observer.sources.formats``; ``common`` holds what they share.
"""
