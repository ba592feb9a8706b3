# Two commands on a fresh clone:  `make demo`  (train, measure, store in MLflow)  and  `make test`.
# Both create .venv and install what they need the first time.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned first so pip never pulls a multi-GB CUDA build onto a CPU machine: the dev and CI
# machines carry this CPU wheel locally. Override with TORCH="torch" (or your own spec) elsewhere.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench check-install clean

# The development install: every extra, full mlflow (the tests' tracking server), test tools.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	touch $@

# The demo needs less: Lightning, and full mlflow for the local sqlite store (the `demo` extra).
# An existing development install has it already.
$(VENV)/.demo: pyproject.toml
	@if [ -f $(VENV)/.installed ] && [ $(VENV)/.installed -nt pyproject.toml ]; then :; else \
	  set -e; [ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV); \
	  $(BIN)/python -m pip install --quiet "$(TORCH)"; \
	  $(BIN)/python -m pip install --quiet -e ".[demo]"; fi
	touch $@

# A sweep of three fits (baseline, smaller model, adaptive validation), compared, and the command
# that opens the green dashboard on them (docs/dashboard.md). `green-mlops demo` trains one.
demo: $(VENV)/.demo
	$(BIN)/python -m green_mlops.integrations.demo

# The MLflow UI test drives Debian's chromium: installed here when missing (needs root or sudo).
# Without it the UI test is skipped, with the install command, except where CI is set: there it
# fails. pytest exits 5 when it collects no test: for this suite that means it is broken, so fail.
test: install
	@scripts/install-browser.sh || if [ -n "$$CI" ]; then \
	  echo "make test: chromium could not be installed; the UI test will fail (CI is set)" >&2; \
	else echo "make test: chromium could not be installed; the UI test will be skipped" >&2; fi
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	MYPY=$(abspath $(BIN))/mypy scripts/typecheck.sh

bench: install
	$(BIN)/python benchmarks/overhead.py

# A wheel, installed with [mlflow] only in a fresh venv, measures a run on a real tracking server.
check-install: install
	PYTHON=$(abspath $(BIN))/python scripts/check-install.sh

clean:
	rm -rf $(VENV) mlflow.db mlruns lightning_logs
