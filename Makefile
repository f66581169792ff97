# Two commands do all the set-up on a fresh machine:
#   make run    create .venv if missing, install the project, run the workflow (config/quick.yaml)
#   make test   same set-up, then the whole test suite
# make run ARGS='--configfile my.yaml'   passes extra arguments to snakemake.
VENV   ?= .venv
PYTHON ?= python3
CORES  ?= $(shell nproc)
CONFIG ?= config/quick.yaml
ARGS   ?=
BIN    := $(VENV)/bin
# Workflow jobs run `python -m overinterp`: the project's virtual environment comes first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test install system-deps report clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the project's dependencies change.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) $(ARGS)

report: install
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) --report results/report.html $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

# System components some tests need (Debian packages); CI installs them, elsewhere those tests skip.
system-deps:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES)

SYSTEM_PACKAGES :=

clean:
	rm -rf results logs .snakemake
