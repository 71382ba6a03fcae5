"""The traffic simulator: a realistic multi-day capture of one phone, with its ground truth.

``load_scenario`` reads a scenario (bundled ones live in ``scenarios/``), ``simulate`` writes the
pcap and ``<name>.truth.json`` beside it.  Imports only observer.config (records never need it).
"""

from observer.simulate.engine import simulate, truth_path
from observer.simulate.scenario import (
    Activity,
    Chat,
    Gap,
    Job,
    Scenario,
    bundled_names,
    load_scenario,
)

__all__ = [
    "Activity", "Chat", "Gap", "Job", "Scenario", "bundled_names", "load_scenario", "simulate",
    "truth_path",
]
