# Tiffin: two commands on a fresh machine, `make serve` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 3000
HOST ?= 0.0.0.0
STAMP := $(VENV)/.installed

.PHONY: serve test setup redis-server chromium train seed lint typecheck unit bench build clean audit soak \
	deploy-tools bentos image deploy-check deploy-e2e deploy-render

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

# KServe's InferenceRESTClient, which tests/test_oip.py drives against the V2 routes, in its own
# virtualenv: kserve pins psutil and protobuf below what BentoML needs. Created once (pip, ~1 min),
# again only when KSERVE_VERSION changes.
KSERVE_VERSION := 0.21.0
KSERVE_VENV := .venv-kserve
KSERVE_STAMP := $(KSERVE_VENV)/.installed-$(KSERVE_VERSION)
$(KSERVE_STAMP):
	rm -rf $(KSERVE_VENV) && $(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install --quiet "kserve==$(KSERVE_VERSION)"
	@touch $(KSERVE_STAMP)

# Debian's redis-server, installed only when missing (tests start their own instances).
redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# Debian's chromium and chromium-driver, installed only when missing (tests/test_dashboard.py drives
# the dashboard in it; the test never downloads a browser and fails when it is absent).
chromium:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { \
	  echo "installing chromium and chromium-driver"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Trains or imports only what the model store lacks; MODEL_DIR (seed 000 layout) is imported too.
train: setup
	$(PY) -m models.train
	$(PY) -m models.tiny_llm
	@if [ -n "$${MODEL_DIR:-$${TIFFIN_MODEL_DIR:-}}" ]; then $(PY) -m models.importer "$${MODEL_DIR:-$$TIFFIN_MODEL_DIR}"; fi

# Writes the generated entity history to Redis when REDIS_URL/REDIS_HOST is set.
seed: setup
	$(PY) -m models.seed_features

# Development mode: without JWT_SECRET_KEY a random secret is generated once into .tiffin/.
serve: train seed
	@export JWT_SECRET_KEY="$${JWT_SECRET_KEY:-$$($(PY) -c 'from tiffin.auth import dev_secret; print(dev_secret())')}"; \
	  echo "Tiffin serving on http://localhost:$(PORT)  (feature store: $${REDIS_URL:-$${REDIS_HOST:-embedded}})"; \
	  echo "Admin API token: $(PY) -m tiffin.auth mint --scope admin"; \
	  exec $(VENV)/bin/bentoml serve service:Tiffin --host $(HOST) --port $(PORT)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy tiffin runners models service.py bench

test: setup redis-server chromium lint typecheck $(KSERVE_STAMP)
	TIFFIN_KSERVE_PYTHON=$(CURDIR)/$(KSERVE_VENV)/bin/python $(VENV)/bin/pytest -q

# bandit (no medium/high finding) and pip-audit over tiffin[dev]'s installed dependencies, with
# justified exceptions in .ci/pip-audit-exceptions.txt; .ci/run calls it after `make test`.
audit: setup
	$(PY) .ci/audit.py

# Issue 11's soak: 10 min of mixed load with repeated version swaps, RSS per process over time,
# a verdict line; e.g. `make soak ARGS="--minutes 3"`. Results in bench/results/soak-*.json.
soak: setup redis-server train
	$(PY) -m bench.soak $(ARGS)

# Issue 3's benchmark: Tiffin, a seed-style service, a hand-tuned reference and MLServer, stepped
# open-loop load until p99 breaks (12-14 min); table on stdout, JSON/Markdown in bench/results/.
# Then the engine micro-benchmark. Iterate on one endpoint with `make bench-quick ARGS="..."`.
.PHONY: bench-setup bench-quick bench-profile
bench: setup redis-server train bench-setup
	$(PY) -m bench.run $(ARGS)
	$(PY) -m bench.engines

# MLServer 1.7.1 lives in its own virtualenv (bench/.venvs/mlserver, gitignored): it pins an older
# starlette, and its worker crashes with uvloop >= 0.22.
bench-setup: setup
	$(PY) -c "from bench.systems import ensure_mlserver_venv; ensure_mlserver_venv()"

# e.g. make bench-quick ARGS="--systems tiffin --workloads score_fraud"
bench-quick: setup redis-server train
	$(PY) -m bench.run --quick $(ARGS)

# py-spy profile of Tiffin's workers under constant load, e.g. ARGS="--workload score_fraud --rate 150"
bench-profile: setup redis-server train
	$(PY) -m bench.profile $(ARGS)

# Issue 13's side-by-side LLM benchmark: Tiffin's /openai/v1/chat/completions vs mlx_lm.server
# (shipped with mlx-lm) on the bench-size model and the tiny one, 1/8/32/64 streams (~8 min).
.PHONY: bench-llm
bench-llm: train
	$(PY) -m models.tiny_llm --bench
	$(PY) -m bench.llm $(ARGS)

build: train
	$(VENV)/bin/bentoml build .

# --- delivery (docs/deploy.md) ------------------------------------------------------------------
# Image variants: full (LLM in the entry service), tabular (no mlx, no LLM), llm (the LLM runner
# alone). Each is a Bento derived from pyproject.toml by deploy/image/bento.py, then an OCI image
# from `bentoml containerize`: with Docker when a Docker engine answers, else buildah (podman's
# storage), which deploy/tools/install.sh installs on a fresh machine.
IMAGES ?= full tabular llm
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
IMAGE_PREFIX ?=
export CONTAINERS_CONF ?= $(CURDIR)/deploy/image/containers.conf

deploy-tools: setup
	deploy/tools/install.sh

# One Bento per variant; its tag is kept in build/bento-<variant>.tag.
bentos: train
	@mkdir -p build
	@for v in $(IMAGES); do \
	  PYTHONPATH=$(CURDIR) $(PY) deploy/image/bento.py $$v > build/bento-$$v.tag || exit 1; \
	  echo "bento $$v: $$(cat build/bento-$$v.tag)"; done

image: deploy-tools bentos
	@if docker info >/dev/null 2>&1; then backend=docker; opts=; \
	else backend=buildah; opts="--opt volume=/etc/ssl/certs:/etc/ssl/certs:ro"; \
	  deploy/image/base.sh; fi; \
	for v in $(IMAGES); do \
	  start=$$(date +%s); [ $$v = full ] && name=$(IMAGE_PREFIX)tiffin || name=$(IMAGE_PREFIX)tiffin-$$v; \
	  $(VENV)/bin/bentoml containerize --backend $$backend $$opts -t $$name:$(IMAGE_TAG) \
	    $$(cat build/bento-$$v.tag) > build/image-$$v.log 2>&1 \
	    || { tail -40 build/image-$$v.log; exit 1; }; \
	  echo "image $$name:$(IMAGE_TAG) built by $$backend in $$(( $$(date +%s) - start ))s"; \
	done; \
	if [ $$backend = buildah ]; then \
	  podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '/tiffin|python:3.11-slim'; \
	  podman image prune -f >/dev/null; fi  # the images a rebuild untagged: 2+ GB each

# Re-render deploy/k8s/ from the chart after changing it.
deploy-render: deploy-tools
	$(PY) deploy/render.py

# Static delivery checks: chart, manifests, custom resources, rules, dashboard, Dockerfiles.
deploy-check: deploy-tools bentos
	TIFFIN_DOCKERFILES="$$(for v in $(IMAGES); do echo $$($(VENV)/bin/bentoml get $$(cat build/bento-$$v.tag) -o path)/env/docker/Dockerfile; done)" \
	  $(VENV)/bin/pytest -q -p no:cacheprovider deploy/tests/test_static.py

# The images run from the rendered manifests with podman, scraped by a real Prometheus.
deploy-e2e: image
	IMAGE_TAG=$(IMAGE_TAG) $(VENV)/bin/pytest -q -p no:cacheprovider deploy/tests/test_e2e.py

clean:
	rm -rf $(VENV) $(KSERVE_VENV) .mypy_cache .ruff_cache .pytest_cache
