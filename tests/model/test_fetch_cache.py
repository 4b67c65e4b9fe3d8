"""model.fetch.cache and model.fetch.place: what lands where, and that a destination appears whole or not at all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.fetch import FetchSettings, fetch
from model.fetch.cache import Cache
from model.fetch.place import place_dir


@pytest.fixture
def settings(tmp_path) -> FetchSettings:
    return FetchSettings(cache_dir=tmp_path / "cache", retries=0, progress_interval_s=0.0)


def test_a_local_directory_is_fetched_as_a_manifest_and_placed_whole(settings, tmp_path):
    src = tmp_path / "gpt2"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "model.safetensors").write_bytes(b"w" * 1000)
    result = fetch(src, tmp_path / "dest", settings=settings)
    assert result.is_dir and {f.name for f in result.files} == {"config.json", "sub/model.safetensors"}
    assert (tmp_path / "dest" / "sub" / "model.safetensors").read_bytes() == b"w" * 1000
    assert Cache(settings.cache_dir).manifest(result.sha256) is not None
    assert not (tmp_path / "dest.partial").exists() and not (tmp_path / "dest.old").exists()
    again = fetch(src, tmp_path / "dest", sha256=result.sha256, settings=settings)  # --sha256 checks a directory too
    assert again.sha256 == result.sha256
    with pytest.raises(Exception, match="manifest digest"):
        fetch(src, tmp_path / "dest2", sha256="0" * 64, settings=settings)
    assert not (tmp_path / "dest2").exists()


def test_a_directory_replaces_a_stale_one_and_leaves_no_extra_files(settings, tmp_path):
    dest = tmp_path / "dest"
    (dest / "old").mkdir(parents=True)
    (dest / "old" / "stale.bin").write_bytes(b"x")
    blob = tmp_path / "blob"
    blob.write_bytes(b"new")
    place_dir([("config.json", blob)], dest, "test://")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["config.json"]


def test_blobs_are_read_only_so_a_hard_link_cannot_change_them(settings, tmp_path):
    src = tmp_path / "ckpt.pt"
    src.write_bytes(b"weights")
    result = fetch(src, tmp_path / "dest.pt", settings=settings)
    blob = result.files[0].blob
    assert blob.stat().st_mode & 0o222 == 0 and os.path.samefile(blob, tmp_path / "dest.pt")


def test_an_existing_folder_as_dest_receives_the_file_under_its_name(settings, tmp_path):
    src = tmp_path / "ckpt.pt"
    src.write_bytes(b"weights")
    (tmp_path / "models").mkdir()
    result = fetch(src, tmp_path / "models", settings=settings)
    assert result.path == tmp_path / "models" / "ckpt.pt" and result.path.read_bytes() == b"weights"


def test_the_lock_makes_a_second_process_wait(tmp_path):
    """Two pods sharing a cache volume: the second fetch of a key waits for the first to finish."""
    cache = Cache(tmp_path)
    code = ("import sys, time; from pathlib import Path; from model.fetch.cache import Cache;"
            "c = Cache(Path(sys.argv[1]));\n"
            "with c.lock('k', 'x', poll_s=0.01):\n"
            "    print('held', flush=True); sys.stdin.readline()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(
                                  Path(__file__).resolve().parents[2])})
    try:
        assert holder.stdout.readline().strip() == "held"
        import fcntl

        with open(tmp_path / "locks" / "k.lock", "a+") as fh:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(60) == 0
        with cache.lock("k", "x", poll_s=0.01):  # released by the holder's exit: no wait now
            pass
    finally:
        holder.kill()


def test_records_never_use_a_temporary_name_another_pod_may_hold(tmp_path):
    # Pods sharing a cache PVC have separate pid namespaces: the same pid in two pods is common, so a
    # temporary name made of the pid would be written and renamed away under the other pod's feet.
    cache = Cache(tmp_path / "cache")
    cache.record("s3://b/k", "etag-1", 3, "a" * 64)
    ref = next((tmp_path / "cache" / "refs").glob("*.json"))
    other = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    other.write_text("another pod's record, half written")
    cache.record("s3://b/k", "etag-1", 3, "b" * 64)
    assert other.read_text() == "another pod's record, half written"
    assert cache.lookup("s3://b/k", "etag-1", 3) is None  # the new digest's blob is not there ...
    assert '"sha256": "' + "b" * 64 in ref.read_text()  # ... but the record was replaced whole
    assert [p.name for p in ref.parent.iterdir() if p.suffix == ".tmp"] == [other.name]
