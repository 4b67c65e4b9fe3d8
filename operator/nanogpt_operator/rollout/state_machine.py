"""The NanoGPTRollout state machine: pure functions of (spec, persisted status, observed world, now).

    Pending ──all models locked──▶ Progressing ──last wave healthy──▶ Succeeded
       │ (Blocked while another      │  ▲   │
       │  rollout holds a model)     │  │   └─failures > maxFailures──▶ Failed ──all reverted──▶ RolledBack
       │                  paused at  ▼  │ unpaused
       └─────────────────── a wave ─▶ Paused
                            boundary

Two rules make it restartable from any status, with no memory outside `status`:

1. `advance` maps the persisted status and the world to the next status (plus Events). It never writes.
2. `actions` derives every write to a NanoGPTModel from the *persisted* status alone, level-based:
   a model in an Updating entry whose spec is not on `to` gets patched, a Reverting one gets its `from`
   back. So an entry's `from` is always in status before its model is changed, a crash between a patch
   and the status write only repeats an idempotent patch, and a wave is never started twice because
   the current wave and each entry's state live in status.

Per-model entries: Waiting → Updating → Healthy | Failed; on rollback Updating/Healthy/Failed →
Reverting → Reverted. Skipped: already on the target at the start (wave 0), or deleted mid-rollout.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nanogpt_operator.conditions import condition
from nanogpt_operator.rollout.model_view import ModelView
from nanogpt_operator.rollout.spec import RolloutSpec
from nanogpt_operator.rollout.waves import Key, plan_waves

# Rollout phases.
PENDING, PROGRESSING, PAUSED = "Pending", "Progressing", "Paused"
SUCCEEDED, FAILED, ROLLED_BACK = "Succeeded", "Failed", "RolledBack"
TERMINAL = (SUCCEEDED, ROLLED_BACK)
# Entry states.
WAITING, UPDATING, HEALTHY, FAILED_STATE = "Waiting", "Updating", "Healthy", "Failed"
REVERTING, REVERTED, SKIPPED = "Reverting", "Reverted", "Skipped"
CHANGED = (UPDATING, HEALTHY, FAILED_STATE, REVERTING, REVERTED)

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_time(t: datetime.datetime) -> str:
    return t.astimezone(datetime.timezone.utc).strftime(TIME_FORMAT)


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.strptime(text, TIME_FORMAT).replace(tzinfo=datetime.timezone.utc)


@dataclass(frozen=True)
class SmokeResult:
    ok: bool
    message: str


@dataclass(frozen=True)
class World:
    """What the handler observed this tick."""

    models: Mapping[Key, ModelView]  # every NanoGPTModel that exists
    selected: frozenset[Key]  # those the rollout's selectors match now
    rollouts: frozenset[str]  # names of the NanoGPTRollouts that exist; a lock naming another is stale
    smoke: Mapping[Key, SmokeResult] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Lock:
    """Set the lock annotation, only if the model is unchanged since we read it (resourceVersion)."""

    key: Key
    resource_version: str | None


@dataclass(frozen=True)
class Unlock:
    key: Key


@dataclass(frozen=True)
class SetCheckpoint:
    """Patch the model's spec.checkpoint (and keep the lock on it in the same patch)."""

    key: Key
    path: str
    claim: str | None
    revert: bool
    resource_version: str | None
    # The whole spec.checkpoint to write (a URI target, or a revert to what the model had); None: path+claim.
    fields: Mapping[str, Any] | None = None


Action = Lock | Unlock | SetCheckpoint


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str
    key: Key | None = None  # None: an Event on the rollout; else also on that NanoGPTModel


@dataclass(frozen=True)
class Entry:
    namespace: str
    name: str
    source: str | None  # status key "from"
    to: str
    state: str
    message: str = ""
    wave: int = 0
    started_at: str | None = None
    failed: bool = False
    from_claim: str | None = None
    to_claim: str | None = None
    from_checkpoint: Mapping[str, Any] | None = None  # the model's spec.checkpoint before, when a URI is involved

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    def to_dict(self) -> dict[str, Any]:
        out = {"namespace": self.namespace, "name": self.name, "from": self.source, "to": self.to,
               "state": self.state, "message": self.message, "wave": self.wave, "startedAt": self.started_at,
               "failed": self.failed, "fromClaimName": self.from_claim, "toClaimName": self.to_claim,
               "fromCheckpoint": dict(self.from_checkpoint) if self.from_checkpoint else None}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Entry:
        return cls(namespace=str(d.get("namespace", "")), name=str(d.get("name", "")), source=d.get("from"),
                   to=str(d.get("to", "")), state=str(d.get("state", WAITING)), message=str(d.get("message", "")),
                   wave=int(d.get("wave", 0)), started_at=d.get("startedAt"), failed=bool(d.get("failed", False)),
                   from_claim=d.get("fromClaimName"), to_claim=d.get("toClaimName"),
                   from_checkpoint=d.get("fromCheckpoint"))


