# Two commands: `make repro` (the pipeline) and `make test` (the whole suite, as CI runs it); `make test-fast`, the
# unit tests.
# Both create .venv at the repo root when missing and install the pinned dependencies.
VENV := .venv
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONPATH := $(abspath src)
export DVC_NO_ANALYTICS := 1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: repro test test-fast bench install plots clean-checkpoints study pull gpu-check ablation tricks tricks-study \
	lr-sweep

# The package is installed editable (no dependencies: requirements.txt pins them), so `python -m cifar_resnet.model`
# works in the activated .venv; stage commands still put their own tree's src/ first (PYTHONPATH=src).
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(VENV)/bin/python -m cifar_resnet.lab.plots_template
	touch $@

# Offline `dvc plots show`/`diff` (README, "Plots offline"): the page template with vega inlined, set as this clone's
# plots.html_template in .dvc/config.local. Both git-ignored; written at install, and again here when deleted.
PLOTS_TEMPLATE := .dvc/plots_offline.html
$(PLOTS_TEMPLATE): | $(VENV)/.installed
	$(VENV)/bin/python -m cifar_resnet.lab.plots_template

install: $(VENV)/.installed $(PLOTS_TEMPLATE)

repro: $(VENV)/.installed
	dvc repro

test: $(VENV)/.installed
	python -m pytest

# The unit tests only: no stage, DVC, make, lab tool or training process (those are marked slow; tests/conftest.py
# fails a test that starts one without the mark).
test-fast: $(VENV)/.installed
	python -m pytest -m "not slow"

bench: $(VENV)/.installed
	python -m cifar_resnet.lab.bench

plots: install
	dvc plots show

clean-checkpoints:
	rm -rf "$${CIFAR_RESNET_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/cifar_resnet}/checkpoints"
# `make study NAME=default SEEDS=0-4 [SET="key=value ..."] [DEVICE=cuda]`: one configuration run for many seeds
# through DVC, summarised in studies/NAME/ (see `python -m cifar_resnet.lab.seed_study --help`). Re-running skips done seeds.
SEEDS ?= 0-4
study: $(VENV)/.installed
	$(if $(NAME),,$(error NAME is required: make study NAME=default SEEDS=0-4))
	python -m cifar_resnet.lab.seed_study '$(NAME)' --seeds '$(SEEDS)' $(foreach s,$(SET),--set '$(s)') \
		$(if $(DEVICE),--device '$(DEVICE)')

# The tricks set, chosen on the validation split (README, "Tricks"; the `stack` row of studies/ablation/): the one
# place it is written. lr_max is pinned at the baseline's pick: the range test does not fit frozen BN scales and
# whitening (no minimum, or an LR at which training collapses).
TRICKS := train.label_smoothing=0.2 train.ema_decay=0.99 train.frozen_bn_scales=true model.whitening=true \
	lr_max=0.4329 evaluate.tta=flip+translate

# `make tricks`: the pipeline with the tricks set, as the DVC experiment `tricks` (`dvc exp show`, `dvc metrics diff`);
# params.yaml is not changed. Again after a code change: EXP_ARGS=--force replaces the experiment.
tricks: $(VENV)/.installed
	dvc exp run -n tricks $(foreach s,$(TRICKS),-S '$(s)') $(EXP_ARGS)

# `make tricks-study SEEDS=0-4`: the tricks set's seed study, studies/tricks/ (what the README's Results report).
tricks-study:
	$(MAKE) study NAME=tricks SEEDS='$(SEEDS)' SET='$(TRICKS)' $(if $(DEVICE),DEVICE='$(DEVICE)')

# `make lr-sweep JOBS=2 [DEVICE=cuda]`: does the LR range test pick a good LRMAX? The default recipe on the validation
# split (45,000 training images), lr_max fixed at each value below, seeds 0-2, run through DVC's queue JOBS at a time;
# rows, summary, curves and figure in studies/lr-sweep/ (its README says what decides). Each range test sweeps its
# whole range (stop_at_climb=false: the same pick, and a curve other rules can be judged on). Re-running skips done runs.
LR_SWEEP := 0.1,0.2,0.3,0.4,0.5,0.6,0.8,1.0
JOBS ?= 1
lr-sweep: $(VENV)/.installed
	python -m cifar_resnet.lab.grid_study lr-sweep --grid 'lr_max=$(LR_SWEEP)' --seeds 0-2 --set data.val_size=5000 \
		--set lr_range_test.stop_at_climb=false --jobs '$(JOBS)' $(if $(DEVICE),--device '$(DEVICE)')

# `make pull`: the DVC-tracked outputs of the checked-out commit (data/, models/) from the default DVC remote, instead
# of `make repro`'s hour of training (README, "Sharing: remotes"). With no default remote, `dvc pull` says only
# "Everything is up to date." and "Checkout failed ... Is your cache up to date?": this says what is missing instead.
pull: $(VENV)/.installed
	@remotes="$$(dvc remote list)" || exit 1; \
	if ! dvc remote default >/dev/null 2>&1; then \
		remotes="$$(printf '%s\n' "$$remotes" | awk 'NF {printf "%s ", $$1}')"; \
		echo "make pull: no default DVC remote is configured, so there is nothing to pull the data and model from." >&2; \
		if [ -n "$$remotes" ]; then \
			echo "  Remotes configured here, none of them the default: $$remotes" >&2; \
			echo "  Pick one:  dvc remote default NAME   (or pull from one: dvc pull -r NAME)" >&2; \
		else \
			echo "  Add one once and commit it, so that every clone has it:" >&2; \
			echo "    dvc remote add -d storage URL    # a shared folder, s3://bucket/path, gs://bucket/path, ssh://host/path" >&2; \
			echo "    git add .dvc/config && git commit -m 'DVC remote'" >&2; \
			echo "  then whoever has the outputs runs 'dvc push' (README, \"Sharing: remotes\")." >&2; \
		fi; \
		echo "  Without a remote, 'make repro' rebuilds everything from the data set: about an hour on a CPU." >&2; \
		exit 1; \
	fi
	dvc pull

# `make gpu-check`: for a machine with a GPU (README, "GPU and other devices"). No install and no .venv needed: it runs
# with whatever $(PYTHON) is on PATH and its torch (no DVC, no albumentations, no data set: synthetic images without
# one). The portability tests on CUDA or MPS, a 24-epoch full-size timing and the bench; one JSON line last. With no
# GPU: the CPU part only, and exit 0. Options: GPU_CHECK_ARGS="--epochs 5" (python -m cifar_resnet.lab.gpu_check -h).
gpu-check:
	$(PYTHON) -m cifar_resnet.lab.gpu_check $(GPU_CHECK_ARGS)

# `make ablation ROW=baseline [SET="key=value ..."] [ON=EARLIER_ROW] [SEED=0] [DEVICE=cuda] [VAL_SIZE=5000]`: one row
# of the tricks ablation: one training run on 45,000 images, its validation accuracy without TTA, with flip and
# with flip+translate, appended to studies/ablation/runs.csv and table.md (`python -m cifar_resnet.lab.ablation --help`).
ablation: $(VENV)/.installed
	$(if $(ROW),,$(error ROW is required: make ablation ROW=baseline [SET="train.label_smoothing=0.2"] [ON=row]))
	python -m cifar_resnet.lab.ablation '$(ROW)' $(foreach s,$(SET),--set '$(s)') $(if $(ON),--on '$(ON)') \
		$(if $(SEED),--seed '$(SEED)') $(if $(VAL_SIZE),--val-size '$(VAL_SIZE)') $(if $(DEVICE),--device '$(DEVICE)')
