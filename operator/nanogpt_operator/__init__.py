"""nanogpt_operator: a kopf operator for two custom resources of the nanogpt.dev API group.

Run it with `kopf run -m nanogpt_operator --all-namespaces`. Importing the package registers both
controllers' handlers in kopf's default registry.

    api.py          the API group, version, kinds and plurals (the one definition)
    config.py       operator settings from NANOGPT_OPERATOR_* (the only reader of the environment)
    errors.py       the typed errors, and what each means for a retry
    client.py       the async Kubernetes client, the one boundary to aiohttp
    fields.py       the spec-parsing helper both spec modules use (errors name the field path)
    conditions.py   status conditions, shared by both resources

    model/          NanoGPTModel (ngm): one served model and its Deployment, Service, PVC, HPA, PDB
        spec, build (pure desired children), drift, apply, status, rollback (the model's own automatic
        rollback), reconcile, handlers (also the operator-wide startup: kopf settings, peering)
    rollout/        NanoGPTRollout (ngr): one checkpoint rolled out across many models, in waves
        spec, model_view (what it reads of each model), waves (the planner), state_machine, smoke
        (the smoke-test gate), client, reconcile, handlers
"""

from nanogpt_operator.model import handlers as model_handlers
from nanogpt_operator.rollout import handlers as rollout_handlers

__all__ = ["model_handlers", "rollout_handlers"]
