# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs; nothing else must be installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,imaging]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/laulima demo --quick

test: lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src/laulima/core src/laulima/hub src/laulima/pki src/laulima/site \
		src/laulima/cli.py src/laulima/cli_security.py src/laulima/client.py src/laulima/sim.py \
		src/laulima/processes.py src/laulima/errors.py src/laulima/auditlog.py \
		src/laulima/cli_algorithm.py src/laulima/cli_site_admin.py src/laulima/submission.py \
		src/laulima/algorithms/bundle.py

bench: $(STAMP)
	$(BIN)/python benchmarks/aggregate.py
	$(BIN)/python benchmarks/round_overhead.py
	$(BIN)/python benchmarks/brain_federated.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
