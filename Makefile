# Two commands do everything on a fresh machine:
#   make demo   simulate a week of one phone, replay, analyse, and write the HTML report
#   make test   run the test suite (installs tshark, tcpdump, chromium and wireguard-go first as root)
# Python 3.12 is found through .python-version (pyenv) or as python3.12 on the PATH.

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@scripts/make-venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/observer demo

test: $(STAMP)
	@scripts/system-tools
	$(PY) -m ruff check observer addons tests benchmarks
	@$(PY) -m pytest -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: failing on purpose"; exit 1; fi; \
	  exit $$rc

bench: $(STAMP)
	$(PY) benchmarks/replay.py
	$(PY) benchmarks/detection.py

clean:
	rm -rf $(VENV) demo-output
