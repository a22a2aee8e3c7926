# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs; nothing else must be installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install lint bench clean orthanc chromium postgresql

# torchvision comes with nnunetv2 (through timm) but cannot load beside the CPU torch pinned in
# constraints.txt; nothing Laulima runs imports it (see constraints.txt), so it is removed again.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,imaging,nnunet,mlflow,postgres,s3,ray]'
	$(BIN)/pip uninstall --quiet -y torchvision
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/laulima demo --quick

# The suite runs on the default backend (SQLite + blob folder) and, at the same time, the hub,
# crash and security suites run again on PostgreSQL + S3 (a real PostgreSQL server and moto's
# S3 server, both started by the test fixtures on loopback: tests/helpers/backends.py). The
# suite waits on processes and servers far more than it computes (about 0.7 of one core on
# average), so the second pass runs beside the first; its output follows the first's.
HUB_SUITES := tests/hub tests/security tests/integration/test_crashes.py tests/integration/test_hub_processes.py
PG_LOG     := test-artefacts/pytest-postgres-s3.log
test: lint orthanc chromium postgresql
	@mkdir -p test-artefacts
	@base=$$(mktemp -d /tmp/laulima-pytest-XXXXXX); \
	$(BIN)/python -m pytest --hub-backend=postgres-s3 --basetemp=$$base $(HUB_SUITES) > $(PG_LOG) 2>&1 & second=$$!; \
	$(BIN)/python -m pytest; first=$$?; \
	wait $$second; again=$$?; \
	echo "==== the hub, crash and security suites on PostgreSQL + S3 ($(PG_LOG)) ===="; cat $(PG_LOG); \
	rm -rf $$base; [ $$first -eq 0 ] && [ $$again -eq 0 ]

# The PACS tests run a real Orthanc with its DICOMweb plugin (Debian packages `orthanc`,
# `orthanc-dicomweb`). Installed only when the binary or the plugin is missing; CI runs as
# root on Debian bookworm, elsewhere sudo is used.
ORTHANC_BIN    := /usr/sbin/Orthanc
ORTHANC_PLUGIN := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
orthanc:
	@if [ ! -x $(ORTHANC_BIN) ] || [ ! -f $(ORTHANC_PLUGIN) ]; then \
		set -e; \
		echo "installing orthanc and orthanc-dicomweb: the PACS tests run a real Orthanc"; \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			orthanc orthanc-dicomweb; \
	fi

# The report's layout test opens it in headless Chromium (Debian packages `chromium`,
# `chromium-driver`; selenium comes with the dev extra). Installed only when the browser or
# its driver is missing, as for orthanc above.
CHROMIUM_BIN     := /usr/bin/chromium
CHROMEDRIVER_BIN := /usr/bin/chromedriver
chromium:
	@if [ ! -x $(CHROMIUM_BIN) ] || [ ! -x $(CHROMEDRIVER_BIN) ]; then \
		set -e; \
		echo "installing chromium and chromium-driver: the report's layout test runs a real browser"; \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver; \
	fi

# The hub's tests run on a real PostgreSQL server too (Debian package `postgresql`; the
# fixture starts a throwaway cluster with its initdb and postgres). Installed when missing.
postgresql:
	@if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
		set -e; \
		echo "installing postgresql: the hub's tests run on a real PostgreSQL server too"; \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src/laulima/core src/laulima/hub src/laulima/pki src/laulima/site \
		src/laulima/cli.py src/laulima/cli_security.py src/laulima/client.py src/laulima/sim.py \
		src/laulima/sim_ray.py src/laulima/processes.py src/laulima/errors.py src/laulima/auditlog.py src/laulima/private_files.py \
		src/laulima/cli_algorithm.py src/laulima/cli_site_admin.py src/laulima/submission.py \
		src/laulima/algorithms src/laulima/imaging src/laulima/predict.py src/laulima/export.py \
		src/laulima/demo.py src/laulima/demo_overlay.py src/laulima/baselines.py src/laulima/report.py \
		src/laulima/terminal.py src/laulima/tracking.py src/laulima/nnunet src/laulima/cli_nnunet.py \
		src/laulima/web

bench: $(STAMP)
	$(BIN)/python benchmarks/aggregate.py
	$(BIN)/python benchmarks/round_overhead.py
	$(BIN)/python benchmarks/brain_federated.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
