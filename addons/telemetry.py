"""mitmproxy addon: record every connection's timing, sizes and endpoints as observer records.

    mitmdump -s addons/telemetry.py --set observer_dir=records [--set observer_config=lab.yaml]

Run it with the mitmdump of the venv the observer is installed in (``observer proxy`` does).  The
logic lives in ``observer.sources.proxy``; this file only hands its addons to mitmproxy.
"""

import sys
from pathlib import Path

try:
    from observer.sources.proxy.addon import make_addons
except ImportError:  # running from a source checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from observer.sources.proxy.addon import make_addons

addons = make_addons()
