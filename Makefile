# Two commands for a fresh machine:  `make demo` (the main job) and `make test` (the suite).
# Both create or refresh the local virtual environment first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINKS := $(VENV)/.linked

.PHONY: venv demo test lint docs bench clean

venv: $(LINKS)

# Editable installs are path based ("strict": a tree of links under build/, put on sys.path by a
# .pth file).  setuptools' default mode resolves `scalarlens` with an import hook that runs
# after the normal path search, so a folder named `scalarlens` in the current directory (a clone
# of this repository, say) would win and `import scalarlens` would give an empty namespace.
# A link tree does not see modules added later: the package folders are prerequisites of
# $(LINKS), so adding, renaming or removing a module relinks on the next make.
STRICT := --config-settings editable_mode=strict
PACKAGE_DIRS := $(shell find core/scalarlens builtin_derivers/scalarlens_builtins \
	$(wildcard plugins/*/scalarlens_*) -type d ! -name __pycache__ 2>/dev/null)

# Refreshed whenever a project file that declares dependencies changes.
$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,dev,plot,docs,ray]" $(STRICT)
	for plugin in plugins/*/; do $(BIN)/python -m pip install -q -e "$$plugin[test]" $(STRICT) || exit 1; done
	touch $(STAMP)

$(LINKS): $(STAMP) $(PACKAGE_DIRS)
	$(BIN)/python -m pip install -q --no-deps -e . $(STRICT)
	for plugin in plugins/*/; do $(BIN)/python -m pip install -q --no-deps -e "$$plugin" $(STRICT) || exit 1; done
	touch $(LINKS)

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

LINTED := core builtin_derivers tests benchmarks scripts plugins docs/gen_pages.py

lint: venv
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

docs: venv
	$(BIN)/python docs/gen_pages.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

bench: venv
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
