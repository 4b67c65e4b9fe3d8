# Two commands on a fresh machine: `make run` (serve the demo model) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU wheel on this project's machines; on a GPU host use the CUDA base image instead.
# A looser pin makes pip pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 5000
IMAGE_REGISTRY ?=
TAG    ?= latest

.PHONY: run test soak bench demo-model gpu-check images images-check deploy undeploy operator manifests-check lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# One stamp per extra, so `make run` does not install the test tools.
$(VENV)/.server: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[server]'
	touch $@

$(VENV)/.dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: $(VENV)/.server
	@echo "Try:  curl -s http://$(HOST):$(PORT)/generate -H 'Content-Type: application/json' -d '{\"prompt\": \"The list\", \"max_length\": 80}'"
	$(BIN)/python -m server --host $(HOST) --port $(PORT)

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

# A bounded soak of the real server (not in `make test`): mixed, cancelled, oversized and malformed
# requests; prints requests by status, p50/p99, RSS and descriptors. SOAK_ARGS="--requests 500" for less.
SOAK_ARGS ?=
soak: $(VENV)/.dev
	$(BIN)/python scripts/soak.py $(SOAK_ARGS)

# BENCH_ARGS=--quick for a smoke run; --llama-cpp to add llama-cpp-python where installed.
BENCH_ARGS ?=
bench: $(VENV)/.dev
	$(BIN)/python -m bench.run $(BENCH_ARGS)

gpu-check:
	bash bench/gpu_check.sh

demo-model: $(VENV)/.dev
	$(BIN)/python scripts/train_demo.py --out model/demo

# Docker where its engine answers, else buildah (chroot isolation: no daemon, no runc needed). Images:
# nanogpt-server:TAG (CUDA), nanogpt-server:TAG-cpu (CPU torch, no CUDA), nanogpt-operator:TAG.
# TIKTOKEN_CACHE=DIR bakes GPT-2's BPE from DIR (a tiktoken cache) instead of fetching it (docs/images.md).
IMAGE_BUILD ?= $(shell if docker info >/dev/null 2>&1; then echo docker build; \
	elif command -v buildah >/dev/null 2>&1; then echo buildah bud --isolation chroot --layers; fi)
TIKTOKEN_CACHE ?=
IMAGE_ARGS = --build-arg VERSION=$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml) \
	--build-arg REVISION=$(shell git rev-parse HEAD 2>/dev/null || echo unknown)

images:
	@test -n "$(IMAGE_BUILD)" || { echo "make images: needs docker or buildah" >&2; exit 1; }
	$(if $(TIKTOKEN_CACHE),cp $(TIKTOKEN_CACHE)/* docker/tiktoken-cache/)
	$(IMAGE_BUILD) $(IMAGE_ARGS) -f Dockerfile.server -t $(IMAGE_REGISTRY)nanogpt-server:$(TAG) .
	$(IMAGE_BUILD) $(IMAGE_ARGS) --build-arg FLAVOR=cpu -f Dockerfile.server -t $(IMAGE_REGISTRY)nanogpt-server:$(TAG)-cpu .
	$(IMAGE_BUILD) $(IMAGE_ARGS) -f Dockerfile.operator -t $(IMAGE_REGISTRY)nanogpt-operator:$(TAG) .

# Builds both Dockerfiles with buildah against stand-in bases and runs the images (tests/images/).
images-check: $(VENV)/.dev
	$(BIN)/python -m pytest -q tests/images tests/test_scripts.py

# kopf's peering CRD is shared by every kopf operator in the cluster: created only if absent, and never
# deleted by undeploy (deleting it would break the others). Models and rollouts carry no finalizers, so
# undeploy finishes even though the operator goes first; created PVCs with deletePolicy Retain stay.
deploy:
	kubectl get crd clusterkopfpeerings.kopf.dev >/dev/null 2>&1 || kubectl create -f crds/kopfpeering.yaml
	kubectl apply -k manifests/

undeploy:
	kubectl delete -k manifests/ --ignore-not-found

# Standalone: a local run must not wait for (or fight) the in-cluster replicas' peering.
operator: $(VENV)/.dev
	NANOGPT_OPERATOR_STANDALONE=true $(BIN)/kopf run -m nanogpt_operator --all-namespaces

manifests-check: $(VENV)/.dev
	$(BIN)/kubectl kustomize manifests >/dev/null
	$(BIN)/hadolint Dockerfile.server Dockerfile.operator
	$(BIN)/python -m pytest -q tests/operator/test_model_crd.py tests/operator/test_operator_manifests.py tests/operator/test_rollout_crd.py

clean:
	rm -rf $(VENV) .pytest_cache bench/results
