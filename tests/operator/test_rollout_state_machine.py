"""The rollout state machine: every transition, and restart from any status (pure, no API).

`Cluster` is a tiny in-memory stand-in for the NanoGPTModels: it applies the machine's actions to model
bodies and, like the model operator would, reports each model Ready on its spec checkpoint unless the
test marks that checkpoint bad for it.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Callable
from typing import Any

import pytest

from nanogpt_operator.rollout import state_machine as machine
from nanogpt_operator.rollout.model_view import LOCK_ANNOTATION, model_view, selected_keys
from nanogpt_operator.rollout.spec import parse_rollout

OLD, NEW = "log/model_40000.pt", "log/model_50000.pt"
T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
NAMES = [("prod", "a"), ("prod", "b"), ("prod", "c"), ("stage", "a"), ("stage", "d")]


def rollout(name: str = "r1", paused: bool = False, smoke: bool = False, **strategy: Any):
    spec: dict[str, Any] = {"selector": {"matchLabels": {"family": "stories"}}, "checkpoint": {"path": NEW},
                            "strategy": {"waves": [1, "50%", "100%"], "progressDeadlineSeconds": 30, **strategy},
                            "paused": paused}
    if smoke:
        spec["gates"] = {"smokeTest": {"prompt": "Once upon a time"}}
    return parse_rollout({"metadata": {"name": name}, "spec": spec})


def model(ns: str, name: str, path: str = OLD, lock: str | None = None, family: str = "stories") -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": ns, "name": name, "labels": {"family": family}, "generation": 1}
    if lock:
        meta["annotations"] = {LOCK_ANNOTATION: lock}
    return {"metadata": meta, "spec": {"checkpoint": {"claimName": "pvc", "path": path}},
            "status": {"phase": "Ready", "servedCheckpoint": path, "observedGeneration": 1,
                       "endpoint": f"http://{name}.{ns}:80"}}


class Cluster:
    def __init__(self, models: list[dict[str, Any]], rollouts: tuple[str, ...] = ("r1",)) -> None:
        self.models = {(m["metadata"]["namespace"], m["metadata"]["name"]): m for m in models}
        self.rollouts = frozenset(rollouts)
        self.bad: set[tuple[tuple[str, str], str]] = set()  # (model, checkpoint) that never gets Ready
        self.writes: list[machine.Action] = []

    def apply(self, action: machine.Action, ours: str = "r1") -> None:
        self.writes.append(action)
        m = self.models[action.key]
        annotations = m["metadata"].setdefault("annotations", {})
        if isinstance(action, machine.Unlock):
            annotations.pop(LOCK_ANNOTATION, None)
            return
        annotations[LOCK_ANNOTATION] = ours
        if isinstance(action, machine.SetCheckpoint):
            m["spec"]["checkpoint"]["path"] = action.path
            m["metadata"]["generation"] += 1
            m["status"].update(phase="Progressing")  # the model operator has not caught up yet

    def settle(self) -> None:
        """The model operator's view: ready on the spec checkpoint unless marked bad."""
        for key, m in self.models.items():
            path = m["spec"]["checkpoint"]["path"]
            ready = (key, path) not in self.bad
            m["status"].update(phase="Ready" if ready else "Progressing", servedCheckpoint=path,
                               observedGeneration=m["metadata"]["generation"])

    def world(self, spec, smoke: dict | None = None) -> machine.World:
        views = {k: model_view(m) for k, m in self.models.items()}
        return machine.World(views, selected_keys(spec, list(views.values()), {}), self.rollouts, smoke or {})


def tick(spec, cluster: Cluster, status: dict, now: datetime.datetime, settle: bool = True,
         smoke: Callable[[tuple[str, str]], machine.SmokeResult] | None = None) -> machine.Step:
    """One handler tick, as rollout/reconcile.py does it: act on the persisted status, observe, decide."""
    for action in machine.actions(spec, status, cluster.world(spec)):
        cluster.apply(action, spec.name)
    if settle:
        cluster.settle()
    world = cluster.world(spec)
    results = {k: smoke(k) for k, _ in machine.smoke_candidates(spec, status, world)} if smoke else {}
    return machine.advance(spec, status, cluster.world(spec, results), now)


