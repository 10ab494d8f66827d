"""SAE feature activations on disk: one sparse CSR matrix [n_rows, d_sae] per hooked layer.

The layout (`csr-v1`: run.json written last, `layer{L:02d}/{indptr,indices,values}.npy` and meta.json)
is specified in docs/formats.md; this module is its writer (`LayerWriter`, each layer folder written
under a temporary name and renamed into place when complete) and reader (`FeatureRun`).

The original repo's format is read too: a folder of dense `layerNN.pt` / `layer-1.pt` tensors
[n_rows, d_sae], read without torch and converted once to a csr-v1 copy `layerNN.csr-v1/` beside them
(sae/data/ptfile.py). Those hold the ungated codes relu((x - b_dec) W_enc) of token 0
(`TopKSAE.get_cls_features` in its sparse_autoencoders.py), `RECORD_CODES["ungated"]`.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from sae.data.ptfile import chunk_nonzero, load_dense
from sae.util.atomic import atomic_path, read_json, write_json
from sae.util.errors import InputError
from sae.util.readers import read_npy

RECORD_CODES = {
    "sae": "the SAE's inference codes (TopK / threshold / ReLU per architecture)",
    "ungated": "relu(pre-activations) of every latent, no TopK (the original repo's get_cls_features)",
}
"""The definitions of recorded features (train_image.py / train_text.py --record_codes)."""

FORMAT = "csr-v1"
_LAYER_DIR = re.compile(r"^layer(-?\d+)$")
_LAYER_PT = re.compile(r"^layer(-?\d+)\.pt$")


@dataclass
class SparseCodes:
    """A [n_rows, d_sae] non-negative matrix in CSR form (numpy arrays, possibly memory-mapped)."""

    indptr: np.ndarray  # int64 [n_rows + 1]
    indices: np.ndarray  # int32 [nnz]
    values: np.ndarray  # float32 [nnz]
    d_sae: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> SparseCodes:
        """Build from a dense [n_rows, d_sae] array; entries equal to 0 are dropped."""
        dense = np.asarray(dense)
        rows, cols = np.nonzero(dense)
        indptr = np.zeros(dense.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=indptr[1:])
        return cls(indptr, cols.astype(np.int32), dense[rows, cols].astype(np.float32), dense.shape[1])

    @classmethod
    def from_topk(cls, values: np.ndarray, indices: np.ndarray, d_sae: int) -> SparseCodes:
        """Build from per-row top-k [n_rows, k] values and indices; zero values are dropped."""
        values = np.asarray(values, dtype=np.float32)
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices, axis=1, kind="stable")
        values = np.take_along_axis(values, order, 1)
        indices = np.take_along_axis(indices, order, 1)
        keep = values > 0
        indptr = np.zeros(values.shape[0] + 1, dtype=np.int64)
        np.cumsum(keep.sum(1), out=indptr[1:])
        return cls(indptr, indices[keep].astype(np.int32), values[keep], d_sae)

    def to_dense(self, dtype: Any = np.float32) -> np.ndarray:
        out = np.zeros((self.n_rows, self.d_sae), dtype=dtype)
        rows = np.repeat(np.arange(self.n_rows), np.diff(self.indptr))
        out[rows, self.indices] = self.values
        return out

    def to_scipy(self):
        """As a `scipy.sparse.csr_matrix` (shares memory where the dtypes allow)."""
        import scipy.sparse

        return scipy.sparse.csr_matrix((self.values, self.indices, self.indptr), shape=(self.n_rows, self.d_sae))

    def to_torch(self, device: str = "cpu"):
        """As a `torch.sparse_csr_tensor` [n_rows, d_sae] on `device` (read-only memory maps are copied)."""
        import torch

        def tensor(a: np.ndarray, dtype: Any = None) -> torch.Tensor:
            a = np.ascontiguousarray(a, dtype=dtype)
            return torch.from_numpy(a if a.flags.writeable else a.copy())

        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                tensor(self.indptr),
                tensor(self.indices, np.int64),
                tensor(self.values),
                size=(self.n_rows, self.d_sae),
                device=device,
                check_invariants=True,  # files from disk: an error rather than a crash if they are corrupt
            )

    def rows(self, start: int, stop: int) -> SparseCodes:
        """Rows start:stop as a new SparseCodes (views where possible)."""
        a, b = int(self.indptr[start]), int(self.indptr[stop])
        return SparseCodes(self.indptr[start : stop + 1] - a, self.indices[a:b], self.values[a:b], self.d_sae)


def _write_npy_header(f: BinaryIO, dtype: npt.DTypeLike, n: int) -> None:
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)}
    )


class LayerWriter:
    """Stream a layer's codes to disk chunk by chunk, then publish the folder atomically.

    with LayerWriter(run_dir, layer=11, d_sae=6144) as w:
        for chunk in ...: w.append(chunk)         # SparseCodes of consecutive rows
    """

    def __init__(
        self,
        run_dir: str | Path,
        layer: int,
        d_sae: int,
        final: Path | None = None,
        extra_meta: dict[str, Any] | None = None,
    ):
        self.final = final or Path(run_dir) / layer_dir_name(layer)
        self.layer, self.d_sae = layer, d_sae
        self.extra_meta = extra_meta or {}
        self._ctx = atomic_path(self.final)
        self._n_rows = 0
        self._nnz = 0

    def __enter__(self) -> LayerWriter:
        self.tmp = self._ctx.__enter__()
        self.tmp.mkdir()
        self._indptr = open(self.tmp / "indptr.bin", "wb")
        self._indices = open(self.tmp / "indices.bin", "wb")
        self._values = open(self.tmp / "values.bin", "wb")
        self._indptr.write(np.zeros(1, dtype=np.int64).tobytes())
        return self

    def append(self, chunk: SparseCodes) -> None:
        if chunk.d_sae != self.d_sae:
            raise ValueError(f"chunk has d_sae={chunk.d_sae}, layer has {self.d_sae}")
        self._indptr.write((np.asarray(chunk.indptr[1:], dtype=np.int64) + self._nnz).tobytes())
        self._indices.write(np.asarray(chunk.indices, dtype=np.int32).tobytes())
        self._values.write(np.asarray(chunk.values, dtype=np.float32).tobytes())
        self._n_rows += chunk.n_rows
        self._nnz += chunk.nnz

    def __exit__(self, exc_type, exc, tb) -> None:
        for f in (self._indptr, self._indices, self._values):
            f.close()
        if exc_type is None:
            for name, dtype, n in (
                ("indptr", np.int64, self._n_rows + 1),
                ("indices", np.int32, self._nnz),
                ("values", np.float32, self._nnz),
            ):
                raw = self.tmp / f"{name}.bin"
                with open(self.tmp / f"{name}.npy", "wb") as out, open(raw, "rb") as src:
                    _write_npy_header(out, dtype, n)
                    while block := src.read(1 << 24):
                        out.write(block)
                raw.unlink()
            meta = {
                "format": FORMAT,
                "n_rows": self._n_rows,
                "d_sae": self.d_sae,
                "layer": self.layer,
                "nnz": self._nnz,
                **self.extra_meta,
            }
            (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        self._ctx.__exit__(exc_type, exc, tb)


def layer_dir_name(layer: int) -> str:
    return f"layer{layer:02d}"


def write_layer(run_dir: str | Path, layer: int, codes: SparseCodes) -> None:
    """Write one layer's codes in one go (see LayerWriter for streaming)."""
    with LayerWriter(run_dir, layer, codes.d_sae) as w:
        w.append(codes)


