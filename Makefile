# Two commands set everything up on a fresh machine:
#   make demo   -- create .venv (if needed), install, run a local federated simulation
#   make test   -- create .venv (if needed), install, lint, run the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedfuse-installed
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: setup demo test test-fast lint bench clean

# Re-installs only when pyproject.toml or constraints.txt change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[simulation,dev,transfer,track,onnx]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedfuse simulate

lint: $(STAMP)
	$(BIN)/ruff check .

# Two workers (pytest-xdist), one test file each at a time: the deployment tests mostly wait on
# Flower's polling, and the other worker runs the rest meanwhile (tests/conftest.py starts the
# longest files first). `$(BIN)/python -m pytest` alone runs the same suite in one process.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# Unit tests only (no federation), for a quick loop while editing.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
