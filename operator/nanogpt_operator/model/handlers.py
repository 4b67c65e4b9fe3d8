"""kopf registrations of the NanoGPTModel controller and nothing else; each delegates to `reconcile.run`.

The startup handler here also configures kopf for the whole operator (peering, where kopf keeps its
state, which logs become Events) and creates kopf's peering object: both controllers run in one process.

`register` takes the registry and the resync period so tests can run the same handlers faster;
`kopf run -m nanogpt_operator` uses kopf's default registry, filled when this module is imported.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from nanogpt_operator.api import GROUP, MODEL_PLURAL, VERSION
from nanogpt_operator.client import KubeClient
from nanogpt_operator.config import load_config
from nanogpt_operator.metrics import shared_metrics
from nanogpt_operator.model import reconcile
from nanogpt_operator.model.apply import ensure_peering

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
        memo.client = await KubeClient.connect(config)
        if config.metrics_port:
            memo.metrics_server, _ = shared_metrics(memo).serve(config.metrics_port)
            logger.info("serving the operator's metrics on :%d/metrics", config.metrics_port)
        if not config.standalone and await ensure_peering(memo.client, config.peering_name):
            logger.info("created ClusterKopfPeering %s", config.peering_name)
        logger.info("configured: peering=%s priority=%s standalone=%s",
                    config.peering_name, config.priority, config.standalone)

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
        await reconcile.run(memo.client, body, patch, logger, resync=False, metrics=shared_metrics(memo))

    # Level-based safety net: re-measure children, repair drift, roll back failed rollouts.
    @kopf.timer(GROUP, VERSION, MODEL_PLURAL, interval=resync_seconds, initial_delay=resync_seconds, registry=registry)
    async def resync(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
        await reconcile.run(memo.client, body, patch, logger, resync=True, metrics=shared_metrics(memo))


register(kopf.get_default_registry())