def write_run_info(run_dir: str | Path, info: dict[str, Any]) -> None:
    """Write run.json, which marks the run complete. Call it after every layer is written."""
    write_json(Path(run_dir) / "run.json", info)


class FeatureRun:
    """A run's recorded features, in this toolkit's format or the original repo's dense .pt files."""

    def __init__(self, path: Path):
        self.path = path
        self.name = path.name
        self.info: dict[str, Any] = {}
        self._files: dict[int, Path] = {}
        if (path / "run.json").exists():
            self.format = FORMAT
            self.info = read_json(path / "run.json")
            if not isinstance(self.info, dict):
                raise InputError(f"{path / 'run.json'}: not a JSON object")
            for child in path.iterdir():
                m = _LAYER_DIR.match(child.name)
                if m and (child / "meta.json").exists():
                    self._files[int(m.group(1))] = child
        else:
            self.format = "original-dense-pt"
            for child in path.iterdir():
                m = _LAYER_PT.match(child.name)
                if m:
                    self._files[int(m.group(1))] = child
        if not self._files:
            raise InputError(
                f"run '{self.name}' at {path} holds no layer data "
                "(no layerNN/ folders with run.json, no layerNN.pt files)"
            )

    @property
    def layers(self) -> list[int]:
        """Layer indices, shallowest first; the original format's -1 (the last layer) sorts last."""
        return sorted(self._files, key=lambda l: (l < 0, l))

    @property
    def record_codes(self) -> str:
        """Which codes the run holds (a key of RECORD_CODES): the original format's are ungated."""
        if self.format != FORMAT:
            return "ungated"
        return str(self.info.get("record_codes", "sae"))

    @property
    def row_ids(self) -> list[int] | None:
        return self.info.get("row_ids")

    def layer_path(self, layer: int) -> Path:
        """The folder (this toolkit's format) or the .pt file (the original's) holding one layer."""
        if layer not in self._files:
            raise InputError(f"run '{self.name}' has no layer {layer}; it has {self.layers}")
        return self._files[layer]

    def load(self, layer: int) -> SparseCodes:
        """The codes of one layer, memory-mapped, not read into RAM. An original-format layer is converted to
        csr-v1 once, in one streamed pass, and the copy kept beside it (`convert_layer`)."""
        path = self.layer_path(layer)
        if self.format == FORMAT:
            meta = read_json(path / "meta.json")
            if not isinstance(meta, dict) or not isinstance(meta.get("d_sae"), int) or meta["d_sae"] < 1:
                raise InputError(f"{path / 'meta.json'}: no positive integer d_sae")
            load = lambda n: read_npy(path / f"{n}.npy")  # noqa: E731
            codes = SparseCodes(load("indptr"), load("indices"), load("values"), meta["d_sae"])
            check_csr(codes, path)
            return codes
        codes = convert_layer(path, layer)
        check_csr(codes, path)
        return codes


