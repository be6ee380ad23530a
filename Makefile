# Two commands do everything on a fresh machine with Python 3.11+ and make:
#   make demo   - a real batch end to end (local Prefect server, local apixo emulator, local storage)
#   make test   - install the locked environment, lint, type-check and run the test suite
PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: install lint format test test-fast chromium demo demo-stop bench clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

# Rebuilt only when the lock or the project metadata changes; `uv sync --frozen` installs exactly the
# lock, with the `emulator` extra (numpy) that the demo, the tests and the benchmarks need.
# Compiled to bytecode once (~15 s): where PYTHONDONTWRITEBYTECODE is set (it is on the dev machine),
# every Prefect server, worker and CLI run would otherwise compile Prefect again (~1.7 s each).
$(VENV)/.installed: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --all-extras --compile-bytecode --python $(PYTHON)
	@touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint chromium
	$(BIN)/pytest

# The review page is tested in headless Chromium (tests/test_review.py). Debian's package is
# installed when no chromium is on the PATH (as root, or through sudo); without apt-get the
# browser tests are skipped with a loud reason.
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; \
	else echo "WARNING: no chromium and no apt-get: the review page's browser tests will be skipped"; \
	fi

test-fast: install
	$(BIN)/pytest -x -q -m "not slow"

demo: install
	$(BIN)/python -m hailuo_batch.demo

demo-stop: install
	$(BIN)/python -m hailuo_batch.demo stop

bench: install
	$(BIN)/python bench/bench_batch.py --items 1000

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache demo-output
