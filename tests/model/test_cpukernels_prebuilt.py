"""NANOGPT_CPU_KERNELS_DIR: a prebuilt kernel library (an image's) is loaded as it is or refused by name,
never compiled over. The loading itself is checked on a built image in tests/images/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def _load_in_fresh_process(prebuilt: Path) -> subprocess.CompletedProcess:
    # A fresh process: load() remembers its first outcome, and this one must not have compiled anything.
    env = {**os.environ, "NANOGPT_CPU_KERNELS_DIR": str(prebuilt), "TORCH_EXTENSIONS_DIR": str(prebuilt / "ext")}
    code = "from model.kernels import cpu; cpu.load()"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_prebuilt_directory_without_a_build_is_refused_by_name_not_compiled(tmp_path: Path) -> None:
    result = _load_in_fresh_process(tmp_path)
    assert result.returncode != 0
    assert f"NANOGPT_CPU_KERNELS_DIR='{tmp_path}': no build stamp" in result.stderr
    assert "python -m model build-kernels DIR" in result.stderr
    assert not (tmp_path / "ext").exists()  # nothing compiled instead


def test_prebuilt_library_for_another_torch_is_refused_before_loading(tmp_path: Path) -> None:
    (tmp_path / "STAMP").write_text("torch 0.0.1\n")
    (tmp_path / "nanogpt_cpu.so").write_bytes(b"not a library")  # never opened: the stamp is checked first
    result = _load_in_fresh_process(tmp_path)
    assert result.returncode != 0
    assert f"was built for torch 0.0.1, this is torch {torch.__version__}; rebuild it" in result.stderr
    assert not (tmp_path / "ext").exists()


def test_build_kernels_command_says_what_is_missing(tmp_path: Path) -> None:
    # No compiler on PATH: the command fails naming it, writing no library.
    env = {**os.environ, "CXX": "no-such-compiler-here"}
    result = subprocess.run([sys.executable, "-m", "model", "build-kernels", str(tmp_path / "k")], env=env,
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1
    assert "CPU kernels cannot be built: needs a C++ compiler (no-such-compiler-here not found" in result.stderr
    assert not (tmp_path / "k").exists()
