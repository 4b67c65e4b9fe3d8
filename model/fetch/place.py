"""Putting verified blobs where the checkpoint is expected, so that the path appears whole or not at all.

A file: a hard link to the blob (or, across filesystems, a copy) made under a partial name beside it,
then renamed over the destination. A directory: built complete as `<dest>.partial`, then swapped in.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from .errors import StorageError

log = logging.getLogger(__name__)


def place_file(blob: Path, dest: Path, uri: str) -> None:
    if _same(blob, dest):
        return
    tmp = dest.with_name(f"{dest.name}.partial")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        _link_or_copy(blob, tmp)
        os.replace(tmp, dest)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StorageError(uri, f"cannot write {err.filename or dest}: {err.strerror or err}") from err


def place_dir(files: list[tuple[str, Path]], dest: Path, uri: str) -> None:
    """`files` are (relative name, blob); `dest` ends up holding exactly them."""
    if dest.is_dir() and _dir_matches(files, dest):
        return
    tmp = dest.with_name(f"{dest.name}.partial")
    old = dest.with_name(f"{dest.name}.old")
    try:
        for stale in (tmp, old):
            if stale.exists():
                shutil.rmtree(stale)
        for name, blob in files:
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(blob, target)
        if dest.exists() or dest.is_symlink():
            if dest.is_dir() and not dest.is_symlink():
                os.replace(dest, old)
            else:
                dest.unlink()
        os.replace(tmp, dest)
        if old.exists():
            shutil.rmtree(old)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(uri, f"cannot write {err.filename or dest}: {err.strerror or err}") from err


def _link_or_copy(blob: Path, target: Path) -> None:
    try:
        os.link(blob, target)
        return
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    # Another filesystem (the cache on a PVC, the destination on an emptyDir): a copy, synced.
    with open(blob, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())


def _same(blob: Path, dest: Path) -> bool:
    try:
        return os.path.samefile(blob, dest)
    except OSError:
        return False


def _dir_matches(files: list[tuple[str, Path]], dest: Path) -> bool:
    """Already in place (a restarted init container): the same names, each the same inode as its blob."""
    present = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    return present == {n for n, _ in files} and all(_same(b, dest / n) for n, b in files)
