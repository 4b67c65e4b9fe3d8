"""The built images do what they promise: the server image's own CMD, as its user, serves the embedded demo
model with the prebuilt CPU kernels and no compiler, exits 0 on SIGTERM, and writes nothing outside /tmp;
the operator image's own entrypoint reconciles a NanoGPTModel against kmock's emulator on loopback.
Both run under `buildah run --isolation chroot`, which shares the host's loopback network."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from images_helpers import REPO, Images, buildah

# A cold first build (stand-in bases, dependencies, kernels) takes minutes; later ones hit the layer cache.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
WRITABLE = ("tmp",)  # the only place a container may write (an emptyDir in the cluster)
NOT_FILES = ("proc", "sys", "dev", "run")  # kernel filesystems and the runtime's own mounts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(image: str) -> dict[str, Any]:
    return json.loads(buildah("inspect", "--type", "image", image).stdout)["OCIv1"]["config"]


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path's (mode, size, mtime) outside /tmp and the kernel filesystems."""
    out: dict[str, tuple[int, int, int]] = {}
    for top in root.iterdir():
        if top.name in WRITABLE + NOT_FILES:
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, name))
                out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
        st = os.lstat(top)
        out[top.name] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


class Container:
    """A working container of `image`: its root filesystem, and its own command run by buildah."""

    def __init__(self, image: str):
        self.image, self.config = image, _config(image)
        self.name = buildah("from", "--pull-never", image).stdout.strip()
        self.root = Path(buildah("mount", self.name).stdout.strip())

    def command(self) -> list[str]:
        return (self.config.get("Entrypoint") or []) + (self.config.get("Cmd") or [])

    def start(self, env: dict[str, str], log: Path, volumes: tuple[str, ...] = ()) -> subprocess.Popen:
        # No --user: buildah runs the image's own USER; no command override: its own entrypoint and CMD.
        args = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
        args += [a for k, v in env.items() for a in ("--env", f"{k}={v}")]
        args += [a for v in volumes for a in ("--volume", v)]
        return subprocess.Popen([*args, self.name, "--", *self.command()], stdout=log.open("wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["buildah", "run", "--isolation", "chroot", self.name, "--", *command],
                              capture_output=True, text=True, timeout=60)

    def remove(self) -> None:
        subprocess.run(["buildah", "rm", self.name], capture_output=True, timeout=60)


@pytest.fixture
def server(images: Images) -> Iterator[Container]:
    c = Container(images.server)
    yield c
    c.remove()


def _process_of(launcher: subprocess.Popen, marker: str) -> int:
    """The pid of the container's own process (a descendant of `launcher` whose command line has `marker`)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            sid = os.getsid(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
        if sid == launcher.pid and marker in cmdline and "buildah" not in cmdline:
            return int(entry.name)
    raise AssertionError(f"no process running {marker!r} under buildah run")


def _wait_for(check, what: str, proc: subprocess.Popen, log: Path, deadline_s: float = 300):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {what}:\n{log.read_text()[-4000:]}")
        result = check()
        if result:
            return result
        time.sleep(0.2)  # polling a condition with a deadline
    raise AssertionError(f"no {what} in {deadline_s}s:\n{log.read_text()[-4000:]}")


def _get(url: str, body: dict | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, None
    except (urllib.error.URLError, ConnectionError):
        return 0, None


def test_server_image_has_no_compiler_and_runs_as_its_numeric_user(server: Container) -> None:
    assert server.config["User"] == "10001:10001"
    found = server.run("sh", "-c", "for c in cc gcc g++ c++ clang; do command -v $c; done; id -u")
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == ["10001"], f"a compiler in the image: {found.stdout}"
    labels = json.loads(buildah("inspect", "--type", "image", server.image).stdout)["OCIv1"]["config"]["Labels"]
    assert labels["org.opencontainers.image.revision"] == "test"
    assert {"org.opencontainers.image.source", "org.opencontainers.image.version"} <= labels.keys()


def test_server_image_serves_the_demo_model_and_writes_only_tmp(server: Container, tmp_path: Path) -> None:
    before = _snapshot(server.root)
    assert len(before) > 1000 and "app/model/demo/model.safetensors" in before  # the whole tree, demo model too
    port, log = _free_port(), tmp_path / "server.log"
    # PORT and HOST only; no MODEL_CHECKPOINT: the image's default is the embedded demo model.
    proc = server.start({"PORT": str(port), "HOST": "127.0.0.1"}, log)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _get(f"{base}/readyz")[0] == 200, "/readyz 200", proc, log)
        status, body = _get(f"{base}/generate", {"prompt": "The", "max_length": 8, "temperature": 0})
        assert status == 200 and isinstance(body, dict) and body, body
        text = log.read_text()
        assert "CPU kernels: prebuilt, loaded from /opt/nanogpt/kernels" in text, text[-4000:]
        assert "unavailable" not in text and "Warning" not in text and "Traceback" not in text, text[-4000:]
        os.kill(_process_of(proc, "-m server"), signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    _assert_unchanged(before, _snapshot(server.root))


def _assert_unchanged(before: dict, after: dict) -> None:
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert changed == [], f"written outside /tmp: {changed[:20]}"


def _emulator_module():
    """tests/operator/conftest.py's Emulator (the API-server habits kopf relies on) and its resources."""
    sys.path.insert(0, str(REPO / "tests" / "operator"))
    spec = importlib.util.spec_from_file_location("operator_conftest", REPO / "tests" / "operator" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_operator_image_reconciles_a_model_against_the_emulator(images: Images, tmp_path: Path) -> None:
    import aiohttp
    import kmock

    emulator = _emulator_module()
    from operator_helpers import BASE_MODEL, RESOURCES, Api, eventually, model_path

    emu = emulator.Emulator()
    for key, info in RESOURCES.items():
        emu.resources[key] = kmock.ResourceInfo(**info)
    operator = Container(images.operator)
    assert operator.config["User"] == "10001:10001" and operator.command()[:2] == ["kopf", "run"]
    before = _snapshot(operator.root)
    try:
        async with emu, kmock.Server(emu) as server:
            url = str(server.url).rstrip("/")
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "emu",
                "clusters": [{"name": "emu", "cluster": {"server": url}}],
                "users": [{"name": "emu", "user": {"token": "test"}}],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}]}))
            kubeconfig.chmod(0o644)
            log = tmp_path / "operator.log"
            # Mounted under /tmp, the container's only writable place (an emptyDir in the cluster).
            proc = operator.start({"KUBECONFIG": "/tmp/kubeconfig", "NANOGPT_OPERATOR_STANDALONE": "true"}, log,
                                  volumes=(f"{kubeconfig}:/tmp/kubeconfig:ro",))
            try:
                async with aiohttp.ClientSession() as session:
                    api = Api(session, url)
                    await api.must("POST", model_path(), BASE_MODEL)
                    async def deployment_or_exit() -> Any:
                        if proc.poll() is not None:  # an operator that died will not make one: fail now
                            raise AssertionError(f"the operator exited {proc.returncode}")
                        return await api.get("/apis/apps/v1/namespaces/ml/deployments/llm")

                    try:
                        deployment = await eventually(deployment_or_exit, timeout=120, what="the Deployment")
                    except AssertionError as err:
                        raise AssertionError(f"{err}; operator log:\n{log.read_text()[-6000:]}") from None
                assert deployment["metadata"]["ownerReferences"][0]["name"] == "llm"
                assert proc.poll() is None, log.read_text()[-4000:]
                os.kill(_process_of(proc, "kopf run"), signal.SIGTERM)
                assert await asyncio.to_thread(proc.wait, 60) == 0, log.read_text()[-4000:]
                _assert_unchanged(before, _snapshot(operator.root))
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
    finally:
        operator.remove()


