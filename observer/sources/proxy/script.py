"""``mitmdump -s`` entry inside the package, for installs without the checkout's addons/ folder."""

from observer.sources.proxy.addon import make_addons

addons = make_addons()
