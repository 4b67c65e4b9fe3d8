"""The CPU kernels' own worker threads (model/kernels/csrc/pool.cpp): every index once, at::parallel_for's
split, several calling threads at once, and a failing chunk that raises without wedging the pool."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from model.kernels import cpu

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    try:
        cpu.load()
    except cpu.KernelUnavailable as err:
        pytest.skip(str(err))


def expected_starts(n: int, grain: int) -> torch.Tensor:
    """at::parallel_for's chunks: as many threads as have `grain` each, equal chunks (ceil)."""
    threads = min(torch.get_num_threads(), -(-n // grain))
    if threads <= 1 or n <= grain:
        return torch.zeros(n, dtype=torch.long)
    chunk = -(-n // threads)
    return torch.arange(n) // chunk * chunk


@pytest.mark.parametrize("n, grain", [(1, 1), (2, 1), (7, 1), (1000, 16), (1000, 999), (1000, 1000), (100_003, 64)])
def test_every_index_runs_once_in_at_parallel_fors_chunks(n, grain):
    out = torch.ops.nanogpt.pool_cover(n, grain, -1)
    assert torch.equal(out[:, 1], torch.ones(n, dtype=torch.long))
    assert torch.equal(out[:, 0], expected_starts(n, grain))


def test_threads_calling_at_once_each_get_every_index_once():
    n, results, errors = 50_000, [], []

    def call():
        try:
            for _ in range(200):
                results.append(torch.ops.nanogpt.pool_cover(n, 16, -1))
        except Exception as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    want = expected_starts(n, 16)
    assert len(results) == 800
    assert all(torch.equal(r[:, 1], torch.ones(n, dtype=torch.long)) and torch.equal(r[:, 0], want) for r in results)


def test_a_failing_chunk_raises_in_the_caller_and_the_pool_goes_on():
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: no chunk runs on a worker")
    n = 1000
    worker_chunk = int(expected_starts(n, 1)[-1])  # the last chunk runs on a worker, not the caller
    for fail_at in (0, worker_chunk):
        with pytest.raises(RuntimeError, match=f"the chunk at {fail_at} fails"):
            torch.ops.nanogpt.pool_cover(n, 1, fail_at)
    assert torch.equal(torch.ops.nanogpt.pool_cover(n, 1, -1)[:, 1], torch.ones(n, dtype=torch.long))


@pytest.mark.parametrize("name, value", [("NANOGPT_CPU_SPIN_US", "-1"), ("NANOGPT_CPU_SPIN_US", "2ms"),
                                         ("NANOGPT_CPU_SPIN_US", "1000001"), ("NANOGPT_CPU_POOL", "2"),
                                         ("NANOGPT_CPU_POOL", "off")])
def test_a_bad_pool_setting_is_refused_naming_it(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} must be an integer from 0 to"):
        cpu.check_pool_env()


def test_pool_settings_in_range_pass(monkeypatch):
    monkeypatch.setenv("NANOGPT_CPU_SPIN_US", "0")
    monkeypatch.setenv("NANOGPT_CPU_POOL", "1")
    cpu.check_pool_env()


SPY = """
import os, sys
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print(os.environ.get("GOMP_SPINCOUNT"))
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Spy())
import {module}
"""


@pytest.mark.parametrize("module", ["model", "server.app", "model.engine.core_process", "bench.run"])
@pytest.mark.parametrize("preset", [None, "5"])
def test_torch_loads_with_the_openmp_spin_set_unless_the_user_set_one(module, preset):
    """libgomp reads GOMP_SPINCOUNT once, when torch loads it: each entry point's first import of
    torch must come after model/__init__.py has set it; a value of the user's stands."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if preset is not None:
        env["GOMP_SPINCOUNT"] = preset
    out = subprocess.run([sys.executable, "-c", SPY.format(module=module)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:1] == [preset or "10000"]
