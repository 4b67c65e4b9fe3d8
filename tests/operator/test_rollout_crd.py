"""The NanoGPTRollout CRD: names, scope, columns, and the shipped sample valid against it."""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from operator_helpers import K8S_VERSION, REPO

from nanogpt_operator.rollout.spec import parse_rollout

CRD = REPO / "crds" / "nanogptrollout.yaml"
SAMPLE = REPO / "manifests" / "samples" / "nanogptrollout.yaml"


def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD.read_text())


def test_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(crd(), K8S_VERSION, strict=True)


def test_names_scope_and_columns() -> None:
    spec = crd()["spec"]
    assert (spec["group"], spec["scope"]) == ("nanogpt.dev", "Cluster")
    assert (spec["names"]["kind"], spec["names"]["plural"]) == ("NanoGPTRollout", "nanogptrollouts")
    assert spec["names"]["shortNames"] == ["ngr"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"]["status"] == {}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert {"Target", "Progress", "Phase", "Age"} <= set(columns)


def test_crd_is_installed_by_kustomize() -> None:
    assert "nanogptrollout.yaml" in yaml.safe_load((REPO / "crds" / "kustomization.yaml").read_text())["resources"]


def test_sample_is_valid_paused_and_parses() -> None:
    sample = yaml.safe_load(SAMPLE.read_text())
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.validate(sample, schema, cls=jsonschema.Draft7Validator)
    # Shipped paused: applying the sample must not roll the sample model to a checkpoint it lacks.
    assert sample["spec"]["paused"] is True
    parsed = parse_rollout(sample)
    assert parsed.paused is True
    model = yaml.safe_load((REPO / "manifests" / "samples" / "nanogptmodel.yaml").read_text())
    selector = sample["spec"]["selector"]["matchLabels"]
    assert selector.items() <= model["metadata"]["labels"].items(), "the sample rollout selects the sample model"
