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


def _zip_pickle(path: Path) -> bytes | None:
    """The data.pkl record of a torch.save zip (stored as <archive name>/data.pkl)."""
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.endswith("/data.pkl") or name == "data.pkl":
                return zf.read(name)
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


def safe_torch_load(path: Path, use_allowlist_api: bool | None = None):
    """torch.load(path) onto the CPU, memory-mapped when the file is a zip archive.

    Raises UnsafeCheckpoint when the file names a global we do not allow; torch's other
    exceptions (truncated/corrupt files) pass through for the caller to translate.
    """
    is_zip = zipfile.is_zipfile(path)
    foreign: list[type] = []
    if is_zip:
        data = _zip_pickle(path)
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
    """The informative line of torch's long weights_only message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "global" in line or "Trying to" in line:
            return line[:300]
    return (lines[0] if lines else type(err).__name__)[:300]
