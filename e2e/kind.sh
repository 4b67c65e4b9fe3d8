#!/usr/bin/env bash
# End-to-end check on a real cluster: kind (default) or k3d, CPU only, the demo model.
# CI cannot run this (no container runtime); run it on a workstation with docker, kind or k3d, and kubectl.
#
#   e2e/kind.sh            # create a cluster, build and load images, install, serve, roll, roll back, clean up
#   KEEP=1 e2e/kind.sh     # keep the cluster afterwards
#   CLUSTER_TOOL=k3d e2e/kind.sh
#
# Steps: build both images -> load them into the cluster -> kubectl apply -k manifests/ -> copy the demo
# checkpoint into a PVC (scripts/upload-checkpoint.sh) -> apply a CPU NanoGPTModel -> wait for phase Ready
# -> POST /generate through the Service -> a second model from an http:// uri served by a pod in the
# cluster (fetched by its init container; status.fetch Fetched) -> change spec.checkpoint to a missing
# file -> wait for the automatic rollback -> delete.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CLUSTER="${CLUSTER:-nanogpt-e2e}"
CLUSTER_TOOL="${CLUSTER_TOOL:-kind}"
NS="${NS:-nanogpt-e2e}"
TAG="${TAG:-e2e}"
DEMO_DIR="${DEMO_DIR:-$ROOT/model/demo}"
TIMEOUT="${TIMEOUT:-600}"

log() { printf '\n== %s\n' "$*"; }
die() { printf 'e2e: %s\n' "$*" >&2; exit 1; }

for bin in docker kubectl "$CLUSTER_TOOL"; do
  command -v "$bin" >/dev/null || die "$bin is required"
done
[ -d "$DEMO_DIR" ] || die "no demo model at $DEMO_DIR (make demo-model)"

cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then
    echo "keeping cluster $CLUSTER"
  elif [ "$CLUSTER_TOOL" = kind ]; then
    kind delete cluster --name "$CLUSTER"
  else
    k3d cluster delete "$CLUSTER"
  fi
}
trap cleanup EXIT

wait_phase() {  # wait_phase NAME PHASE: poll status.phase with a deadline
  local deadline=$((SECONDS + TIMEOUT))
  until [ "$(kubectl -n "$NS" get ngm "$1" -o jsonpath='{.status.phase}' 2>/dev/null)" = "$2" ]; do
    [ $SECONDS -lt $deadline ] || { kubectl -n "$NS" get ngm "$1" -o yaml; die "$1 never reached $2"; }
    sleep 5
  done
}

log "cluster"
if [ "$CLUSTER_TOOL" = kind ]; then
  kind create cluster --name "$CLUSTER" --wait 120s
else
  k3d cluster create "$CLUSTER" --wait
fi

log "images"
docker build -f "$ROOT/Dockerfile.operator" -t "nanogpt-operator:$TAG" "$ROOT"
# The CPU flavour: CPU torch and the prebuilt CPU kernels, no CUDA libraries (a fraction of the size).
docker build -f "$ROOT/Dockerfile.server" --build-arg FLAVOR=cpu -t "nanogpt-server:$TAG" "$ROOT"
if [ "$CLUSTER_TOOL" = kind ]; then
  kind load docker-image --name "$CLUSTER" "nanogpt-operator:$TAG" "nanogpt-server:$TAG"
else
  k3d image import -c "$CLUSTER" "nanogpt-operator:$TAG" "nanogpt-server:$TAG"
fi

log "install"
kubectl get crd clusterkopfpeerings.kopf.dev >/dev/null 2>&1 || kubectl create -f "$ROOT/crds/kopfpeering.yaml"
kubectl apply -k "$ROOT/crds"
kubectl wait --for condition=established --timeout=60s crd/nanogptmodels.nanogpt.dev crd/clusterkopfpeerings.kopf.dev
kubectl apply -k "$ROOT/manifests"
kubectl -n nanogpt-system set image deployment/nanogpt-operator operator="nanogpt-operator:$TAG"
kubectl -n nanogpt-system rollout status deployment/nanogpt-operator --timeout=300s

log "checkpoint volume (scripts/upload-checkpoint.sh, the documented path for a local checkpoint)"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
"$ROOT/scripts/upload-checkpoint.sh" "$DEMO_DIR" model-pvc -n "$NS" --path demo --size 1Gi

