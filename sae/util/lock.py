"""An exclusive, non-blocking lock on a file: a second process gets a one-line error, not a wait."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from sae.util.errors import InputError


@contextlib.contextmanager
def exclusive(lock_path: str | Path, busy: str) -> Iterator[None]:
    """Hold an flock on `lock_path` (created if needed) for the `with` block; InputError(`busy`) when
    another process holds it. The lock goes with the process: a killed holder frees it. No-op where
    fcntl does not exist (Windows)."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except OSError:
            raise InputError(busy) from None
        yield
