"""The shell scripts: `bash -n` and shellcheck clean, and e2e/kind.sh's logic in a dry run whose docker,
kind, k3d and kubectl are stubs that log their arguments and play a cluster's answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["e2e/kind.sh", ".ci/run", ".ci/images/standin.sh"]

# kubectl as far as kind.sh (and the upload-checkpoint.sh it runs) asks it: phase Ready until the checkpoint
# is patched, then Degraded, and the served checkpoint stays the first one (the operator rolled back).
KUBECTL = """#!/usr/bin/env bash
echo "kubectl $*" >> "$STUB_LOG"
case "$*" in *"-f -"*) cat >/dev/null ;; esac  # read the manifest, as kubectl does (a pipe must not break)
case "$*" in
  *patch*) touch "$STUB_LOG.patched" ;;
  *"{.status.phase}"*) if [ -e "$STUB_LOG.patched" ]; then echo Degraded; else echo Ready; fi ;;
  *"{.status.servedCheckpoint}"*) echo demo ;;
  *"{.status.fetch.phase}"*) echo Fetched ;;
  # upload-checkpoint.sh compares sha256 sums on both sides: the pod's copy is the demo itself.
  *exec*sha256sum*) (cd "$STUB_DEMO" && find . -type f -exec sha256sum {} + | sort -k2) ;;
  *"--dry-run=client"*) echo "apiVersion: v1" ;;
esac
"""
LOGGER = '#!/usr/bin/env bash\necho "$(basename "$0") $*" >> "$STUB_LOG"\n'


def tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert path, f"{name} not found: install the dev extra (pip install -e '.[dev]')"
    return path


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_is_shellcheck_clean(script: str) -> None:
    subprocess.run(["bash", "-n", str(REPO / script)], check=True, timeout=30)
    result = subprocess.run([tool("shellcheck"), "--severity=style", str(REPO / script)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def _dry_run(tmp_path: Path, cluster_tool: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("docker", "kind", "k3d"):
        (bin_dir / name).write_text(LOGGER)
    (bin_dir / "kubectl").write_text(KUBECTL)
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(log), "CLUSTER_TOOL": cluster_tool,
           "STUB_DEMO": str(REPO / "model" / "demo")}
    result = subprocess.run(["bash", str(REPO / "e2e/kind.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "e2e passed" in result.stdout
    return log.read_text().splitlines()


def _index(calls: list[str], *words: str) -> int:
    return next(i for i, c in enumerate(calls) if all(w in c for w in words))


@pytest.mark.parametrize("cluster_tool", ["kind", "k3d"])
def test_kind_sh_dry_run_builds_loads_installs_serves_and_cleans_up(tmp_path: Path, cluster_tool: str) -> None:
    calls = _dry_run(tmp_path, cluster_tool)
    create = _index(calls, cluster_tool, "cluster", "create")
    operator = _index(calls, "docker build", "Dockerfile.operator", "nanogpt-operator:e2e")
    server = _index(calls, "docker build", "Dockerfile.server", "FLAVOR=cpu", "nanogpt-server:e2e")
    load = (_index(calls, "kind load docker-image", "nanogpt-operator:e2e", "nanogpt-server:e2e")
            if cluster_tool == "kind" else _index(calls, "k3d image import", "nanogpt-operator:e2e", "nanogpt-server:e2e"))
    install = _index(calls, "kubectl apply -k", "manifests")
    upload = _index(calls, "kubectl -n nanogpt-e2e cp", "model/demo/.", "/models/demo")
    model = _index(calls, "get ngm demo ", "{.status.phase}")  # waiting on the claim model
    uri_model = _index(calls, "kubectl -n nanogpt-e2e get ngm demo-http", "{.status.fetch.phase}")
    rollback = _index(calls, "kubectl", "patch ngm demo")
    delete = _index(calls, cluster_tool, "delete")
    assert create < operator < server < load < install < upload < model < uri_model < rollback
    assert rollback < delete == len(calls) - 1
