# One command per task. `make run` and `make test` set up everything they need
# on a fresh Debian machine: system packages (through apt), the virtualenv, the
# tiny model.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test check bench bench-gpu deps venv tiny-model clean

run: deps venv
	$(VENV)/bin/stepcast run

test: deps venv
	$(PY) -m pytest $(PYTEST_ARGS)

check: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Benchmarks print their figures and write them to .data/bench/*.json.
# bench.gpu needs a CUDA GPU: `make bench-gpu` on a GPU machine.
bench: deps venv
	$(PY) -m bench.overhead --jobs 60
	$(PY) -m bench.batching --jobs 64 --sizes 1 2 4 8
	$(PY) -m bench.controlplane --jobs 2000 --workers 2
	$(PY) -m bench.previews
	$(PY) -m bench.ws_fanout --clients 100 1000
	$(PY) -m bench.soak --jobs 1000 --kill-every 3
	$(PY) -m bench.capacity --seconds 10 --concurrency 16
	$(PY) -m bench.fanout --sockets 1000 --rates 500 1000 2000 4000
	$(PY) -m bench.cluster --servers 3 --workers 3 --clients 30 --jobs-per-client 40
	$(PY) -m bench.chaos --seconds 240 --watchers 200 --jobs-per-s 4

bench-gpu: venv
	$(PY) -m bench.gpu

tiny-model: venv
	$(VENV)/bin/stepcast tiny-model

venv: $(STAMP)

# Rebuilt whenever pyproject.toml changes. torch==2.13.0 is the CPU wheel these
# machines carry on disk (see README for a CUDA build).
$(STAMP): pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# Postgres and Redis servers, Chromium for the page tests and docker-compose to
# validate compose.yaml, from apt when missing.
deps:
	@if ! command -v redis-server >/dev/null; then \
		echo "installing redis-server (apt)"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	fi
	@if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "installing postgresql (apt)"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi
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
