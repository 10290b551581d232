# kleinserve developer commands. `make serve` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_DIR := tests/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
CHROMIUM := /usr/bin/chromium

.PHONY: setup node-setup browser-setup postgres-setup test lint serve bench clean

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

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info $(NODE_DIR)/node_modules
