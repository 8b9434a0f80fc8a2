# bg — set-up, tests and the main training job.
# `make test` creates .venv if missing, installs torch at the pinned TORCH_VERSION and the package, runs pytest.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(TORCH_VERSION)
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (one per core here; whole test files per worker, so a file's fixtures
# are built once); 0 runs the tests in one process.
PYTEST_WORKERS ?= 2

.PHONY: setup test test-slow demo train data bench bench-nsf bench-ddp bench-tarflow bench-cnf bench-aldp clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels.
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# A five-minute first run that shows every output (checkpoints, metrics, figures, samples, analysis report):
# configs/aldp_demo.yaml through fit → predict → analyze (bg/demo.py). Not a good sampler; `make train` is.
demo: setup
	$(PY) -m bg.demo

# The main job: split-channel NSF on alanine dipeptide (generates and caches replica-exchange data on
# first run, ~9 min on 2 cores, then trains ~19 min); prints the checkpoint and the W&B offline run.
TRAIN_CONFIG ?= configs/aldp_nsf.yaml
train: setup
	$(VENV)/bin/bg fit --config $(TRAIN_CONFIG)

SHARED_DATA ?= ../shared/data
bench: setup
	$(PY) bench/foundation.py $(if $(wildcard $(SHARED_DATA)/villin_1vii.pdb),--villin $(SHARED_DATA)/villin_1vii.pdb,)
	$(PY) bench/torch_energy.py $(if $(wildcard $(SHARED_DATA)/villin_1vii.pdb),--villin $(SHARED_DATA)/villin_1vii.pdb,) \
		$(if $(wildcard $(SHARED_DATA)/protein_g_1pga.pdb),--protein-g $(SHARED_DATA)/protein_g_1pga.pdb,)

# Split NSF vs baseline at equal (shortened) budget on alanine dipeptide (~25 min on 2 cores).
bench-nsf: setup
	$(PY) bench/nsf.py --label split=configs/aldp_nsf.yaml --label baseline=configs/aldp_nsf_baseline.yaml \
		--epoch-scale 0.3 --out bench/results/nsf_aldp.md

# One vs two gloo processes training the aldp NSF (needs the cached MD of `make train`; ~4 min).
bench-ddp: setup
	$(PY) bench/ddp_cpu.py --steps 40 --devices 2 --out bench/results/ddp_cpu.md

# TarFlow on alanine dipeptide: train (~21 min on 2 cores, + ~27 min of replica exchange on first use), then proposal vs importance-reweighted vs
# SMC samples against the MD test split (~10 min); writes bench/results/tarflow_aldp.md.
TARFLOW_RUNS ?= bench/runs/tarflow
bench-tarflow: setup
	WANDB_MODE=disabled $(VENV)/bin/bg fit --config configs/aldp_tarflow.yaml --trainer.enable_progress_bar=false \
		--trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.init_args.save_dir=$(TARFLOW_RUNS)
	$(PY) bench/tarflow.py --checkpoint $$(ls -t $$(find $(TARFLOW_RUNS) -name last.ckpt) | head -1) \
		--data-config configs/aldp_tarflow.yaml --step-size 1e-6 3e-6 --out bench/results/tarflow_aldp.md

# Equivariant CNF on alanine dipeptide: train (~26 min on 2 cores), then 1,000 samples with exact log q
# (~50 min), chirality/topology rates, ESS and torsion W2 vs the MD test split; writes bench/results/cnf_aldp.md.
# COMPARE="tarflow=<ckpt> nsf=<ckpt>" also times those generators' sampling on this machine.
CNF_RUNS ?= bench/runs/cnf
COMPARE ?=
bench-cnf: setup
	WANDB_MODE=disabled $(VENV)/bin/bg fit --config configs/aldp_cnf.yaml --trainer.enable_progress_bar=false \
		--trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.init_args.save_dir=$(CNF_RUNS)
	$(PY) bench/cnf.py --checkpoint $$(ls -t $$(find $(CNF_RUNS) -name last.ckpt) | head -1) \
		--data-config configs/aldp_cnf.yaml $(if $(COMPARE),--compare $(COMPARE),) --out bench/results/cnf_aldp.md

# Alanine dipeptide against a long replica-exchange reference of its own (~17 min, once, kept in
# bench/runs), then the newest `make train` checkpoints judged with 20,000 samples and OpenMM energies.
ALDP_RUN ?= $(shell ls -td runs/bg/*/checkpoints 2>/dev/null | head -1)
bench-aldp: setup
	$(PY) bench/aldp_reference.py --iterations 12000 --out bench/results/aldp_reference.md
	$(PY) bench/aldp_judge.py $(foreach c,$(wildcard $(ALDP_RUN)/stage-end-*.ckpt $(ALDP_RUN)/best-*.ckpt $(ALDP_RUN)/last.ckpt),--checkpoint $(c)) \
		--samples 20000 --out bench/results/aldp_judge.md

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