@dataclass(frozen=True)
class State:
    """The persisted part of status, typed; reason/message/blocked feed the conditions."""

    phase: str = PENDING
    target: str | None = None
    wave: int = 0
    waves: int = 0
    entries: tuple[Entry, ...] = ()
    next_wave_at: str | None = None
    blocked: str | None = None
    reason: str = "Starting"
    message: str = ""

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> State:
        blocked = next((c.get("message") for c in status.get("conditions") or []
                        if c.get("type") == "Blocked" and c.get("status") == "True"), None)
        return cls(phase=status.get("phase") or PENDING, target=status.get("target"),
                   wave=int(status.get("currentWave") or 0), waves=int(status.get("waves") or 0),
                   entries=tuple(Entry.from_dict(e) for e in status.get("models") or []),
                   next_wave_at=status.get("nextWaveAt"), blocked=blocked)


@dataclass(frozen=True)
class Step:
    status: dict[str, Any]
    events: tuple[Event, ...]


# ---------------------------------------------------------------------------------------------- gates

def on_checkpoint(m: ModelView, path: str | None, claim: str | None) -> bool:
    """The model's spec asks for this checkpoint (claim only compared when the rollout sets one)."""
    return m.path == path and (claim is None or m.claim == claim)


def ready_gate(spec: RolloutSpec, m: ModelView, to: str) -> tuple[bool, str]:
    """gates.ready: phase Ready, serving `to`, and the status is about the current generation."""
    if not spec.gate_ready:
        return True, ""
    current = m.generation is None or m.observed_generation is None or m.observed_generation >= m.generation
    if m.phase == "Ready" and m.served == to and current:
        return True, ""
    return False, f"waiting for Ready on {to} (phase {m.phase or 'unknown'}, serving {m.served or 'nothing'})"


def _held_elsewhere(lock: str | None, ours: str, rollouts: frozenset[str]) -> bool:
    return bool(lock) and lock != ours and lock in rollouts


def smoke_candidates(spec: RolloutSpec, status: Mapping[str, Any], world: World) -> list[tuple[Key, str]]:
    """(model, endpoint) pairs whose smoke test should run this tick: Updating and past the ready gate."""
    s = State.from_status(status)
    if spec.smoke is None or s.phase not in (PROGRESSING, PAUSED):
        return []
    found = []
    for e in s.entries:
        m = world.models.get(e.key)
        if e.state == UPDATING and m is not None and m.endpoint and on_checkpoint(m, e.to, e.to_claim) \
                and ready_gate(spec, m, e.to)[0]:
            found.append((e.key, m.endpoint))
    return found


# -------------------------------------------------------------------------------------------- actions

def actions(spec: RolloutSpec, status: Mapping[str, Any], world: World) -> list[Action]:
    """Writes to NanoGPTModels that the persisted status asks for and the world does not show yet."""
    s, ours, out = State.from_status(status), spec.name, []
    if s.phase == PENDING:
        todo = [k for k in sorted(world.selected) if not on_checkpoint(world.models[k], spec.checkpoint_path,
                                                                       spec.claim_name)]
        for k in todo:  # in (namespace, name) order, stopping at a held one: no two rollouts deadlock
            m = world.models[k]
            if _held_elsewhere(m.lock, ours, world.rollouts):
                break
            if m.lock != ours:
                out.append(Lock(k, m.resource_version))
        wanted = set(todo)
        out.extend(Unlock(k) for k, m in sorted(world.models.items()) if m.lock == ours and k not in wanted)
        return out
    for e in s.entries:
        m = world.models.get(e.key)
        if m is None or _held_elsewhere(m.lock, ours, world.rollouts):
            continue  # never two writers on one model
        if s.phase in TERMINAL:
            if m.lock == ours:
                out.append(Unlock(e.key))
        elif e.state == UPDATING and not on_checkpoint(m, e.to, e.to_claim):
            out.append(SetCheckpoint(e.key, e.to, e.to_claim, False, m.resource_version, spec.checkpoint_fields))
        elif e.state == REVERTING and e.source and not on_checkpoint(m, e.source, e.from_claim):
            out.append(SetCheckpoint(e.key, e.source, e.from_claim, True, m.resource_version, e.from_checkpoint))
        elif e.state in (WAITING, UPDATING, HEALTHY, FAILED_STATE, REVERTING) and m.lock != ours:
            out.append(Lock(e.key, m.resource_version))  # someone removed our lock: take it back
    return out


