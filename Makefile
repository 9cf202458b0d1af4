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
PYTEST_ARGS ?=

export PYTHONUNBUFFERED := 1

.PHONY: env tokenize train test bench eval sample demo clean

env: $(STAMP)

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON_SYS) -m venv $(VENV)
	@echo "installing into $(VENV) ($(TORCH_SPEC) first, then the project) ..."
	@$(PY) -m pip install $(PIP_FLAGS) "$(TORCH_SPEC)" 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -m pip install $(PIP_FLAGS) -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import torch, vector_quantize_pytorch, tokenizers, torchdata, safetensors" \
		|| { echo "environment install failed: see the pip output above"; exit 1; }
	@touch $(STAMP)

tokenize: $(STAMP)
	$(PY) -m train.tokenize --preset $(PRESET) --out $(OUT) $(if $(DATA),--data $(DATA) --data-mode $(DATA_MODE))

train: $(STAMP)
	$(PY) -m train --preset $(PRESET) --data $(OUT) --out $(RUN) --resume $(RESUME) $(if $(STEPS),--steps $(STEPS))

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(OUT) runs
