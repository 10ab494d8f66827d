"""Exact Pearson best matches between the features of two layers, from sparse codes or dense arrays.

For a source layer X [n_rows, d_x] and a target layer Y [n_rows, d_y] on the same rows, each column i
is first shifted by a constant c_i (0 for most columns, see below), x'_i = x_i - c_i, and

    s'_i  = sum_n x'_ni                            shifted column sum
    css_i = sum_n (x'_ni - s'_i / n_rows)^2         centred sum of squares, = sum x'^2 - s'^2 / n_rows
    corr_ij = (G_ij - s'_i s'_j / n_rows) / sqrt(css_i css_j),   G = X'^T Y'  (co-occurrence)

which is the exact Pearson correlation for any shifts (the same 1/n_rows in covariance and variances).
Moments are float64. Correlations are clipped to [-1, 1].

Shifts and accuracy. Without a shift, G_ij - s_i s_j / n cancels: its rounding error relative to
sqrt(css_i css_j) grows like eps * kappa with kappa_i = sum_n x_ni^2 / css_i = 1 + (mean_i / sd_i)^2,
which is huge for a nearly constant column (x = 1 + 1e-5 u: kappa ~ 1e11). So a column with
kappa > SHIFT_KAPPA = 16 is shifted by c_i = its mean rounded to float32. The values are float32 (or
fp16) and c_i is a float32, so every x_ni - c_i is exact in float64, and the shifted column has
kappa ~ 1: the result is accurate to ~1e-12 whatever the spread. The other columns lose at most a
factor 16. A column with kappa > 16 has fewer than 1/16 of zeros (kappa <= n_rows / n_zeros), so
making it dense costs little; ordinary sparse SAE codes (kappa ~ 1 / density) are never shifted and
keep the sparse fast path.

Dead features. A feature is dead when all its n_rows values (the zeros that are not stored included)
lie within DEAD_RANGE = 2^-20 (~9.5e-7, about 8 to 16 float32 units in the last place) of each other,
relative to the largest magnitude: max - min <= DEAD_RANGE * max |x|. This is exactly the constant
columns (all-zero, or any constant value, e.g. an fp16-rounded constant) and the columns whose only
variation is float32 round-off noise. A column that varies more, even on a single row, is alive and
its correlations are exact. A dead feature correlates 0 with everything: a dead source feature gets
rho = 0 and best = -1, and a dead target feature offers a correlation of 0 to every source feature.

The cross moment G comes from one of two paths, chosen per layer pair from the number of co-occurring
pairs (`Budget.dense_ratio`):
- sparse: every (source entry, target entry) pair on the same row is scattered into a dense float64
  block [block, d_y] of G (co-occurrence, cost ~ nnz_x * nnz_y / n_rows), for SAE codes; memory
  O(block * d_y) plus the codes as float64 CSR;
- dense: row chunks of both layers are densified (shifted, unscaled) and multiplied, cost
  ~ n_rows * d_x * d_y, for dense activations such as the original repo's format. Each row chunk of
  the target is densified once and multiplied by a whole super-block of source columns (as many as
  `Budget.dense_acc_entries` allows: one super-block up to d_x * d_y = 16.8M); the chunk products are
  added into a float64 accumulator. NumpyEngine's default `dense_dtype="float32"` multiplies in
  float32 (BLAS sgemm, exact products for fp16 values, float32 sums over at most 4096 rows: ~1e-6),
  which only picks the argmax; the chosen pair's correlation is then recomputed in float64
  (`pair_corr`), so rho is exact too (a near-tie within ~1e-6 may pick either feature).
  Nothing but the chunk buffers, the accumulator and the inputs (memory-mapped when read from disk)
  is held.
Two engines run this: `NumpyEngine` (CPU, used and tested in CI) and `TorchEngine` (CUDA when present,
float64 throughout; it also runs on CPU, which is how the tests check it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse

from sae.data.features import SparseCodes

DEAD_RANGE = 2.0**-20
SHIFT_KAPPA = 16.0

LayerData = SparseCodes | np.ndarray  # CSR codes, or a dense [n_rows, d] array (fp16/fp32, maybe mmapped)


class NonFiniteError(ValueError):
    """The layer holds NaN or inf values (`count` of them)."""

    def __init__(self, count: int):
        super().__init__(f"{count} non-finite values")
        self.count = count


def _check_finite(sums: np.ndarray, count) -> None:
    """A column holds a NaN or an inf exactly when its float64 sum is not finite (float32 values cannot
    overflow it); then count them (`count()`, a second pass only in that case)."""
    if not np.isfinite(sums).all():
        raise NonFiniteError(count())


@dataclass(frozen=True)
class ColumnStats:
    """Per-feature moments of a layer [n_rows, d], all [d]."""

    n_rows: int
    sums: np.ndarray  # float64: S_i = sum_n x_ni (the wMPPC weight)
    stored: np.ndarray  # int64: number of non-zero values
    shifted: np.ndarray  # bool: kappa_i > SHIFT_KAPPA, the column is shifted by center_i
    center: np.ndarray  # float64 holding a float32: mean_i rounded to float32 where shifted, else 0
    csums: np.ndarray  # float64: s'_i = sum_n (x_ni - center_i)
    css: np.ndarray  # float64: sum_n (x_ni - mean_i)^2, two-pass
    dead: np.ndarray  # bool: max - min <= DEAD_RANGE * max |x|

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
        """mean of the shifted column / sqrt(css) [d], 0 for dead features."""
        return self.csums / self.n_rows * self.inv_sd

    @property
    def n_dead(self) -> int:
        return int(self.dead.sum())

    @property
    def nnz(self) -> int:
        """Entries of the shifted layer in sparse form (a shifted column has every row)."""
        return int(np.where(self.shifted, self.n_rows, self.stored).sum())


def _finish_stats(
    n: int,
    sums: np.ndarray,
    sumsq: np.ndarray,
    stored: np.ndarray,
    vmin: np.ndarray,
    vmax: np.ndarray,
    shifted_moments,
    dead_range: float,
) -> ColumnStats:
    """Stats from first-pass sums (float64) and, for the shifted columns only, a second pass:
    shifted_moments(cols, c) -> (sum_n (x - c), sum_n (x - c)^2) over those columns."""
    mean = sums / n
    css = sumsq - sums * mean  # one pass: relative error <= kappa * eps * n, kappa <= SHIFT_KAPPA where kept
    dead = vmax - vmin <= dead_range * np.maximum(np.abs(vmax), np.abs(vmin))
    shifted = ~dead & ~(n * mean**2 <= (SHIFT_KAPPA - 1.0) * css)  # a garbage css (<= 0) counts as shifted
    center = np.where(shifted, mean.astype(np.float32).astype(np.float64), 0.0)
    csums = sums.copy()
    cols = np.flatnonzero(shifted)
    if len(cols):
        s1, s2 = shifted_moments(cols, center[cols])  # x - c is exact: c is a float32 near every value
        csums[cols] = s1
        css[cols] = s2 - s1 * (s1 / n)
    dead |= ~(css > 0)
    css[dead] = np.maximum(css[dead], 0.0)
    shifted &= ~dead
    center[~shifted] = 0.0
    csums[~shifted] = sums[~shifted]
    return ColumnStats(n, sums, stored, shifted, center, csums, css, dead)


def column_stats(data: LayerData, dead_range: float = DEAD_RANGE) -> ColumnStats:
    """Float64 moments of a [n_rows, d] layer, sparse codes (unstored zeros count) or a dense array.
    Raises NonFiniteError if it holds NaN or inf."""
    if not isinstance(data, SparseCodes):
        return _dense_column_stats(data, dead_range)
    n, d = data.n_rows, data.d_sae
    idx = np.asarray(data.indices)
    vals = np.asarray(data.values, dtype=np.float64)
    sums = np.bincount(idx, vals, minlength=d)
    _check_finite(sums, lambda: int((~np.isfinite(vals)).sum()))
    sumsq = np.bincount(idx, vals * vals, minlength=d)
    stored = np.bincount(idx, minlength=d)
    zeros = n - stored
    vmin, vmax = np.full(d, np.inf), np.full(d, -np.inf)
    np.minimum.at(vmin, idx, vals)
    np.maximum.at(vmax, idx, vals)
    vmin = np.where(zeros > 0, np.minimum(vmin, 0.0), vmin)
    vmax = np.where(zeros > 0, np.maximum(vmax, 0.0), vmax)

    def shifted_moments(cols: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        full = np.zeros(d)
        full[cols] = c
        dev = vals - full[idx]
        s1 = np.bincount(idx, dev, minlength=d) - zeros * full
        s2 = np.bincount(idx, dev * dev, minlength=d) + zeros * full**2
        return s1[cols], s2[cols]

    return _finish_stats(n, sums, sumsq, stored, vmin, vmax, shifted_moments, dead_range)


def cast_into(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[...] = src converted to out's dtype (fp16 -> fp32 through torch, ~10x faster than numpy)."""
    if src.dtype == np.float16 and src.flags.writeable:
        import torch

        torch.from_numpy(out).copy_(torch.from_numpy(src))
    else:
        np.copyto(out, src, casting="unsafe")
    return out


