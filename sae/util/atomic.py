"""Atomic file and directory writes: a reader never sees a half-written file.

Everything is first written under a temporary name in the same directory, flushed to disk, then
renamed into place (rename is atomic on POSIX within one file system). The temporary names carry the
writer's process id, so `remove_dead_temporaries` can clear what a killed process left.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sae.util import readers


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it to `path`, on error delete it.

    Works for files and for directories (an existing directory at `path` is replaced).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if path.is_dir() and tmp.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN or infinite float (numpy ones included) replaced by None (JSON null)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented, strictly valid JSON (NaN and inf become null), atomically."""
    text = json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


read_json = readers.read_json  # one JSON reader: a bad file is a one-line InputError naming it


# ------------------------------------------------------------------------------ leftovers of dead runs

_TMP_PID = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")
STALE_S = 600  # leftovers untouched for this long may be removed (a process id is only unique on its host)


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (a process of another user counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def last_touched(path: Path) -> float:
    """Seconds since `path`, or anything under it, was last modified."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [p.lstat().st_mtime for p in path.rglob("*")]
    return time.time() - max(times)


def remove_dead_temporaries(root: str | Path, min_age_s: float = STALE_S) -> list[Path]:
    """Delete `.<name>.tmp-<pid>` / `.<name>.old-<pid>` files and folders (the temporary names of `atomic_path`)
    left under `root` by processes that no longer exist and untouched for `min_age_s` (a folder shared
    by several hosts may hold the live temporaries of another host's process). Returns them."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for p in list(root.rglob(".*")):
        m = _TMP_PID.match(p.name)
        if not m or pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            if last_touched(p) < min_age_s:
                continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed
