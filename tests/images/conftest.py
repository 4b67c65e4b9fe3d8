"""The images fixture: both Dockerfiles built once per session (see images_helpers.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from images_helpers import BUILD_TIMEOUT, REPO, Images, build, build_context, report_sizes, require_buildah


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Images]:
    """Both images, built from the Dockerfiles with only the base images substituted."""
    require_buildah()
    standin = subprocess.run(["bash", str(REPO / ".ci/images/standin.sh"), "torch"], capture_output=True,
                             text=True, timeout=BUILD_TIMEOUT)
    assert standin.returncode == 0, standin.stderr[-4000:]
    torch_base = standin.stdout.strip().splitlines()[-1]
    python_base = torch_base.replace("standin-torch", "standin-python")
    context = build_context(tmp_path_factory.mktemp("context"))
    operator = build(context, "Dockerfile.operator", "localhost/nanogpt-operator:test", f"PYTHON_BASE={python_base}")
    # The CPU flavour: its python:3.11-slim stand-in already holds the torch wheel the CPU index would give.
    server = build(context, "Dockerfile.server", "localhost/nanogpt-server:cpu-test", "FLAVOR=cpu",
                   f"PYTHON_BASE={torch_base}", f"CUDA_BASE={torch_base}", "REVISION=test")
    report_sizes(pytestconfig, operator, server)
    yield Images(operator, server, context)
