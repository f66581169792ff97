# Two commands do all the set-up on a fresh machine:
#   make run    create .venv if missing, install the project, run the workflow (config/quick.yaml)
#   make test   same set-up, then the whole test suite
# make run ARGS='...'   passes arguments to snakemake; ARGS='--configfile a.yaml b.yaml' replaces config/quick.yaml.
VENV   ?= .venv
PYTHON ?= python3
CORES  ?= $(shell nproc)
CONFIG ?= config/quick.yaml
ARGS   ?=
BIN    := $(VENV)/bin
# Workflow jobs run `python -m overinterp`: the project's virtual environment comes first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test install system-deps report clean publish pull

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# TORCH=cpu installs PyTorch's CPU build from its own index first (about 1 GB instead of about 6 GB of CUDA
# wheels) for machines without an NVIDIA GPU that can reach TORCH_CPU_INDEX. Not the default: that index is
# a second host that firewalled or mirrored machines often cannot reach, where PyPI's build installs anyway.
TORCH           ?= default
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

# Reinstall when the project's dependencies change.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install --quiet --upgrade pip
ifeq ($(TORCH),cpu)
	$(BIN)/python -m pip install --quiet --index-url $(TORCH_CPU_INDEX) torch torchvision
endif
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# As with snakemake itself: config files given in ARGS (`--configfile a.yaml b.yaml`, merged in order over
# config/config.yaml) replace $(CONFIG); without any, $(CONFIG) is used.
ifneq ($(filter --configfile --configfiles,$(ARGS)),)
SNAKEMAKE_ARGS = $(ARGS)
else
SNAKEMAKE_ARGS = --configfile $(CONFIG) $(ARGS)
endif

# A failed job's log (where its error message is) is printed on the console, not only named; every minute,
# the progress bars of the running jobs (from their logs) too. The report is built at the end.
# (A dry run, ARGS='-n', builds no report.)
DRY_RUN := $(filter -n --dry-run --dryrun,$(ARGS))
run: install
	$(BIN)/overinterp watch -- $(BIN)/snakemake --cores $(CORES) --show-failed-logs $(SNAKEMAKE_ARGS)
ifeq ($(DRY_RUN),)
	$(BIN)/snakemake --cores $(CORES) --report results/report.html $(SNAKEMAKE_ARGS)
	@echo "The results: results/report.html (open it in a browser; it begins with the headline)"
endif

report: install
	$(BIN)/snakemake --cores $(CORES) --report results/report.html $(SNAKEMAKE_ARGS)

# Share the expensive results through a DVC remote (README "Sharing results with DVC"); pass the
# configuration they were made with (CONFIG, ARGS) so that Snakemake can check them.
publish: install
	$(BIN)/overinterp publish -- $(SNAKEMAKE_ARGS)

pull: install
	$(BIN)/overinterp pull -- $(SNAKEMAKE_ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

# System components some tests need (Debian packages); CI installs them, elsewhere those tests skip.
system-deps:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES)

SYSTEM_PACKAGES :=
SYSTEM_PACKAGES += slurm-wlm munge   # tests/test_slurm.py brings up a single-node Slurm
SYSTEM_PACKAGES += chromium chromium-driver   # tests/test_humaneval.py takes the study in a headless browser

clean:
	rm -rf logs .snakemake
	[ ! -d results ] || { find results ! -type d ! -name '*.dvc' -delete; find results -mindepth 1 -type d -empty -delete; }   # keeps the DVC pointers
