"""Disk space: sizes in readable units, and files reserved up front so that a full disk is a one-line
error naming the file and the space needed, never a SIGBUS in the middle of writing a memory map."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from sae.util.errors import InputError

FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, file size limit, quota


def human_bytes(n: float) -> str:
    """'512 B', '3.4 KiB', '1.25 GiB': three significant digits, binary units."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError


def free_bytes(path: str | Path) -> int | None:
    """Free space of the file system holding `path` (its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    with contextlib.suppress(OSError):
        return shutil.disk_usage(p).free
    return None


def disk_full_error(path: str | Path, needed: int, e: OSError) -> InputError:
    """The one-line error for a write of `needed` bytes to `path` that failed with `e`."""
    free = free_bytes(path)
    has = f", {human_bytes(free)} free" if free is not None else ""
    return InputError(f"{path}: {e.strerror or e}: needs {human_bytes(needed)}{has}; free some space and run again")


def reserve(path: str | Path, nbytes: int) -> None:
    """Allocate the first `nbytes` of the existing file `path` on disk now (posix_fallocate), so that
    writing through a memory map later cannot fail; InputError when the space is not there."""
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in FULL:
            raise disk_full_error(path, nbytes, e) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def open_memmap(path: str | Path, mode: str, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """`np.lib.format.open_memmap` whose whole file is reserved on disk first (see `reserve`)."""
    try:
        arr = np.lib.format.open_memmap(path, mode=mode, dtype=dtype, shape=shape)
    except OSError as e:
        if e.errno in FULL:
            raise disk_full_error(path, int(np.prod(shape)) * np.dtype(dtype).itemsize, e) from None
        raise
    reserve(path, arr.offset + arr.nbytes)
    return arr
