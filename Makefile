# Set-up and entry points. `make demo` and `make test` each do the whole install on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
# Intra-op threads of a demo run: THREADS=, else OMP_NUM_THREADS from the environment, else every core. On a shared
# (loaded) machine use 1: a 2-thread step that has to wait for a busy core ran 5-17 s/it, a 1-thread one 0.8 s/it.
THREADS ?= $(or $(OMP_NUM_THREADS),$(shell nproc))

.PHONY: install demo demo-ar demo-markov demo-sft demo-fsdit test bench clean

$(PY):
	python3 -m venv $(VENV)

# torch first, and only if missing: the local CPU wheel; a bare `pip install torch` would pull CUDA packages.
# The eval extra (lm-eval-harness) is installed too, so `make test` runs the harness tests.
$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,eval]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		--num_cpu_threads_per_process $(THREADS) tdlm/train.py configs/quickstart.yaml trainer.overwrite=true

demo-ar: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(PY) tdlm/train.py configs/quickstart_ar.yaml trainer.overwrite=true

demo-markov: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(PY) tdlm/train.py configs/markov.yaml trainer.overwrite=true

# SFT (docs/sft.md): fine-tune the quickstart checkpoint (trained first by `make demo` if absent) on the embedded
# stdlib Q&A corpus, then the conditional bound before/after and answers to held-out prompts beside the references.
QUICKSTART_CKPT := runs/quickstart/checkpoints/step_0000600
demo-sft: $(STAMP)
	@test -f $(QUICKSTART_CKPT)/model/config.json || { echo "$(QUICKSTART_CKPT) absent: training it first (make demo)"; $(MAKE) demo; }
	OMP_NUM_THREADS=$(THREADS) $(PY) tdlm/train.py configs/sft.yaml trainer.overwrite=true \
		model.pretrained=$(QUICKSTART_CKPT)/model
	OMP_NUM_THREADS=$(THREADS) $(PY) eval/sft_demo.py --run runs/sft --before $(QUICKSTART_CKPT) --num-prompts 6 \
		--method ancestral --steps 64

# FSDiT on a generated CIFAR-100-layout dataset with a random tiny SigLIP (written once to .cache/fsdit/).
FSDIT_DEMO_DATA := .cache/fsdit/demo_data
demo-fsdit: $(STAMP)
	test -f $(FSDIT_DEMO_DATA)/cifar-100-python/meta || $(PY) -m tdlm.fsdit.data synthetic $(FSDIT_DEMO_DATA) --classes 20 --per-class 40
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		--num_cpu_threads_per_process $(THREADS) tdlm/fsdit/train.py configs/fsdit_demo.yaml trainer.overwrite=true

# -q comes from pyproject's addopts; a second one here would also drop the "N passed in T s" summary line.
test: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf runs .cache .pytest_cache
