# Two commands: `make repro` (the pipeline) and `make test` (the whole suite, as CI runs it).
# Both create .venv at the repo root when missing and install the pinned dependencies.
VENV := .venv
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONPATH := $(abspath src)
export DVC_NO_ANALYTICS := 1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: repro test bench install plots clean-checkpoints study

# The package is installed editable (no dependencies: requirements.txt pins them), so `python -m cifar_resnet.model`
# works in the activated .venv; stage commands still put their own tree's src/ first (PYTHONPATH=src).
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(VENV)/bin/python -m cifar_resnet.plots_template
	touch $@

# Offline `dvc plots show`/`diff` (README, "Plots offline"): the page template with vega inlined, set as this clone's
# plots.html_template in .dvc/config.local. Both git-ignored; written at install, and again here when deleted.
PLOTS_TEMPLATE := .dvc/plots_offline.html
$(PLOTS_TEMPLATE): | $(VENV)/.installed
	$(VENV)/bin/python -m cifar_resnet.plots_template

install: $(VENV)/.installed $(PLOTS_TEMPLATE)

repro: $(VENV)/.installed
	dvc repro

test: $(VENV)/.installed
	python -m pytest

bench: $(VENV)/.installed
	python -m cifar_resnet.bench

plots: install
	dvc plots show

clean-checkpoints:
	rm -rf "$${CIFAR_RESNET_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/cifar_resnet}/checkpoints"
# `make study NAME=default SEEDS=0-4 [SET="key=value ..."] [DEVICE=cuda]`: one configuration run for many seeds
# through DVC, summarised in studies/NAME/ (see `python -m cifar_resnet.study --help`). Re-running skips done seeds.
SEEDS ?= 0-4
study: $(VENV)/.installed
	$(if $(NAME),,$(error NAME is required: make study NAME=default SEEDS=0-4))
	python -m cifar_resnet.study '$(NAME)' --seeds '$(SEEDS)' $(foreach s,$(SET),--set '$(s)') \
		$(if $(DEVICE),--device '$(DEVICE)')