def drive(spec, cluster: Cluster, status: dict | None = None, ticks: int = 40, lose: int | None = None,
          start: int = 0, **kw: Any) -> tuple[dict, list[dict], list[machine.Event]]:
    """Tick until a final phase; `lose`: the status write of that tick is lost (crash before it)."""
    status, history, events = dict(status or {}), [], []
    for i in range(start, start + ticks):
        step = tick(spec, cluster, status, T0 + datetime.timedelta(seconds=i), **kw)
        events.extend(step.events)
        if i != lose:
            status = step.status
            history.append(copy.deepcopy(status))
        if status.get("phase") in machine.TERMINAL and not machine.actions(spec, status, cluster.world(spec)):
            break
    return status, history, events


def entries(status: dict) -> dict[tuple[str, str], dict]:
    return {(e["namespace"], e["name"]): e for e in status["models"]}


def cond(status: dict, kind: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == kind)


def fresh() -> Cluster:
    return Cluster([model(ns, n) for ns, n in NAMES] + [model("prod", "other", family="poems")])


# ------------------------------------------------------------------------------------------- Pending

def test_pending_without_models_waits_for_some():
    spec, cluster = rollout(), Cluster([model("prod", "x", family="poems")])
    step = tick(spec, cluster, {}, T0)
    assert step.status["phase"] == "Pending"
    assert cond(step.status, "Progressing")["reason"] == "NoModels"


def test_pending_locks_every_selected_model_in_order_then_plans():
    spec, cluster = rollout(), fresh()
    acts = machine.actions(spec, {}, cluster.world(spec))
    assert acts == [machine.Lock(k, None) for k in sorted(NAMES)]  # not the poems model
    locking = machine.advance(spec, {}, cluster.world(spec), T0)
    assert locking.status["phase"] == "Pending" and cond(locking.status, "Progressing")["reason"] == "Locking"
    for a in acts:
        cluster.apply(a)
    step = machine.advance(spec, locking.status, cluster.world(spec), T0)
    assert step.status["phase"] == "Progressing"
    assert step.status["waves"] == 3 and step.status["currentWave"] == 1
    e = entries(step.status)
    assert e[("prod", "a")]["state"] == "Updating" and e[("prod", "a")]["from"] == OLD
    assert [e[k]["wave"] for k in sorted(NAMES)] == [1, 2, 2, 3, 3]  # 1, ceil(50% of 5)=3, 5
    assert {ev.reason for ev in step.events} == {"Started", "WaveStarted"}
    assert step.status["counts"] == {"selected": 5, "updated": 1, "healthy": 0, "failed": 0, "skipped": 0}


def test_pending_is_blocked_by_another_rollouts_lock_with_a_clear_condition():
    spec = rollout()
    cluster = Cluster([model("prod", "a"), model("prod", "b", lock="r0"), model("stage", "a")], ("r0", "r1"))
    acts = machine.actions(spec, {}, cluster.world(spec))
    assert acts == [machine.Lock(("prod", "a"), None)]  # stops at the held model: lock ordering
    step = machine.advance(spec, {}, cluster.world(spec), T0)
    assert step.status["phase"] == "Pending"
    blocked = cond(step.status, "Blocked")
    assert blocked["status"] == "True" and "prod/b is being changed by rollout r0" in blocked["message"]
    assert cond(step.status, "Progressing")["status"] == "False"
    assert [ev.reason for ev in step.events] == ["Blocked"]
    again = machine.advance(spec, step.status, cluster.world(spec), T0)
    assert again.events == ()  # said once, not every tick


def test_a_lock_naming_a_deleted_rollout_is_stale_and_taken():
    spec, cluster = rollout(), Cluster([model("prod", "a", lock="gone")])
    assert machine.actions(spec, {}, cluster.world(spec)) == [machine.Lock(("prod", "a"), None)]


def test_models_already_on_the_target_are_skipped_and_need_no_lock():
    spec = rollout()
    cluster = Cluster([model("prod", "a", path=NEW), model("prod", "b")])
    assert machine.actions(spec, {}, cluster.world(spec)) == [machine.Lock(("prod", "b"), None)]
    status, _, _ = drive(spec, cluster)
    assert status["phase"] == "Succeeded"
    assert entries(status)[("prod", "a")]["state"] == "Skipped"
    assert status["progress"] == "2/2"


def test_everything_already_on_the_target_succeeds_at_once():
    spec, cluster = rollout(), Cluster([model("prod", "a", path=NEW)])
    step = machine.advance(spec, {}, cluster.world(spec), T0)
    assert step.status["phase"] == "Succeeded" and step.status["waves"] == 0


