# User entry points. Every target creates .venv on first use and installs into it.
#   make tokenize train      the main job on the embedded corpora (artifacts/ then runs/default/)
#   make test                the test suite (tiny presets, CPU only, no network)
# Variables: PRESET=tiny|default|... DATA=path/to/docs.jsonl OUT=artifacts RUN=runs/default
#            TORCH_SPEC='torch==2.13.0' (pick a CUDA build elsewhere, see README)

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
PIP_FLAGS  ?= -q --disable-pip-version-check

PRESET     ?= default
OUT        ?= artifacts
DATA       ?=
DATA_MODE  ?= add
RUN        ?= runs/$(PRESET)
STEPS      ?=
RESUME     ?= auto
CKPT       ?= $(RUN)
HOST       ?= 127.0.0.1
PORT       ?= 7860
PYTEST_ARGS ?=

export PYTHONUNBUFFERED := 1

.PHONY: env tokenize train test bench eval eval-retrieval sample demo clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -d $(VENV) || $(PYTHON_SYS) -m venv $(VENV)
	@echo "installing into $(VENV) ($(TORCH_SPEC) first, then the project) ..."
	@$(PY) -m pip install $(PIP_FLAGS) "$(TORCH_SPEC)" 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import torch, vector_quantize_pytorch, tokenizers, torchdata, safetensors" \
		|| { echo "environment install failed: see the pip output above"; exit 1; }
	@touch $(STAMP)

tokenize: $(STAMP)
	$(PY) -m train.tokenize --preset $(PRESET) --out $(OUT) $(if $(DATA),--data $(DATA) --data-mode $(DATA_MODE))

train: $(STAMP)
	$(PY) -m train --preset $(PRESET) --data $(OUT) --out $(RUN) --resume $(RESUME) $(if $(STEPS),--steps $(STEPS))

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# an example of the sampling CLI: four images for a caption, and a caption for one of them
sample: $(STAMP)
	$(PY) -m sample generate --ckpt $(CKPT) --prompt "a small red circle in the top left" --next image --n 4 --seed 0 --out $(CKPT)/sample_example
	$(PY) -m sample generate --ckpt $(CKPT) --prompt "<image>" --image $(CKPT)/sample_example/sample0_0.png --next text --n 2 --out $(CKPT)/sample_example/caption

demo: $(STAMP)
	$(PY) -m demo --ckpt $(CKPT) --host $(HOST) --port $(PORT)

# benchmarks (not tests): figures into bench/results.json; transformers is a benchmark-only extra
bench: $(STAMP)
	@$(PY) -c "import transformers" 2>/dev/null || $(PY) -m pip install $(PIP_FLAGS) -e '.[bench]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) bench/bench_train.py
	$(PY) bench/bench_sample.py
	$(PY) bench/bench_classify.py --ckpt $(CKPT)
	$(PY) bench/bench_index.py
	$(PY) bench/report.py

eval: $(STAMP)
	$(PY) bench/eval.py --ckpt $(CKPT) $(if $(wildcard $(OUT)/retriever),--retriever $(OUT)/retriever)
	$(PY) bench/report.py

# held-out image NLL with retrieval on/off (CKPT trained with PRESET=ra; BASELINE= a run without)
eval-retrieval: $(STAMP)
	$(PY) bench/eval_retrieval.py --ckpt $(CKPT) --data $(OUT) $(if $(BASELINE),--baseline $(BASELINE))
	$(PY) bench/report.py

clean:
	rm -rf $(OUT) runs
