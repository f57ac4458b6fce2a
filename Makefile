# Two commands for a fresh machine:  `make demo` (the main job) and `make test` (the suite).
# Both create or refresh the local virtual environment first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint docs bench clean

venv: $(STAMP)

# Refreshed whenever a project file that declares dependencies changes.
$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,dev,plot,docs]"
	for plugin in plugins/*/; do $(BIN)/python -m pip install -q -e "$$plugin[test]" || exit 1; done
	touch $(STAMP)

demo: venv
	$(BIN)/scalarlens demo --plot scalarlens-demo.png

# The core suite, then each plugin's own suite from its directory (its own pytest config).
# pytest's exit code 5 (no tests collected) is reported, not treated as a failure.
test: venv
	@run() { "$$@"; rc=$$?; [ $$rc -eq 5 ] && { echo "warning: no tests collected by: $$*"; rc=0; }; return $$rc; }; \
	run $(BIN)/python -m pytest || exit $$?; \
	for plugin in plugins/*/; do \
		echo "== $$plugin"; \
		(cd "$$plugin" && run $(CURDIR)/$(BIN)/python -m pytest -q) || exit $$?; \
	done

lint: venv
	$(BIN)/ruff check core builtin_derivers tests benchmarks scripts plugins docs/gen_pages.py
	$(BIN)/mypy

docs: venv
	$(BIN)/python docs/gen_pages.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

bench: venv
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
