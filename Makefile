# The two commands of the README: `make demo` (the main job) and `make test` (the tests).
# Both create .venv and install the pinned environment and the package on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup build test demo bench clean

$(STAMP): requirements.txt pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# (Re)build relayops._C and, where nvcc is found, relayops._C_cuda in place; a no-op when
# csrc/ is unchanged.
build: setup
	$(BIN)/python setup.py build_ext --inplace

test: build
	$(BIN)/python -m pytest

demo: build
	$(BIN)/relayops demo

bench: build
	$(BIN)/python -m pytest bench

clean:
	rm -rf $(VENV) build *.egg-info
