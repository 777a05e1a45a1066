# A fresh machine needs only python3 (3.11+): every target builds its own virtualenv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

EMULATORS := emulators/node_modules/.package-lock.json
PROMTOOL  := .tools/prometheus/usr/bin/promtool

.PHONY: test chaos demo bench lint clean emulators redis-server promtool

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# kinesalite and dynalite, pinned by emulators/package-lock.json (needs Node 20 and npm).
$(EMULATORS): emulators/package.json emulators/package-lock.json
	cd emulators && npm ci --no-audit --no-fund --loglevel=error
	touch $(EMULATORS)

emulators: $(EMULATORS)

# The redis store's tests start a throwaway redis-server (a Debian package; installing needs root).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq redis-server; }

# promtool checks and unit-tests the alerting rules. It comes from Debian's prometheus package,
# unpacked here rather than installed (installing would also set up a Prometheus service).
$(PROMTOOL):
	mkdir -p .tools/deb
	cd .tools/deb && { apt-get download -qq prometheus 2>/dev/null || { apt-get update -qq && apt-get download -qq prometheus; }; }
	dpkg-deb -x .tools/deb/prometheus_*.deb .tools/prometheus
	touch $(PROMTOOL)

promtool: $(PROMTOOL)

test: $(STAMP) $(EMULATORS) redis-server $(PROMTOOL) lint
	$(BIN)/python -m pytest -q

# The long chaos runs (20 SIGKILLs a run on each source), left out of `make test`; CI runs both.
chaos: $(STAMP) $(EMULATORS) redis-server
	$(BIN)/python -m pytest -q -s -m long

lint: $(STAMP)
	$(BIN)/ruff check segment_relay tests bench
	$(BIN)/mypy segment_relay

demo: $(STAMP)
	$(BIN)/segment-relay demo

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info emulators/node_modules .tools
