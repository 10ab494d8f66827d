"""Helpers shared by the loaders: one-line errors for models that are not available, local fingerprints."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sae.util.errors import InputError

# --------------------------------------------------------------------------------------------------
# Loading helpers: one-line errors for models that are not available


def short_error(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:120]}{'...' if len(text) > 120 else ''}"


def unavailable(kind: str, name: str, e: BaseException) -> InputError:
    where = "local directory" if os.path.isdir(name) else "name"
    return InputError(
        f"cannot load {kind} {where} '{name}' ({short_error(e)}); a hub name must be in the local cache when the "
        f"hub is unreachable or HF_HUB_OFFLINE=1 - download it once, or give a local directory"
    )


def local_fingerprint(path: str) -> str | None:
    """Hash of (file, size, mtime) under a local model directory; None for hub names."""
    if not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
