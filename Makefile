# emowatch — everything installs into .venv/ from the exact lock file.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
STAMP    = $(VENV)/.installed

.PHONY: install test test-fast demo lint bench lock clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24"
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

## Run the whole test suite (unit, integration on SQLite+PostgreSQL+MLflow+SMTP, end-to-end).
test: install
	$(BIN)/python -m pytest -q -ra

## The main job: train, monitor three sites, re-adapt, explain, register, promote, summarise.
demo: install
	$(BIN)/emowatch demo

lint: install
	$(BIN)/ruff check .

## The benchmarks that chose today's defaults (hours in all; need EMOWATCH_DATA_DIR): each
## prints a table (docs/benchmarks.md). Exploratory ones are in bench/explore/, run by hand.
bench: install
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.train
	$(BIN)/python -m bench.drift
	$(BIN)/python -m bench.estimate --seeds 0
	$(BIN)/python -m bench.portfolio --seeds 0 1 2
	$(BIN)/python -m bench.explain
	$(BIN)/python -m bench.throughput

## Re-resolve the lock file from pyproject.toml (needs the package index).
lock:
	rm -rf /tmp/emowatch-lock && $(PY) -m venv /tmp/emowatch-lock
	/tmp/emowatch-lock/bin/pip install -q --upgrade "pip>=24"
	/tmp/emowatch-lock/bin/pip install -q -e ".[dev]"
	/tmp/emowatch-lock/bin/pip freeze --exclude-editable | grep -v '^-e ' > requirements.lock

clean:
	rm -rf .emowatch
