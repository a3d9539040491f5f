# ebpf-agent: `make run` and `make test` are all a fresh Debian 12 host (as root) needs.
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= config/agent.yaml

.PHONY: install run test lint openapi bench clean

install:
	@bash scripts/install.sh

run: install
	$(VENV)/bin/ebpf-agent serve --config $(CONFIG)

test: install
	$(PY) -m pytest -ra $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/mypy agent

openapi: install
	$(PY) -m agent.api.openapi_dump > openapi/openapi.json

bench: install
	$(PY) bench/exec_storm.py
	$(PY) bench/stream.py
	$(PY) bench/overhead.py
	$(PY) bench/func_overhead.py
	$(PY) bench/flood_stop.py
	$(PY) bench/fleet.py
	$(PY) bench/api_limits.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
