# synthcohort — `make demo` and `make test` work on a fresh machine with Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo
DEMO_PATIENTS ?= 1000
TEST_WORKERS ?= 2

.PHONY: install demo audit test test-fast lint bench wheelhouse clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,ray,postgres]"
	touch $@

install: $(BIN)/.installed

$(DEMO_DIR)/raw/labels.csv: | $(BIN)/.installed
	$(BIN)/synthcohort demo-data --out $(DEMO_DIR)/raw --patients $(DEMO_PATIENTS) --force

# The demo's patients are synthetic, so a re-ingest starts their privacy budget afresh (--reset-budget, recorded
# in the new ledger). With real patients, leave it out: a replaced store's ledger then follows its patients.
$(DEMO_DIR)/store/store.json: $(DEMO_DIR)/raw/labels.csv
	$(BIN)/synthcohort ingest $(DEMO_DIR)/raw --labels $(DEMO_DIR)/raw/labels.csv --declare-labels healthy,lesion \
		--out $(DEMO_DIR)/store --force --reset-budget

# Retrains only when the store changed (make's timestamps); `train` also reuses a bundle whose inputs match.
$(DEMO_DIR)/model/model_card.json: $(DEMO_DIR)/store/store.json
	$(BIN)/synthcohort train $(DEMO_DIR)/store --out $(DEMO_DIR)/model --epsilon 8 --preset cpu-small --force

$(DEMO_DIR)/model/private/calibration.json: $(DEMO_DIR)/model/model_card.json
	$(BIN)/synthcohort calibrate $(DEMO_DIR)/store $(DEMO_DIR)/model

# A small released cohort: generated, filtered, written; --resume continues an interrupted export.
$(DEMO_DIR)/cohort/manifest.json: $(DEMO_DIR)/model/private/calibration.json
	rm -rf $(DEMO_DIR)/cohort
	$(BIN)/synthcohort export $(DEMO_DIR)/model --out $(DEMO_DIR)/cohort --n 50 --format nifti,png --resume

demo: $(DEMO_DIR)/cohort/manifest.json
	$(BIN)/synthcohort info $(DEMO_DIR)/store
	$(BIN)/synthcohort card $(DEMO_DIR)/model
	@echo "unfiltered sample grids (internal, never served): $(DEMO_DIR)/model/private/unfiltered_samples_*.png"
	@echo "synthetic cohort (NIfTI + PNG previews, manifest, privacy report): $(DEMO_DIR)/cohort"

# Internal privacy and utility report on the demo model (≈ 10 min on 2 cores); never served.
audit: $(DEMO_DIR)/model/private/calibration.json
	$(BIN)/synthcohort audit $(DEMO_DIR)/store $(DEMO_DIR)/model --out $(DEMO_DIR)/audit --force

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint docker/Dockerfile docker/Dockerfile.cuda

# pytest exits 5 when no test was collected: report it and fail. The files run in TEST_WORKERS processes
# (pytest-xdist; idle ones take queued tests from busy ones); TEST_WORKERS=0 runs them in this one.
test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; exit $$rc

# Everything that needs no trained model, server, browser or PostgreSQL (tests/conftest.py: lanes), in about 2 minutes.
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not slow and not browser and not postgres" -q

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/perf/bench_ingest.py --patients $(DEMO_PATIENTS) --workers 2

# Wheels for an offline machine that already has a CUDA build of torch (an air-gapped GPU server, a vendor image):
# what bench_gpu.py needs beyond such an image, at constraints.txt's versions, for its Python (WHEEL_PY). There:
#   pip install --no-index --no-deps --target wheelhouse/site wheelhouse/*.whl
#   PYTHONPATH=wheelhouse/site:. python benchmarks/perf/bench_gpu.py --device cuda --out bench_runs/gpu
WHEEL_PY ?= 3.12
GPU_IMAGE_LACKS = diffusers opacus faiss-cpu nibabel nilearn monai pydicom pydantic pydantic-core annotated-types \
	typing-inspection
wheelhouse:
	rm -rf wheelhouse
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: -c constraints.txt -d wheelhouse \
		--python-version $(WHEEL_PY) --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 $(GPU_IMAGE_LACKS)
	@du -sh wheelhouse

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