def check_csr(codes: SparseCodes, where: str | Path, chunk: int = 1 << 22) -> None:
    """InputError naming `where` unless `codes` is a valid csr-v1 matrix: indptr int64 [n_rows + 1] from 0,
    non-decreasing, ending at nnz = len(indices) = len(values); indices int32 in [0, d_sae); values
    float32 and finite. Reads the arrays once, by chunks (memory maps stay small)."""
    p, i, v = codes.indptr, codes.indices, codes.values
    wrong = []
    for name, arr, dtype in (("indptr", p, np.int64), ("indices", i, np.int32), ("values", v, np.float32)):
        if arr.ndim != 1 or arr.dtype != dtype:
            wrong.append(f"{name}.npy is {arr.dtype} {list(arr.shape)}, not 1-D {np.dtype(dtype).name}")
    if wrong:
        raise InputError(f"{where}: {'; '.join(wrong)}")
    if len(p) < 1 or p[0] != 0 or p[-1] != len(i) or len(i) != len(v):
        raise InputError(
            f"{where}: bad CSR arrays (indptr[0] = {p[0] if len(p) else None}, indptr[-1] = "
            f"{p[-1] if len(p) else None}, {len(i)} indices, {len(v)} values)"
        )
    for a in range(0, len(p), chunk):
        if (np.diff(p[a : a + chunk + 1]) < 0).any():
            raise InputError(f"{where}: bad CSR arrays (indptr decreases)")
    for a in range(0, len(i), chunk):
        ia, va = i[a : a + chunk], v[a : a + chunk]
        if len(ia) and (ia.min() < 0 or ia.max() >= codes.d_sae):
            raise InputError(f"{where}: bad CSR arrays (a latent index outside [0, {codes.d_sae}))")
        if not np.isfinite(va).all():
            count = sum(int((~np.isfinite(v[b : b + chunk])).sum()) for b in range(0, len(v), chunk))
            what = "values.npy holds" if Path(where).is_dir() else "holds"
            raise InputError(f"{where}: {what} {count} non-finite values (NaN or inf)")


# ------------------------------------------------------------------------------------------------
# the original format, converted to csr-v1 once (read by sae/data/ptfile.py without torch)

SIDECAR_SUFFIX = ".csr-v1"
CHUNK_ENTRIES = 1 << 24  # dense entries scanned at once by the conversion


