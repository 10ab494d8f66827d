"""The original repo's layer files: one dense tensor [n_rows, d_sae] per `layerNN.pt`, read without torch.

A `.pt` file written by `torch.save` (since torch 1.6) is an uncompressed zip archive:

    <name>/data.pkl     a pickle that rebuilds the tensor (torch._utils._rebuild_tensor_v2)
    <name>/data/0       the raw little-endian storage bytes, 64-byte aligned in the archive

`read_pt_array` parses data.pkl with a restricted unpickler that only builds a tensor description
(storage dtype, offset, shape, strides) and refuses every other global, so a crafted file runs no code;
the storage is then memory-mapped straight from the archive as a numpy array (no copy, no torch import,
which alone costs ~0.5 GB of resident memory and seconds). Files that are not a plain dense tensor in
this layout (legacy non-zip files, bf16, sparse tensors) return None; callers then use
`torch.load(weights_only=True)`, which is also safe.

The conversion of a layer to csr-v1 (one streamed pass, kept beside the file) is
`sae.data.features.convert_layer`.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from sae.util.errors import InputError

_STORAGE_DTYPES = {
    "HalfStorage": np.float16,
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
}


class _TensorRef:
    """What data.pkl describes: storage `key` of `dtype`, and the view (offset, shape, strides) in elements."""

    def __init__(self, dtype: Any, key: str, offset: int = 0, shape: tuple = (), stride: tuple = ()):
        self.dtype, self.key, self.offset, self.shape, self.stride = dtype, key, offset, shape, stride


class _Refused(Exception):
    pass


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _TensorRef):
        raise _Refused("not a storage")
    return _TensorRef(storage.dtype, storage.key, int(offset), tuple(size), tuple(stride))


class _StorageType:
    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


class _TensorUnpickler(pickle.Unpickler):
    """Builds only _TensorRef objects: any global other than the tensor rebuild, the float storage types and
    OrderedDict (the empty hooks argument) is refused, so no code from the file ever runs."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return dict
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        # ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise _Refused("unknown persistent id")
        return _TensorRef(pid[1].dtype, str(pid[2]))


def _member_offset(f, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored (uncompressed) member's data in the archive."""
    f.seek(info.header_offset)
    head = f.read(30)
    if head[:4] != b"PK\x03\x04":
        raise _Refused("bad local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_pt_array(path: str | Path) -> np.ndarray | None:
    """The dense tensor of a `torch.save` zip file as a copy-on-write memory-mapped numpy array (any shape),
    or None when the file is not a plain float16/32/64 tensor in that layout (then use torch.load).
    A file that is not even a readable zip or pickle is an InputError."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                return None
            prefix = pkl[: -len("data.pkl")]
            if prefix + "byteorder" in names and z.read(prefix + "byteorder").strip() != b"little":
                return None
            ref = _TensorUnpickler(z.open(pkl)).load()
            if not isinstance(ref, _TensorRef):
                return None
            info = z.getinfo(f"{prefix}data/{ref.key}")
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            with open(path, "rb") as f:
                offset = _member_offset(f, info)
    except _Refused:
        return None
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
        raise InputError(f"{path}: not a readable torch file ({type(e).__name__}: {e})") from None
    itemsize = np.dtype(ref.dtype).itemsize
    numel = info.file_size // itemsize
    if numel == 0:
        return np.zeros(ref.shape, dtype=ref.dtype)
    # copy-on-write: the file is never written, and fast paths that need a writeable array (torch casts) work
    storage = np.memmap(path, dtype=ref.dtype, mode="c", offset=offset, shape=(numel,))
    extent = ref.offset + sum((s - 1) * st for s, st in zip(ref.shape, ref.stride)) + 1 if all(ref.shape) else 0
    if extent > numel or min(ref.stride, default=0) < 0:
        raise InputError(f"{path}: tensor view runs past its storage ({extent} > {numel} values)")
    return np.lib.stride_tricks.as_strided(
        storage[ref.offset :], shape=ref.shape, strides=tuple(s * itemsize for s in ref.stride)
    )


def load_dense(path: str | Path) -> np.ndarray:
    """A layer file's tensor [n_rows, d_sae] as a numpy array: memory-mapped without torch where possible,
    else through torch.load(weights_only=True) (memory-mapped too where torch can); bf16 and other dtypes
    are cast to float32."""
    path = Path(path)
    arr = read_pt_array(path)
    if arr is None:
        import torch

        try:
            try:
                tensor = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # not the zip format: cannot be memory-mapped
                tensor = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is one line
            raise InputError(f"{path}: not a readable torch file ({type(e).__name__}: {e})") from None
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"{path}: holds a {type(tensor).__name__}, not a tensor [n_rows, d_sae]")
        if tensor.is_sparse:
            tensor = tensor.to_dense()
        if tensor.dtype not in (torch.float16, torch.float32, torch.float64):
            tensor = tensor.float()
        arr = tensor.numpy()
    if arr.ndim != 2:
        raise InputError(f"{path}: holds a tensor of shape {list(arr.shape)}, not [n_rows, d_sae]")
    return arr


def chunk_nonzero(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the non-zero entries of a C-contiguous [rows, d] block, row-major order.

    Scans 8-byte words first (4 fp16 values at once), then looks inside the few non-zero words: ~5x faster
    than np.nonzero on sparse data. -0.0 counts as zero."""
    d = block.shape[1]
    flat = block.reshape(-1)
    lanes = 8 // block.dtype.itemsize
    if lanes > 1 and flat.size % lanes == 0 and flat.ctypes.data % 8 == 0:
        words = np.flatnonzero(flat.view(np.uint64))
        cand = (words[:, None] * lanes + np.arange(lanes)).reshape(-1)
        pos = cand[flat[cand] != 0]
    else:
        pos = np.flatnonzero(flat)
    return pos // d, pos % d


def density(dense: np.ndarray, rows: int = 256) -> float:
    """Fraction of non-zero entries, estimated from up to 4 spread chunks of `rows` rows."""
    n = dense.shape[0]
    if n == 0 or dense.shape[1] == 0:
        return 0.0
    starts = sorted({int(s) for s in np.linspace(0, max(n - rows, 0), 4)})
    nz = total = 0
    for s in starts:
        block = np.ascontiguousarray(dense[s : s + rows])
        nz += len(chunk_nonzero(block)[0])
        total += block.size
    return nz / total
