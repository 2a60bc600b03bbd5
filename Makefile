# The two commands of README.md: `make train` (the main job, `fastcache train` on built-in defaults) and `make test`.
# Both install first: into the active virtual environment, or where none is active into .venv/, made here with the
# first python3 (or python) on the PATH (Debian's system Python refuses pip installs: PEP 668). The recipes run with
# that environment's bin/ first on the PATH, so that the tests' own `python3` / `python` children find it too.
ifdef VIRTUAL_ENV
ENV_DIR := $(VIRTUAL_ENV)
else
ENV_DIR := $(CURDIR)/.venv
export VIRTUAL_ENV := $(ENV_DIR)
endif
export PATH := $(ENV_DIR)/bin:$(PATH)
PYTHON := $(ENV_DIR)/bin/python
BOOTSTRAP_PYTHON ?= $(shell command -v python3 || command -v python)
STAMP := $(ENV_DIR)/.fastcache-install-stamp
SOURCES := requirements-dev.txt pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: setup train test bench info

$(PYTHON):
	@test -n "$(BOOTSTRAP_PYTHON)" || { echo "make: no python3 or python on the PATH (fastcache needs Python 3.10+)"; exit 2; }
	$(BOOTSTRAP_PYTHON) -m venv $(ENV_DIR)

# The pinned environment (CPU torch from the wheel on disk) and the extension built in place; redone when a source
# changes (the stamp lives in the environment, so a fresh clone or a new environment always installs).
$(STAMP): $(SOURCES) | $(PYTHON)
	$(PYTHON) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

train: setup
	$(PYTHON) -m fastcache train --overwrite

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) bench/contrastive_table.py --out bench/results/contrastive_cpu.json

info: setup
	$(PYTHON) -m fastcache info
