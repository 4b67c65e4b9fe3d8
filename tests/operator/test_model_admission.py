"""The NanoGPTModel CRD's CEL rules, evaluated with cel-python on good and bad objects (k8s_rules.admit),
and the spec parser refusing the same objects before any child is written."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from k8s_rules import admit
from operator_helpers import BASE_MODEL, CRD_PATH

from nanogpt_operator.errors import SpecError
from nanogpt_operator.model.spec import parse_model

CRD: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())


def model(name: str = "llm", **spec: Any) -> dict[str, Any]:
    body = copy.deepcopy(BASE_MODEL)
    body["metadata"]["name"] = name
    body["spec"].update(spec)
    return body


GOOD_NAMES = ["llm", "gpt2-small", "a", "m" * 63, "model-124m"]
# A dot, a digit first, too long, an upper-case letter, a trailing dash.
BAD_NAMES = ["gpt2.small", "124m", "m" * 64, "Llm", "llm-"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_are_admitted_and_parsed(name: str) -> None:
    assert admit(CRD, model(name))[1] == []
    assert parse_model(model(name)).name == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_at_admission_and_by_the_parser(name: str) -> None:
    violations = admit(CRD, model(name))[1]
    assert len(violations) == 1 and violations[0].startswith("<root>: metadata.name must be a DNS-1035 label")
    with pytest.raises(SpecError) as caught:
        parse_model(model(name))
    assert caught.value.path == "metadata.name"


@pytest.mark.parametrize("value", ["four", "4 pods", "", "1.2.3"])
def test_a_custom_metric_target_that_is_no_quantity_is_refused(value: str) -> None:
    scaling = {"maxReplicas": 4, "customMetric": {"name": "inflight", "targetAverageValue": value}}
    with pytest.raises(SpecError) as caught:
        parse_model(model(autoscaling=scaling))
    assert caught.value.path == "spec.autoscaling.customMetric.targetAverageValue"
    schema = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    target = schema["properties"]["spec"]["properties"]["autoscaling"]["properties"]["customMetric"]
    import re
    assert not re.match(target["properties"]["targetAverageValue"]["pattern"], value)


@pytest.mark.parametrize("value", [4, "4", "500m", "1k", "2Gi"])
def test_custom_metric_quantities_pass(value: Any) -> None:
    scaling = {"maxReplicas": 4, "customMetric": {"name": "inflight", "targetAverageValue": value}}
    m = parse_model(model(autoscaling=scaling))
    assert m.autoscaling is not None and m.autoscaling.custom_metric is not None
    assert m.autoscaling.custom_metric.target_average_value == str(value)


def test_a_rollout_deadline_shorter_than_the_load_budget_is_refused() -> None:
    bad = model(rollout={"progressDeadlineSeconds": 600})  # startupTimeoutSeconds defaults to 900
    assert admit(CRD, bad)[1] == [".spec: rollout.progressDeadlineSeconds must be >= server.startupTimeoutSeconds: "
                                  "a pod may take that long to load"]
    with pytest.raises(SpecError) as caught:
        parse_model(bad)
    assert caught.value.path == "spec.rollout.progressDeadlineSeconds"
    good = model(rollout={"progressDeadlineSeconds": 200}, server={"startupTimeoutSeconds": 120})
    assert admit(CRD, good)[1] == [] and parse_model(good).progress_deadline_seconds == 200
    assert admit(CRD, model())[1] == [] and parse_model(model()).progress_deadline_seconds == 960


@pytest.mark.parametrize(("spec", "message"), [
    ({"autoscaling": {"maxReplicas": 2, "minReplicas": 3, "targetCPUUtilization": 50},
      "resources": {"requests": {"cpu": "1"}}}, "minReplicas must be <= maxReplicas"),
    ({"autoscaling": {"maxReplicas": 2}}, "set targetCPUUtilization, customMetric or keda"),
    ({"autoscaling": {"maxReplicas": 2, "targetCPUUtilization": 50}}, "needs resources.requests.cpu"),
    ({"rollout": {"maxSurge": 0, "maxUnavailable": "0%"}}, "maxUnavailable must not be 0"),
    ({"checkpoint": {"claimName": "c", "path": "../etc/passwd"}}, "relative to the claim"),
    ({"resources": {"limits": {"nvidia.com/gpu": 1}}}, "set GPUs with spec.gpus"),
    ({"env": [{"name": "PORT", "value": "1"}]}, "set by the operator"),
])
def test_the_other_rules_refuse_what_the_parser_refuses(spec: dict[str, Any], message: str) -> None:
    bad = model(**spec)
    violations = admit(CRD, bad)[1]
    assert len(violations) == 1 and message in violations[0], violations
    with pytest.raises(SpecError):
        parse_model(bad)


def test_the_sample_is_admitted() -> None:
    from test_model_crd import samples
    for sample in samples():
        assert admit(CRD, sample)[1] == []
