"""The operator's API group and its two resources: the one definition, read by both controllers.

crds/nanogptmodels.yaml and crds/nanogptrollout.yaml declare the same names.
"""

from __future__ import annotations

GROUP = "nanogpt.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# NanoGPTModel (short name ngm): one served model; its controller is nanogpt_operator.model.
MODEL_KIND = "NanoGPTModel"
MODEL_PLURAL = "nanogptmodels"
# NanoGPTRollout (short name ngr): a checkpoint rolled out across many models; nanogpt_operator.rollout.
ROLLOUT_KIND = "NanoGPTRollout"
ROLLOUT_PLURAL = "nanogptrollouts"

# app.kubernetes.io/managed-by of everything the operator creates; it only deletes what carries it.
MANAGER = "nanogpt-operator"


def models_path(namespace: str | None = None, name: str | None = None) -> str:
    """The API path of NanoGPTModels: all of them, one namespace's, or one."""
    scope = f"/namespaces/{namespace}" if namespace else ""
    path = f"/apis/{API_VERSION}{scope}/{MODEL_PLURAL}"
    return f"{path}/{name}" if name else path


def rollouts_path() -> str:
    """The API path of every NanoGPTRollout in the cluster."""
    return f"/apis/{API_VERSION}/{ROLLOUT_PLURAL}"
