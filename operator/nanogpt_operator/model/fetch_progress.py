"""Bytes done of a running fetch: the last progress line of ONE fetching pod's `fetch` log.

The kubelet reports only that the init container runs; how far it got is in its log. Reading a log is
best effort: RBAC without pods/log (403), a pod or container gone (404, 400), a slow kubelet (5xx,
timeout) each leave status.fetch at Fetching without bytes, with one debug line, never an error that
would fail the reconcile. One pod, a few lines, a bounded number of bytes per reconcile.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from nanogpt_operator.client import KubeClient
from nanogpt_operator.config import OperatorConfig
from nanogpt_operator.errors import ApiError, ClientClosedError
from nanogpt_operator.model.fetch_build import FETCH_CONTAINER
from nanogpt_operator.model.fetch_status import FetchProgress, fetch_state, parse_progress
from nanogpt_operator.model.spec import ModelSpec

TAIL_LINES = 5  # a progress line is written with one prose line beside it, plus the odd retry warning


async def fetch_progress(client: KubeClient, m: ModelSpec, pods: Sequence[Mapping[str, Any]],
                         config: OperatorConfig) -> FetchProgress | None:
    """The progress of the pod that status.fetch names, when it is Fetching; None when unknown."""
    if not m.checkpoint.uri or config.fetch_log_bytes <= 0:
        return None
    state = fetch_state(pods)
    if state is None or state.phase != "Fetching":
        return None
    try:
        log = await client.pod_log(m.namespace, state.pod, FETCH_CONTAINER, tail_lines=TAIL_LINES,
                                   limit_bytes=config.fetch_log_bytes, timeout_s=config.fetch_log_timeout_s)
    except ClientClosedError:
        raise  # the operator is stopping: the reconcile ends, as for any other request
    except ApiError as err:  # TransientApiError included: progress is not worth a retry
        logging.getLogger("nanogpt_operator.fetch").debug(
            "no fetch progress for %s/%s from pod %s: %s", m.namespace, m.name, state.pod, err)
        return None
    return parse_progress(log)