def _dense_column_stats(data: np.ndarray, dead_range: float, entries: int = 1 << 22) -> ColumnStats:
    n, d = data.shape
    step = max(1, entries // max(d, 1))
    buf = np.empty((min(step, n), d), dtype=np.float32 if data.dtype != np.float64 else np.float64)
    sums, sumsq = np.zeros(d), np.zeros(d)
    stored = np.zeros(d, dtype=np.int64)
    vmin, vmax = np.full(d, np.inf), np.full(d, -np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        for r0 in range(0, n, step):
            chunk = cast_into(data[r0 : r0 + step], buf[: min(step, n - r0)])
            sums += chunk.sum(0, dtype=np.float64)
            sumsq += np.einsum("ij,ij->j", chunk, chunk, dtype=np.float64)
            stored += np.count_nonzero(chunk, axis=0)
            np.minimum(vmin, chunk.min(0), out=vmin)
            np.maximum(vmax, chunk.max(0), out=vmax)
    _check_finite(sums, lambda: sum(int((~np.isfinite(data[r : r + step])).sum()) for r in range(0, n, step)))

    def shifted_moments(cols: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s1, s2 = np.zeros(len(cols)), np.zeros(len(cols))
        for r0 in range(0, n, step):
            dev = np.asarray(data[r0 : r0 + step, cols], dtype=np.float64) - c
            s1 += dev.sum(0)
            s2 += np.einsum("ij,ij->j", dev, dev)
        return s1, s2

    return _finish_stats(n, sums, sumsq, stored, vmin, vmax, shifted_moments, dead_range)


@dataclass
class BestMatch:
    """For each source feature: its best Pearson correlation in the target layer and which feature."""

    rho: np.ndarray  # float64 [d_x] in [-1, 1]; 0 for dead source features
    best: np.ndarray  # int64 [d_x]; index of the best target feature, -1 for dead source features


def _ranges(total: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, step):
        yield start, min(start + step, total)


@dataclass
class Budget:
    """Sizes that bound the working memory (in array entries)."""

    block_entries: int = 1 << 19  # sparse path: dense float64 cross-moment block [block, d_y]
    pair_chunk: int = 1 << 19  # sparse path: co-occurrence pairs scattered at once
    dense_ratio: float = 3e-3  # use the dense path when pairs > dense_ratio * n * d_x * d_y
    pad_waste: float = 2.0  # sparse path pads target rows to the longest when n * kmax <= this * nnz + n
    dense_acc_entries: int = 1 << 24  # dense path: float64 accumulator of a source super-block [cols, d_y]
    dense_row_entries: int = 1 << 23  # dense path: the target's densified row chunk [rows, d_y]
    dense_max_rows: int = 4096  # dense path: at most this many rows per chunk product (float32 sums)
    dense_min: int = 256  # dense super-blocks and row chunks are at least this big (BLAS efficiency)

    def block_cols(self, d_y: int) -> int:
        return max(1, self.block_entries // max(d_y, 1))

    def dense_cols(self, d_y: int) -> int:
        return max(self.dense_min, self.dense_acc_entries // max(d_y, 1))

    def dense_rows(self, d_y: int) -> int:
        return min(self.dense_max_rows, max(self.dense_min, self.dense_row_entries // max(d_y, 1)))


class PreparedLayer:
    """One layer ready for correlations: its stats, its data, and layouts built on first use (cached).

    `data` is the layer as read (CSR codes or a dense array, possibly memory-mapped) and is never copied
    whole except into the float64 CSR that the sparse path needs. A permuted layer (`permuted`) reads the
    rows of its base layer in another order.
    """

    def __init__(
        self, stats: ColumnStats, data: LayerData, perm: np.ndarray | None = None, base: PreparedLayer | None = None
    ):
        self.stats = stats
        self.data = data
        self.perm = perm  # row r is row perm[r] of `base`
        self.base = base
        self.cache: dict[str, Any] = {}

    @property
    def n_rows(self) -> int:
        return self.stats.n_rows

    @property
    def d(self) -> int:
        return self.stats.d

    @property
    def nnz(self) -> int:
        return self.stats.nnz

    def permuted(self, perm: np.ndarray) -> PreparedLayer:
        """The same layer with its rows reordered: row r of the result is row perm[r]."""
        base = self.base or self
        return PreparedLayer(self.stats, self.data, perm if self.perm is None else self.perm[perm], base)

    @property
    def csr(self) -> scipy.sparse.csr_matrix:
        """float64 CSR [n_rows, d] of (x - center) / sqrt(css) (dead columns -> 0)."""
        if "csr" not in self.cache:
            if self.base is not None:
                assert self.perm is not None, "permuted() gives a base together with a perm"
                self.cache["csr"] = self.base.csr[self.perm]
            elif isinstance(self.data, SparseCodes):
                self.cache["csr"] = self._csr_from_codes(self.data)
            else:
                self.cache["csr"] = self._csr_from_dense(self.data)
        return self.cache["csr"]

    def _csr_from_codes(self, codes: SparseCodes) -> scipy.sparse.csr_matrix:
        st, inv_sd = self.stats, self.stats.inv_sd
        n, d = codes.n_rows, codes.d_sae
        idx = np.asarray(codes.indices, dtype=np.int32)
        vals = np.asarray(codes.values, dtype=np.float64)
        indptr = np.asarray(codes.indptr, dtype=np.int64)
        if not st.shifted.any():
            return scipy.sparse.csr_matrix((vals * inv_sd[idx], idx, indptr), shape=(n, d))
        rows = np.repeat(np.arange(n), np.diff(indptr))
        keep = ~st.shifted[idx]
        cols = np.flatnonzero(st.shifted)
        pos = np.full(d, -1)
        pos[cols] = np.arange(len(cols))
        block = np.empty((n, len(cols)))
        block[:] = -st.center[cols]  # every row of a shifted column: x - c, exact
        block[rows[~keep], pos[idx[~keep]]] += vals[~keep]
        block *= inv_sd[cols]
        coo = scipy.sparse.coo_matrix(
            (
                np.concatenate([vals[keep] * inv_sd[idx[keep]], block.ravel()]),
                (
                    np.concatenate([rows[keep], np.repeat(np.arange(n), len(cols))]),
                    np.concatenate([idx[keep], np.tile(cols, n)]),
                ),
            ),
            shape=(n, d),
        )
        return coo.tocsr()

    def _csr_from_dense(self, data: np.ndarray) -> scipy.sparse.csr_matrix:
        inv_sd = self.stats.inv_sd
        parts = []
        step = max(1, (1 << 22) // max(self.d, 1))
        for r0 in range(0, self.n_rows, step):
            r1 = min(r0 + step, self.n_rows)
            chunk = self.dense_rows(r0, r1, slice(None), np.empty((r1 - r0, self.d)))
            chunk *= inv_sd
            parts.append(scipy.sparse.csr_matrix(chunk))
        return scipy.sparse.vstack(parts, format="csr") if parts else scipy.sparse.csr_matrix(data.shape)

    @property
    def value_dtype(self) -> np.dtype:
        """The narrowest float dtype that holds every value exactly (float32 for codes and fp16/fp32 arrays)."""
        if isinstance(self.data, SparseCodes) or self.data.dtype.itemsize <= 4:
            return np.dtype(np.float32)
        return np.dtype(np.float64)

    def dense_rows(self, r0: int, r1: int, cols: slice | np.ndarray, out: np.ndarray, shift: bool = True) -> np.ndarray:
        """Rows r0:r1 and columns `cols` (a slice, or indices) of the shifted layer x - center (unscaled;
        x itself with shift=False), written into `out` [r1-r0, n_cols] (float32 or float64, reused by the
        caller) and returned."""
        data = self.data
        rows: slice | np.ndarray = slice(r0, r1) if self.perm is None else self.perm[r0:r1]
        if isinstance(data, SparseCodes) and isinstance(rows, slice) and isinstance(cols, slice):
            b0, b1, _ = cols.indices(self.d)
            a, b = int(data.indptr[r0]), int(data.indptr[r1])
            idx = np.asarray(data.indices[a:b])
            at = np.repeat(np.arange(r1 - r0), np.diff(np.asarray(data.indptr[r0 : r1 + 1])))
            vals = np.asarray(data.values[a:b])
            if (b0, b1) != (0, self.d):
                keep = (idx >= b0) & (idx < b1)
                idx, at, vals = idx[keep], at[keep], vals[keep]
            out.fill(0)
            out[at, idx - b0] = vals
        elif isinstance(data, SparseCodes):  # permuted rows (null baseline) or chosen columns
            if "scipy" not in self.cache:
                self.cache["scipy"] = data.to_scipy()
            out[...] = self.cache["scipy"][rows][:, cols].toarray()
        elif isinstance(cols, slice):
            cast_into(data[rows, cols], out)
        else:
            cast_into(np.take(data[rows], cols, axis=1), out)  # (much faster than data[rows, cols])
        shifted = self.stats.shifted[cols]
        if shift and shifted.any():
            out[:, shifted] -= self.stats.center[cols][shifted].astype(out.dtype)
        return out


def pair_corr(
    x: PreparedLayer, y: PreparedLayer, b0: int, b1: int, cols: np.ndarray, entries: int = 1 << 22
) -> np.ndarray:
    """corr(x_i, y_{cols[i - b0]}) for i in b0:b1, float64 [b1-b0], by row chunks of the dense layers."""
    n, k = x.n_rows, b1 - b0
    rows = min(n, max(1, entries // max(2 * k, 1)))
    raw = [np.empty((rows, k), layer.value_dtype) for layer in (x, y)]  # the values, exactly
    cx, cy = x.stats.center[b0:b1], y.stats.center[cols]
    shifted = bool(cx.any() or cy.any())
    dev = [np.empty((rows, k)) for _ in range(2)] if shifted else []  # x - c in float64: exact
    dot = np.zeros(k)
    for r0, r1 in _ranges(n, rows):
        m = r1 - r0
        xr = x.dense_rows(r0, r1, slice(b0, b1), raw[0][:m], shift=False)
        yr = y.dense_rows(r0, r1, cols, raw[1][:m], shift=False)
        if shifted:
            xr, yr = np.subtract(xr, cx, out=dev[0][:m]), np.subtract(yr, cy, out=dev[1][:m])
        dot += np.einsum("ij,ij->j", xr, yr, dtype=np.float64)  # float32 products are exact in float64
    cov = dot - x.stats.csums[b0:b1] * (y.stats.csums[cols] / n)
    return cov * x.stats.inv_sd[b0:b1] * y.stats.inv_sd[cols]


class NumpyEngine:
    """CPU engine: numpy/scipy, single process; float64 moments, dense products in `dense_dtype`."""

    name = "numpy"
    device = "cpu"

    def __init__(self, path: str = "auto", budget: Budget | None = None, dense_dtype: str = "float32"):
        if path not in ("auto", "sparse", "dense"):
            raise ValueError(f"path must be auto, sparse or dense, not {path!r}")
        if dense_dtype not in ("float32", "float64"):
            raise ValueError(f"dense_dtype must be float32 or float64, not {dense_dtype!r}")
        self.path = path
        self.budget = budget or Budget()
        self.dense_dtype = dense_dtype

    def prepare(self, data: LayerData, stats: ColumnStats | None = None) -> PreparedLayer:
        """Sparse codes or a dense [n_rows, d] array, with its stats (computed if not given)."""
        return PreparedLayer(stats if stats is not None else column_stats(data), data)

    # layouts of the sparse path, built once per layer and cached
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
            csr = layer.csr
            counts = np.diff(csr.indptr)
            kmax = int(counts.max()) if len(counts) else 0
            if kmax == 0 or layer.n_rows * kmax > self.budget.pad_waste * csr.nnz + layer.n_rows:
                layer.cache["padded"] = None
            else:
                idx = np.zeros((layer.n_rows, kmax), dtype=np.int64)
                val = np.zeros((layer.n_rows, kmax))
                pos = np.arange(csr.nnz) - np.repeat(csr.indptr[:-1], counts)
                rows = np.repeat(np.arange(layer.n_rows), counts)
                idx[rows, pos] = csr.indices
                val[rows, pos] = csr.data
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
        ycsr = y.csr
        d_y, size = y.d, (b1 - b0) * y.d
        p0, p1 = int(indptr[b0]), int(indptr[b1])
        out: np.ndarray | None = None
        padded = self._padded(y)
        if padded is not None:
            pidx, pval = padded
            step = max(1, self.budget.pair_chunk // pidx.shape[1])
            chunks = [(e, min(e + step, p1)) for e in range(p0, p1, step)]
        else:
            counts = np.diff(ycsr.indptr)[rows[p0:p1]]
            cum = np.cumsum(counts)
            cuts = np.searchsorted(
                cum,
                np.arange(self.budget.pair_chunk, int(cum[-1]) if len(cum) else 0, self.budget.pair_chunk),
                side="right",
            )
            bounds = [p0, *(p0 + cuts), p1]
            chunks = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        for e0, e1 in chunks:
            n, a, local = rows[e0:e1], vals[e0:e1], (cols[e0:e1] - b0) * d_y
            if padded is not None:
                flat = local[:, None] + pidx[n]
                w = a[:, None] * pval[n]
            else:
                counts = np.diff(ycsr.indptr)[n]
                rep = np.repeat(np.arange(len(n)), counts)
                pos = np.arange(int(counts.sum())) + (ycsr.indptr[n] - (np.cumsum(counts) - counts))[rep]
                flat = local[rep] + ycsr.indices[pos]
                w = a[rep] * ycsr.data[pos]
            part = np.bincount(flat.ravel(), w.ravel(), minlength=size)
            if out is None:
                out = part
            else:
                out += part
        if out is None:
            out = np.zeros(size)
        return out.reshape(b1 - b0, d_y)

    def _sparse_blocks(self, x: PreparedLayer, y: PreparedLayer) -> Iterator[tuple[int, int, Any]]:
        """(b0, b1, corr [b1-b0, d_y]) for blocks of source features, by the sparse path."""
        shift_x = x.stats.n_rows * x.stats.shift
        shift_y = y.stats.shift
        for b0, b1 in _ranges(x.d, self.budget.block_cols(y.d)):
            block = self._cross_sparse(x, y, b0, b1)
            block -= np.multiply.outer(shift_x[b0:b1], shift_y)
            yield b0, b1, block

    def _dense_blocks(self, x: PreparedLayer, y: PreparedLayer) -> Iterator[tuple[int, int, Any]]:
        """(b0, b1, corr [b1-b0, d_y]) for super-blocks of source features, by chunked dense products.

        The buffers (row chunks of both layers, the chunk product) are allocated once and reused."""
        dtype = np.dtype(self.dense_dtype)
        n = x.n_rows
        cols, rows = min(x.d, self.budget.dense_cols(y.d)), min(n, self.budget.dense_rows(y.d))
        xbuf, ybuf = np.empty((rows, cols), dtype), np.empty((rows, y.d), dtype)
        prod = np.empty((cols, y.d), dtype)
        for b0, b1 in _ranges(x.d, cols):
            acc = np.multiply.outer(-x.stats.csums[b0:b1], y.stats.csums / n)  # - s'_i s'_j / n, then + G
            out = prod[: b1 - b0]
            for r0, r1 in _ranges(n, rows):
                yr = y.dense_rows(r0, r1, slice(None), ybuf[: r1 - r0])
                xr = x.dense_rows(r0, r1, slice(b0, b1), xbuf[: r1 - r0, : b1 - b0])
                np.matmul(xr.T, yr, out=out)
                acc += out
            acc *= x.stats.inv_sd[b0:b1, None]
            acc *= y.stats.inv_sd[None, :]
            yield b0, b1, acc

    def _row_max(self, block: Any) -> tuple[np.ndarray, np.ndarray]:
        arg = block.argmax(axis=1)
        return block[np.arange(block.shape[0]), arg], arg

    def best_match(self, x: PreparedLayer, y: PreparedLayer) -> BestMatch:
        """For every feature of x, max_j corr(x_i, y_j) over all features j of y (clipped to [-1, 1]),
        and the argmax. With float32 dense products, the argmax is found in float32 (a near-tie within
        ~1e-6 may pick either) and the correlation of the chosen pair is recomputed in float64."""
        if x.n_rows != y.n_rows:
            raise ValueError(f"layers have {x.n_rows} and {y.n_rows} rows")
        rho = np.zeros(x.d)
        best = np.zeros(x.d, dtype=np.int64)
        if y.d == 0:
            return BestMatch(rho, best - 1)
        dense = self.use_dense(x, y)
        for b0, b1, block in self._dense_blocks(x, y) if dense else self._sparse_blocks(x, y):
            rho[b0:b1], best[b0:b1] = self._row_max(block)
            del block
            if dense and self.dense_dtype != "float64":  # the winner's correlation again, in float64
                rho[b0:b1] = pair_corr(x, y, b0, b1, best[b0:b1])
        np.clip(rho, -1.0, 1.0, out=rho)
        rho[x.stats.dead] = 0.0
        best[x.stats.dead] = -1
        return BestMatch(rho, best)


class TorchEngine(NumpyEngine):
    """The same algorithm with torch on `device` (CUDA when present): index_add_ scatter, or float64 matmul."""

    name = "torch"

    def __init__(
        self, device: str = "cuda", path: str = "auto", budget: Budget | None = None, dense_dtype: str = "float64"
    ):
        super().__init__(
            path,
            budget
            or Budget(
                block_entries=1 << 24,
                pair_chunk=1 << 24,
                dense_ratio=1e-3,
                dense_acc_entries=1 << 26,
                dense_row_entries=1 << 24,
                dense_max_rows=1 << 16,
            ),
            dense_dtype,
        )
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
        mean_row = max(1, int(y.csr.nnz) // max(y.n_rows, 1))
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

    def _sparse_blocks(self, x, y):
        import torch

        self._csc(x)
        shift_x = self._t(x)["shift"] * x.stats.n_rows
        shift_y = self._t(y)["shift"]
        for b0, b1 in _ranges(x.d, self.budget.block_cols(y.d)):
            block = self._cross_sparse(x, y, b0, b1)
            block.sub_(torch.outer(shift_x[b0:b1], shift_y))
            yield b0, b1, block

    def _dense_blocks(self, x, y):
        import torch

        dtype = np.dtype(self.dense_dtype)
        dev, n = self.device, x.n_rows
        on = lambda a: torch.as_tensor(a, device=dev)  # noqa: E731
        isd_y, csum_y = on(y.stats.inv_sd), on(y.stats.csums / n)
        for b0, b1 in _ranges(x.d, self.budget.dense_cols(y.d)):
            acc = torch.zeros((b1 - b0, y.d), dtype=torch.float64, device=dev)
            for r0, r1 in _ranges(n, self.budget.dense_rows(y.d)):
                yr = on(y.dense_rows(r0, r1, slice(None), np.empty((r1 - r0, y.d), dtype)))
                xr = on(x.dense_rows(r0, r1, slice(b0, b1), np.empty((r1 - r0, b1 - b0), dtype)))
                acc += (xr.T @ yr).to(torch.float64)
                del xr, yr
            acc -= torch.outer(on(x.stats.csums[b0:b1]), csum_y)
            acc *= on(x.stats.inv_sd[b0:b1])[:, None]
            acc *= isd_y[None, :]
            yield b0, b1, acc

    def _row_max(self, block):
        values, arg = block.max(dim=1)
        return values.cpu().numpy(), arg.cpu().numpy()


GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")  # NVIDIA, ROCm, WSL


def make_engine(device: str = "auto", path: str = "auto") -> NumpyEngine:
    """'auto' -> TorchEngine('cuda') if torch.cuda.is_available() else NumpyEngine(); 'cpu' -> numpy;
    'cuda' / 'cuda:N' -> TorchEngine on that device; 'torch-cpu' -> TorchEngine on CPU (for tests).

    'auto' on a machine with no GPU device file (GPU_DEVICE_FILES) goes straight to numpy without
    importing torch, whose import alone costs ~600 MB of resident memory."""
    if device == "cpu" or (device == "auto" and not any(os.path.exists(f) for f in GPU_DEVICE_FILES)):
        return NumpyEngine(path)
    if device == "torch-cpu":
        return TorchEngine("cpu", path)
    import torch

    if device == "auto":
        return TorchEngine("cuda", path) if torch.cuda.is_available() else NumpyEngine(path)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            from sae.util.errors import InputError

            raise InputError(f"--device {device}: torch sees no CUDA device here")
        return TorchEngine(device, path)
    from sae.util.errors import InputError

    raise InputError(f"--device must be auto, cpu or cuda[:N], not '{device}'")
