"""torch.load that never runs code from the file.

A `.pt` file is a pickle, and unpickling can call any function the file names
(os.system, eval, ...). We load with `weights_only=True`, whose unpickler builds only
tensors and plain containers, and allow exactly one foreign class: a training script's
`GPTConfig` dataclass (build-nanogpt pickles it as `__main__.GPTConfig`, which no
other process can import). It becomes a `ForeignConfig`, a plain attribute bag whose
construction runs nothing. Any other global in the file is refused before torch.load
is even called.

torch < 2.4 has no allow-list API; there we give torch.load a pickle module whose
find_class hands out only torch's own weights-only allow-list plus ForeignConfig.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import torch

FOREIGN_CLASS_NAME = "GPTConfig"  # the only foreign class we let a checkpoint construct


class ForeignConfig:
    """Stands in for a pickled config class: it only collects the attributes the file sets."""

    def __init__(self, *args, **kwargs):  # REDUCE could call it; accept anything and run nothing
        pass

    def __repr__(self) -> str:
        return f"ForeignConfig({vars(self)})"


class UnsafeCheckpoint(Exception):
    """The pickle names something outside the allow-list; str() says what."""


def _torch_allowed_globals() -> dict:
    # Private but present since torch 1.13: the globals weights_only=True accepts by default.
    from torch import _weights_only_unpickler as wou

    return wou._get_allowed_globals()


def _pickle_globals(data: bytes) -> set[str]:
    """Every GLOBAL the pickle names. torch.save writes protocol 2, which names globals only
    with GLOBAL; STACK_GLOBAL (protocol 4) is refused by torch's weights-only unpickler anyway."""
    names = set()
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name == "GLOBAL":
            module, name = arg.split(" ", 1)
            names.add(f"{module}.{name}")
    return names


MAX_PICKLE_BYTES = 256 << 20  # GPT-2's data.pkl is tens of KiB; the tensors live in records beside it


class BadArchive(Exception):
    """A zip whose records declare sizes the file cannot hold, or that inflate past the limit."""


def check_archive(zf: zipfile.ZipFile, file_size: int, max_pickle_bytes: int) -> None:
    """Declared sizes against the file and the limit, before anything is inflated: a 1.5 MB
    zip whose data.pkl inflates to 1.5 GB is refused here, in microseconds."""
    inflated = 0
    for info in zf.infolist():
        if info.header_offset + info.compress_size > file_size:
            raise BadArchive(f"truncated or corrupt: record {info.filename} declares {info.compress_size} bytes "
                             f"at offset {info.header_offset}, past the end of the {file_size}-byte file")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                raise BadArchive(f"truncated or corrupt: stored record {info.filename} declares {info.file_size} "
                                 f"bytes but holds {info.compress_size}")
            continue
        inflated += info.file_size  # torch.save stores records; only a hand-made zip compresses them
        if inflated > max_pickle_bytes:
            raise BadArchive(f"refused: compressed records inflate to {inflated} bytes or more (from "
                             f"{info.compress_size} for {info.filename}), over the limit of {max_pickle_bytes} "
                             "bytes (MAX_PICKLE_BYTES)")


def _zip_pickle(path: Path, max_pickle_bytes: int = MAX_PICKLE_BYTES) -> bytes | None:
    """The data.pkl record of a torch.save zip (stored as <archive name>/data.pkl), read only
    after check_archive and never past the limit."""
    with zipfile.ZipFile(path) as zf:
        check_archive(zf, path.stat().st_size, max_pickle_bytes)
        for info in zf.infolist():
            if info.filename.endswith("/data.pkl") or info.filename == "data.pkl":
                if info.file_size > max_pickle_bytes:
                    raise BadArchive(f"refused: {info.filename} is {info.file_size} bytes, over the limit of "
                                     f"{max_pickle_bytes} bytes (MAX_PICKLE_BYTES)")
                with zf.open(info) as f:
                    return f.read(max_pickle_bytes + 1)
    return None


def _foreign_classes(names: set[str]) -> list[type]:
    """One ForeignConfig subclass per foreign GPTConfig name, named so that torch's allow-list
    key `{__module__}.{__qualname__}` matches the name recorded in the file."""
    classes = []
    for full in sorted(names):
        module, _, name = full.rpartition(".")
        classes.append(type(name, (ForeignConfig,), {"__module__": module, "__qualname__": name}))
    return classes


class _RestrictedUnpickler(pickle.Unpickler):
    """Fallback for torch < 2.4: torch.load subclasses this and calls our find_class for
    every global except storage types, so nothing outside the allow-list can be named."""

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        allowed = _torch_allowed_globals()
        if full in allowed:
            return allowed[full]
        if name == FOREIGN_CLASS_NAME:
            return _foreign_classes({full})[0]
        raise pickle.UnpicklingError(f"global {full} is not allowed")


class _RestrictedPickleModule:
    __name__ = "restricted_pickle"
    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(f, **kwargs):
        return _RestrictedUnpickler(f, **kwargs).load()


def has_allowlist_api() -> bool:
    return hasattr(torch.serialization, "add_safe_globals")


def safe_torch_load(path: Path, use_allowlist_api: bool | None = None, max_pickle_bytes: int | None = None):
    """torch.load(path) onto the CPU, memory-mapped when the file is a zip archive.

    Raises UnsafeCheckpoint when the file names a global we do not allow, BadArchive when its
    records lie about their sizes or inflate past `max_pickle_bytes`; torch's other
    exceptions (truncated/corrupt files) pass through for the caller to translate.
    """
    is_zip = zipfile.is_zipfile(path)
    foreign: list[type] = []
    if is_zip:
        data = _zip_pickle(path, max_pickle_bytes or MAX_PICKLE_BYTES)
        if data is not None:
            names = _pickle_globals(data)
            unknown = names - set(_torch_allowed_globals())
            refused = sorted(n for n in unknown if n.rpartition(".")[2] != FOREIGN_CLASS_NAME)
            if refused:
                raise UnsafeCheckpoint(f"the pickle references {', '.join(refused)}")
            foreign = _foreign_classes(unknown)
    if use_allowlist_api is None:
        use_allowlist_api = has_allowlist_api()
    kwargs = dict(map_location="cpu", mmap=is_zip)
    try:
        if not use_allowlist_api:
            return torch.load(str(path), weights_only=False, pickle_module=_RestrictedPickleModule, **kwargs)
        if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5: scoped to this call
            with torch.serialization.safe_globals(foreign):
                return torch.load(str(path), weights_only=True, **kwargs)
        # torch 2.4: process-wide, which is harmless for classes that run nothing.
        torch.serialization.add_safe_globals(foreign)
        return torch.load(str(path), weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        # weights_only refusals (e.g. a legacy non-zip pickle naming os.system) land here.
        raise UnsafeCheckpoint(f"the unpickler refused it: {_refusal_reason(err)}") from err


def _refusal_reason(err: Exception) -> str:
    """What torch's weights_only refusal objected to, in one line. Its long message also
    advises retrying with weights_only=False, which we never do and must never print."""
    text = str(err)
    named = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global ([\w.]+) is not allowed", text)
    if named:
        return f"global {named.group(1)} is not allowed"
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if detail:
        line = detail.group(1).strip()
        opcode = re.fullmatch(r"Unsupported operand (\d+)", line)
        if opcode:
            code = bytes([int(opcode.group(1)) % 256]).decode("latin-1")
            name = next((op.name for op in pickletools.opcodes if op.code == code), "unknown")
            return f"pickle opcode {name} is not allowed"
        return line[:200]
    return f"{type(err).__name__} from the weights-only unpickler"
