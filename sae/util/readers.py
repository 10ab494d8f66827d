"""Readers that turn a missing, empty, truncated or garbled file into `InputError("<file>: <what is wrong>")`.

One per file type, used wherever the toolkit reads what a user may hand it:
- `read_json(path)`: .json (sae/util/atomic.py re-exports it);
- `read_npy(path, mmap=True)`: .npy arrays (memory-mapped by default; never unpickles);
- `reading(path)`: a `with` block around a safetensors or `torch.load(weights_only=True)` read, whose
  library errors (zip, pickle-protocol, header, EOF) become the same one-line error.
Content checks (shapes, dtypes, index ranges) stay with the format's own reader (e.g.
`sae.data.features.check_csr`).
"""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sae.util.errors import InputError


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def read_json(path: str | Path) -> Any:
    """The parsed content of a JSON file; InputError naming it when missing, empty or not JSON."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: unreadable ({_first_line(e)})") from None
    if not text.strip():
        raise InputError(f"{path}: empty file (truncated?), not JSON")
    try:
        return json.loads(text)
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON (truncated or garbled: {_first_line(e)})") from None


def read_npy(path: str | Path, mmap: bool = True) -> np.ndarray:
    """A .npy array (memory-mapped read-only unless mmap=False); InputError naming the file when it is
    missing, a directory, an .npz archive, empty, truncated or garbled, or holds Python objects."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: a directory, not a .npy file")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except EOFError:
        raise InputError(f"{path}: empty file (truncated?), not a .npy array") from None
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        raise InputError(f"{path}: not a readable .npy array (truncated or garbled: {_first_line(e)})") from None
    if not isinstance(arr, np.ndarray):  # np.load opened an .npz archive
        arr.close()
        raise InputError(f"{path}: an .npz archive, not a .npy array")
    return arr


@contextlib.contextmanager
def reading(path: str | Path, what: str = "file") -> Iterator[None]:
    """Turn the errors of reading `path` inside the block (safetensors, torch.load with
    weights_only=True) into `InputError("<path>: unreadable <what> (...)")`. Keep the block to the read."""
    try:
        yield
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as e:
        raise InputError(f"{path}: unreadable {what}, truncated or garbled ({_first_line(e)})") from None
    except Exception as e:
        if type(e).__name__ == "SafetensorError":  # safetensors' own error type (a plain Exception)
            raise InputError(f"{path}: unreadable {what}, truncated or garbled ({_first_line(e)})") from None
        raise