def test_created_paused_plans_but_changes_nothing():
    spec, cluster = rollout(paused=True), fresh()
    status, _, _ = drive(spec, cluster, ticks=5)
    assert status["phase"] == "Paused" and status["currentWave"] == 0
    assert not any(isinstance(a, machine.SetCheckpoint) for a in cluster.writes)


# --------------------------------------------------------------------------------------- Progressing

def test_happy_rollout_three_waves_then_locks_released():
    spec, cluster = rollout(), fresh()
    status, history, events = drive(spec, cluster)
    assert status["phase"] == "Succeeded"
    assert [h["currentWave"] for h in history if h["phase"] == "Progressing"][-1] == 3
    assert status["counts"] == {"selected": 5, "updated": 5, "healthy": 5, "failed": 0, "skipped": 0}
    assert status["progress"] == "5/5"
    assert all(m["spec"]["checkpoint"]["path"] == NEW for k, m in cluster.models.items() if k[1] != "other")
    assert cluster.models[("prod", "other")]["spec"]["checkpoint"]["path"] == OLD
    assert all(LOCK_ANNOTATION not in m["metadata"].get("annotations", {}) for m in cluster.models.values())
    waves = [ev.message for ev in events if ev.reason == "WaveStarted"]
    assert len(waves) == 3 and waves[0].startswith("wave 1/3: updating 1 models")


def test_waves_run_one_at_a_time():
    spec, cluster = rollout(), fresh()
    _, history, _ = drive(spec, cluster)
    for h in history:
        active = {e["wave"] for e in h["models"] if e["state"] == "Updating"}
        assert active <= {h["currentWave"]}
        assert all(e["state"] == "Waiting" for e in h["models"] if e["wave"] > h["currentWave"])


def test_the_gate_waits_for_ready_on_the_new_checkpoint_of_the_current_generation():
    spec, cluster = rollout(), fresh()
    status, _, _ = drive(spec, cluster, ticks=2, settle=False)  # locked, wave 1 started
    step = tick(spec, cluster, status, T0, settle=False)  # spec patched, status still the old one
    e = entries(step.status)[("prod", "a")]
    assert e["state"] == "Updating" and "waiting for Ready on" in e["message"]
    m = cluster.models[("prod", "a")]
    m["status"].update(phase="Ready", servedCheckpoint=NEW, observedGeneration=m["metadata"]["generation"] - 1)
    assert entries(tick(spec, cluster, step.status, T0, settle=False).status)[("prod", "a")]["state"] == "Updating"
    m["status"]["observedGeneration"] += 1
    assert entries(tick(spec, cluster, step.status, T0, settle=False).status)[("prod", "a")]["state"] == "Healthy"


def test_pause_between_waves_waits_until_next_wave_at():
    spec, cluster = rollout(pauseBetweenWaves="1m"), fresh()
    status, history, _ = drive(spec, cluster, ticks=5)
    assert status["currentWave"] == 1 and status["nextWaveAt"] == "2025-01-01T00:01:01Z"
    assert cond(status, "Progressing")["reason"] == "PausingBetweenWaves"
    later = machine.advance(spec, status, cluster.world(spec), T0 + datetime.timedelta(minutes=2))
    assert later.status["currentWave"] == 2 and later.status["nextWaveAt"] is None


def test_a_failed_model_within_max_failures_lets_the_rollout_go_on():
    spec, cluster = rollout(maxFailures=1), fresh()
    cluster.bad.add((("prod", "b"), NEW))
    status, _, events = drive(spec, cluster, ticks=200)
    assert status["phase"] == "Succeeded"
    assert entries(status)[("prod", "b")]["state"] == "Failed"
    assert "not healthy within 30s" in entries(status)[("prod", "b")]["message"]
    assert status["counts"]["failed"] == 1 and status["progress"] == "4/5"
    assert any(ev.reason == "ModelFailed" and ev.key == ("prod", "b") for ev in events)


