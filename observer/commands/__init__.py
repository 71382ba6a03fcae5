"""Subcommands of the ``observer`` CLI: argument parsing and wiring only, no logic."""
