# One-command setup: `make test` creates .venv if missing, installs requirements.txt and runs lint + tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-portable lint format demo clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The fast tests again on PyTorch's portable CPU kernels: the kernel choice another CPU makes, seen on this one
# (a float compared with == where batching or kernels differ fails here on every machine). CI runs it after `test`.
test-portable: install
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -m "not sim and not slurm and not gpu" -p no:cacheprovider

# The main job: the whole pipeline at a small default on one LIBERO-Object task (CPU, ~15 min; outputs in demo/)
demo: install
	PY=$(PY) bash scripts/demo.sh

clean:
	rm -rf runs data results demo logs wandb .pytest_cache .ruff_cache