def iter_codes(dense: np.ndarray, chunk_entries: int = CHUNK_ENTRIES):
    """Row chunks of a dense [n_rows, d] array as SparseCodes (non-zeros kept, values as float32)."""
    n, d = dense.shape
    step = max(1, chunk_entries // max(d, 1))
    for r0 in range(0, n, step):
        block = np.ascontiguousarray(dense[r0 : r0 + step])
        rows, cols = chunk_nonzero(block)
        indptr = np.zeros(block.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=block.shape[0]), out=indptr[1:])
        yield SparseCodes(indptr, cols.astype(np.int32), block[rows, cols].astype(np.float32), d)


def sidecar_path(pt: str | Path) -> Path:
    pt = Path(pt)
    return pt.with_name(pt.name[: -len(".pt")] + SIDECAR_SUFFIX)


def _source_stamp(pt: Path) -> dict[str, int]:
    st = pt.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_sidecar(pt: str | Path):
    """The layer's csr-v1 copy (memory-mapped SparseCodes) if it exists and matches the .pt file, else None."""
    pt = Path(pt)
    folder = sidecar_path(pt)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("source") != _source_stamp(pt):
            return None
        arrays = [np.load(folder / f"{n}.npy", mmap_mode="r") for n in ("indptr", "indices", "values")]
    except (OSError, ValueError):
        return None
    return SparseCodes(*arrays, d_sae=int(meta["d_sae"]))


def convert_layer(pt: str | Path, layer: int, keep: bool = True, progress: bool = False):
    """The csr-v1 codes of one original-format layer file: its sidecar if current, else one streamed pass
    over the dense tensor, written as the sidecar (keep=True, when the folder is writable: then returned
    memory-mapped) or built in memory. Values are float32 (exact for fp16/fp32 files)."""
    pt = Path(pt)
    if keep and (codes := read_sidecar(pt)) is not None:
        return codes
    dense = load_dense(pt)
    if dense.dtype == np.float64:
        raise InputError(f"{pt}: float64 values do not fit the float32 csr-v1 format; compare it dense")
    chunks = iter_codes(dense)
    if progress:
        from tqdm import tqdm

        step = max(1, CHUNK_ENTRIES // max(dense.shape[1], 1))
        chunks = tqdm(chunks, total=-(-dense.shape[0] // step), desc=f"convert {pt.name}", leave=False)
    if keep:
        folder = sidecar_path(pt)
        try:
            with LayerWriter(
                folder.parent, layer, dense.shape[1], final=folder, extra_meta={"source": _source_stamp(pt)}
            ) as w:
                for c in chunks:
                    w.append(c)
        except OSError:  # a read-only run folder: convert in memory instead
            chunks = iter_codes(dense)
        else:
            if (codes := read_sidecar(pt)) is not None:
                return codes
            chunks = iter_codes(dense)
    parts = list(chunks)
    if not parts:
        return SparseCodes(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), dense.shape[1])
    offsets = np.cumsum([0] + [p.nnz for p in parts[:-1]])
    indptr = np.concatenate([np.zeros(1, np.int64), *(p.indptr[1:] + o for p, o in zip(parts, offsets))])
    return SparseCodes(
        indptr, np.concatenate([p.indices for p in parts]), np.concatenate([p.values for p in parts]), dense.shape[1]
    )


def available_runs(features_dir: str | Path, complete: bool = True) -> list[str]:
    """Names of the runs in `features_dir`: complete ones (run.json written, or the original format's
    layerNN.pt files), or with complete=False the other folders (runs stopped or still going)."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        return []
    folders = [p for p in features_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(
        p.name
        for p in folders
        if ((p / "run.json").is_file() or any(_LAYER_PT.match(f.name) for f in p.iterdir())) == complete
    )


def open_run(features_dir: str | Path, name: str) -> FeatureRun:
    """Open `features_dir/name`; a missing run is an InputError naming the runs that exist."""
    path = Path(features_dir) / name
    if not path.is_dir():
        runs = available_runs(features_dir)
        listing = ", ".join(runs) if runs else "none"
        unfinished = available_runs(features_dir, complete=False)
        if unfinished:
            listing += f"; unfinished: {', '.join(unfinished)}"
        raise InputError(f"no run '{name}' in {features_dir} (available: {listing})")
    return FeatureRun(path)
