# Two commands on a fresh clone:  `make demo`  (train, measure, store in MLflow)  and  `make test`.
# Both create .venv and install what they need the first time.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned first so pip never pulls a multi-GB CUDA build onto a CPU machine: the dev and CI
# machines carry this CPU wheel locally. Override with TORCH="torch" (or your own spec) elsewhere.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	touch $@

demo: install
	$(BIN)/green-mlops demo

# The MLflow UI test drives Debian's chromium: installed here when missing (needs root or sudo).
# pytest exits 5 when it collects no test: for this suite that means it is broken, so fail.
test: install
	@scripts/install-browser.sh || echo "make test: chromium could not be installed; the UI test will fail" >&2
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	MYPY=$(abspath $(BIN))/mypy scripts/typecheck.sh

bench: install
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) mlflow.db mlruns lightning_logs
