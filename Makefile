# The two commands of README.md: `make train` (the main job, `fastcache train` on built-in defaults) and `make test`.
PYTHON ?= python
STAMP := .install-stamp
SOURCES := requirements-dev.txt pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: setup train test bench info

# Installs the pinned environment (CPU torch from the wheel on disk) and builds the extension in place; redone
# when a source changes (the stamp is not committed, so a fresh clone always installs).
$(STAMP): $(SOURCES)
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
