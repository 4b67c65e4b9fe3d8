"""A NanoGPTRollout's spec as typed values, parsed once with the shared helper of fields.py. Pure, no I/O.

`parse_rollout` reads the spec with the same defaults as crds/nanogptrollout.yaml; a value the schema
would have refused (an old object, or a server without validation) raises SpecError naming the field path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nanogpt_operator.errors import SpecError
from nanogpt_operator.fields import (DNS_SUBDOMAIN, REMOTE_FIELDS, SHA256, Fields, display_source, pvc_target,
                                    uri_problem)
from nanogpt_operator.rollout.waves import WaveSize, parse_waves

DEFAULT_WAVES = ("1", "25%", "100%")
DEFAULT_SMOKE_MAX_LENGTH = 16
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


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
    """The spec of one NanoGPTRollout: which models, which checkpoint, in which waves, behind which gates."""

    name: str
    selector: LabelSelector
    namespace_selector: LabelSelector | None
    checkpoint_path: str  # the target as models record it: the path in the claim, or the URI (query cut)
    claim_name: str | None
    waves: tuple[WaveSize, ...]
    pause_between_waves_s: int
    max_failures: int
    # None: each model's own spec.rollout.progressDeadlineSeconds.
    progress_deadline_s: int | None
    gate_ready: bool
    smoke: SmokeGate | None
    paused: bool
    # A URI target: what to write as each model's spec.checkpoint (uri, sha256, endpoint, ...); None: a path.
    checkpoint_fields: Mapping[str, Any] | None = None


# spec.checkpoint of a NanoGPTRollout that go with a fetched uri, as in a NanoGPTModel.
URI_FIELDS = ("uri", *REMOTE_FIELDS)


def _parse_target(f: Fields) -> tuple[str, str | None, dict[str, Any] | None]:
    """(target, claimName, the URI form's fields) of spec.checkpoint; the models' own parser checks the rest."""
    uri = f.str("uri")
    if uri is None:
        extra = [k for k in URI_FIELDS if k in f.data]
        if extra:
            raise SpecError(f.at(extra[0]), "applies only to a uri")
        return f.relative_path("path"), f.str("claimName", pattern=DNS_SUBDOMAIN) or None, None
    if "path" in f.data or "claimName" in f.data:
        raise SpecError(f.at("uri"), "set either uri, or path (and claimName), not both")
    problem = uri_problem(uri, f.bool("allowHttp", False))
    if problem:
        raise SpecError(f.at("uri"), problem)
    if uri.startswith("pvc://"):
        claim, path = pvc_target(uri)
        return path, claim, None
    f.str("sha256", pattern=SHA256)
    return display_source(uri), None, {k: f.data[k] for k in URI_FIELDS if k in f.data}


def parse_selector(f: Fields) -> LabelSelector:
    requirements = []
    for i, raw in enumerate(f.list("matchExpressions")):
        expr = Fields(raw, f"{f.at('matchExpressions')}[{i}]")
        op = expr.data.get("operator")
        if op not in SELECTOR_OPERATORS:
            raise SpecError(expr.at("operator"), f"must be In, NotIn, Exists or DoesNotExist, got {op!r}")
        values = tuple(str(v) for v in expr.data.get("values") or ())
        if op in ("In", "NotIn") and not values:
            raise SpecError(expr.at("values"), f"must not be empty for {op}")
        requirements.append(Requirement(str(expr.data.get("key", "")), op, values))
    labels = f.section("matchLabels").data
    return LabelSelector(tuple(sorted((str(k), str(v)) for k, v in labels.items())), tuple(requirements))


def _parse_smoke(gates: Fields) -> SmokeGate | None:
    f = gates.child("smokeTest")
    if f is None:
        return None
    return SmokeGate(prompt=f.str("prompt", required=True),
                     max_length=f.int("maxLength", DEFAULT_SMOKE_MAX_LENGTH, 1))


def parse_rollout(body: Mapping[str, Any]) -> RolloutSpec:
    """The typed spec of a NanoGPTRollout body, with the CRD's defaults."""
    spec = Fields(body.get("spec") or {}, "spec")
    if "selector" not in spec.data:
        raise SpecError(spec.at("selector"), "is required")
    checkpoint, strategy, gates = spec.section("checkpoint"), spec.section("strategy"), spec.section("gates")
    namespace_selector = spec.child("namespaceSelector")
    target, claim, fields = _parse_target(checkpoint)
    return RolloutSpec(
        name=str(body["metadata"]["name"]),
        selector=parse_selector(spec.section("selector")),
        namespace_selector=None if namespace_selector is None else parse_selector(namespace_selector),
        checkpoint_path=target,
        claim_name=claim,
        checkpoint_fields=fields,
        waves=parse_waves(list(strategy.list("waves") or DEFAULT_WAVES), strategy.at("waves")),
        pause_between_waves_s=strategy.duration("pauseBetweenWaves", 0),
        max_failures=strategy.int("maxFailures", 0, 0) or 0,
        progress_deadline_s=strategy.int("progressDeadlineSeconds", None, 0),
        gate_ready=gates.bool("ready", True),
        smoke=_parse_smoke(gates),
        paused=spec.bool("paused", False),
    )
