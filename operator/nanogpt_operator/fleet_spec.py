"""A NanoGPTRollout's spec, and the facts of one NanoGPTModel it needs, as typed values. Pure, no I/O.

`parse_rollout` reads the spec once with the same defaults as crds/nanogptrollout.yaml; a value the
schema would have refused (an old object, or a server without validation) raises SpecError naming the
field path. `model_view` reduces a NanoGPTModel to what the rollout decides on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nanogpt_operator.errors import SpecError
from nanogpt_operator.waves import Key, WaveSize, parse_waves

GROUP = "nanogpt.dev"
VERSION = "v1alpha1"
KIND = "NanoGPTRollout"
PLURAL = "nanogptrollouts"
# The lock: a NanoGPTModel carrying this annotation is being changed by the rollout it names.
LOCK_ANNOTATION = f"{GROUP}/rollout"
# Same default as NanoGPTModel spec.rollout.progressDeadlineSeconds (crds/nanogptmodels.yaml).
MODEL_DEADLINE_DEFAULT_S = 600
DEFAULT_WAVES = ("1", "25%", "100%")
DEFAULT_SMOKE_MAX_LENGTH = 16

_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


@dataclass(frozen=True)
class Requirement:
    """One matchExpressions entry of a label selector."""

    key: str
    operator: str  # In | NotIn | Exists | DoesNotExist
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelSelector:
    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
            if req.operator == "In" and labels.get(req.key) not in req.values:
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
        return True


@dataclass(frozen=True)
class SmokeGate:
    """gates.smokeTest: one real POST /generate through the model's Service."""

    prompt: str
    max_length: int = DEFAULT_SMOKE_MAX_LENGTH


@dataclass(frozen=True)
class RolloutSpec:
    name: str
    selector: LabelSelector
    namespace_selector: LabelSelector | None
    checkpoint_path: str
    claim_name: str | None
    waves: tuple[WaveSize, ...]
    pause_between_waves_s: int
    max_failures: int
    # None: each model's own spec.rollout.progressDeadlineSeconds.
    progress_deadline_s: int | None
    gate_ready: bool
    smoke: SmokeGate | None
    paused: bool


@dataclass(frozen=True)
class ModelView:
    """What a rollout needs to know about one NanoGPTModel, read from its body."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    path: str | None
    claim: str | None
    lock: str | None
    phase: str | None
    served: str | None
    generation: int | None
    observed_generation: int | None
    endpoint: str | None
    deadline_s: int
    # The checkpoint the model's own operator rolled back from in this generation, if it did.
    rolled_back_from: str | None
    resource_version: str | None

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


def parse_duration(value: object, path: str) -> int:
    """Seconds from `90`, `"90"`, `"90s"`, `"5m"`, `"1h30m"`."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _DURATION.match(value) if isinstance(value, str) and value else None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if match is None:
        raise SpecError(path, f"must be a duration such as 30s, 5m or 1h, got {value!r}")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(path, f"must be an object, got {type(value).__name__}")
    return value


def parse_selector(value: Any, path: str) -> LabelSelector:
    data = _mapping(value, path)
    labels = _mapping(data.get("matchLabels"), f"{path}.matchLabels")
    requirements = []
    for i, expr in enumerate(data.get("matchExpressions") or []):
        expr = _mapping(expr, f"{path}.matchExpressions[{i}]")
        op = expr.get("operator")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise SpecError(f"{path}.matchExpressions[{i}].operator",
                            f"must be In, NotIn, Exists or DoesNotExist, got {op!r}")
        values = tuple(str(v) for v in expr.get("values") or ())
        if op in ("In", "NotIn") and not values:
            raise SpecError(f"{path}.matchExpressions[{i}].values", f"must not be empty for {op}")
        requirements.append(Requirement(str(expr.get("key", "")), op, values))
    return LabelSelector(tuple(sorted((str(k), str(v)) for k, v in labels.items())), tuple(requirements))


def _int(data: Mapping[str, Any], key: str, default: int | None, path: str) -> int | None:
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(f"{path}.{key}", f"must be an integer >= 0, got {value!r}")
    return value


