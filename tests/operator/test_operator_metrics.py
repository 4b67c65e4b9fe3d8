"""What the controllers count in OperatorMetrics: reconcile results, drift repairs, rollbacks, waves, rollouts."""

from __future__ import annotations

from typing import Any

import kopf

from nanogpt_operator.metrics import OperatorMetrics, shared_metrics
from nanogpt_operator.model import reconcile as model_reconcile
from nanogpt_operator.rollout import reconcile as rollout_reconcile
from nanogpt_operator.rollout.state_machine import Event as RolloutEvent


def body(namespace: str | None, name: str) -> kopf.Body:
    meta: dict[str, Any] = {"name": name, "uid": "u"}
    if namespace:
        meta["namespace"] = namespace
    return kopf.Body({"metadata": meta, "spec": {}, "status": {}})


def value(m: OperatorMetrics, metric: str, **labels: str) -> float:
    got = m.registry.get_sample_value(metric, labels)
    return 0.0 if got is None else got


def test_model_reconciles_drift_and_rollbacks() -> None:
    m = OperatorMetrics()
    events = (model_reconcile.Event("Warning", "DriftCorrected", "x"), model_reconcile.Event("Warning", "RolledBack", "y"),
              model_reconcile.Event("Normal", "Created", "z"))
    model_reconcile.count(m, body("ml", "llm"), model_reconcile.Outcome({}, events))
    model_reconcile.count(m, body("ml", "llm"), None)
    assert value(m, "nanogpt_operator_reconciles_total", kind="NanoGPTModel", result="ok") == 1
    assert value(m, "nanogpt_operator_reconciles_total", kind="NanoGPTModel", result="error") == 1
    assert value(m, "nanogpt_operator_drift_repairs_total", kind="NanoGPTModel") == 1
    assert value(m, "nanogpt_operator_rollbacks_total", namespace="ml", name="llm") == 1


def test_rollout_waves_and_outcomes() -> None:
    m = OperatorMetrics()
    b = body(None, "r1")  # NanoGPTRollout is cluster-scoped: namespace ""
    rollout_reconcile.count(m, b, (RolloutEvent("Normal", "WaveComplete", "w1"), RolloutEvent("Normal", "WaveStarted", "w2")))
    rollout_reconcile.count(m, b, (RolloutEvent("Warning", "RolloutFailed", "f"),))
    rollout_reconcile.count(m, b, (RolloutEvent("Warning", "RolledBack", "r"),))
    rollout_reconcile.count(m, b, None)
    names = {"namespace": "", "name": "r1"}
    assert value(m, "nanogpt_operator_rollout_waves_total", **names, result="complete") == 1
    assert value(m, "nanogpt_operator_rollout_waves_total", **names, result="failed") == 1
    assert value(m, "nanogpt_operator_rollouts_total", **names, outcome="failed") == 1
    assert value(m, "nanogpt_operator_rollouts_total", **names, outcome="reverted") == 1
    assert value(m, "nanogpt_operator_rollouts_total", **names, outcome="succeeded") == 0
    assert value(m, "nanogpt_operator_reconciles_total", kind="NanoGPTRollout", result="ok") == 3
    assert value(m, "nanogpt_operator_reconciles_total", kind="NanoGPTRollout", result="error") == 1


def test_both_controllers_share_one_registry() -> None:
    memo = kopf.Memo()
    assert shared_metrics(memo) is shared_metrics(memo)
