# Two entry points for a fresh machine: `make run` (the main job) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv deps run test lint typecheck pytest perf clean

venv: $(VENV)/.installed

# The install compiles these with mypyc into extension modules beside them, which Python imports
# instead, and builds the hand-written C ones: an edit must rebuild them (rpcfast/_compiled.py
# lists both; import refuses stale ones).
C_SOURCES := rpcfast/transports/_sockops.c rpcfast/_header.c services/kvstore/log/_encode.c \
	services/kvstore/log/_relocate.c
HOT_PATH := rpcfast/_session.py rpcfast/_pending.py rpcfast/transports/_udp.py rpcfast/dispatch/_poller.py rpcfast/_router.py rpcfast/_fastcall.py \
	services/kvstore/log/_entries.py services/kvstore/log/_segments.py services/kvstore/log/_hashtable.py \
	services/kvstore/log/_log.py services/kvstore/log/_cleaner.py services/kvstore/_objects.py

$(VENV)/.installed: pyproject.toml setup.py rpcfast/_compiled.py $(HOT_PATH) $(C_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]' --config-settings editable_mode=compat
	touch $@

# The main job: a local kvstore cluster (coordinator + 4 storage servers, 3-way replication,
# embedded coordinator state), a mixed workload against it, a report; then it stops.
run: venv
	rm -rf .kvdata
	$(BIN)/rpcfast-kv cluster --servers 4 --replicas 3 --dir .kvdata --memory 128 --workload 10

# The RPC demo: an echo server over UDP and ZeroMQ and a latency report against a raw socket.
demo: venv
	$(BIN)/rpcfast-perf demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

# Debian packages the suite runs for real (ZooKeeper for coordinator failover; peers in perf/).
DEB_PACKAGES := zookeeper redis-server memcached
deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
		$$sudo apt-get update -qq && $$sudo apt-get install -y --no-install-recommends $$missing; \
	fi

pytest: venv deps
	$(BIN)/pytest -q

test: lint typecheck pytest

perf: venv
	$(BIN)/rpcfast-perf rpc --json perf-rpc.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
