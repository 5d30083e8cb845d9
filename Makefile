# Every target installs what it needs into .venv itself. `make help` lists them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run demo test lint format bench image secrets upstream mlflow-ui serve compile lock clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# A .venv that lacks pip (venv's module missing when it was made: Debian's python3.x-venv) or
# is older than 3.11 is made anew; pip's own errors named neither.
$(STAMP): requirements.txt
	@$(PY) -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  $(PYTHON) -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	    echo "error: $(PYTHON) is not Python 3.11+ with its venv module; pass PYTHON=python3.11 (or newer), and on Debian/Ubuntu apt install python3.11-venv" >&2; exit 2; }; \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## create .venv with the pinned requirements (torch + torchvision as a PyPI pair)

run: $(STAMP) ## run the pipeline on CIFAR-10 (downloads it once, where a network exists); ARGS=... adds flags
	$(PY) pipelines/run.py $(ARGS)

demo: $(STAMP) ## the whole pipeline offline on generated data, then serve the model (Ctrl-C stops)
	$(PY) pipelines/run.py --dataset synthetic --profile smoke --serve $(ARGS)

# Two processes, a test file each at a time (a file's servers and trained models are its own):
# one process kept 2 cores about 60% busy, as the tests wait on servers and subprocesses.
test: $(STAMP) ## run the test suite (real S3 server processes on 127.0.0.1), in 2 processes
	$(PY) -m pytest -n 2 --dist loadfile $(ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP) ## ruff format and autofix
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP) ## every benchmark into benchmarks/results/ and docs/BENCHMARKS.md (~80 min; ARGS="--only serving")
	$(PY) -m benchmarks $(ARGS)

IMAGE = $(shell $(PY) -c 'from pipelines.config import PipelineConfig; print(PipelineConfig().image)' 2>/dev/null)
TORCH_INDEX_URL ?=

image: $(STAMP) ## build the project image, tagged from the config (needs a Docker engine)
	docker build -f infrastructure/Dockerfile -t $(IMAGE) \
	  --build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) --build-arg GIT_COMMIT=$(shell git rev-parse HEAD) .

secrets: $(STAMP) ## write random keys for the Kubernetes overlays (git-ignored *.env; never committed)
	$(PY) -m pipelines.keys

upstream: ## install the pinned cert-manager, Argo Workflows, Training Operator and KServe (kubectl context)
	infrastructure/upstream/install.sh

mlflow-ui: $(STAMP) ## browse the local runs in the MLflow UI (port: mlflow.ui_port, default 5000)
	$(PY) pipelines/run.py mlflow-ui $(ARGS)

serve: $(STAMP) ## serve the registered champion again, as `run` left it (ARGS="--dataset synthetic")
	$(PY) pipelines/run.py serve $(ARGS)

compile: $(STAMP) ## regenerate the committed golden files in pipelines/compiled/ (Argo, KFP, manifests)
	$(PY) pipelines/run.py compile --out pipelines/compiled

lock: ## re-resolve requirements.in into the fully pinned requirements.txt
	rm -rf /tmp/mlops-lock && $(PYTHON) -m venv /tmp/mlops-lock
	/tmp/mlops-lock/bin/pip install --quiet -r requirements.in
	{ echo "# Full lock of requirements.in (pip freeze of a clean .venv). Regenerate with: make lock"; \
	  /tmp/mlops-lock/bin/pip freeze; } > requirements.txt

clean: ## remove local state (.mlops/) and build output
	rm -rf .mlops build .pytest_cache
