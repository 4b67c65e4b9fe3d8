"""model/safe_load.py against archives that lie: zip bombs and records past the end of the file.
Each is refused from the declared sizes, before anything is inflated."""

from __future__ import annotations

import struct
import tracemalloc
import zipfile

import pytest
import torch

from model import CheckpointError, load_model_from_checkpoint


def write_bomb(path, inflated: int, chunk: bytes = b"N" * (1 << 20)) -> None:
    """A torch-shaped zip whose data.pkl deflates `inflated` bytes of pickle NONE opcodes to almost nothing."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("bomb/data.pkl", "w", force_zip64=True) as f:
            for _ in range(inflated // len(chunk)):
                f.write(chunk)
        zf.writestr("bomb/version", "3\n")


def test_zip_bomb_is_refused_before_it_inflates(tmp_path):
    path = tmp_path / "bomb.pt"
    write_bomb(path, 512 << 20)
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="MAX_PICKLE_BYTES") as err:
            load_model_from_checkpoint(path, device="cpu", max_pickle_bytes=64 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(512 << 20) in str(err.value) and str(64 << 20) in str(err.value)
    assert peak < 16 << 20  # nothing near the inflated size was ever allocated


def test_default_limit_refuses_a_gigabyte_pickle(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("bomb/data.pkl")
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, b"N" * (4 << 20))
    _patch_central_sizes(path, "bomb/data.pkl", uncompressed=1_500_000_000)
    with pytest.raises(CheckpointError, match="over the limit of 268435456 bytes"):
        load_model_from_checkpoint(path, device="cpu")


def _patch_central_sizes(path, name: str, compressed: int | None = None, uncompressed: int | None = None) -> None:
    """Rewrite the sizes a record's central-directory entry declares (what zipfile trusts)."""
    data = bytearray(path.read_bytes())
    start = struct.unpack_from("<I", data, data.rfind(b"PK\x05\x06") + 16)[0]  # the central directory's offset
    at = data.find(b"PK\x01\x02", start)
    while at != -1:
        n = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46: at + 46 + n].decode() == name:
            if compressed is not None:
                struct.pack_into("<I", data, at + 20, compressed)
            if uncompressed is not None:
                struct.pack_into("<I", data, at + 24, uncompressed)
            path.write_bytes(bytes(data))
            return
        at = data.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"no central directory entry for {name}")


def test_a_record_past_the_end_of_the_file_is_named(tmp_path):
    path = tmp_path / "lie.pt"
    torch.save({"model": {}, "model_args": {}}, path)
    name = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("data.pkl"))
    _patch_central_sizes(path, name, compressed=10**8, uncompressed=10**8)
    with pytest.raises(CheckpointError) as err:
        load_model_from_checkpoint(path, device="cpu")
    message = str(err.value)
    assert "past the end" in message and name in message and "100000000" in message
    assert "EOFError: \n" not in message + "\n"