def parse_rollout(body: Mapping[str, Any]) -> RolloutSpec:
    """The typed spec of a NanoGPTRollout body, with the CRD's defaults."""
    spec = _mapping(body.get("spec"), "spec")
    if "selector" not in spec:
        raise SpecError("spec.selector", "is required")
    checkpoint = _mapping(spec.get("checkpoint"), "spec.checkpoint")
    path = checkpoint.get("path")
    if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
        raise SpecError("spec.checkpoint.path", f"must be a relative path inside the claim, got {path!r}")
    claim = checkpoint.get("claimName")
    strategy = _mapping(spec.get("strategy"), "spec.strategy")
    gates = _mapping(spec.get("gates"), "spec.gates")
    smoke = gates.get("smokeTest")
    smoke_gate = None
    if smoke is not None:
        smoke = _mapping(smoke, "spec.gates.smokeTest")
        prompt = smoke.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise SpecError("spec.gates.smokeTest.prompt", "must be a non-empty string")
        max_length = _int(smoke, "maxLength", DEFAULT_SMOKE_MAX_LENGTH, "spec.gates.smokeTest")
        if not max_length:
            raise SpecError("spec.gates.smokeTest.maxLength", "must be at least 1")
        smoke_gate = SmokeGate(prompt, max_length)
    ns_selector = spec.get("namespaceSelector")
    return RolloutSpec(
        name=str(body["metadata"]["name"]),
        selector=parse_selector(spec.get("selector"), "spec.selector"),
        namespace_selector=None if ns_selector is None else parse_selector(ns_selector, "spec.namespaceSelector"),
        checkpoint_path=path,
        claim_name=str(claim) if claim else None,
        waves=parse_waves(list(strategy.get("waves") or DEFAULT_WAVES), "spec.strategy.waves"),
        pause_between_waves_s=parse_duration(strategy.get("pauseBetweenWaves", 0),
                                             "spec.strategy.pauseBetweenWaves"),
        max_failures=_int(strategy, "maxFailures", 0, "spec.strategy") or 0,
        progress_deadline_s=_int(strategy, "progressDeadlineSeconds", None, "spec.strategy"),
        gate_ready=bool(gates.get("ready", True)),
        smoke=smoke_gate,
        paused=bool(spec.get("paused", False)),
    )


def _opt_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def model_view(body: Mapping[str, Any]) -> ModelView:
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    checkpoint = spec.get("checkpoint") or {}
    generation = _opt_int(meta.get("generation"))
    rollback = status.get("rollback") or {}
    rolled_back = rollback.get("fromCheckpoint") if rollback.get("generation") == generation else None
    deadline = _opt_int((spec.get("rollout") or {}).get("progressDeadlineSeconds"))
    return ModelView(
        namespace=str(meta.get("namespace", "")), name=str(meta.get("name", "")),
        labels=dict(meta.get("labels") or {}),
        path=checkpoint.get("path"), claim=checkpoint.get("claimName"),
        lock=(meta.get("annotations") or {}).get(LOCK_ANNOTATION),
        phase=status.get("phase"), served=status.get("servedCheckpoint"),
        generation=generation, observed_generation=_opt_int(status.get("observedGeneration")),
        endpoint=status.get("endpoint"),
        deadline_s=deadline if deadline is not None else MODEL_DEADLINE_DEFAULT_S,
        rolled_back_from=rolled_back, resource_version=meta.get("resourceVersion"),
    )


def selected_keys(spec: RolloutSpec, models: Sequence[ModelView],
                  namespace_labels: Mapping[str, Mapping[str, str]]) -> frozenset[Key]:
    """The models the rollout's selectors match now; a namespace not in `namespace_labels` has no labels."""
    keys = set()
    for m in models:
        if not spec.selector.matches(m.labels):
            continue
        if spec.namespace_selector is not None and not spec.namespace_selector.matches(
                namespace_labels.get(m.namespace, {})):
            continue
        keys.add(m.key)
    return frozenset(keys)
