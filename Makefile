# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test docs install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and pinned: the pin takes the local CPU wheel, so the project's `torch>=2.4`
# is already satisfied and pip never pulls the CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/peftlab plan --model minilm-l6 --placement attention --rank 8 --output demo/plan.json
	$(BIN)/peftlab study run placement --dir demo/placement --jobs 2
	$(BIN)/peftlab study export demo/placement
	$(BIN)/peftlab report demo/placement

test: $(STAMP)
	$(BIN)/python -m pytest

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache
