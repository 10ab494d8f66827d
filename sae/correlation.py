"""Exact Pearson best matches between the features of two layers, computed from sparse codes.

For a source layer X [n_rows, d_x] and a target layer Y [n_rows, d_y] on the same rows:

    s_i  = sum_n X[n, i]                          column sum (also the wMPPC weight S_i)
    css_i = sum_n (X[n, i] - s_i / n_rows)^2      centred sum of squares (two-pass, float64)
    corr_ij = (G_ij - s_i s_j / n_rows) / sqrt(css_i css_j),   G = X^T Y  (co-occurrence)

which is the exact Pearson correlation (the same 1/n_rows in covariance and variances). With the
scaled codes Xs = X diag(1/sqrt(css)) and shift_i = mean_i / sqrt(css_i) this is

    corr = Xs^T Ys - n_rows * outer(shift_x, shift_y)

`best_match` returns, for every source feature i, rho_i = max_j corr_ij and its argmax. The max is
exact over all d_y targets, including the pairs that never co-occur (G_ij = 0, corr_ij < 0), so a
feature that co-occurs with nothing gets its true, negative, best correlation.

A feature is dead when css_i <= DEAD_RTOL^2 * sum_n X[n, i]^2, i.e. its standard deviation is below
1e-6 of its root mean square (this catches all-zero columns and constant columns up to round-off).
A dead feature correlates 0 with everything: a dead source feature gets rho = 0 and best = -1, and a
dead target feature offers a correlation of 0 to every source feature.

The work is done in blocks of source features: a dense [block, d_y] float64 block of the cross
moment is built, the shift is subtracted, and the row max is kept, so memory is O(block * d_y) plus
the codes. The cross moment comes from one of two paths:
- sparse: every (source entry, target entry) pair on the same row is scattered into the block
  (co-occurrence, cost ~ nnz_x * nnz_y / n_rows), for SAE codes;
- dense: row chunks of both layers are densified and multiplied (cost ~ n_rows * d_x * d_y), for the
  dense activations of the original repo's format.
Two engines run this: `NumpyEngine` (CPU, used and tested in CI) and `TorchEngine` (CUDA when present;
it also runs on CPU, which is how the tests check it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse

from sae.features import SparseCodes

DEAD_RTOL = 1e-6


@dataclass(frozen=True)
class ColumnStats:
    """Per-feature moments of a layer [n_rows, d], all float64 [d]."""

    n_rows: int
    sums: np.ndarray  # S_i = sum_n x_ni
    sumsq: np.ndarray  # sum_n x_ni^2
    css: np.ndarray  # sum_n (x_ni - mean_i)^2, computed two-pass
    dead: np.ndarray  # bool: standard deviation below DEAD_RTOL * root mean square

    @property
    def d(self) -> int:
        return len(self.sums)

    @property
    def inv_sd(self) -> np.ndarray:
        """1 / sqrt(css) [d], 0 for dead features."""
        out = np.zeros(self.d)
        alive = ~self.dead
        out[alive] = 1.0 / np.sqrt(self.css[alive])
        return out

    @property
    def shift(self) -> np.ndarray:
        """mean / sqrt(css) [d], 0 for dead features."""
        return self.sums / self.n_rows * self.inv_sd

    @property
    def n_dead(self) -> int:
        return int(self.dead.sum())


def column_stats(codes: SparseCodes, dead_rtol: float = DEAD_RTOL) -> ColumnStats:
    """Exact float64 moments of a [n_rows, d_sae] layer (the zeros that are not stored count)."""
    n, d = codes.n_rows, codes.d_sae
    idx = np.asarray(codes.indices)
    vals = np.asarray(codes.values, dtype=np.float64)
    sums = np.bincount(idx, vals, minlength=d)
    sumsq = np.bincount(idx, vals * vals, minlength=d)
    stored = np.bincount(idx, minlength=d)
    mean = sums / n
    css = np.bincount(idx, (vals - mean[idx]) ** 2, minlength=d) + (n - stored) * mean**2
    dead = css <= dead_rtol**2 * sumsq
    return ColumnStats(n, sums, sumsq, css, dead)


@dataclass
class BestMatch:
    """For each source feature: its best Pearson correlation in the target layer and which feature."""

    rho: np.ndarray  # float64 [d_x]; 0 for dead source features
    best: np.ndarray  # int64 [d_x]; index of the best target feature, -1 for dead source features


def _scaled_csr(codes: SparseCodes, stats: ColumnStats) -> scipy.sparse.csr_matrix:
    """The layer as float64 CSR [n_rows, d] with column j multiplied by 1/sqrt(css_j) (dead -> 0)."""
    idx = np.asarray(codes.indices)
    vals = np.asarray(codes.values, dtype=np.float64) * stats.inv_sd[idx]
    return scipy.sparse.csr_matrix(
        (vals, idx.astype(np.int32, copy=False), np.asarray(codes.indptr, dtype=np.int64)),
        shape=(codes.n_rows, codes.d_sae),
    )


def _ranges(total: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, step):
        yield start, min(start + step, total)


@dataclass
class Budget:
    """Sizes that bound the working memory of one block (in float64 entries)."""

    block_entries: int = 1 << 19  # dense cross-moment block [block, d_y]
    pair_chunk: int = 1 << 19  # co-occurrence pairs scattered at once (sparse path)
    dense_ratio: float = 3e-3  # use the dense path when pairs > dense_ratio * n * d_x * d_y
    pad_waste: float = 2.0  # sparse path pads target rows to the longest when n * kmax <= this * nnz + n

    dense_min: int = 256  # the dense path's blocks and row chunks are at least this big (BLAS efficiency)

    def block_cols(self, d_y: int, dense: bool = False) -> int:
        return max(self.dense_min if dense else 1, self.block_entries // max(d_y, 1))

    def row_chunk(self, d: int) -> int:
        return max(self.dense_min, self.block_entries // max(d, 1))


class PreparedLayer:
    """One layer ready for correlations: stats, and the scaled codes in the engine's layouts."""

    def __init__(self, stats: ColumnStats, csr: scipy.sparse.csr_matrix):
        self.stats = stats
        self.csr = csr  # float64 [n_rows, d], scaled by 1/sqrt(css)
        self.cache: dict[str, Any] = {}

    @property
    def n_rows(self) -> int:
        return self.csr.shape[0]

    @property
    def d(self) -> int:
        return self.csr.shape[1]

    @property
    def nnz(self) -> int:
        return int(self.csr.nnz)

    def permuted(self, perm: np.ndarray) -> PreparedLayer:
        """The same layer with its rows reordered: row r of the result is row perm[r]."""
        return PreparedLayer(self.stats, self.csr[perm])


class NumpyEngine:
    """CPU engine: numpy/scipy, float64, single process."""

    name = "numpy"
    device = "cpu"

    def __init__(self, path: str = "auto", budget: Budget | None = None):
        if path not in ("auto", "sparse", "dense"):
            raise ValueError(f"path must be auto, sparse or dense, not {path!r}")
        self.path = path
        self.budget = budget or Budget()

    def prepare(self, codes: SparseCodes, stats: ColumnStats | None = None) -> PreparedLayer:
        stats = stats if stats is not None else column_stats(codes)
        return PreparedLayer(stats, _scaled_csr(codes, stats))

    # layouts, built once per layer and cached
    def _csc(self, layer: PreparedLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(indptr [d+1], rows int64 [nnz], values float64 [nnz], column of each entry int64 [nnz])."""
        if "csc" not in layer.cache:
            csc = layer.csr.tocsc()
            csc.sort_indices()
            indptr = csc.indptr.astype(np.int64)
            cols = np.repeat(np.arange(layer.d, dtype=np.int64), np.diff(indptr))
            layer.cache["csc"] = (indptr, csc.indices.astype(np.int64), csc.data, cols)
        return layer.cache["csc"]

    def _padded(self, layer: PreparedLayer) -> tuple[np.ndarray, np.ndarray] | None:
        """Rows padded to the longest row, (indices [n, kmax], values [n, kmax]), or None if wasteful."""
        if "padded" not in layer.cache:
            counts = np.diff(layer.csr.indptr)
            kmax = int(counts.max()) if len(counts) else 0
            if kmax == 0 or layer.n_rows * kmax > self.budget.pad_waste * layer.nnz + layer.n_rows:
                layer.cache["padded"] = None
            else:
                idx = np.zeros((layer.n_rows, kmax), dtype=np.int64)
                val = np.zeros((layer.n_rows, kmax))
                pos = np.arange(layer.nnz) - np.repeat(layer.csr.indptr[:-1], counts)
                rows = np.repeat(np.arange(layer.n_rows), counts)
                idx[rows, pos] = layer.csr.indices
                val[rows, pos] = layer.csr.data
                layer.cache["padded"] = (idx, val)  # padding: feature 0 with value 0, adds nothing
        return layer.cache["padded"]

    def use_dense(self, x: PreparedLayer, y: PreparedLayer) -> bool:
        if self.path != "auto":
            return self.path == "dense"
        pairs = x.nnz * (y.nnz / max(y.n_rows, 1))
        return pairs > self.budget.dense_ratio * x.n_rows * x.d * y.d

    def _cross_sparse(self, x: PreparedLayer, y: PreparedLayer, b0: int, b1: int) -> np.ndarray:
        """Xs[:, b0:b1]^T Ys as a dense float64 [b1-b0, d_y], by scattering co-occurring pairs."""
        indptr, rows, vals, cols = self._csc(x)
        d_y, size = y.d, (b1 - b0) * y.d
        p0, p1 = int(indptr[b0]), int(indptr[b1])
        out: np.ndarray | None = None
        padded = self._padded(y)
        if padded is not None:
            pidx, pval = padded
            step = max(1, self.budget.pair_chunk // pidx.shape[1])
            chunks = [(e, min(e + step, p1)) for e in range(p0, p1, step)]
        else:
            counts = np.diff(y.csr.indptr)[rows[p0:p1]]
            cum = np.cumsum(counts)
            cuts = np.searchsorted(cum, np.arange(self.budget.pair_chunk, int(cum[-1]) if len(cum) else 0,
                                                  self.budget.pair_chunk), side="right")
            bounds = [p0, *(p0 + cuts), p1]
            chunks = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        for e0, e1 in chunks:
            n, a, local = rows[e0:e1], vals[e0:e1], (cols[e0:e1] - b0) * d_y
            if padded is not None:
                flat = local[:, None] + pidx[n]
                w = a[:, None] * pval[n]
            else:
                counts = np.diff(y.csr.indptr)[n]
                rep = np.repeat(np.arange(len(n)), counts)
                pos = np.arange(int(counts.sum())) + (y.csr.indptr[n] - (np.cumsum(counts) - counts))[rep]
                flat = local[rep] + y.csr.indices[pos]
                w = a[rep] * y.csr.data[pos]
            part = np.bincount(flat.ravel(), w.ravel(), minlength=size)
            if out is None:
                out = part
            else:
                out += part
        if out is None:
            out = np.zeros(size)
        return out.reshape(b1 - b0, d_y)

    def _cross_dense(self, x: PreparedLayer, y: PreparedLayer, b0: int, b1: int) -> np.ndarray:
        """Xs[:, b0:b1]^T Ys by dense float64 products over row chunks."""
        if "csc_matrix" not in x.cache:
            x.cache["csc_matrix"] = x.csr.tocsc()
        xb = x.cache["csc_matrix"][:, b0:b1].tocsr()
        out = np.zeros((b1 - b0, y.d))
        for r0, r1 in _ranges(x.n_rows, self.budget.row_chunk(max(y.d, b1 - b0))):
            out += xb[r0:r1].toarray().T @ y.csr[r0:r1].toarray()
        return out

    def best_match(self, x: PreparedLayer, y: PreparedLayer) -> BestMatch:
        """For every feature of x, max_j corr(x_i, y_j) over all features j of y, and the argmax."""
        if x.n_rows != y.n_rows:
            raise ValueError(f"layers have {x.n_rows} and {y.n_rows} rows")
        rho = np.zeros(x.d)
        best = np.zeros(x.d, dtype=np.int64)
        if y.d == 0:
            return BestMatch(rho, best - 1)
        shift_x = x.stats.n_rows * x.stats.shift
        shift_y = y.stats.shift
        dense = self.use_dense(x, y)
        cross = self._cross_dense if dense else self._cross_sparse
        for b0, b1 in _ranges(x.d, self.budget.block_cols(y.d, dense)):
            block = cross(x, y, b0, b1)
            block -= np.multiply.outer(shift_x[b0:b1], shift_y)
            arg = block.argmax(axis=1)
            rho[b0:b1] = block[np.arange(b1 - b0), arg]
            best[b0:b1] = arg
        rho[x.stats.dead] = 0.0
        best[x.stats.dead] = -1
        return BestMatch(rho, best)


class TorchEngine(NumpyEngine):
    """The same algorithm with torch on `device` (CUDA when present): index_add_ scatter or matmul."""

    name = "torch"

    def __init__(self, device: str = "cuda", path: str = "auto", budget: Budget | None = None):
        super().__init__(path, budget or Budget(block_entries=1 << 24, pair_chunk=1 << 24,
                                                 dense_ratio=1e-3))
        self.device = device

    def _t(self, layer: PreparedLayer) -> dict[str, Any]:
        """The layer's CSR and CSC arrays as tensors on the device, built once."""
        if "torch" not in layer.cache:
            import torch

            dev = self.device
            indptr, rows, vals, cols = self._csc(layer)
            csr = layer.csr
            layer.cache["torch"] = {
                "crow": torch.as_tensor(csr.indptr.astype(np.int64), device=dev),
                "col": torch.as_tensor(csr.indices.astype(np.int64), device=dev),
                "val": torch.as_tensor(csr.data, device=dev),
                "ccol": torch.as_tensor(indptr, device=dev),
                "crows": torch.as_tensor(rows, device=dev),
                "cvals": torch.as_tensor(vals, device=dev),
                "ccols": torch.as_tensor(cols, device=dev),
                "shift": torch.as_tensor(layer.stats.shift, device=dev),
            }
        return layer.cache["torch"]

    def _cross_sparse(self, x, y, b0, b1):
        import torch

        tx, ty = self._t(x), self._t(y)
        p0, p1 = int(x.cache["csc"][0][b0]), int(x.cache["csc"][0][b1])
        out = torch.zeros((b1 - b0) * y.d, dtype=torch.float64, device=self.device)
        counts_all = ty["crow"][1:] - ty["crow"][:-1]
        mean_row = max(1, y.nnz // max(y.n_rows, 1))
        step = max(1, self.budget.pair_chunk // mean_row)
        for e0 in range(p0, p1, step):
            e1 = min(e0 + step, p1)
            n = tx["crows"][e0:e1]
            counts = counts_all[n]
            rep = torch.repeat_interleave(torch.arange(len(n), device=self.device), counts)
            starts = ty["crow"][n] - (torch.cumsum(counts, 0) - counts)
            pos = torch.arange(rep.numel(), device=self.device) + starts[rep]
            flat = ((tx["ccols"][e0:e1] - b0) * y.d)[rep] + ty["col"][pos]
            out.index_add_(0, flat, tx["cvals"][e0:e1][rep] * ty["val"][pos])
        return out.view(b1 - b0, y.d)

    def _dense_rows(self, t: dict[str, Any], r0: int, r1: int, d: int):
        import torch

        a, b = int(t["crow"][r0]), int(t["crow"][r1])
        counts = t["crow"][r0 + 1 : r1 + 1] - t["crow"][r0:r1]
        rows = torch.repeat_interleave(torch.arange(r1 - r0, device=self.device), counts)
        out = torch.zeros((r1 - r0, d), dtype=torch.float64, device=self.device)
        out[rows, t["col"][a:b]] = t["val"][a:b]
        return out

    def _cross_dense(self, x, y, b0, b1):
        import torch

        tx, ty = self._t(x), self._t(y)
        # the source block as a row-sorted CSR on the device
        p0, p1 = int(x.cache["csc"][0][b0]), int(x.cache["csc"][0][b1])
        rows, order = torch.sort(tx["crows"][p0:p1], stable=True)
        crow = torch.zeros(x.n_rows + 1, dtype=torch.int64, device=self.device)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=x.n_rows), 0)
        blk = {"crow": crow, "col": (tx["ccols"][p0:p1] - b0)[order], "val": tx["cvals"][p0:p1][order]}
        out = torch.zeros((b1 - b0, y.d), dtype=torch.float64, device=self.device)
        for r0, r1 in _ranges(x.n_rows, self.budget.row_chunk(max(y.d, b1 - b0))):
            out += self._dense_rows(blk, r0, r1, b1 - b0).T @ self._dense_rows(ty, r0, r1, y.d)
        return out

    def best_match(self, x: PreparedLayer, y: PreparedLayer) -> BestMatch:
        import torch

        if x.n_rows != y.n_rows:
            raise ValueError(f"layers have {x.n_rows} and {y.n_rows} rows")
        rho = np.zeros(x.d)
        best = np.zeros(x.d, dtype=np.int64)
        if y.d == 0:
            return BestMatch(rho, best - 1)
        self._csc(x)
        shift_x = self._t(x)["shift"] * x.stats.n_rows
        shift_y = self._t(y)["shift"]
        dense = self.use_dense(x, y)
        cross = self._cross_dense if dense else self._cross_sparse
        for b0, b1 in _ranges(x.d, self.budget.block_cols(y.d, dense)):
            block = cross(x, y, b0, b1)
            block.sub_(torch.outer(shift_x[b0:b1], shift_y))
            values, arg = block.max(dim=1)
            rho[b0:b1] = values.cpu().numpy()
            best[b0:b1] = arg.cpu().numpy()
        rho[x.stats.dead] = 0.0
        best[x.stats.dead] = -1
        return BestMatch(rho, best)


def make_engine(device: str = "auto", path: str = "auto") -> NumpyEngine:
    """'auto' -> TorchEngine('cuda') if torch.cuda.is_available() else NumpyEngine(); 'cpu' -> numpy;
    'cuda' / 'cuda:N' -> TorchEngine on that device; 'torch-cpu' -> TorchEngine on CPU (for tests)."""
    if device == "cpu":
        return NumpyEngine(path)
    if device == "torch-cpu":
        return TorchEngine("cpu", path)
    import torch

    if device == "auto":
        return TorchEngine("cuda", path) if torch.cuda.is_available() else NumpyEngine(path)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            from sae.cli import InputError

            raise InputError(f"--device {device}: torch sees no CUDA device here")
        return TorchEngine(device, path)
    from sae.cli import InputError

    raise InputError(f"--device must be auto, cpu or cuda[:N], not '{device}'")
