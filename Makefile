# The two commands of the README. Each creates .venv and installs what it needs on first use
# (and again whenever pyproject.toml or constraints.txt change). constraints.txt pins the CPU
# build of torch, so nothing here pulls CUDA wheels.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export SAM_EDU_PROFILE ?= quick
export TF_CPP_MIN_LOG_LEVEL ?= 3
export KERAS_BACKEND ?= tensorflow

.PHONY: test book clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --constraint constraints.txt --editable ".[all]"
	$(BIN)/python -c "import sam_edu, torch, jax, optax, tensorflow, keras, nbval, jupyter_book"
	touch $(STAMP)

# All pytest tests, plus nbval over every chapter and every exercise solution.
# pytest exits 5 when it collects nothing, which is not a failure.
test: $(STAMP)
	$(BIN)/python -m pytest tests book exercises/solutions \
	  --nbval-lax --nbval-current-env --nbval-cell-timeout=900 || [ $$? -eq 5 ]

# Executes every chapter (quick profile unless SAM_EDU_PROFILE=full) into _build/html.
book: $(STAMP)
	$(BIN)/jupyter-book build . --builder html -n -W --keep-going

clean:
	rm -rf _build $(VENV)