# -------------------------------------------------------------------------------------------- advance

def advance(spec: RolloutSpec, status: Mapping[str, Any], world: World, now: datetime.datetime,
            generation: int = 1) -> Step:
    """The next status and the Events of this transition."""
    s = State.from_status(status)
    step = {PENDING: _pending, PROGRESSING: _progressing, PAUSED: _paused, FAILED: _reverting}.get(s.phase)
    events: list[Event] = []
    if step is None:  # Succeeded and RolledBack are final; actions() releases the locks
        s = dataclasses.replace(s, reason=s.phase, message=_final_message(s))
    else:
        s = step(spec, s, world, now, events)
    return Step(render(s, status.get("conditions") or [], format_time(now), generation), tuple(events))


def _final_message(s: State) -> str:
    if s.phase == SUCCEEDED:
        return f"every selected model is on {s.target}"
    return "every changed model is back on its previous checkpoint"


def _pending(spec: RolloutSpec, s: State, world: World, now: datetime.datetime, events: list[Event]) -> State:
    selected = sorted(world.selected)
    if not selected:
        return dataclasses.replace(s, blocked=None, reason="NoModels",
                                   message="the selectors match no NanoGPTModel yet")
    target, claim = spec.checkpoint_path, spec.claim_name
    todo = [k for k in selected if not on_checkpoint(world.models[k], target, claim)]
    for k in todo:
        lock = world.models[k].lock
        if _held_elsewhere(lock, spec.name, world.rollouts):
            message = f"{k[0]}/{k[1]} is being changed by rollout {lock}; waiting for it to finish"
            if s.blocked != message:
                events.append(Event("Warning", "Blocked", message))
            return dataclasses.replace(s, blocked=message, reason="ModelLocked", message=message)
    unlocked = [k for k in todo if world.models[k].lock != spec.name]
    if unlocked:
        return dataclasses.replace(s, blocked=None, reason="Locking",
                                   message=f"taking the lock on {len(unlocked)} of {len(todo)} models")
    # Every model to change is ours now: freeze the plan and record where each model comes from.
    plan = plan_waves(selected, set(selected) - set(todo), spec.waves)
    wave_of = {k: i + 1 for i, keys in enumerate(plan) for k in keys}
    entries = []
    for k in selected:
        m = world.models[k]
        wave = wave_of.get(k, 0)
        entries.append(Entry(k[0], k[1], m.path, target, WAITING if wave else SKIPPED,
                             "" if wave else "already on the target", wave,
                             from_claim=m.claim if claim else None, to_claim=claim))
    events.append(Event("Normal", "Started", f"rolling {target} out to {len(todo)} of {len(selected)} "
                                             f"models in {len(plan)} waves"))
    s = State(phase=PROGRESSING, target=target, wave=0, waves=len(plan), entries=tuple(entries))
    return _boundary(spec, s, world, now, events)


def _paused(spec: RolloutSpec, s: State, world: World, now: datetime.datetime, events: list[Event]) -> State:
    if not spec.paused:
        events.append(Event("Normal", "Resumed", f"resumed after wave {s.wave}/{s.waves}"))
        s = dataclasses.replace(s, phase=PROGRESSING, next_wave_at=None)
    return _progressing(spec, s, world, now, events)


