"""kopf registrations of the NanoGPTModel controller and nothing else; each delegates to `reconcile.run`.

The startup handler here also configures kopf for the whole operator (peering, where kopf keeps its
state, which logs become Events) and creates kopf's peering object: both controllers run in one process.

`register` takes the registry and the resync period so tests can run the same handlers faster;
`kopf run -m nanogpt_operator` uses kopf's default registry, filled when this module is imported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from nanogpt_operator.api import GROUP, MANAGER, MODEL_PLURAL, VERSION, models_path
from nanogpt_operator.client import KubeClient
from nanogpt_operator.config import load_config
from nanogpt_operator.errors import ApiError, ClientClosedError
from nanogpt_operator.metrics import shared_metrics
from nanogpt_operator.model import reconcile
from nanogpt_operator.model.apply import ensure_peering
from nanogpt_operator.timers import Resync, register_resync

# Drift repair must happen within 30 s of a hand edit: a timer every 10 s leaves room for retries.
RESYNC_SECONDS = 10.0


def register(registry: kopf.OperatorRegistry, *, resync_seconds: float = RESYNC_SECONDS) -> None:
    """Register the NanoGPTModel handlers, and the operator-wide startup and cleanup, into `registry`."""

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
        config = load_config()
        settings.peering.name = config.peering_name
        settings.peering.priority = config.priority
        settings.peering.standalone = config.standalone
        settings.peering.clusterwide = True
        # Two replicas without their peering object would both reconcile: refuse to start instead.
        settings.peering.mandatory = not config.standalone
        settings.persistence.finalizer = f"{GROUP}/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration")
        # Only warnings become Kubernetes Events; the operator posts its own meaningful ones.
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        memo.config = config
        memo.client = await KubeClient.connect(config)
        if config.metrics_port:
            memo.metrics_server, _ = shared_metrics(memo).serve(config.metrics_port)
            logger.info("serving the operator's metrics on :%d/metrics", config.metrics_port)
        if not config.standalone and await ensure_peering(memo.client, config.peering_name):
            logger.info("created ClusterKopfPeering %s", config.peering_name)
        logger.info("configured: peering=%s priority=%s standalone=%s",
                    config.peering_name, config.priority, config.standalone)

    # kopf runs cleanup handlers after its other tasks (watchers, timers) are stopped, so no handler is
    # mid-request when the session closes; `close` also waits for any request still in flight.
    @kopf.on.cleanup(registry=registry)
    async def close(memo: kopf.Memo, **_: Any) -> None:
        if "client" in memo:
            await memo.client.close()
        if "metrics_server" in memo:
            memo.metrics_server.shutdown()

    @kopf.on.create(GROUP, VERSION, MODEL_PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, MODEL_PLURAL, field="spec", registry=registry)
    @kopf.on.resume(GROUP, VERSION, MODEL_PLURAL, registry=registry)
    async def reconcile_on_change(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger,
                                  **_: Any) -> None:
        await reconcile.run(memo.client, body, patch, logger, resync=False, config=memo.config,
                            metrics=shared_metrics(memo))

    # Level-based safety net: re-measure children, repair drift, roll back failed rollouts.
    register_resync(GROUP, VERSION, MODEL_PLURAL, registry=registry,
                    resync=lambda memo: model_resync(memo, resync_seconds))

    # Status follows the pods: every change of an owned Deployment's status (a replica ready, a rollout
    # stuck) re-derives the model's status at once instead of at the next resync.
    @kopf.on.event("apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": MANAGER},
                   registry=registry)
    async def follow_deployment(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger,
                                **_: Any) -> None:
        await follow(memo, event.get("type"), body, logger)


def model_resync(memo: kopf.Memo, interval: float) -> Resync:
    """The model's resync round (reconcile with resync=True), and how it writes the status."""
    async def run(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger) -> None:
        await reconcile.run(memo.client, body, patch, logger, resync=True, config=memo.config,
                            metrics=shared_metrics(memo))

    async def write_status(body: kopf.Body, status: Mapping[str, Any]) -> None:
        await memo.client.patch_status(models_path(body.metadata.namespace, body.metadata.name), status)

    # The first round one period after start: the create/resume handlers have just reconciled.
    return Resync(run, write_status, interval=interval, initial_delay=interval)


async def follow(memo: kopf.Memo, event_type: str | None, deployment: kopf.Body, logger: kopf.Logger) -> None:
    owner = next((o for o in deployment.metadata.get("ownerReferences") or [] if o.get("controller")), None)
    if event_type == "DELETED" or owner is None or owner.get("kind") != "NanoGPTModel":
        return  # a deleted child is recreated by the resync, which also posts the Event
    try:
        model = await memo.client.get_model(deployment.metadata.namespace, owner["name"])
        if model is not None and await reconcile.refresh_status(memo.client, model, memo.config):
            logger.debug("status of %s follows its Deployment", owner["name"])
    except ClientClosedError:
        return  # the operator is stopping
    except ApiError as err:  # the resync timer covers what a watch event missed
        logger.info("could not refresh the status of %s: %s", owner["name"], err)


register(kopf.get_default_registry())