def test_beyond_max_failures_stops_reverts_every_changed_model_then_rolled_back():
    spec, cluster = rollout(), fresh()
    cluster.bad.add((("prod", "b"), NEW))
    status, history, events = drive(spec, cluster, ticks=200)
    assert "Failed" in [h["phase"] for h in history]
    assert status["phase"] == "RolledBack"
    e = entries(status)
    assert e[("prod", "a")]["state"] == "Reverted" and e[("prod", "b")]["state"] == "Reverted"
    assert e[("prod", "b")]["failed"] is True and e[("prod", "a")].get("failed") is False
    assert e[("stage", "a")]["state"] == "Waiting"  # wave 3 never started
    assert all(m["spec"]["checkpoint"]["path"] == OLD for m in cluster.models.values())
    assert all(LOCK_ANNOTATION not in m["metadata"].get("annotations", {}) for m in cluster.models.values())
    assert [ev.reason for ev in events if ev.type == "Warning"][-1] == "RolledBack"
    assert status["counts"]["failed"] == 1


def test_reverting_writes_from_the_persisted_status_only():
    spec, cluster = rollout(), fresh()
    cluster.bad.add((("prod", "a"), NEW))
    _, history, _ = drive(spec, cluster, ticks=200)
    status = next(h for h in history if h["phase"] == "Failed")
    cluster = _cluster_at(status, set())
    cluster.models[("prod", "a")]["spec"]["checkpoint"]["path"] = NEW  # the crash came before the revert
    acts = machine.actions(spec, status, cluster.world(spec))
    assert acts == [machine.SetCheckpoint(("prod", "a"), OLD, None, True, None)]


def test_a_model_that_rolled_itself_back_fails_at_once():
    spec, cluster = rollout(maxFailures=5), fresh()
    status, _, _ = drive(spec, cluster, ticks=2, settle=False)
    tick(spec, cluster, status, T0, settle=False)
    m = cluster.models[("prod", "a")]
    m["status"].update(phase="Degraded", servedCheckpoint=OLD,
                       rollback={"generation": m["metadata"]["generation"], "fromCheckpoint": NEW})
    step = machine.advance(spec, status, cluster.world(spec), T0)
    assert entries(step.status)[("prod", "a")]["state"] == "Failed"
    assert "rolled itself back" in entries(step.status)[("prod", "a")]["message"]


def test_smoke_runs_only_past_the_ready_gate_and_must_pass():
    spec, cluster = rollout(smoke=True), fresh()
    status, _, _ = drive(spec, cluster, ticks=2, settle=False)
    tick(spec, cluster, status, T0, settle=False)
    assert machine.smoke_candidates(spec, status, cluster.world(spec)) == []  # not ready yet
    cluster.settle()
    assert machine.smoke_candidates(spec, status, cluster.world(spec)) == [(("prod", "a"), "http://a.prod:80")]
    bad = {("prod", "a"): machine.SmokeResult(False, "POST /generate answered 500: boom")}
    step = machine.advance(spec, status, cluster.world(spec, bad), T0)
    assert "smoke test failed: POST /generate answered 500" in entries(step.status)[("prod", "a")]["message"]
    late = machine.advance(spec, status, cluster.world(spec, bad), T0 + datetime.timedelta(seconds=60))
    assert entries(late.status)[("prod", "a")]["state"] == "Reverting"  # failed, maxFailures 0
    good = {("prod", "a"): machine.SmokeResult(True, "generated 40 characters")}
    ok = machine.advance(spec, status, cluster.world(spec, good), T0)
    assert entries(ok.status)[("prod", "a")]["state"] == "Healthy"


def test_a_model_deleted_mid_rollout_is_skipped_not_failed():
    spec, cluster = rollout(), fresh()
    status, _, _ = drive(spec, cluster, ticks=2)
    del cluster.models[("stage", "d")]
    step = machine.advance(spec, status, cluster.world(spec), T0)
    assert entries(step.status)[("stage", "d")]["state"] == "Skipped"
    assert [ev.reason for ev in step.events][0] == "ModelDeleted"
    assert step.status["phase"] == "Progressing"


def test_a_removed_lock_is_taken_back():
    spec, cluster = rollout(), fresh()
    status, _, _ = drive(spec, cluster, ticks=2)
    cluster.models[("stage", "d")]["metadata"]["annotations"].pop(LOCK_ANNOTATION)
    assert machine.Lock(("stage", "d"), None) in machine.actions(spec, status, cluster.world(spec))


def test_never_writes_a_model_another_rollout_holds():
    spec, cluster = rollout(), fresh()
    status, _, _ = drive(spec, cluster, ticks=2, settle=False)
    cluster.models[("prod", "a")]["metadata"]["annotations"][LOCK_ANNOTATION] = "r0"
    cluster.rollouts = frozenset({"r0", "r1"})
    assert machine.actions(spec, status, cluster.world(spec)) == []


