"""A NanoGPTModel with spec.checkpoint.uri: the fetch init container, its volumes, and the status that
follows the pods' init containers. Objects are checked against Kubernetes 1.30 (strict)."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from operator_helpers import K8S_VERSION

from nanogpt_operator.model.build import Owner, desired_children, desired_deployment
from nanogpt_operator.model.rollback import effective_spec
from nanogpt_operator.model.spec import parse_model
from nanogpt_operator.model.status import derive_status, pod_problems

OWNER = Owner(name="llm", uid="u")
NOW = "2026-01-01T00:00:00Z"
DIGEST = "ab" * 32
S3 = {"uri": "s3://models/out/ckpt.pt", "endpoint": "http://minio.storage:9000", "secretRef": {"name": "s3-creds"},
      "sha256": DIGEST.upper(), "cache": {"claimName": "ckpt-cache"}}
SOURCES = {
    "https": {"uri": "https://example.com/out/ckpt.pt?X-Amz-Signature=secret"},
    "http": {"uri": "http://models.internal/ckpt.pt", "allowHttp": True},
    "s3": S3,
    "hf": {"uri": "hf://openai-community/gpt2@main", "cache": {"sizeLimit": "10Gi"}, "secretRef": {"name": "hf"}},
    "pvc": {"uri": "pvc://models/out/ckpt.pt"},
}


def pod_spec(model_body, checkpoint: dict[str, Any], **spec: Any) -> dict[str, Any]:
    d = desired_deployment(parse_model(model_body(checkpoint=checkpoint, **spec)), OWNER)
    out: dict[str, Any] = d["spec"]["template"]["spec"]
    return out


@pytest.mark.parametrize("source", SOURCES)
def test_every_child_is_valid_kubernetes(model_body, source: str) -> None:
    for gpus, replicas in ((1, 3), (0, 1)):
        m = parse_model(model_body(checkpoint=SOURCES[source], gpus=gpus, replicas=replicas))
        for obj in desired_children(m, OWNER):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_s3_gets_an_init_container_from_the_server_image(model_body) -> None:
    spec = pod_spec(model_body, S3, image="reg/nanogpt:1", gpus=1)
    (init,) = spec["initContainers"]
    server = spec["containers"][0]
    assert init["image"] == server["image"] == "reg/nanogpt:1"
    assert init["command"] == ["python", "-m", "model", "fetch", "s3://models/out/ckpt.pt",
                               "/models/checkpoint/ckpt.pt", "--status-file", "/dev/termination-log",
                               "--sha256", DIGEST]
    assert init["securityContext"] == server["securityContext"] and init["securityContext"]["runAsNonRoot"]
    assert "nvidia.com/gpu" not in json.dumps(init["resources"])  # the GPU is the server's alone
    env = {e["name"]: e for e in init["env"]}
    assert env["NANOGPT_CACHE_DIR"]["value"] == "/var/cache/nanogpt"
    assert env["NANOGPT_S3_ENDPOINT"]["value"] == "http://minio.storage:9000"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "HF_TOKEN"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": key,
                                                                        "optional": True}}}
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]} == {
        "checkpoint": "/models", "tmp": "/tmp", "checkpoint-cache": "/var/cache/nanogpt"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["checkpoint"] == {"name": "checkpoint", "emptyDir": {}}
    assert volumes["checkpoint-cache"]["persistentVolumeClaim"] == {"claimName": "ckpt-cache"}
    # The server reads the local copy, read-only, and gets no credential.
    server_env = {e["name"]: e.get("value") for e in server["env"]}
    assert server_env["MODEL_CHECKPOINT"] == "/models/checkpoint/ckpt.pt"
    assert not {"AWS_SECRET_ACCESS_KEY", "HF_TOKEN"} & set(server_env)
    assert {"name": "checkpoint", "mountPath": "/models", "readOnly": True} in server["volumeMounts"]


def test_a_directory_source_and_the_default_cache(model_body) -> None:
    spec = pod_spec(model_body, SOURCES["hf"])
    init = spec["initContainers"][0]
    assert init["command"][4:6] == ["hf://openai-community/gpt2@main", "/models/checkpoint"]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["NANOGPT_CACHE_DIR"] == "/models/.cache"  # same emptyDir as DEST: a hard link, one copy
    assert {v["name"]: v for v in spec["volumes"]}["checkpoint"]["emptyDir"] == {"sizeLimit": "10Gi"}
    server_env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert server_env["MODEL_CHECKPOINT"] == "/models/checkpoint"


def test_http_needs_allow_http_and_passes_it_on(model_body) -> None:
    assert pod_spec(model_body, SOURCES["http"])["initContainers"][0]["command"][-1] == "--allow-http"


def test_pvc_uri_mounts_the_claim_and_fetches_nothing(model_body) -> None:
    spec = pod_spec(model_body, SOURCES["pvc"])
    assert "initContainers" not in spec
    assert spec["volumes"][0]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_a_remote_uri_refuses_a_tokenizer_in_a_claim(model_body) -> None:
    from nanogpt_operator.errors import SpecError
    with pytest.raises(SpecError) as caught:
        parse_model(model_body(checkpoint=SOURCES["https"], tokenizer={"path": "meta.pkl"}))
    assert caught.value.path == "spec.tokenizer.path"


def fetch_pod(name: str, state: dict[str, Any], last: dict[str, Any] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"name": "fetch", "state": state}
    if last is not None:
        status["lastState"] = last
    return {"metadata": {"name": name}, "status": {"initContainerStatuses": [status],
            "containerStatuses": [{"name": "server", "state": {"waiting": {"reason": "PodInitializing"}}}]}}


def deployment(model_body, checkpoint: dict[str, Any], ready: int = 0) -> dict[str, Any]:
    d = desired_deployment(parse_model(model_body(checkpoint=checkpoint)), OWNER)
    d["metadata"]["generation"] = 1
    d["status"] = {"observedGeneration": 1, "replicas": 1, "readyReplicas": ready, "updatedReplicas": 1,
                   "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]}
    return d


def status_for(model_body, checkpoint: dict[str, Any], pods: list[dict[str, Any]], ready: int = 0) -> dict[str, Any]:
    m = parse_model(model_body(checkpoint=checkpoint))
    return derive_status(m, 1, deployment(model_body, checkpoint, ready), pods, {}, None, NOW)


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in status["conditions"]}


def test_a_running_fetch_is_phase_fetching(model_body) -> None:
    status = status_for(model_body, SOURCES["https"], [fetch_pod("llm-1", {"running": {"startedAt": NOW}})])
    assert status["phase"] == "Fetching"
    assert status["fetch"] == {"phase": "Fetching", "uri": "https://example.com/out/ckpt.pt?…", "pod": "llm-1"}
    assert conditions(status)["Fetched"][:2] == ("False", "Fetching")
    assert "secret" not in json.dumps(status)  # a pre-signed URL's signature is a credential
    assert status["source"] == "https://example.com/out/ckpt.pt?…"


def test_a_finished_fetch_reports_its_digest_then_the_usual_phases(model_body) -> None:
    done = {"terminated": {"exitCode": 0, "reason": "Completed", "message": json.dumps(
        {"phase": "Fetched", "uri": "s3://models/out/ckpt.pt", "sha256": DIGEST, "bytes": 1234, "cached": True})}}
    pod = fetch_pod("llm-1", done)
    pod["status"]["containerStatuses"] = [{"name": "server", "state": {"running": {}}}]
    status = status_for(model_body, S3, [pod])
    assert status["phase"] == "Pending"  # loading: not ready yet, nothing served before
    assert status["fetch"]["phase"] == "Fetched" and status["fetch"]["sha256"] == DIGEST
    assert status["fetch"]["bytes"] == 1234
    assert conditions(status)["Fetched"][:2] == ("True", "Fetched") and DIGEST in conditions(status)["Fetched"][2]
    assert status_for(model_body, S3, [pod], ready=1)["phase"] == "Ready"


def test_a_failed_fetch_is_degraded_with_the_termination_message(model_body) -> None:
    report = {"phase": "Failed", "uri": "s3://models/out/ckpt.pt", "reason": "Forbidden",
              "message": "s3://models/out/ckpt.pt: S3 answered 403: AccessDenied", "retryable": False}
    crashed = fetch_pod("llm-1", {"waiting": {"reason": "CrashLoopBackOff"}},
                        {"terminated": {"exitCode": 4, "reason": "Error", "message": json.dumps(report)}})
    status = status_for(model_body, S3, [crashed])
    assert status["phase"] == "Degraded"
    assert status["fetch"] == {"phase": "Failed", "uri": "s3://models/out/ckpt.pt", "pod": "llm-1",
                               "reason": "Forbidden", "message": report["message"], "retryable": False}
    ok, reason, message = conditions(status)["Degraded"]
    assert (ok, reason) == ("True", "FetchFailed")
    assert "s3://models/out/ckpt.pt" in message and "403: AccessDenied" in message and "will not help" in message
    assert conditions(status)["Fetched"][:2] == ("False", "FetchFailed")
    assert pod_problems([crashed])[0].reason == "FetchFailed"


def test_a_fetch_that_died_without_a_status_file_shows_its_log_tail(model_body) -> None:
    dead = fetch_pod("llm-1", {"terminated": {"exitCode": 137, "reason": "OOMKilled", "message": "Killed"}})
    status = status_for(model_body, SOURCES["hf"], [dead])
    assert status["fetch"]["reason"] == "OOMKilled" and status["fetch"]["message"] == "Killed"
    assert status["phase"] == "Degraded"


def test_a_claim_model_has_no_fetch_status(model_body) -> None:
    m = parse_model(model_body())
    status = derive_status(m, 1, None, [], {}, None, NOW)
    assert status["fetch"] is None and status["source"] == "pvc://model-pvc/log/model_40000.pt"
    assert "Fetched" not in {c["type"] for c in status["conditions"]}


def test_rollback_to_a_previous_uri_keeps_the_form(model_body) -> None:
    m = parse_model(model_body(checkpoint=S3))
    back = effective_spec(m, {"toCheckpoint": "s3://models/old/ckpt.pt", "toImage": None})
    assert back.checkpoint.uri == "s3://models/old/ckpt.pt" and back.checkpoint.sha256 is None
    assert back.checkpoint.secret_ref == "s3-creds"


# ------------------------------------------------------------------ under kopf, against kmock's emulator

POD = "/api/v1/namespaces/ml/pods"
LABELS = {"app.kubernetes.io/name": "nanogpt", "app.kubernetes.io/instance": "llm"}


async def test_a_uri_model_under_kopf_follows_its_fetch(emulator, model_body) -> None:
    from operator_helpers import eventually, model_path
    from test_model_kopf import DEPLOY, model_status, operator

    emu, api = emulator
    async with operator(api):
        await api.must("POST", model_path(), model_body(checkpoint=S3, replicas=2))
        deployment = await eventually(lambda: api.get(DEPLOY), what="the Deployment")
        spec = deployment["spec"]["template"]["spec"]
        assert spec["initContainers"][0]["command"][4] == "s3://models/out/ckpt.pt"
        assert {v["name"] for v in spec["volumes"]} >= {"checkpoint", "checkpoint-cache"}
        assert deployment["spec"]["template"]["metadata"]["annotations"]["nanogpt.dev/checkpoint"] == S3["uri"]

        # The kubelet: the pod's init container runs.
        running = fetch_pod("llm-1", {"running": {"startedAt": NOW}})
        await api.must("POST", POD, {**running, "apiVersion": "v1", "kind": "Pod",
                                     "metadata": {"name": "llm-1", "namespace": "ml", "labels": LABELS}})

        async def phase(name: str) -> dict[str, Any] | None:
            status = await model_status(api)
            return status if status.get("phase") == name else None

        status = await eventually(lambda: phase("Fetching"), what="phase Fetching")
        assert status["source"] == "s3://models/out/ckpt.pt" and status["fetch"]["pod"] == "llm-1"

        # ... and ends with the fetch's status file as its termination message.
        report = {"phase": "Failed", "uri": S3["uri"], "reason": "DigestMismatch", "retryable": False,
                  "message": f"{S3['uri']}: sha256 mismatch: expected {DIGEST}, got {'cd' * 32}"}
        failed = fetch_pod("llm-1", {"terminated": {"exitCode": 6, "reason": "Error", "message": json.dumps(report)}})
        await api.must("PATCH", f"{POD}/llm-1", {"status": failed["status"]})
        status = await eventually(lambda: phase("Degraded"), what="phase Degraded on the failed fetch")
        assert status["fetch"]["reason"] == "DigestMismatch"
        assert conditions(status)["Degraded"][:2] == ("True", "FetchFailed")
        assert "sha256 mismatch" in conditions(status)["Fetched"][2]
