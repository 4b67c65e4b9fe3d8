"""A NanoGPTModel's automatic rollback (spec.rollout.autoRollback), as pure decisions.

Not to be confused with the NanoGPTRollout's revert of many models (rollout/state_machine.py).

When a rollout misses its deadline (the Deployment reports ProgressDeadlineExceeded), the operator pins
the last checkpoint and image that every replica once served (status.lastGoodCheckpoint/lastGoodImage)
for the *current generation* of the spec. The pin lives in status.rollback; the next edit of the spec
bumps metadata.generation, which releases the pin and tries the new spec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from nanogpt_operator.model.spec import ModelSpec
from nanogpt_operator.model.status import DeploymentState, Problem


def pinned_rollback(status: Mapping[str, Any], generation: int) -> dict[str, Any] | None:
    """The rollback recorded for this generation, if any; a newer spec is tried as written."""
    rollback = status.get("rollback")
    if isinstance(rollback, Mapping) and rollback.get("generation") == generation:
        return dict(rollback)
    return None


def effective_spec(m: ModelSpec, rollback: Mapping[str, Any] | None) -> ModelSpec:
    """The spec to build children from: as written, or with the last good checkpoint and image."""
    if rollback is None:
        return m
    checkpoint = m.checkpoint.with_source(rollback["toCheckpoint"]) or m.checkpoint
    return dataclasses.replace(m, checkpoint=checkpoint, image=rollback.get("toImage") or m.image)


def decide_rollback(m: ModelSpec, generation: int, ds: DeploymentState, problems: Sequence[Problem],
                    status: Mapping[str, Any]) -> dict[str, Any] | None:
    """A rollback to pin now, or None: only after the deadline, and only to something that worked."""
    if not m.rollout.auto_rollback or not ds.deadline_exceeded:
        return None
    if pinned_rollback(status, generation) is not None:
        return None
    good_ckpt, good_image = status.get("lastGoodCheckpoint"), status.get("lastGoodImage")
    if not good_ckpt or (ds.checkpoint, ds.image) == (good_ckpt, good_image):
        return None  # nothing proven to return to, or the proven version itself is failing now
    if m.checkpoint.with_source(good_ckpt) is None:
        return None  # proven in the other form (a claim, a URI) or a cut pre-signed URL: cannot rebuild it
    cause = f"{problems[0].reason}: {problems[0].message}" if problems else "ProgressDeadlineExceeded"
    return {
        "generation": generation,
        "fromCheckpoint": ds.checkpoint, "fromImage": ds.image,
        "toCheckpoint": good_ckpt, "toImage": good_image,
        "reason": problems[0].reason if problems else "ProgressDeadlineExceeded",
        "message": (f"checkpoint {ds.checkpoint} (image {ds.image}) was not ready within "
                    f"{m.progress_deadline_seconds}s ({cause}); rolled back to {good_ckpt} "
                    f"(image {good_image}). Edit the spec to try again."),
    }
