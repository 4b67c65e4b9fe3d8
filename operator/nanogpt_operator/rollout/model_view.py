"""What a NanoGPTRollout reads of the NanoGPTModels: a typed view of each, and which ones it selects. Pure.

A model is read leniently (it is another controller's resource, already validated there): `model_view`
keeps only the facts the rollout decides on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nanogpt_operator.api import GROUP
from nanogpt_operator.fields import display_source
from nanogpt_operator.rollout.spec import RolloutSpec
from nanogpt_operator.rollout.waves import Key

# The lock: a NanoGPTModel carrying this annotation is being changed by the rollout it names.
LOCK_ANNOTATION = f"{GROUP}/rollout"
# A model without spec.rollout.progressDeadlineSeconds gets its load budget plus a margin, as in
# model/spec.py (ModelSpec.progress_deadline_seconds; tests/operator/test_rollout_spec.py pins the equality).
MODEL_STARTUP_DEFAULT_S = 900
MODEL_LOAD_MARGIN_S = 60


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
    # spec.server.apiKeySecretRef as (Secret name, key): the smoke test must send one of those keys.
    api_key_secret: tuple[str, str] | None = None
    # spec.checkpoint as written (to return to it on a revert).
    checkpoint: Mapping[str, Any] | None = None
    # Why the model's pods cannot fetch its checkpoint (status.fetch), when retrying cannot help.
    fetch_error: str | None = None

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


def _opt_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _fetch_error(status: Mapping[str, Any]) -> str | None:
    fetch = status.get("fetch") or {}
    if fetch.get("phase") != "Failed" or fetch.get("retryable", True):
        return None
    return f"{fetch.get('reason', 'FetchFailed')}: {fetch.get('message', '')} (pod {fetch.get('pod', '?')})"


def _source(checkpoint: Mapping[str, Any]) -> str | None:
    """The model's checkpoint as the rollout compares it: the path in the claim, or the URI (query cut)."""
    uri = checkpoint.get("uri")
    if isinstance(uri, str) and uri.startswith("pvc://") and "/" in uri[6:]:
        return uri[6:].split("/", 1)[1]
    return display_source(uri) if isinstance(uri, str) else checkpoint.get("path")


def _claim(checkpoint: Mapping[str, Any]) -> str | None:
    uri = checkpoint.get("uri")
    if isinstance(uri, str) and uri.startswith("pvc://"):
        return uri[6:].split("/", 1)[0]
    return checkpoint.get("claimName")


def _display(checkpoint: Mapping[str, Any]) -> str:
    uri = checkpoint.get("uri")
    return display_source(uri) if isinstance(uri, str) else f"pvc://{checkpoint.get('claimName')}/{checkpoint.get('path')}"


def model_view(body: Mapping[str, Any]) -> ModelView:
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    checkpoint = spec.get("checkpoint") or {}
    generation = _opt_int(meta.get("generation"))
    rollback = status.get("rollback") or {}
    rolled_back = rollback.get("fromCheckpoint") if rollback.get("generation") == generation else None
    ref = (spec.get("server") or {}).get("apiKeySecretRef") or {}
    deadline = _opt_int((spec.get("rollout") or {}).get("progressDeadlineSeconds"))
    startup = _opt_int((spec.get("server") or {}).get("startupTimeoutSeconds")) or MODEL_STARTUP_DEFAULT_S
    return ModelView(
        namespace=str(meta.get("namespace", "")), name=str(meta.get("name", "")),
        labels=dict(meta.get("labels") or {}),
        path=_source(checkpoint), claim=_claim(checkpoint), checkpoint=dict(checkpoint),
        fetch_error=_fetch_error(status) if status.get("source") in (None, _display(checkpoint)) else None,
        lock=(meta.get("annotations") or {}).get(LOCK_ANNOTATION),
        phase=status.get("phase"), served=status.get("servedCheckpoint"),
        generation=generation, observed_generation=_opt_int(status.get("observedGeneration")),
        endpoint=status.get("endpoint"),
        deadline_s=deadline if deadline is not None else startup + MODEL_LOAD_MARGIN_S,
        rolled_back_from=rolled_back, resource_version=meta.get("resourceVersion"),
        api_key_secret=(str(ref["name"]), str(ref.get("key") or "keys")) if ref.get("name") else None,
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