def test_server_image_runs_the_operators_fetch_init_container(server: Container, tmp_path: Path) -> None:
    """The init container a NanoGPTModel with spec.checkpoint.uri gets (the operator's own command and env),
    run in the server image as its user: it fetches over loopback HTTP, verifies the digest and reports
    its JSON status."""
    import hashlib
    import http.server
    import threading

    from nanogpt_operator.model.build import Owner, desired_deployment
    from nanogpt_operator.model.spec import parse_model

    served = tmp_path / "served"
    served.mkdir()
    data = (REPO / "model" / "demo" / "model.safetensors").read_bytes()
    (served / "ckpt.safetensors").write_bytes(data)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(served))  # noqa: E731
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        uri = f"http://127.0.0.1:{httpd.server_address[1]}/ckpt.safetensors"
        body = {"apiVersion": "nanogpt.dev/v1alpha1", "kind": "NanoGPTModel",
                "metadata": {"name": "llm", "namespace": "ml", "uid": "u", "generation": 1},
                "spec": {"checkpoint": {"uri": uri, "allowHttp": True, "sha256": hashlib.sha256(data).hexdigest()},
                         "gpus": 0}}
        pod = desired_deployment(parse_model(body), Owner(name="llm", uid="u"))["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        models = tmp_path / "models"
        models.mkdir()
        models.chmod(0o777)  # an emptyDir the pod's user can write
        env = [a for e in init["env"] if "value" in e for a in ("--env", f"{e['name']}={e['value']}")]
        done = subprocess.run(["buildah", "run", "--isolation", "chroot", "--network", "host", *env,
                               "--volume", f"{models}:/models",
                               server.name, "--", *init["command"]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    fetched = models / "checkpoint" / "ckpt.safetensors"
    assert fetched.read_bytes() == data
    # The same JSON goes to stdout and to --status-file (the kubelet's mount of /dev/termination-log, which
    # buildah's own /dev hides here).
    status = json.loads(done.stdout.strip().splitlines()[-1])
    assert status["phase"] == "Fetched" and status["sha256"] == hashlib.sha256(data).hexdigest(), status
    server_env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert server_env["MODEL_CHECKPOINT"] == "/models/checkpoint/ckpt.safetensors"
