"""Helpers for tests/images: builds the repository's Dockerfiles with buildah against local stand-in bases (.ci/images/standin.sh).

Skipped only where buildah is missing, and never in CI (CI=true turns the skip into a failure): .ci/run
installs buildah and debootstrap. The build context is the tracked files (as a clean clone has them) plus
GPT-2's BPE cache in docker/tiktoken-cache/, so the server image is built as an air-gapped builder would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
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


def require_buildah() -> None:
    if shutil.which("buildah") and shutil.which("debootstrap"):
        return
    if os.environ.get("CI") == "true":
        pytest.fail("buildah and debootstrap are required in CI (.ci/run installs them)")
    pytest.skip("buildah/debootstrap not installed (apt-get install buildah debootstrap)")


def build_context(dest: Path) -> Path:
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


def build(context: Path, dockerfile: str, tag: str, *build_args: str) -> str:
    args = [a for kv in build_args for a in ("--build-arg", kv)]
    try:
        buildah("bud", "--isolation", "chroot", "--layers", *args, "-f", dockerfile, "-t", tag, str(context),
                timeout=BUILD_TIMEOUT)
    except subprocess.CalledProcessError as err:
        pytest.fail(f"{dockerfile} did not build:\n{err.stdout[-4000:]}\n{err.stderr[-4000:]}")
    return tag


def report_sizes(config: pytest.Config, *images: str) -> None:
    """Each image's size, on the terminal even under -q (the README quotes them)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    sizes = [f"image size: {image} {buildah('images', '--format', '{{.Size}}', image).stdout.strip()}"
             for image in images]
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            for line in sizes:
                reporter.write_line(line)
