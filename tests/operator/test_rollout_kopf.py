"""The rollout controller under kopf.testing.KopfRunner against kmock's KubernetesEmulator.

Only the rollout handlers run (their own registry): the emulator runs no Deployments, so a stand-in for
the model operator marks each NanoGPTModel Ready on its spec checkpoint, unless the test holds it back.
The smoke test is the real HttpSmokeTest, hitting an aiohttp server on 127.0.0.1 that each model's
status.endpoint points at. Every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
from aiohttp import web
from kopf.testing import KopfRunner

from nanogpt_operator.rollout import handlers as rollout_handlers
from nanogpt_operator.rollout.client import RolloutClient
from nanogpt_operator.rollout.model_view import LOCK_ANNOTATION
from k8s_rules import deletion_completes
from operator_helpers import kopf_running, serve_loopback

OLD, NEW = "log/model_40000.pt", "log/model_50000.pt"
MODELS = "/apis/nanogpt.dev/v1alpha1/namespaces/{ns}/nanogptmodels"
ROLLOUTS = "/apis/nanogpt.dev/v1alpha1/nanogptrollouts"
MERGE = {"Content-Type": "application/merge-patch+json"}
FLEET = [("prod", "a"), ("prod", "b"), ("prod", "c"), ("stage", "a"), ("stage", "d")]
TICK_S = 0.1
DEADLINE_S = 60.0  # an upper bound on a loaded CI host, not a wait


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = DEADLINE_S) -> Any:
    """Poll `check` until it returns something truthy, or fail naming `what`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > end:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)  # poll interval, not synchronisation: the loop re-checks the condition


class Api:
    """What a person does with kubectl: create, get, merge-patch, delete."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def send(self, method: str, path: str, body: Any = None, headers: dict | None = None) -> Any:
        async with self.session.request(method, path, json=body, headers=headers) as response:
            data = await response.json(content_type=None)
            assert response.status < 400, (method, path, response.status, data)
            return data

    async def model(self, ns: str, name: str) -> dict[str, Any]:
        return await self.send("GET", f"{MODELS.format(ns=ns)}/{name}")

    async def models(self) -> list[dict[str, Any]]:
        return (await self.send("GET", "/apis/nanogpt.dev/v1alpha1/nanogptmodels"))["items"]

    async def rollout(self, name: str = "r1") -> dict[str, Any]:
        return await self.send("GET", f"{ROLLOUTS}/{name}")

    async def patch_model(self, ns: str, name: str, patch: dict) -> None:
        await self.send("PATCH", f"{MODELS.format(ns=ns)}/{name}", patch, MERGE)

    async def patch_rollout(self, name: str, patch: dict) -> None:
        await self.send("PATCH", f"{ROLLOUTS}/{name}", patch, MERGE)


class ModelOperatorStandIn:
    """Marks each model Ready on its spec checkpoint, as the real operator would once pods are ready."""

    def __init__(self, api: Api, smoke_url: str) -> None:
        self.api, self.smoke_url = api, smoke_url
        self.held: set[tuple[str, str]] = set()  # models whose new pods "never get ready"

    async def run(self) -> None:
        while True:
            for m in await self.api.models():
                ns, name = m["metadata"]["namespace"], m["metadata"]["name"]
                path, status = m["spec"]["checkpoint"]["path"], m.get("status") or {}
                phase = "Progressing" if (ns, name) in self.held else "Ready"
                if (status.get("servedCheckpoint"), status.get("phase")) != (path, phase):
                    await self.api.patch_model(ns, name, {"status": {
                        "phase": phase, "servedCheckpoint": path,
                        "endpoint": f"{self.smoke_url}/{ns}/{name}"}})
            await asyncio.sleep(0.05)  # a controller's resync period


def nanogpt_model(ns: str, name: str, family: str = "stories") -> dict[str, Any]:
    return {"apiVersion": "nanogpt.dev/v1alpha1", "kind": "NanoGPTModel",
            "metadata": {"name": name, "namespace": ns, "labels": {"nanogpt.dev/family": family},
                         "uid": f"uid-{ns}-{name}", "resourceVersion": "1"},
            "spec": {"checkpoint": {"claimName": "model-pvc", "path": OLD}, "replicas": 1}}


def nanogpt_rollout(name: str = "r1", **strategy: Any) -> dict[str, Any]:
    return {"apiVersion": "nanogpt.dev/v1alpha1", "kind": "NanoGPTRollout",
            # kopf tests resourceVersion in its JSON patches (finalizers); the emulator never sets one.
            "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "1"},
            "spec": {"selector": {"matchLabels": {"nanogpt.dev/family": "stories"}},
                     "checkpoint": {"path": NEW},
                     "strategy": {"waves": [1, "50%", "100%"], "maxFailures": 0, **strategy},
                     "gates": {"ready": True, "smokeTest": {"prompt": "Once upon a time", "maxLength": 8}}}}


@pytest.fixture
async def smoke_server() -> AsyncIterator[dict[str, Any]]:
    """A real HTTP server standing in for each model's Service: /<ns>/<name>/generate."""
    state: dict[str, Any] = {"hits": [], "broken": set(), "keys": {}, "auth": []}

    async def generate(request: web.Request) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info["name"]
        body = await request.json()
        state["hits"].append((ns, name, body))
        key = state["keys"].get((ns, name))  # as the server does with API_KEYS_FILE (server/auth.py)
        state["auth"].append((ns, name, request.headers.get("Authorization")))
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            return web.json_response({"error": {"code": "invalid_api_key"}}, status=401)
        if (ns, name) in state["broken"]:
            return web.json_response({"prompt": body["prompt"], "generated_text": ""})
        return web.json_response({"prompt": body["prompt"], "generated_text": body["prompt"] + " there was"})

    app = web.Application()
    app.router.add_post("/{ns}/{name}/generate", generate)
    async with serve_loopback(app) as url:
        state["url"] = url
        yield state


