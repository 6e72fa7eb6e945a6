# synthcohort — `make demo` and `make test` work on a fresh machine with Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo
DEMO_PATIENTS ?= 1000

.PHONY: install demo test lint bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/.installed

$(DEMO_DIR)/raw/labels.csv: | $(BIN)/.installed
	$(BIN)/synthcohort demo-data --out $(DEMO_DIR)/raw --patients $(DEMO_PATIENTS) --force

$(DEMO_DIR)/store/store.json: $(DEMO_DIR)/raw/labels.csv
	$(BIN)/synthcohort ingest $(DEMO_DIR)/raw --labels $(DEMO_DIR)/raw/labels.csv --out $(DEMO_DIR)/store --force

demo: $(DEMO_DIR)/store/store.json
	$(BIN)/synthcohort info $(DEMO_DIR)/store

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest exits 5 when no test was collected: report it and fail.
test: lint
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; exit $$rc

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_ingest.py --patients $(DEMO_PATIENTS) --workers 2

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
