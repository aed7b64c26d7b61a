# One command per task. `make run` and `make test` set up everything they need
# on a fresh Debian machine: system packages (through apt), the virtualenv, the
# tiny model. `make run` installs only what running needs (Postgres, Redis, the
# package); `make test` adds what the tests need (Chromium, docker-compose, the
# dev extras).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test check bench bench-gpu deps test-deps venv dev-venv tiny-model clean

run: deps venv
	$(VENV)/bin/stepcast run

test: deps test-deps dev-venv
	$(PY) -m pytest $(PYTEST_ARGS)

check: dev-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Benchmarks print their figures and write them to .data/bench/*.json.
# bench.gpu needs a CUDA GPU: `make bench-gpu` on a GPU machine.
bench: deps dev-venv
	$(PY) -m bench.overhead --jobs 60
	$(PY) -m bench.batching --jobs 64 --sizes 1 2 4 8
	$(PY) -m bench.controlplane --jobs 2000 --workers 2
	$(PY) -m bench.previews
	$(PY) -m bench.ws_fanout --clients 100 1000
	$(PY) -m bench.soak --jobs 1000 --kill-every 3
	$(PY) -m bench.failover --runs 10
	$(PY) -m bench.capacity --seconds 10 --concurrency 16
	$(PY) -m bench.fanout --sockets 1000 --rates 500 1000 2000 4000
	$(PY) -m bench.scheduling --backlog 500 --workers 2
	$(PY) -m bench.cluster --servers 3 --workers 3 --clients 30 --jobs-per-client 40
	$(PY) -m bench.history_check --rounds 4 --events 20000
	$(PY) -m bench.event_plane --shards 0 1 2 3 4 --servers 3 --sockets 3000 --rates 1000 2000 4000 6000
	$(PY) -m bench.chaos --seconds 240 --watchers 200 --jobs-per-s 4

bench-gpu: dev-venv
	$(PY) -m bench.gpu

tiny-model: venv
	$(VENV)/bin/stepcast tiny-model

venv: $(RUN_STAMP)
dev-venv: $(DEV_STAMP)

# Rebuilt whenever pyproject.toml changes. torch==2.13.0 is the CPU wheel these
# machines carry on disk (see README for a CUDA build). The dev extras include
# the package itself, so a dev venv serves `make run` too.
$(RUN_STAMP): pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@[ $(DEV_STAMP) -nt pyproject.toml ] || $(PY) -m pip install --quiet --disable-pip-version-check -e .
	@touch $(RUN_STAMP)

$(DEV_STAMP): pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(DEV_STAMP) $(RUN_STAMP)

# The Postgres and Redis servers (redis-cli makes the tests' Redis Cluster), from apt when missing.
deps:
	@if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then \
		echo "installing redis-server and redis-cli (apt)"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	fi
	@if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "installing postgresql (apt)"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi

# Chromium for the page tests and docker-compose to validate compose.yaml.
test-deps:
	@if ! command -v docker-compose >/dev/null; then \
		echo "installing docker-compose to validate compose.yaml (apt)"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; \
	fi
	@if ! command -v chromium >/dev/null; then \
		echo "installing chromium for the page tests (apt)"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

clean:
	rm -rf .data .pytest_cache .mypy_cache .ruff_cache