# A NanoGPTModel on the CPU server image: its name, its spec.checkpoint (flow YAML) and any further
# spec lines (indented two spaces).
apply_model() {
  kubectl -n "$NS" apply -f - <<YAML
apiVersion: nanogpt.dev/v1alpha1
kind: NanoGPTModel
metadata: {name: $1}
spec:
  checkpoint: $2
  image: nanogpt-server:$TAG
  imagePullPolicy: Never
  replicas: 1
  gpus: 0
  resources: {requests: {cpu: 500m, memory: 1Gi}, limits: {memory: 2Gi}}
  server: {startupTimeoutSeconds: 120}
${3:-}
YAML
}

log "model"
apply_model demo "{claimName: model-pvc, path: demo}" "  rollout: {progressDeadlineSeconds: 120}"
wait_phase demo Ready
kubectl -n "$NS" get ngm demo -o wide

log "generate through the Service"
kubectl -n "$NS" run curl --rm -i --restart=Never --image=curlimages/curl:8.8.0 -- \
  -sf http://demo/generate -H 'Content-Type: application/json' -d '{"prompt": "The", "max_length": 20}'

log "a model from an http:// uri served inside the cluster (fetch init container, status.fetch)"
# A file server from the server image itself: it writes a small random GPT-2-vocabulary nanoGPT ckpt.pt
# (the demo is a directory; an http(s) uri names one file) and serves it with python's http.server.
kubectl -n "$NS" apply -f - <<YAML
apiVersion: v1
kind: Service
metadata: {name: ckpt-http}
spec:
  selector: {app: ckpt-http}
  ports: [{port: 8000, targetPort: 8000}]
---
apiVersion: v1
kind: Pod
metadata: {name: ckpt-http, labels: {app: ckpt-http}}
spec:
  securityContext: {runAsUser: 10001, runAsGroup: 10001, runAsNonRoot: true}
  containers:
    - name: files
      image: nanogpt-server:$TAG
      imagePullPolicy: Never
      command: [sh, -c]
      args:
        - |
          python -c '
          import torch
          from model.gpt import GPT, GPTConfig
          args = dict(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=64, bias=False, dropout=0.0)
          torch.save({"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args}, "/srv/ckpt.pt")
          ' && exec python -m http.server 8000 --directory /srv
      readinessProbe: {tcpSocket: {port: 8000}, periodSeconds: 2}
      securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
      volumeMounts: [{name: srv, mountPath: /srv}]
  volumes: [{name: srv, emptyDir: {}}]
YAML
kubectl -n "$NS" wait --for=condition=Ready pod/ckpt-http --timeout=300s
apply_model demo-http "{uri: \"http://ckpt-http.$NS.svc:8000/ckpt.pt\", allowHttp: true}"
wait_phase demo-http Ready
kubectl -n "$NS" get ngm demo-http -o jsonpath='{.status.fetch}{"\n"}'
[ "$(kubectl -n "$NS" get ngm demo-http -o jsonpath='{.status.fetch.phase}')" = Fetched ] || die "no Fetched status"
kubectl -n "$NS" run curl-http --rm -i --restart=Never --image=curlimages/curl:8.8.0 -- \
  -sf http://demo-http/generate -H 'Content-Type: application/json' -d '{"prompt": "The", "max_length": 8}'
kubectl -n "$NS" delete ngm demo-http --wait --timeout=120s
kubectl -n "$NS" delete pod/ckpt-http service/ckpt-http --wait --timeout=120s

log "failed rollout rolls back"
kubectl -n "$NS" patch ngm demo --type merge -p '{"spec": {"checkpoint": {"path": "demo/missing.pt"}}}'
wait_phase demo Degraded
kubectl -n "$NS" get ngm demo -o jsonpath='{.status.rollback.message}{"\n"}'
[ "$(kubectl -n "$NS" get ngm demo -o jsonpath='{.status.servedCheckpoint}')" = demo ] || die "no rollback"

log "delete"
kubectl -n "$NS" delete ngm demo --wait --timeout=120s
# Owner references: the garbage collector removes the children.
kubectl -n "$NS" wait --for=delete deployment/demo service/demo --timeout=120s
log "e2e passed"
