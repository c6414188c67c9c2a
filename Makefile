# Two commands: `make repro` (the pipeline) and `make test` (the whole suite, as CI runs it).
# Both create .venv at the repo root when missing and install the pinned dependencies.
VENV := .venv
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONPATH := $(abspath src)
export DVC_NO_ANALYTICS := 1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: repro test bench install clean-checkpoints

$(VENV)/.installed: requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

repro: $(VENV)/.installed
	dvc repro

test: $(VENV)/.installed
	python -m pytest

bench: $(VENV)/.installed
	python -m cifar_resnet.bench

clean-checkpoints:
	rm -rf "$${CIFAR_RESNET_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/cifar_resnet}/checkpoints"
