# Set-up and entry points. `make demo` and `make test` work on a fresh machine: each creates the
# virtual environment on first use (CPU torch pinned by constraints/cpu.txt, so no CUDA wheels).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints/cpu.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints/cpu.txt -e '.[cpu,dev]'
	touch $@

# cellpose 3.1 pins numpy<2.1, so its tests run in a second environment (the main one keeps current numpy).
CP_VENV ?= .venv-cellpose
$(CP_VENV)/.installed: pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(CP_VENV)
	$(CP_VENV)/bin/python -m pip install -q -c constraints/cpu.txt torch==2.13.0
	$(CP_VENV)/bin/python -m pip install -q -c constraints/cpu.txt -e '.[cpu,dev,cellpose]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/msnoop demo

test: $(VENV)/.installed $(CP_VENV)/.installed
	$(BIN)/python -m pytest
	$(CP_VENV)/bin/python -m pytest -m cellpose -p no:cacheprovider

clean:
	rm -rf demo_output .pytest_cache