@pytest.fixture
async def cluster(smoke_server: dict[str, Any]) -> AsyncIterator[tuple[kmock.KubernetesEmulator, Api, Any]]:
    emu = kmock.KubernetesEmulator()
    info = kmock.ResourceInfo
    emu.resources["nanogpt.dev/v1alpha1/nanogptrollouts"] = info(
        kind="NanoGPTRollout", namespaced=False, verbs={"list", "watch", "get", "patch"}, subresources={"status"})
    emu.resources["nanogpt.dev/v1alpha1/nanogptmodels"] = info(
        kind="NanoGPTModel", namespaced=True, verbs={"list", "watch", "get", "patch"}, subresources={"status"})
    emu.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False, verbs={"list", "watch"})
    emu.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
        kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch"})
    emu.resources["v1/events"] = info(kind="Event", namespaced=True, verbs={"create"})
    emu.resources["v1/secrets"] = info(kind="Secret", namespaced=True, verbs={"get", "create"})
    async with emu, kmock.Server(emu) as server, aiohttp.ClientSession(base_url=str(server.url)) as session:
        api = Api(session)
        for ns, name in FLEET:
            await api.send("POST", MODELS.format(ns=ns), nanogpt_model(ns, name))
        await api.send("POST", MODELS.format(ns="prod"), nanogpt_model("prod", "poem", family="poems"))
        stand_in = ModelOperatorStandIn(api, smoke_server["url"])
        task = asyncio.create_task(stand_in.run())
        await eventually(lambda: _all_ready(api), "the stand-in to mark every model Ready")
        yield emu, api, stand_in
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _all_ready(api: Api) -> bool:
    return all((m.get("status") or {}).get("phase") == "Ready" for m in await api.models())


@contextlib.asynccontextmanager
async def operator(url: str) -> AsyncIterator[KopfRunner]:
    """kopf running only the rollout handlers, in its own thread and loop, against the emulator."""
    registry = kopf.OperatorRegistry()

    async def connect() -> RolloutClient:
        return RolloutClient(aiohttp.ClientSession(), url, lambda: None, "nanogpt-operator-test")

    rollout_handlers.register(registry, interval=TICK_S, connect=connect)
    settings = kopf.OperatorSettings()
    settings.posting.level = logging.WARNING  # as the operator's startup sets it: no Event per log line
    settings.watching.connect_timeout = 5
    settings.watching.server_timeout = 10
    async with kopf_running(registry, url, settings=settings) as runner:
        yield runner


def _phase(api: Api, *phases: str, name: str = "r1") -> Callable[[], Awaitable[Any]]:
    async def check() -> Any:
        r = await api.rollout(name)
        return r if (r.get("status") or {}).get("phase") in phases else None
    return check


def _entries(rollout: dict) -> dict[tuple[str, str], dict]:
    return {(e["namespace"], e["name"]): e for e in rollout["status"]["models"]}


def _events(emu: kmock.KubernetesEmulator) -> list[dict]:
    """Every Event kopf posted (the emulator stores only one per namespace: they have no names)."""
    return [r.data for r in emu if r.action == kmock.action.CREATE
            and r.resource is not None and r.resource.plural == "events"]


async def _no_locks(api: Api) -> bool:
    return not [m for m in await api.models() if LOCK_ANNOTATION in (m["metadata"].get("annotations") or {})]


async def _paths(api: Api) -> dict[tuple[str, str], str]:
    return {(m["metadata"]["namespace"], m["metadata"]["name"]): m["spec"]["checkpoint"]["path"]
            for m in await api.models()}


