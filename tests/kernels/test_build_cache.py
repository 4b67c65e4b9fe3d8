"""The CPU kernels' build in the shared extensions cache is named by the sources' digest, so two
checkouts with different sources never rebuild over each other (nothing is compiled here)."""

from __future__ import annotations

import shutil

from torch.utils import cpp_extension

from model.kernels import cpu


def _names_built(monkeypatch, build_directory=None) -> list[str]:
    names: list[str] = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, **_: names.append(name))
    cpu._compile(build_directory)
    return names


def test_the_shared_cache_build_is_named_by_the_sources_digest(monkeypatch):
    assert _names_built(monkeypatch) == [f"nanogpt_cpu_{cpu.sources_digest()[:12]}"]


def test_an_image_build_keeps_the_library_name(monkeypatch, tmp_path):
    assert _names_built(monkeypatch, tmp_path) == ["nanogpt_cpu"]  # build() copies LIBRARY from there


def test_other_sources_have_another_digest(monkeypatch, tmp_path):
    before = cpu.sources_digest()
    copies = []
    for src in cpu.SOURCES:
        copies.append(tmp_path / src.name)
        shutil.copy(src, copies[-1])
    monkeypatch.setattr(cpu, "SOURCES", copies)
    assert cpu.sources_digest() == before  # same bytes, same digest, wherever the checkout is
    copies[0].write_text(copies[0].read_text() + "\n// another checkout's edit\n")
    assert cpu.sources_digest() != before


def test_a_lock_left_by_a_killed_build_is_removed_before_building(monkeypatch, tmp_path, caplog):
    # torch's FileBaton: a builder killed mid-build leaves `lock`, and every later load waits on it forever.
    build = tmp_path / "nanogpt_cpu"
    build.mkdir()
    (build / "lock").touch()
    seen: list[bool] = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, **_: seen.append((build / "lock").exists()))
    with caplog.at_level("WARNING", logger=cpu.__name__):
        cpu._compile(build)
    assert seen == [False]  # gone before torch's builder looked for it
    assert "interrupted" in caplog.text


def test_a_live_builder_keeps_its_lock(tmp_path):
    import subprocess
    import sys

    build = tmp_path / "nanogpt_cpu"
    build.mkdir()
    (build / "lock").touch()
    # Another process inside build_lock (a live build): ours cannot take it, and its lock file stays.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from model.kernels import cpu\n"
         "with cpu.build_lock(Path(sys.argv[1]), blocking=False):\n"
         "    print('held', flush=True); sys.stdin.read()", str(build)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (build / "lock").touch()  # the holder removed the stale one; this is its own, live
        try:
            with cpu.build_lock(build, blocking=False):
                raise AssertionError("took the lock of a live builder")
        except BlockingIOError:
            pass
        assert (build / "lock").exists()
    finally:
        holder.communicate("", timeout=60)
    with cpu.build_lock(build, blocking=False):  # released when its holder exits
        assert not (build / "lock").exists()
