"""rollout.py: when to roll back, to what, and for how long."""

from __future__ import annotations

from nanogpt_operator.model.rollback import decide_rollback, effective_spec, pinned_rollback
from nanogpt_operator.model.spec import parse_model
from nanogpt_operator.model.status import DeploymentState, Problem

GOOD = {"lastGoodCheckpoint": "good.pt", "lastGoodImage": "srv:1"}


def state(deadline: bool = True, checkpoint: str = "bad.pt", image: str = "srv:2") -> DeploymentState:
    return DeploymentState(desired=2, replicas=2, ready=1, updated=1, complete=False, steady=False,
                        deadline_exceeded=deadline, checkpoint=checkpoint, image=image)


def test_rolls_back_after_the_deadline_to_the_last_good(model_body) -> None:
    m = parse_model(model_body())
    decision = decide_rollback(m, 5, state(), [Problem("OOMKilled", "out of memory", "p")], GOOD)
    assert decision is not None
    assert (decision["toCheckpoint"], decision["toImage"], decision["generation"]) == ("good.pt", "srv:1", 5)
    assert (decision["fromCheckpoint"], decision["reason"]) == ("bad.pt", "OOMKilled")
    assert "960s" in decision["message"] and "Edit the spec" in decision["message"]


def test_no_rollback_before_the_deadline_or_when_disabled(model_body) -> None:
    assert decide_rollback(parse_model(model_body()), 5, state(deadline=False), [], GOOD) is None
    off = parse_model(model_body(rollout={"autoRollback": False}))
    assert decide_rollback(off, 5, state(), [], GOOD) is None


def test_no_rollback_without_a_good_version_or_onto_itself(model_body) -> None:
    m = parse_model(model_body())
    assert decide_rollback(m, 5, state(), [], {}) is None
    assert decide_rollback(m, 5, state(checkpoint="good.pt", image="srv:1"), [], GOOD) is None


def test_pin_holds_for_its_generation_only(model_body) -> None:
    status = {**GOOD, "rollback": {"generation": 5, "toCheckpoint": "good.pt", "toImage": "srv:1"}}
    assert pinned_rollback(status, 5) is not None
    assert pinned_rollback(status, 6) is None  # the user edited the spec: try it
    assert decide_rollback(parse_model(model_body()), 5, state(), [], status) is None


def test_effective_spec_swaps_checkpoint_and_image(model_body) -> None:
    m = parse_model(model_body(image="srv:2"))
    assert effective_spec(m, None) is m
    rolled = effective_spec(m, {"toCheckpoint": "good.pt", "toImage": "srv:1"})
    assert (rolled.checkpoint.path, rolled.image) == ("good.pt", "srv:1")
    assert rolled.checkpoint.claim_name == m.checkpoint.claim_name
