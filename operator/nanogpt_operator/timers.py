"""Resync loops that do not block deletion: one kopf daemon per object, without kopf's finalizer.

Why not `@kopf.timer`: kopf (1.45) marks every timer and daemon `requires_finalizer=True`, so it puts its
finalizer on each watched object. With the operator down, or uninstalled together with its CRDs, nothing
removes it and `kubectl delete` hangs: the API server deletes an object only once `metadata.finalizers`
is empty (https://kubernetes.io/docs/concepts/overview/working-with-objects/finalizers/). A resync only
re-measures and repairs, and children go by garbage collection (owner references), so nothing has to run
before an object goes. kopf then also removes the finalizer it put on objects before ("no handlers
requiring it").

Without the finalizer, kopf never stops a timer of a deleted object (it stops daemons and timers on
deletionTimestamp, which an object without finalizers never gets). So the loop is a daemon that ends by
itself once its object is gone: on the object's DELETED watch event, or when its status write answers
404 (a DELETED event missed across a watch reconnect); kopf stops it at shutdown
(`stopped`), so no round is in flight when the cleanup handlers close the API client. A daemon's `patch`
is only applied when it returns, so each round writes the status it produced itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf

from nanogpt_operator.errors import ApiError, ClientClosedError, OperatorError

# How soon a pausing loop notices kopf's stop request (kopf cancels it after `cancellation_timeout`).
STOP_CHECK_S = 0.5
# One resync round: given kopf's live body, a fresh patch and the object's logger; fills patch.status.
Round = Callable[[kopf.Body, kopf.Patch, kopf.Logger], Awaitable[None]]
# How to write the status a round made (a 404 ends the loop: the object is gone).
WriteStatus = Callable[[kopf.Body, Mapping[str, Any]], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class Resync:
    """What one resource's resync loop does each round, and how often."""

    run: Round
    write_status: WriteStatus
    interval: float
    initial_delay: float = 0.0


async def resync_loop(resync: Resync, body: kopf.Body, stopped: kopf.DaemonStopped, logger: kopf.Logger,
                      gone: Callable[[], bool]) -> None:
    """Run rounds until the operator stops or the object is `gone`; errors delay the next round."""
    await _pause(stopped, resync.initial_delay)
    while not stopped:
        delay = resync.interval
        if gone():
            logger.debug("deleted: its resync ends")
            return
        try:
            await _round(resync, body, stopped, logger)
        except kopf.TemporaryError as err:
            logger.error("resync failed temporarily: %s", err)
            delay = err.delay if err.delay is not None else resync.interval
        except ClientClosedError:
            return  # the operator is stopping
        except ApiError as err:
            if err.status == 404:  # deleted while the round ran
                return
            logger.error("resync failed temporarily: %s", err)
        except OperatorError as err:  # the API failed while checking or writing: the next round retries
            logger.error("resync failed temporarily: %s", err)
        await _pause(stopped, delay)


async def _pause(stopped: kopf.DaemonStopped, seconds: float) -> None:
    """Wait `seconds`, or less once kopf asks the daemon to stop.

    Not `stopped.wait(seconds)`: kopf runs that wait in a task of its own, which outlives a daemon that
    kopf spawns during its shutdown and then fails the shutdown with its TimeoutError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not stopped and loop.time() < deadline:
        await asyncio.sleep(min(STOP_CHECK_S, deadline - loop.time()))


async def _round(resync: Resync, body: kopf.Body, stopped: kopf.DaemonStopped, logger: kopf.Logger) -> None:
    patch = kopf.Patch()
    try:
        await resync.run(body, patch, logger)
    except kopf.PermanentError:
        pass  # the round reported it (status, one Event per generation); its status is written below
    status = dict(patch).get("status")
    if status and not stopped:
        await resync.write_status(body, status)


def register_resync(group: str, version: str, plural: str, *, registry: kopf.OperatorRegistry,
                    resync: Callable[[kopf.Memo], Resync]) -> None:
    """A per-object resync daemon for `plural` that needs no finalizer; `resync(memo)` says what it does."""
    deleted: set[str] = set()  # uids seen in DELETED events, until their loop has ended

    @kopf.on.event(group, version, plural, registry=registry)
    async def resync_end(event: kopf.RawEvent, **_: Any) -> None:
        if event.get("type") == "DELETED":
            deleted.add(str((event.get("object") or {}).get("metadata", {}).get("uid")))

    async def resync_daemon(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: kopf.Logger,
                            **_: Any) -> None:
        uid = str(body.metadata.uid)
        try:
            await resync_loop(resync(memo), body, stopped, logger, gone=lambda: uid in deleted)
        finally:
            deleted.discard(uid)

    kopf.daemon(group, version, plural, id="resync", registry=registry, cancellation_timeout=5.0)(resync_daemon)
    spawning = registry._spawning  # kopf offers no public switch for a daemon's finalizer
    spawning._handlers[:] = [dataclasses.replace(h, requires_finalizer=False) if h.fn is resync_daemon else h
                             for h in spawning._handlers]
