"""What produced a file: package versions and the git commit of this checkout."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

__version__ = "0.1.0"
REPO_ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    """The commit of this checkout (with a '+dirty' suffix when it has changes), or None outside git
    (an installed copy: its folder is not a checkout, even inside someone else's repository)."""
    if not (REPO_ROOT / ".git").exists() or not (REPO_ROOT / "sae").is_dir():
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# distributions whose versions a result depends on (numerics, tokenisation, decoding, data loading)
PACKAGES = ("torch", "transformers", "open_clip_torch", "datasets", "tokenizers", "pillow", "numpy", "safetensors")


def package_version(dist: str) -> str | None:
    """The installed version of a distribution, None when it is not installed (no import needed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def provenance() -> dict[str, str | None]:
    """Versions of this package, python and the libraries whose numerics matter, plus the git commit."""
    import torch

    return {
        "share_concepts": __version__,
        **{dist: package_version(dist) for dist in PACKAGES},
        "torch": torch.__version__,  # with its build tag (+cu..., +cpu)
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }
