"""Builds the repository's Dockerfiles with buildah against local stand-in bases (.ci/images/standin.sh).

Skipped only where buildah is missing, and never in CI (CI=true turns the skip into a failure): .ci/run
installs buildah and debootstrap. The build context is the tracked files (as a clean clone has them) plus
GPT-2's BPE cache in docker/tiktoken-cache/, so the server image is built as an air-gapped builder would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIKTOKEN_CACHE = Path(os.environ["TIKTOKEN_CACHE_DIR"])  # set by tests/conftest.py
BUILD_TIMEOUT = 1800  # a cold build compiles the kernels and installs the dependencies from the registry


@dataclass(frozen=True)
class Images:
    operator: str
    server: str
    context: Path


def buildah(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout, check=True, **kwargs)


def _require_buildah() -> None:
    if shutil.which("buildah") and shutil.which("debootstrap"):
        return
    if os.environ.get("CI") == "true":
        pytest.fail("buildah and debootstrap are required in CI (.ci/run installs them)")
    pytest.skip("buildah/debootstrap not installed (apt-get install buildah debootstrap)")


def _context(dest: Path) -> Path:
    """The tracked files at their working-tree contents, plus the BPE cache the Dockerfile copies."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    cache = dest / "docker" / "tiktoken-cache"
    cache.mkdir(parents=True, exist_ok=True)
    for f in TIKTOKEN_CACHE.iterdir():
        shutil.copyfile(f, cache / f.name)
    return dest


def _build(context: Path, dockerfile: str, tag: str, *build_args: str) -> str:
    args = [a for kv in build_args for a in ("--build-arg", kv)]
    try:
        buildah("bud", "--isolation", "chroot", "--layers", *args, "-f", dockerfile, "-t", tag, str(context),
                timeout=BUILD_TIMEOUT)
    except subprocess.CalledProcessError as err:
        pytest.fail(f"{dockerfile} did not build:\n{err.stdout[-4000:]}\n{err.stderr[-4000:]}")
    return tag


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    """Both images, built from the Dockerfiles with only the base images substituted."""
    _require_buildah()
    standin = subprocess.run(["bash", str(REPO / ".ci/images/standin.sh"), "torch"], capture_output=True,
                             text=True, timeout=BUILD_TIMEOUT)
    assert standin.returncode == 0, standin.stderr[-4000:]
    torch_base = standin.stdout.strip().splitlines()[-1]
    python_base = torch_base.replace("standin-torch", "standin-python")
    context = _context(tmp_path_factory.mktemp("context"))
    operator = _build(context, "Dockerfile.operator", "localhost/nanogpt-operator:test", f"PYTHON_BASE={python_base}")
    # The CPU flavour: its python:3.11-slim stand-in already holds the torch wheel the CPU index would give.
    server = _build(context, "Dockerfile.server", "localhost/nanogpt-server:cpu-test", "FLAVOR=cpu",
                    f"PYTHON_BASE={torch_base}", f"CUDA_BASE={torch_base}", "REVISION=test")
    yield Images(operator, server, context)
