# The two commands of the README: `make test` and `make reproduce`. Each installs first when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# tiny on a machine without a GPU, small on one with a GPU; override: make reproduce SCALE=paper
SCALE  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo small || echo tiny)

.PHONY: install test test-gpu reproduce bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

# The suite on WORKERS pytest-xdist processes (each with its share of torch threads: tests/conftest.py; worksteal evens
# out the minute-long tests at the end); WORKERS=0 runs it in this one process. The runner lives in TEST_TOOLS, outside
# the venv's site-packages, so that installing it leaves the pycode corpus (those site-packages' files) as it was.
WORKERS    ?= 2
TEST_TOOLS := $(VENV)/test-tools

$(TEST_TOOLS)/.installed: requirements-test.lock $(VENV)/.installed
	rm -rf $(TEST_TOOLS)
	$(BIN)/python -m pip install -q --no-deps --target $(TEST_TOOLS) -r requirements-test.lock
	@touch $@

test: install $(TEST_TOOLS)/.installed
	$(BIN)/ruff check gnsrepro tests benchmarks
	PYTHONPATH=$(abspath $(TEST_TOOLS))$${PYTHONPATH:+:$$PYTHONPATH} \
	  $(BIN)/python -m pytest -q $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist worksteal)

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

# every experiment of the scale (conf/plan/$(SCALE).yaml), its figures and outputs/reproduce/$(SCALE)/REPORT.md;
# PART=name runs one part (PART=report only rebuilds the report)
reproduce: install
	$(BIN)/gnsrepro reproduce plan=$(SCALE) $(if $(PART),part=$(PART))

bench: install
	$(BIN)/gnsrepro bench layernorm
	$(BIN)/gnsrepro bench train model=111M
	$(BIN)/gnsrepro bench overhead model=111M

lint: install
	$(BIN)/ruff check gnsrepro tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
