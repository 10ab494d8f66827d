"""What produced a file: package versions and the git commit of this checkout."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

from sae import __version__

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    """The commit of this checkout (with a '+dirty' suffix when it has changes), or None outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=5,
        )
        return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, str | None]:
    """Versions of this package and the libraries whose numerics matter, plus the git commit."""
    import numpy
    import torch

    return {
        "share_concepts": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }
