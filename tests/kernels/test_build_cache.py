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
