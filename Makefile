# ebpf-agent: `make run` and `make test` are all a fresh Debian 12 host (as root) needs.
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= config/agent.yaml

.PHONY: install run test lint openapi bench soak clean image image-test

install:
	@bash scripts/install.sh

run: install
	$(VENV)/bin/ebpf-agent serve --config $(CONFIG)

# The container image first (scripts/build-image.sh: skipped when the image matches the
# sources), so the slow image tests check this tree and nothing downloads during pytest.
test: install
	bash scripts/build-image.sh >/dev/null
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
	$(PY) bench/func_all_libc.py
	$(PY) bench/flood_stop.py
	$(PY) bench/fleet.py
	$(PY) bench/latency_histogram.py
	$(PY) bench/syscall_cost.py
	$(PY) bench/net_cost.py
	$(PY) bench/file_cost.py
	$(PY) bench/startup.py
	$(PY) bench/api_limits.py
	$(PY) bench/decode.py

# One agent under churn (clients, target edits, func restarts, NATS restarts) for
# SOAK_MINUTES; fails if RSS or anything else grows (bench/soak.py). Not part of `make test`.
SOAK_MINUTES ?= 30
soak: install
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

# The container image without a Docker daemon: debootstrap base + buildah bud
# (scripts/build-image.sh; storage in build/image). install.sh installs buildah/debootstrap.
image: install
	bash scripts/build-image.sh

# Only the image tests (also part of `make test`).
image-test: image
	$(PY) -m pytest -ra tests/packaging/test_image.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
