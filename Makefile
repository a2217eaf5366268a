# clx: every figure from its notebook, headless. `make figures` and `make test` set up the
# environment first when it is missing. Offline (no internet): CLX_OFFLINE=1 make figures
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.clx-installed
PROFILE ?= quick
NOTEBOOKS := $(wildcard notebooks/*.ipynb)
NAMES := $(basename $(notdir $(NOTEBOOKS)))
CORE := $(shell find clx_core -name '*.py')

.DEFAULT_GOAL := figures
.PHONY: figures test setup lab bench test-refs lint unit nbval clean distclean $(addprefix figure-,$(NAMES))

figures: $(addprefix figure-,$(NAMES))

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# One executed copy per notebook in build/; its figures land in figures/<notebook>/.
$(addprefix figure-,$(NAMES)): figure-%: build/%.ipynb

build/%.ipynb: notebooks/%.ipynb $(CORE) $(STAMP)
	@mkdir -p build
	$(BIN)/papermill $< build/.$*.partial.ipynb -p profile $(PROFILE) --cwd notebooks --log-level WARNING
	mv build/.$*.partial.ipynb $@

test: lint unit nbval

lint: $(STAMP)
	$(BIN)/ruff check clx_core tests notebooks

unit: $(STAMP)
	CLX_OFFLINE=1 $(BIN)/python -m pytest tests --ignore=tests/notebooks

# Notebook regression: re-execute the committed smoke runs and compare the marked cells.
nbval: $(STAMP)
	rm -rf build/nbval-results
	CLX_OFFLINE=1 CLX_RESULTS=build/nbval-results $(BIN)/python -m pytest --nbval-lax tests/notebooks \
		--nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

# Regenerate the committed smoke runs (after a deliberate change of results).
test-refs: $(STAMP)
	rm -rf build/refs-results
	for nb in $(NOTEBOOKS); do \
		CLX_OFFLINE=1 CLX_RESULTS=build/refs-results $(BIN)/papermill $$nb tests/notebooks/$$(basename $$nb) \
			-p profile smoke -p offline True --cwd notebooks --log-level WARNING || exit 1; \
	done

bench: $(STAMP)
	@mkdir -p build
	CLX_OFFLINE=1 $(BIN)/python -m clx_core.bench --out build/bench.json

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

clean:
	rm -rf build results .pytest_cache .ruff_cache figures/*/
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
