# kleinserve developer commands. `make serve` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_DIR := tests/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
CHROMIUM := /usr/bin/chromium

.PHONY: setup node-setup browser-setup postgres-setup test lint serve bench gpu-wheels clean

setup: $(STAMP)

# Re-installs only when the dependency pins change; torch comes from the CPU build pinned in constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

node-setup: $(NODE_STAMP)

# The Vercel AI SDK packages tests/api/test_vercel.py runs under Node, exactly as locked; `npm ci` again
# only when node_modules is missing or package.json / package-lock.json changed.
$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v npm >/dev/null || { echo "make: Node.js >= 20 with npm is needed for the tests" >&2; exit 1; }
	cd $(NODE_DIR) && npm ci --no-audit --no-fund
	touch $(NODE_STAMP)

# Debian's Chromium for the playground tests (tests/web drive it with the playwright package from the dev
# extras, which never downloads a browser of its own); installed only when missing. Needs root, as apt does.
browser-setup: setup
	@test -x $(CHROMIUM) || { \
		echo "make: installing Debian's chromium for tests/web"; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; \
	}

# Debian's PostgreSQL server for the job store tests (tests/postgres.py runs a private cluster of its own, as a
# non-root user); installed only when no initdb is there. Needs root, as apt does.
postgres-setup:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		echo "make: installing Debian's postgresql for the job store tests"; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql; \
	}

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: setup node-setup browser-setup postgres-setup lint
	$(BIN)/python -m pytest -q

serve: setup
	$(BIN)/kleinserve serve

bench: setup
	$(BIN)/python bench/engine.py

# Every wheel a GPU machine with a CUDA torch but no network needs for kleinserve and bench/gpu.py, kleinserve's
# own included, into $(GPU_WHEELS) (git-ignored); there: `bash bench/gpu_setup.sh` (README, GPU). Binary wheels
# only, for CPython $(GPU_PYTHON) on manylinux x86_64. Left out, to stay under the GPU machine's 64 MiB transfer
# limit: torch and what torch requires, the packages of GPU_PRESENT (numpy: 16 MiB, in every CUDA torch image
# seen; `make gpu-wheels GPU_PRESENT=` carries it too) and the embedded toy model (12 MiB; GPU runs name their
# model). ~48 MiB.
GPU_WHEELS := .gpu-wheels
GPU_PYTHON ?= 3.11
GPU_PRESENT ?= numpy
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 \
	manylinux1_x86_64 linux_x86_64
gpu-wheels: setup
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)/tree
	echo $(GPU_PYTHON) > $(GPU_WHEELS)/python-version
	$(BIN)/python bench/gpu_requirements.py $(addprefix --present ,$(GPU_PRESENT)) > $(GPU_WHEELS)/requirements.txt
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
		$(addprefix --platform ,$(GPU_PLATFORMS)) --dest $(GPU_WHEELS) -r $(GPU_WHEELS)/requirements.txt
	tar -cf - --exclude=src/kleinserve/models --exclude=__pycache__ --exclude='*.egg-info' \
		pyproject.toml README.md src | tar -xf - -C $(GPU_WHEELS)/tree
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir $(GPU_WHEELS) $(GPU_WHEELS)/tree
	rm -rf $(GPU_WHEELS)/tree
	@du -sh $(GPU_WHEELS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info $(NODE_DIR)/node_modules
