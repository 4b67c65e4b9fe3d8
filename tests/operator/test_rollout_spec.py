"""The NanoGPTRollout spec: defaults equal to the CRD's, errors naming the field, selectors (pure)."""

from __future__ import annotations

import pytest

from nanogpt_operator.errors import SpecError
from nanogpt_operator.fields import parse_duration
from nanogpt_operator.rollout.model_view import model_view, selected_keys
from nanogpt_operator.rollout.spec import parse_rollout

NEW = "log/model_50000.pt"


def model(ns: str, name: str, family: str = "stories") -> dict:
    return {"metadata": {"namespace": ns, "name": name, "labels": {"family": family}},
            "spec": {"checkpoint": {"claimName": "pvc", "path": "log/model_40000.pt"}}}


MODELS = [model("prod", "a"), model("prod", "b"), model("prod", "c"), model("stage", "a"), model("stage", "d"),
          model("prod", "other", family="poems")]


def test_spec_defaults_match_the_crd():
    spec = parse_rollout({"metadata": {"name": "r"}, "spec": {"selector": {}, "checkpoint": {"path": NEW}}})
    assert [str(w.count or f"{w.percent}%") for w in spec.waves] == ["1", "25%", "100%"]
    assert (spec.pause_between_waves_s, spec.max_failures, spec.gate_ready, spec.smoke, spec.paused) == \
        (0, 0, True, None, False)


@pytest.mark.parametrize(("spec", "path"), [
    ({"checkpoint": {"path": NEW}}, "spec.selector"),
    ({"selector": {}, "checkpoint": {"path": "/abs"}}, "spec.checkpoint.path"),
    ({"selector": {}, "checkpoint": {"path": "../x"}}, "spec.checkpoint.path"),
    ({"selector": {}, "checkpoint": {"path": NEW}, "strategy": {"waves": ["0%"]}}, "spec.strategy.waves[0]"),
    ({"selector": {}, "checkpoint": {"path": NEW}, "strategy": {"maxFailures": -1}}, "spec.strategy.maxFailures"),
    ({"selector": {}, "checkpoint": {"path": NEW}, "strategy": {"pauseBetweenWaves": "5 min"}},
     "spec.strategy.pauseBetweenWaves"),
    ({"selector": {"matchExpressions": [{"key": "k", "operator": "In"}]}, "checkpoint": {"path": NEW}},
     "spec.selector.matchExpressions[0].values"),
    ({"selector": {}, "checkpoint": {"path": NEW}, "gates": {"smokeTest": {"prompt": ""}}},
     "spec.gates.smokeTest.prompt"),
])
def test_bad_specs_name_the_field(spec, path):
    with pytest.raises(SpecError) as err:
        parse_rollout({"metadata": {"name": "r"}, "spec": spec})
    assert err.value.path == path


@pytest.mark.parametrize(("text", "seconds"), [("0s", 0), ("90", 90), ("5m", 300), ("1h30m", 5400), (45, 45)])
def test_durations(text, seconds):
    assert parse_duration(text, "p") == seconds


def test_selectors_with_expressions_and_namespaces():
    spec = parse_rollout({"metadata": {"name": "r"}, "spec": {
        "selector": {"matchExpressions": [{"key": "family", "operator": "In", "values": ["stories", "poems"]},
                                          {"key": "frozen", "operator": "DoesNotExist"}]},
        "namespaceSelector": {"matchLabels": {"env": "prod"}}, "checkpoint": {"path": NEW}}})
    views = [model_view(m) for m in MODELS]
    keys = selected_keys(spec, views, {"prod": {"env": "prod"}, "stage": {"env": "stage"}})
    assert keys == {("prod", "a"), ("prod", "b"), ("prod", "c"), ("prod", "other")}
