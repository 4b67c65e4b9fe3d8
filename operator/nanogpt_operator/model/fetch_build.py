"""The init container that fetches a remote checkpoint (spec.checkpoint.uri) before the server starts.

It runs the server image itself: `python -m model fetch URI DEST --status-file /dev/termination-log`
(model/fetch/cli.py), so the kubelet copies the fetch's final JSON status (Fetched with the digest, or
Failed with reason and message, never a credential) into the pod's status, where model/status.py reads it.

Volumes: `checkpoint`, an emptyDir per pod mounted at /models (read-write here, read-only in the server),
receives DEST. The cache (NANOGPT_CACHE_DIR) is by default inside that same emptyDir, so DEST is a hard
link to the verified blob (one copy on disk); with spec.checkpoint.cache.claimName it is a shared PVC, so
replicas and restarts download once (the fetcher locks each download with flock and moves only finished
files into place) and each pod copies the verified file into its own emptyDir.
"""

from __future__ import annotations

import copy
from pathlib import PurePosixPath
from typing import Any

from nanogpt_operator.model.spec import CheckpointSpec

FETCH_CONTAINER = "fetch"
CHECKPOINT_VOLUME, CACHE_VOLUME = "checkpoint", "checkpoint-cache"
SHARED_CACHE_MOUNT = "/var/cache/nanogpt"
FETCH_DIR = "checkpoint"  # under the mount: DEST, a directory or the folder holding the file
# python -m model fetch imports torch (the model package): room for that, not for a model.
FETCH_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
# Keys of spec.checkpoint.secretRef passed to the fetch, each optional: boto3's and huggingface_hub's own.
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "HF_TOKEN")


def file_name(uri: str) -> str | None:
    """The fetched file's name when the URI names one file (https://, s3:// key, an hf:// path with a
    suffix), None for a directory source (s3:// prefix ending in '/', an hf:// repo root or folder)."""
    scheme, rest = uri.split("://", 1)
    path = rest.split("?", 1)[0].split("#", 1)[0]
    if scheme == "s3" and path.endswith("/"):
        return None
    segments = path.split("/")
    if scheme == "hf":
        inner = segments[2:]
        last = inner[-1] if inner and inner[-1] else ""
        return last if PurePosixPath(last).suffix else None
    return PurePosixPath(path).name or None


def fetched_path(c: CheckpointSpec, mount: str) -> str:
    """Where the server finds the fetched checkpoint (its MODEL_CHECKPOINT)."""
    assert c.uri is not None
    name = file_name(c.uri)
    return f"{mount}/{FETCH_DIR}/{name}" if name else f"{mount}/{FETCH_DIR}"


def _env(c: CheckpointSpec, mount: str) -> list[dict[str, Any]]:
    cache = SHARED_CACHE_MOUNT if c.cache.claim_name else f"{mount}/.cache"
    env: list[dict[str, Any]] = [{"name": "NANOGPT_CACHE_DIR", "value": cache}, {"name": "HOME", "value": "/tmp"}]
    if c.endpoint:
        env.append({"name": "NANOGPT_S3_ENDPOINT", "value": c.endpoint})
    if c.secret_ref:  # references only: the values stay in the Secret
        env.extend({"name": key, "valueFrom": {"secretKeyRef": {"name": c.secret_ref, "key": key, "optional": True}}}
                   for key in SECRET_KEYS)
    return env


def fetch_command(c: CheckpointSpec, mount: str) -> list[str]:
    assert c.uri is not None
    command = ["python", "-m", "model", "fetch", c.uri, fetched_path(c, mount), "--status-file", "/dev/termination-log"]
    if c.sha256:
        command += ["--sha256", c.sha256]
    if c.allow_http:
        command.append("--allow-http")
    return command


def init_container(c: CheckpointSpec, image: str, pull_policy: str, security: dict[str, Any],
                   mount: str) -> dict[str, Any]:
    mounts = [{"name": CHECKPOINT_VOLUME, "mountPath": mount}, {"name": "tmp", "mountPath": "/tmp"}]
    if c.cache.claim_name:
        mounts.append({"name": CACHE_VOLUME, "mountPath": SHARED_CACHE_MOUNT})
    return {
        "name": FETCH_CONTAINER, "image": image, "imagePullPolicy": pull_policy,
        "command": fetch_command(c, mount), "env": _env(c, mount),
        "resources": copy.deepcopy(dict(c.fetch_resources) or FETCH_RESOURCES),
        "volumeMounts": mounts, "securityContext": security,
        # The status file is the message; without one (a crash before it), the log's tail is.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def fetch_volumes(c: CheckpointSpec) -> list[dict[str, Any]]:
    empty: dict[str, Any] = {"sizeLimit": c.cache.size_limit} if c.cache.size_limit else {}
    volumes: list[dict[str, Any]] = [{"name": CHECKPOINT_VOLUME, "emptyDir": empty}]
    if c.cache.claim_name:
        volumes.append({"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": c.cache.claim_name}})
    return volumes
