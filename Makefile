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

.PHONY: run test soak bench demo-model gpu-check images deploy undeploy operator manifests-check lint clean

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

images:
	docker build -f Dockerfile.server -t $(IMAGE_REGISTRY)nanogpt-server:$(TAG) .
	docker build -f Dockerfile.operator -t $(IMAGE_REGISTRY)nanogpt-operator:$(TAG) .

deploy:
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