def _progressing(spec: RolloutSpec, s: State, world: World, now: datetime.datetime,
                 events: list[Event]) -> State:
    entries = list(s.entries)
    for i, e in enumerate(entries):
        if e.state in (WAITING, UPDATING) and e.key not in world.models:
            entries[i] = dataclasses.replace(e, state=SKIPPED, message="the NanoGPTModel was deleted")
            events.append(Event("Warning", "ModelDeleted", f"{e.namespace}/{e.name} was deleted during the rollout"))
    active = [i for i, e in enumerate(entries) if e.state == UPDATING]
    for i in active:
        entries[i] = _gate(spec, entries[i], world, now, events)
    s = dataclasses.replace(s, entries=tuple(entries))
    failed = sum(e.failed for e in entries)
    if failed > spec.max_failures:
        return _fail(spec, s, failed, events)
    waiting = [e for e in entries if e.state == UPDATING]
    if waiting:
        return dataclasses.replace(s, blocked=None, reason="WaitingForGates",
                                   message=f"wave {s.wave}/{s.waves}: {len(waiting)} models not healthy yet; "
                                           f"{waiting[0].namespace}/{waiting[0].name}: {waiting[0].message}")
    if active:  # the current wave finished this tick
        healthy = sum(e.state == HEALTHY for e in entries if e.wave == s.wave)
        events.append(Event("Normal", "WaveComplete", f"wave {s.wave}/{s.waves} complete: {healthy} models "
                                                      f"healthy on {s.target}"))
        if spec.pause_between_waves_s and s.wave < s.waves:
            later = now + datetime.timedelta(seconds=spec.pause_between_waves_s)
            s = dataclasses.replace(s, next_wave_at=format_time(later))
    return _boundary(spec, s, world, now, events)


def _boundary(spec: RolloutSpec, s: State, world: World, now: datetime.datetime, events: list[Event]) -> State:
    """Between waves: finish, pause, wait out pauseBetweenWaves, or start the next wave."""
    if s.wave >= s.waves:
        events.append(Event("Normal", "Succeeded", f"every selected model is on {s.target}"))
        return dataclasses.replace(s, phase=SUCCEEDED, blocked=None, next_wave_at=None, reason=SUCCEEDED,
                                   message=f"every selected model is on {s.target}")
    if spec.paused:
        if s.phase != PAUSED:
            events.append(Event("Normal", "Paused", f"paused after wave {s.wave}/{s.waves}"))
        return dataclasses.replace(s, phase=PAUSED, reason="Paused",
                                   message=f"paused after wave {s.wave}/{s.waves}; set spec.paused: false to go on")
    not_before = parse_time(s.next_wave_at)
    if not_before is not None and now < not_before:
        return dataclasses.replace(s, reason="PausingBetweenWaves",
                                   message=f"wave {s.wave + 1}/{s.waves} starts at {s.next_wave_at}")
    wave, started, entries = s.wave + 1, format_time(now), []
    for e in s.entries:
        if e.wave == wave and e.state == WAITING:
            m = world.models[e.key]  # deleted ones became Skipped in _progressing
            # Re-read `from` now (the model was locked since the plan, but a person may have edited it):
            # this status is written before actions() patches the model, so `from` is never lost.
            uri_involved = spec.checkpoint_fields is not None or bool((m.checkpoint or {}).get("uri"))
            e = dataclasses.replace(e, state=UPDATING, source=m.path, started_at=started,
                                    from_claim=m.claim if e.to_claim else None,
                                    from_checkpoint=dict(m.checkpoint or {}) if uri_involved else None,
                                    message=f"setting spec.checkpoint.path to {e.to}")
        entries.append(e)
    count = sum(e.wave == wave and e.state == UPDATING for e in entries)
    events.append(Event("Normal", "WaveStarted", f"wave {wave}/{s.waves}: updating {count} models to {s.target}"))
    return dataclasses.replace(s, phase=PROGRESSING, wave=wave, entries=tuple(entries), next_wave_at=None,
                               blocked=None, reason="WaveStarted", message=f"wave {wave}/{s.waves} started")


def _gate(spec: RolloutSpec, e: Entry, world: World, now: datetime.datetime, events: list[Event]) -> Entry:
    """One Updating entry after this tick's observations: still Updating, Healthy or Failed."""
    m = world.models[e.key]
    deadline_s = spec.progress_deadline_s if spec.progress_deadline_s is not None else m.deadline_s
    started = parse_time(e.started_at) or now
    expired = now >= started + datetime.timedelta(seconds=deadline_s)

    def fail(why: str) -> Entry:
        events.append(Event("Warning", "ModelFailed", f"{e.namespace}/{e.name}: {why}", e.key))
        return dataclasses.replace(e, state=FAILED_STATE, failed=True, message=why)

    def wait(why: str) -> Entry:
        if expired:
            return fail(f"not healthy within {deadline_s}s: {why}")
        return dataclasses.replace(e, message=why)

    if not on_checkpoint(m, e.to, e.to_claim):
        return wait(f"setting spec.checkpoint.path to {e.to}")
    if m.fetch_error:  # the pods cannot fetch e.to, and retrying will not help: no need to wait it out
        return fail(f"its pods cannot fetch {e.to}: {m.fetch_error}")
    ok, why = ready_gate(spec, m, e.to)
    if not ok:
        if m.rolled_back_from == e.to:
            return fail(f"the NanoGPTModel rolled itself back from {e.to}")
        if m.phase == "Failed":
            return fail(f"the NanoGPTModel reports phase Failed with {e.to}")
        return wait(why)
    if spec.smoke is not None:
        result = world.smoke.get(e.key)
        if result is None:
            return wait("waiting for the smoke test" if m.endpoint else "waiting for status.endpoint")
        if not result.ok:
            return wait(f"smoke test failed: {result.message}")
    message = f"healthy on {e.to}" + (" (ready, smoke test passed)" if spec.smoke else "")
    events.append(Event("Normal", "ModelHealthy", f"{e.namespace}/{e.name} is {message}", e.key))
    return dataclasses.replace(e, state=HEALTHY, message=message)