# -------------------------------------------------------------------------------------------- Paused

def test_pause_stops_after_the_current_wave_and_resume_goes_on():
    cluster = fresh()
    status, _, _ = drive(rollout(), cluster, ticks=2, settle=False)
    assert status["currentWave"] == 1
    paused = rollout(paused=True)
    status, _, events = drive(paused, cluster, status, ticks=10)
    assert status["phase"] == "Paused" and status["currentWave"] == 1  # wave 1 finished, wave 2 not started
    assert entries(status)[("prod", "a")]["state"] == "Healthy"
    assert "Paused" in [ev.reason for ev in events]
    assert cond(status, "Progressing")["status"] == "False"
    step = machine.advance(rollout(), status, cluster.world(rollout()), T0)
    assert step.status["phase"] == "Progressing" and step.status["currentWave"] == 2
    assert [ev.reason for ev in step.events] == ["Resumed", "WaveStarted"]
    final, _, _ = drive(rollout(), cluster, step.status)
    assert final["phase"] == "Succeeded"


def test_final_phases_only_release_locks():
    spec, cluster = rollout(), fresh()
    status, _, _ = drive(spec, cluster)
    cluster.models[("prod", "a")]["metadata"]["annotations"][LOCK_ANNOTATION] = "r1"
    assert machine.actions(spec, status, cluster.world(spec)) == [machine.Unlock(("prod", "a"))]
    step = machine.advance(spec, status, cluster.world(spec), T0)
    assert step.status["phase"] == "Succeeded" and step.events == ()
    assert step.status["models"] == status["models"]


# --------------------------------------------------------------------------------- restart from status

def _happy_history() -> list[dict]:
    _, history, _ = drive(rollout(), fresh())
    return history


def _failing_history() -> list[dict]:
    cluster = fresh()
    cluster.bad.add((("prod", "c"), NEW))
    _, history, _ = drive(rollout(), cluster, ticks=200)
    return history


def _cluster_at(status: dict, bad: set) -> Cluster:
    """The models as a crashed operator would find them: the writes of `status` may or may not be done."""
    cluster = fresh()
    cluster.bad |= bad
    for e in status.get("models", []):
        m = cluster.models[(e["namespace"], e["name"])]
        m["metadata"].setdefault("annotations", {})[LOCK_ANNOTATION] = "r1"
        if e["state"] in ("Healthy", "Failed"):
            m["spec"]["checkpoint"]["path"] = e["to"]
    cluster.settle()
    return cluster


@pytest.mark.parametrize("index", range(len(_happy_history())))
def test_restart_from_any_status_of_a_happy_rollout_finishes_it(index):
    status = _happy_history()[index]
    cluster = _cluster_at(status, set())
    final, history, events = drive(rollout(), cluster, copy.deepcopy(status), start=index + 1)
    assert final["phase"] == "Succeeded"
    assert all(e["from"] == OLD and e["state"] == "Healthy" for e in final["models"])
    started = [int(ev.message.split("/")[0].split()[1]) for ev in events if ev.reason == "WaveStarted"]
    assert started == sorted(set(started)) and all(w > status.get("currentWave", 0) for w in started)


@pytest.mark.parametrize("index", range(len(_failing_history())))
def test_restart_from_any_status_of_a_failing_rollout_returns_every_model(index):
    status = _failing_history()[index]
    cluster = _cluster_at(status, {(("prod", "c"), NEW)})
    final, _, _ = drive(rollout(), cluster, copy.deepcopy(status), ticks=200, start=index + 1)
    assert final["phase"] == "RolledBack"
    assert all(m["spec"]["checkpoint"]["path"] == OLD for m in cluster.models.values())
    assert all(e["from"] == OLD for e in final["models"])


@pytest.mark.parametrize("lose", range(0, 14))
def test_a_lost_status_write_never_loses_from_or_flips_a_model_twice(lose):
    spec, cluster = rollout(), fresh()
    final, _, _ = drive(spec, cluster, lose=lose)
    assert final["phase"] == "Succeeded"
    assert all(e["from"] == OLD for e in final["models"])
    updates = [a.key for a in cluster.writes if isinstance(a, machine.SetCheckpoint)]
    assert sorted(set(updates)) == sorted(NAMES)  # each model moved to the target, none moved back
    assert not any(a.revert for a in cluster.writes if isinstance(a, machine.SetCheckpoint))