async def test_happy_rollout_across_three_waves(cluster, smoke_server):
    emu, api, _ = cluster
    async with operator(str(api.session._base_url)):
        await api.send("POST", ROLLOUTS, nanogpt_rollout())
        done = await eventually(_phase(api, "Succeeded"), "the rollout to succeed")
        await eventually(lambda: _no_locks(api), "the locks to be released")
    status = done["status"]
    assert status["waves"] == 3 and status["currentWave"] == 3
    assert status["counts"] == {"selected": 5, "updated": 5, "healthy": 5, "failed": 0, "skipped": 0}
    assert status["progress"] == "5/5"
    assert all(e["from"] == OLD and e["to"] == NEW and e["state"] == "Healthy" for e in status["models"])
    assert [_entries(done)[k]["wave"] for k in FLEET] == [1, 2, 2, 3, 3]
    paths = await _paths(api)
    assert all(paths[k] == NEW for k in FLEET) and paths[("prod", "poem")] == OLD
    assert sorted({(ns, name) for ns, name, _ in smoke_server["hits"]}) == sorted(FLEET)
    assert all(body == {"prompt": "Once upon a time", "max_length": 8} for _, _, body in smoke_server["hits"])
    reasons = [e["reason"] for e in _events(emu)]
    assert reasons.count("WaveStarted") == 3 and "Succeeded" in reasons
    # No finalizer on the rollout or any model: a DELETE completes with the operator down (issue 17).
    assert deletion_completes(await api.rollout())
    assert all(deletion_completes(m) for m in await api.models())


async def test_failed_gate_stops_and_reverts(cluster, smoke_server):
    emu, api, _ = cluster
    smoke_server["broken"].add(("prod", "b"))  # wave 2: its server answers without generated_text
    async with operator(str(api.session._base_url)):
        # Long enough for the healthy ones (timestamps have whole seconds), short for a fast test.
        await api.send("POST", ROLLOUTS, nanogpt_rollout(progressDeadlineSeconds=4))
        done = await eventually(_phase(api, "RolledBack"), "the rollout to roll back")
        await eventually(lambda: _no_locks(api), "the locks to be released")
    entries = _entries(done)
    failed = {k for k, e in entries.items() if e.get("failed")}
    assert ("prod", "b") in failed and failed <= {("prod", "b"), ("prod", "c")}  # prod/c: only on a slow machine
    assert "smoke test failed: POST /generate answered 200 without generated_text" in \
        entries[("prod", "b")]["message"]
    assert {k for k, e in entries.items() if e["state"] == "Reverted"} == {("prod", "a"), ("prod", "b"), ("prod", "c")}
    assert entries[("stage", "a")]["state"] == "Waiting"  # wave 3 never started
    assert all(path == OLD for path in (await _paths(api)).values())
    assert done["status"]["counts"]["failed"] == len(failed)
    warnings = {e["reason"] for e in _events(emu) if e["type"] == "Warning"}
    assert {"ModelFailed", "RolloutFailed", "RolledBack"} <= warnings


async def test_pause_stops_after_the_current_wave_and_resume_finishes(cluster, smoke_server):
    emu, api, stand_in = cluster
    stand_in.held.add(("prod", "a"))  # keep wave 1 open until the pause is in place
    async with operator(str(api.session._base_url)):
        await api.send("POST", ROLLOUTS, nanogpt_rollout())

        async def wave_one_open() -> bool:
            r = await api.rollout()
            return (r.get("status") or {}).get("currentWave") == 1 and \
                (await api.model("prod", "a"))["spec"]["checkpoint"]["path"] == NEW
        await eventually(wave_one_open, "wave 1 to update prod/a")
        await api.patch_rollout("r1", {"spec": {"paused": True}})
        stand_in.held.clear()
        paused = await eventually(_phase(api, "Paused"), "the rollout to pause")
        assert paused["status"]["currentWave"] == 1
        assert _entries(paused)[("prod", "a")]["state"] == "Healthy"
        assert (await _paths(api))[("prod", "b")] == OLD  # wave 2 not started
        await api.patch_rollout("r1", {"spec": {"paused": False}})
        done = await eventually(_phase(api, "Succeeded"), "the resumed rollout to succeed")
    assert done["status"]["counts"]["healthy"] == 5
    reasons = [e["reason"] for e in _events(emu)]
    assert "Paused" in reasons and "Resumed" in reasons


