#!/usr/bin/env bash
# Copy a local checkpoint into a PersistentVolumeClaim, so that a NanoGPTModel can serve it:
#
#   scripts/upload-checkpoint.sh out-shakespeare-char/ckpt.pt models [-n NAMESPACE] [--path DIR] [--size 2Gi]
#
# Creates the claim if it is missing (ReadWriteOnce, --size, --storage-class), starts a short-lived pod
# that mounts it, copies the file or directory with `kubectl cp` into <claim>/<path>/, compares sha256
# sums on both sides, removes the pod, and prints the spec.checkpoint to use. Needs kubectl and a context.
set -euo pipefail

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

NAMESPACE="" DEST_PATH="" SIZE="" STORAGE_CLASS="" IMAGE="busybox:1.36" TIMEOUT="300s"
POSITIONAL=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--namespace) NAMESPACE="$2"; shift 2 ;;
    --path) DEST_PATH="$2"; shift 2 ;;
    --size) SIZE="$2"; shift 2 ;;
    --storage-class) STORAGE_CLASS="$2"; shift 2 ;;
    --image) IMAGE="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    -*) echo "unknown option: $1" >&2; usage ;;
    *) POSITIONAL+=("$1"); shift ;;
  esac
done
[ "${#POSITIONAL[@]}" -eq 2 ] || usage
SRC="${POSITIONAL[0]%/}" CLAIM="${POSITIONAL[1]}"
[ -e "$SRC" ] || { echo "$SRC: no such file or directory" >&2; exit 1; }
command -v kubectl >/dev/null || { echo "kubectl is not on PATH" >&2; exit 1; }

NAME="$(basename "$SRC")"
if [ -z "$DEST_PATH" ]; then
  # out-shakespeare-char/ckpt.pt -> out-shakespeare-char (as the loader names models); a directory keeps its name
  if [ -f "$SRC" ]; then DEST_PATH="$(basename "$(cd "$(dirname "$SRC")" && pwd)")"; else DEST_PATH="$NAME"; fi
fi
case "$DEST_PATH" in /*|*..*) echo "--path must be relative to the claim, without '..'" >&2; exit 2 ;; esac

KUBECTL=(kubectl)
[ -n "$NAMESPACE" ] && KUBECTL+=(-n "$NAMESPACE")
NS_SHOWN="${NAMESPACE:-$(kubectl config view --minify -o jsonpath='{..namespace}' 2>/dev/null || true)}"
NS_SHOWN="${NS_SHOWN:-default}"

bytes=$(du -sb "$SRC" | cut -f1)
if [ -z "$SIZE" ]; then  # the checkpoint, plus a quarter and 1 GiB for what else goes there, in whole GiB
  SIZE="$(( (bytes + bytes / 4) / 1073741824 + 1 ))Gi"
fi

if ! "${KUBECTL[@]}" get pvc "$CLAIM" >/dev/null 2>&1; then
  echo "creating PersistentVolumeClaim $CLAIM ($SIZE) in $NS_SHOWN"
  {
    printf 'apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: %s}\nspec:\n' "$CLAIM"
    printf '  accessModes: [ReadWriteOnce]\n  resources: {requests: {storage: %s}}\n' "$SIZE"
    if [ -n "$STORAGE_CLASS" ]; then printf '  storageClassName: %s\n' "$STORAGE_CLASS"; fi
  } | "${KUBECTL[@]}" apply -f -
fi

POD="upload-$(printf '%s' "$CLAIM" | cut -c1-40)-$RANDOM"
cleanup() { "${KUBECTL[@]}" delete pod "$POD" --ignore-not-found --wait=false >/dev/null 2>&1 || true; }
trap cleanup EXIT
# Non-root, as the server runs (uid 10001): fsGroup makes the volume writable for it and readable for the server.
"${KUBECTL[@]}" apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $POD, labels: {app.kubernetes.io/part-of: nanogpt, app.kubernetes.io/component: upload}}
spec:
  restartPolicy: Never
  activeDeadlineSeconds: 7200
  securityContext: {runAsUser: 10001, runAsGroup: 10001, fsGroup: 10001, runAsNonRoot: true}
  containers:
    - name: upload
      image: $IMAGE
      command: [sleep, "7200"]
      securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
      volumeMounts: [{name: models, mountPath: /models}]
  volumes: [{name: models, persistentVolumeClaim: {claimName: $CLAIM}}]
YAML
"${KUBECTL[@]}" wait --for=condition=Ready "pod/$POD" --timeout="$TIMEOUT"

echo "copying $SRC ($bytes bytes) to $CLAIM:/$DEST_PATH"
"${KUBECTL[@]}" exec "$POD" -- mkdir -p "/models/$DEST_PATH"
if [ -d "$SRC" ]; then
  "${KUBECTL[@]}" cp "$SRC/." "$NS_SHOWN/$POD:/models/$DEST_PATH"
  CKPT_PATH="$DEST_PATH"
  local_sums=$(cd "$SRC" && find . -type f -exec sha256sum {} + | sort -k2)
  remote_sums=$("${KUBECTL[@]}" exec "$POD" -- sh -c "cd '/models/$DEST_PATH' && find . -type f -exec sha256sum {} + | sort -k2")
else
  "${KUBECTL[@]}" cp "$SRC" "$NS_SHOWN/$POD:/models/$DEST_PATH/$NAME"
  CKPT_PATH="$DEST_PATH/$NAME"
  local_sums=$(sha256sum "$SRC" | cut -d' ' -f1)
  remote_sums=$("${KUBECTL[@]}" exec "$POD" -- sha256sum "/models/$CKPT_PATH" | cut -d' ' -f1)
fi
if [ "$local_sums" != "$remote_sums" ]; then
  echo "sha256 mismatch after the copy; removing /models/$DEST_PATH" >&2
  "${KUBECTL[@]}" exec "$POD" -- rm -rf "/models/$DEST_PATH"
  exit 1
fi
"${KUBECTL[@]}" exec "$POD" -- chmod -R a+rX "/models/$DEST_PATH"

echo "done (sha256 verified). In the NanoGPTModel (namespace $NS_SHOWN):"
printf '  spec:\n    checkpoint: {claimName: %s, path: %s}\n' "$CLAIM" "$CKPT_PATH"