def _fail(spec: RolloutSpec, s: State, failed: int, events: list[Event]) -> State:
    cause = next(f"{e.namespace}/{e.name}: {e.message}" for e in s.entries if e.failed)
    entries = []
    for e in s.entries:
        if e.state in (UPDATING, HEALTHY, FAILED_STATE):
            e = dataclasses.replace(e, state=REVERTING, message=f"reverting to {e.source}" +
                                    (f" after: {e.message}" if e.failed else ""))
        elif e.state == WAITING:
            e = dataclasses.replace(e, message="not started: the rollout failed")
        entries.append(e)
    reverting = sum(e.state == REVERTING for e in entries)
    message = (f"{failed} models failed (maxFailures {spec.max_failures}), first {cause}; "
               f"reverting {reverting} models")
    events.append(Event("Warning", "RolloutFailed", message))
    return dataclasses.replace(s, phase=FAILED, entries=tuple(entries), next_wave_at=None, reason="Reverting",
                               message=message)


def _reverting(spec: RolloutSpec, s: State, world: World, now: datetime.datetime, events: list[Event]) -> State:
    entries = []
    for e in s.entries:
        m = world.models.get(e.key)
        if e.state == REVERTING and (m is None or not e.source or on_checkpoint(m, e.source, e.from_claim)):
            # Keep why it was reverted ("reverting to X after: ...") in the final message.
            done = "the NanoGPTModel was deleted" if m is None else e.message.replace("reverting", "reverted", 1)
            e = dataclasses.replace(e, state=REVERTED, message=done)
            if m is not None:
                events.append(Event("Normal", "Reverted", f"{e.namespace}/{e.name} {done}", e.key))
        entries.append(e)
    s = dataclasses.replace(s, entries=tuple(entries))
    left = sum(e.state == REVERTING for e in entries)
    if left:
        return dataclasses.replace(s, reason="Reverting", message=f"reverting {left} models")
    reverted = sum(e.state == REVERTED for e in entries)
    events.append(Event("Warning", "RolledBack", f"returned {reverted} models to their previous checkpoints"))
    return dataclasses.replace(s, phase=ROLLED_BACK, reason=ROLLED_BACK, message=_final_message(
        dataclasses.replace(s, phase=ROLLED_BACK)))


# --------------------------------------------------------------------------------------------- render

def counts(entries: Sequence[Entry]) -> dict[str, int]:
    return {"selected": len(entries),
            "updated": sum(e.state in CHANGED for e in entries),
            "healthy": sum(e.state == HEALTHY for e in entries),
            "failed": sum(e.failed for e in entries),
            "skipped": sum(e.state == SKIPPED for e in entries)}


def render(s: State, previous: Sequence[Mapping[str, Any]], now: str, generation: int) -> dict[str, Any]:
    """The whole status subresource."""
    c = counts(s.entries)
    done = c["healthy"] + sum(e.state == SKIPPED and e.wave == 0 for e in s.entries)
    working = s.phase in (PENDING, PROGRESSING, FAILED) and not s.blocked
    conditions = [condition("Progressing", working, s.reason, s.message, generation, previous, now),
                  condition("Blocked", bool(s.blocked), "ModelLocked" if s.blocked else "NotBlocked",
                            s.blocked or "", generation, previous, now)]
    return {
        "phase": s.phase,
        "observedGeneration": generation,
        "target": s.target,
        "currentWave": s.wave,
        "waves": s.waves,
        "counts": c,
        "progress": f"{done}/{c['selected']}",
        "nextWaveAt": s.next_wave_at,
        "message": s.message,
        "models": [e.to_dict() for e in s.entries],
        "conditions": conditions,
    }
