"""The traffic simulator: realistic multi-day captures of one phone or a lab of phones, with their
ground truth.

``load_scenario`` reads a scenario (bundled ones live in ``scenarios/``), ``fleet_scenario``
generates a lab of phones, ``simulate`` writes the pcap (or hourly rotated pcaps) and
``<name>.truth.json`` beside it.  Imports only observer.config (records never need it).
"""

from observer.simulate.engine import rotated_name, simulate, truth_path
from observer.simulate.scenario import (
    Activity,
    Chat,
    Gap,
    Job,
    Phone,
    Scenario,
    bundled_names,
    fleet_scenario,
    load_scenario,
)

__all__ = [
    "Activity", "Chat", "Gap", "Job", "Phone", "Scenario", "bundled_names", "fleet_scenario",
    "load_scenario", "rotated_name", "simulate", "truth_path",
]
