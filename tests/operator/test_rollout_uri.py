"""A NanoGPTRollout whose target is a URI: what it writes into each model's spec.checkpoint (through the
real merge patch of rollout/reconcile.py), the fetch as a gate, and the revert to the claim form."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest
import yaml
from k8s_rules import admit
from operator_helpers import REPO

from nanogpt_operator.errors import SpecError
from nanogpt_operator.rollout import state_machine as machine
from nanogpt_operator.rollout.model_view import model_view, selected_keys
from nanogpt_operator.rollout.reconcile import model_patch
from nanogpt_operator.rollout.spec import parse_rollout

CRD = yaml.safe_load((REPO / "crds" / "nanogptrollout.yaml").read_text())
T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
URI = "s3://models/v2/ckpt.pt"
TARGET = {"uri": URI, "sha256": "ab" * 32, "endpoint": "http://minio:9000", "secretRef": {"name": "s3"}}


def rollout_body(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "nanogpt.dev/v1alpha1", "kind": "NanoGPTRollout", "metadata": {"name": "r1"},
            "spec": {"selector": {"matchLabels": {"family": "stories"}}, "checkpoint": checkpoint,
                     "strategy": {"waves": ["100%"], "progressDeadlineSeconds": 600}}}


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch, as the API server applies the rollout's writes."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def model_body() -> dict[str, Any]:
    return {"metadata": {"namespace": "prod", "name": "a", "labels": {"family": "stories"}, "generation": 1,
                         "resourceVersion": "1"},
            "spec": {"checkpoint": {"claimName": "pvc", "path": "v1/ckpt.pt"}},
            "status": {"phase": "Ready", "servedCheckpoint": "v1/ckpt.pt", "observedGeneration": 1,
                       "source": "pvc://pvc/v1/ckpt.pt", "endpoint": "http://a.prod:80"}}


def served(body: dict[str, Any], fetch: dict[str, Any] | None = None) -> None:
    """The model operator catching up: it serves (or fails to fetch) whatever its spec names."""
    ck = body["spec"]["checkpoint"]
    source = ck.get("uri") or ck["path"]
    body["status"].update(observedGeneration=body["metadata"]["generation"],
                          source=ck.get("uri") or f"pvc://{ck['claimName']}/{ck['path']}",
                          phase="Degraded" if fetch else "Ready", servedCheckpoint=source, fetch=fetch)


def drive(spec, body: dict[str, Any], fetch: dict[str, Any] | None = None, ticks: int = 12) -> dict[str, Any]:
    status: dict[str, Any] = {}
    for i in range(ticks):
        world = machine.World({("prod", "a"): model_view(body)}, selected_keys(spec, [model_view(body)], {}),
                              frozenset({"r1"}))
        for action in machine.actions(spec, status, world):
            merge(body, model_patch(action, "r1", None))
            if isinstance(action, machine.SetCheckpoint):
                body["metadata"]["generation"] += 1
                served(body, fetch if not action.revert else None)
        world = machine.World({("prod", "a"): model_view(body)}, world.selected, frozenset({"r1"}))
        status = machine.advance(spec, status, world, T0 + datetime.timedelta(seconds=i)).status
        if status["phase"] in machine.TERMINAL and not machine.actions(spec, status, world):
            break
    return status


def test_a_uri_target_writes_the_uri_form_and_succeeds() -> None:
    spec = parse_rollout(rollout_body(TARGET))
    assert spec.checkpoint_path == URI and spec.checkpoint_fields == TARGET
    body = model_body()
    status = drive(spec, body)
    assert status["phase"] == "Succeeded", status
    assert body["spec"]["checkpoint"] == TARGET  # claimName and path are gone: exactly one form


def test_a_model_that_cannot_fetch_fails_the_gate_and_is_reverted() -> None:
    spec = parse_rollout(rollout_body(TARGET))
    body = model_body()
    fetch = {"phase": "Failed", "uri": URI, "pod": "a-1", "reason": "Forbidden", "retryable": False,
             "message": f"{URI}: S3 answered 403: AccessDenied"}
    status = drive(spec, body, fetch)
    assert status["phase"] == "RolledBack", status
    entry = status["models"][0]
    assert "cannot fetch s3://models/v2/ckpt.pt" in entry["message"] and "403" in entry["message"]
    assert body["spec"]["checkpoint"] == {"claimName": "pvc", "path": "v1/ckpt.pt"}


def test_a_retryable_fetch_error_waits() -> None:
    body = model_body()
    served(body, {"phase": "Failed", "uri": URI, "reason": "Unreachable", "retryable": True, "message": "refused"})
    assert model_view(body).fetch_error is None


@pytest.mark.parametrize(("checkpoint", "message"), [
    ({"uri": "ftp://h/x"}, "must be https://"),
    ({"uri": "http://h/ckpt.pt"}, "plain http://"),
    ({"uri": URI, "path": "x"}, "set either uri"),
    ({"uri": URI, "sha256": "xyz"}, "64 hex"),
])
def test_bad_uri_targets_are_refused_at_admission_and_by_the_parser(checkpoint, message) -> None:
    violations = admit(CRD, rollout_body(checkpoint))[1]
    assert any(message in v for v in violations), violations
    with pytest.raises(SpecError) as caught:
        parse_rollout(rollout_body(checkpoint))
    assert caught.value.path.startswith("spec.checkpoint.")


@pytest.mark.parametrize("checkpoint", [TARGET, {"uri": "hf://org/repo@v2"}, {"path": "v2/ckpt.pt"},
                                        {"uri": "pvc://pvc/v2/ckpt.pt"}])
def test_good_targets_are_admitted(checkpoint) -> None:
    assert admit(CRD, rollout_body(checkpoint))[1] == []
    parse_rollout(rollout_body(checkpoint))
