# rayfarm: the two commands are `make demo` and `make test`; both set up first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rayfarm-setup
#: Where setup steps write what they print (scripts/quietly.sh shows one line each).
LOGS   := build/setup

.PHONY: setup demo test lint bench bench-tiles bench-slices bench-upload bench-scale bench-api bench-load bench-stop bench-worker bench-cpu clean addon

## setup: create or reuse .venv with the SDK, cluster, render and dev extras; build the
## Blender environments the farm offers ($RAYFARM_BLENDER, default 5.3 and 5.0: bpy from
## PyPI, ~400 MB each, cached in ~/.cache/rayfarm/blender); install redis-server and
## chromium (the web page's browser tests)
setup: $(STAMP)
	@./scripts/install-system.sh redis-server redis-server redis
	@./scripts/install-system.sh chromium chromium
	@$(BIN)/rayfarm blender install

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "rayfarm needs Python 3.11 ($(PYTHON) not found): install it (pyenv install 3.11) or run make PYTHON=/path/to/python3.11" >&2; exit 2; }
	@test -x $(BIN)/python || ./scripts/quietly.sh "creating $(VENV) with $(PYTHON)" $(LOGS)/venv.log $(PYTHON) -m venv $(VENV)
	@./scripts/quietly.sh "upgrading pip in $(VENV)" $(LOGS)/pip.log $(BIN)/python -m pip install --upgrade pip
	@./scripts/quietly.sh "installing rayfarm and its extras into $(VENV), about 1.3 GB with Ray (minutes the first time)" $(LOGS)/install.log $(BIN)/python -m pip install -e '.[cluster,render,dev]'
	@touch $(STAMP)

## demo: start a local farm, render the example scene (frames 1-8, one frame as 2x2 tiles), download
demo: setup
	@$(BIN)/python examples/demo.py

## test: lint, type-check and run every test (slow ones included) against real Redis, Ray and bpy
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/mypy_tree.py
	$(BIN)/mypy
	$(BIN)/python -m pytest

## lint: ruff and mypy, as make test runs them (mypy over scripts/mypy_tree.py's build/mypy)
lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/python scripts/mypy_tree.py && $(BIN)/mypy

## bench: the overhead benchmark, median of 3 runs of each way (see BENCHMARKS.md)
bench: setup
	$(BIN)/python bench/overhead.py --repeat 3

## bench-tiles: one frame whole vs tiled 2x2 vs auto on two actors (see BENCHMARKS.md)
bench-tiles: setup
	$(BIN)/python bench/tiles.py --sweep

## bench-slices: one high-sample frame whole vs its samples in 2 and 4 slices on two actors
bench-slices: setup
	$(BIN)/python bench/slices.py

## bench-upload: first submit vs unchanged re-submit vs one texture changed (~200 MB of textures)
bench-upload: setup
	$(BIN)/python bench/upload.py

## bench-api: GET /jobs/{id}/status through Ray Serve vs bare uvicorn, and SSE streams held
bench-api: setup
	$(BIN)/python bench/api.py

## bench-load: 200 submissions at once with status polling, then a sustained status-poll load
bench-load: setup
	$(BIN)/python bench/load.py

## bench-stop: how soon a cancel stops a render in progress, and a hung render is killed
bench-stop: setup
	$(BIN)/python bench/stop.py

## bench-worker: the Blender worker boundary: a cold and a warm worker against a bpy process
bench-worker: setup
	$(BIN)/python bench/worker.py

## bench-cpu: CPU seconds of the farm's own processes by role, idle and during a job
bench-cpu: setup
	$(BIN)/python bench/cpu.py

## bench-scale: dispatch throughput with a no-op render, 10 000 tasks on 8 simulated GPU nodes
bench-scale: setup
	$(BIN)/python bench/scale.py

## addon: build the Blender extension, dist/rayfarm-addon-<version>.zip (wheels fetched at build time)
addon: setup
	$(BIN)/python blender_addon/build.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