async def test_operator_restart_mid_rollout_continues_from_status(cluster, smoke_server):
    emu, api, stand_in = cluster
    stand_in.held.update({("prod", "b"), ("prod", "c")})  # wave 2 cannot finish before the restart
    url = str(api.session._base_url)
    async with operator(url):
        await api.send("POST", ROLLOUTS, nanogpt_rollout())

        async def wave_two_applied() -> bool:
            paths = await _paths(api)
            return paths[("prod", "b")] == NEW and paths[("prod", "c")] == NEW
        await eventually(wave_two_applied, "wave 2 to update its models")
    before = await api.rollout()
    assert before["status"]["currentWave"] == 2 and before["status"]["phase"] == "Progressing"
    stand_in.held.clear()
    async with operator(url):
        done = await eventually(_phase(api, "Succeeded"), "the restarted operator to finish")
    assert all(e["from"] == OLD and e["state"] == "Healthy" for e in done["status"]["models"])
    # Never a wave twice: currentWave only ever grew across every stored version of the rollout.
    waves = [(v.get("status") or {}).get("currentWave", 0)
             for v in emu.objects["nanogpt.dev/v1alpha1/nanogptrollouts", None, "r1"].history]
    assert waves == sorted(waves)
    assert [e["reason"] for e in _events(emu)].count("WaveStarted") == 3
    # Each model moved OLD -> NEW once and never back.
    for ns, name in FLEET:
        history = emu.objects["nanogpt.dev/v1alpha1/nanogptmodels", ns, name].history
        paths = [v["spec"]["checkpoint"]["path"] for v in history]
        assert paths == sorted(paths) and paths[-1] == NEW


async def test_a_second_rollout_waits_for_the_first_with_a_condition(cluster, smoke_server):
    emu, api, stand_in = cluster
    stand_in.held.add(("prod", "a"))
    async with operator(str(api.session._base_url)):
        await api.send("POST", ROLLOUTS, nanogpt_rollout("r1", waves=["100%"]))
        await eventually(lambda: _locked(api, ("prod", "a"), "r1"), "r1 to lock prod/a")
        second = nanogpt_rollout("r2", waves=["100%"])
        second["spec"]["checkpoint"]["path"] = "log/model_60000.pt"
        await api.send("POST", ROLLOUTS, second)

        async def blocked() -> Any:
            r = await api.rollout("r2")
            conds = {c["type"]: c for c in (r.get("status") or {}).get("conditions") or []}
            return conds.get("Blocked", {}).get("status") == "True" and conds["Blocked"]
        condition = await eventually(blocked, "r2 to report Blocked")
        assert "prod/a is being changed by rollout r1" in condition["message"]
        assert (await api.rollout("r2"))["status"]["phase"] == "Pending"
        stand_in.held.clear()
        await eventually(_phase(api, "Succeeded", name="r1"), "r1 to finish")
        await eventually(_phase(api, "Succeeded", name="r2"), "r2 to go on and finish")
    assert all(path == "log/model_60000.pt" for k, path in (await _paths(api)).items() if k in FLEET)


async def _locked(api: Api, key: tuple[str, str], owner: str) -> bool:
    return ((await api.model(*key))["metadata"].get("annotations") or {}).get(LOCK_ANNOTATION) == owner


async def test_the_smoke_gate_sends_the_model_s_own_api_key(cluster, smoke_server):
    emu, api, _ = cluster
    smoke_server["keys"][("prod", "a")] = "k-123"  # its server takes only this key
    data = base64.b64encode(b"# rotated monthly\nk-123\nk-old\n").decode()
    await api.send("POST", "/api/v1/namespaces/prod/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a-keys", "namespace": "prod"},
        "data": {"keys": data}})
    await api.patch_model("prod", "a", {"spec": {"server": {"apiKeySecretRef": {"name": "a-keys"}}}})
    async with operator(str(api.session._base_url)):
        await api.send("POST", ROLLOUTS, nanogpt_rollout(waves=[1, "100%"]))
        await eventually(_phase(api, "Succeeded"), "the rollout to succeed")
    assert ("prod", "a", "Bearer k-123") in smoke_server["auth"]
    # Models without apiKeySecretRef get no key: it is only ever sent to the server it belongs to.
    assert all(auth is None for ns, name, auth in smoke_server["auth"] if (ns, name) != ("prod", "a"))


async def test_a_missing_key_secret_fails_the_gate_naming_it(cluster, smoke_server):
    emu, api, _ = cluster
    smoke_server["keys"][("prod", "a")] = "k-123"
    await api.patch_model("prod", "a", {"spec": {"server": {"apiKeySecretRef": {"name": "a-keys"}}}})
    async with operator(str(api.session._base_url)):
        await api.send("POST", ROLLOUTS, nanogpt_rollout(progressDeadlineSeconds=4))
        done = await eventually(_phase(api, "RolledBack"), "the rollout to roll back")
    message = _entries(done)[("prod", "a")]["message"]
    assert "no API key in Secret prod/a-keys (key 'keys') named by spec.server.apiKeySecretRef" in message
    assert not [h for h in smoke_server["hits"] if h[:2] == ("prod", "a")]  # never sent without its key
