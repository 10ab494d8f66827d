"""Streaming SAE evaluation metrics, accumulated batch by batch in float64.

`MetricsAccumulator.update(x, x_hat, codes)` takes one batch: the SAE inputs `x` [n, d_in], their
reconstructions `x_hat` [n, d_in] and the dense, non-negative SAE codes [n, d_sae]. A latent is
*active* on a row where its code is > 0. Only [d_in] and [d_sae] vectors and a few scalars are kept,
all float64 (counts int64) and on the device of the first batch; rows are never stored. Two
accumulators over disjoint data combine with `merge`.

With N rows seen, x̄ the per-dimension mean over all N rows, c_nj the code of latent j on row n,
a_nj = [c_nj > 0], and f_j = Σ_n a_nj / N the firing frequency of latent j, `compute()` reports:

    fvu                          Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄‖²   dataset-level FVU (NaN if the
                                 denominator is 0). Streamed: with S1_d = Σ_n x_nd and S2_d = Σ_n x_nd²,
                                 Σ_n ‖x_n − x̄‖² = Σ_d (S2_d − S1_d² / N). In float64 the cancellation is
                                 harmless unless |mean| / std of a dimension exceeds ~1e5.
    r2_overcomplete              1 − Σ_n ‖x_n − x̂_n‖² / Σ_nd (x_nd − m)², m the one mean of all N d_in
                                 entries: the R² of overcomplete (metrics.r2_score, the Bridge Score
                                 paper's library; without its +1e-6), higher than 1 − fvu when the
                                 dimensions' means differ
    cosine                       (1/N) Σ_n ⟨x_n, x̂_n⟩ / (‖x_n‖ ‖x̂_n‖). A row where both vectors are zero
                                 counts as 1 (a zero vector reconstructed exactly); a row where only
                                 one of them is zero counts as 0.
    mse                          (1/(N d_in)) Σ_n ‖x_n − x̂_n‖²
    l0                           (1/N) Σ_n Σ_j a_nj               mean number of active latents per row
    population_sparsity          (1/N) Σ_n (Σ_j a_nj / d_sae)     mean proportion of active latents per row
    mean_lifetime_sparsity       (1/d_sae) Σ_j f_j                mean firing frequency of the latents;
                                 equals population_sparsity (both are Σ_nj a_nj / (N d_sae)), the
                                 sanity check of the CLIP RN50/ViT report, §4.1
    dead_fraction                fraction of latents with f_j = 0
    dense_fraction               fraction of latents with f_j > dense_threshold (default 0.1)
    mean_activation              (1/(N d_sae)) Σ_nj c_nj
    mean_activation_when_active  mean over live latents of (Σ_n c_nj a_nj / Σ_n a_nj); NaN if none live
    near_zero_fraction           (1/(N d_sae)) #{(n, j): |c_nj| <= near_zero_eps} (default eps 1e-6);
                                 the report's "average fraction of near-zero activations" (§3.3)
    n_rows, n_dead, n_dense, d_in, d_sae

`per_sample_fvu` gives MSAE's per-sample FVU, a different quantity (see its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

_F64 = torch.float64
_SUMS = (  # the running sums of MetricsAccumulator, all additive over disjoint rows
    "_sum_x",
    "_sum_x2",
    "_sse",
    "_cos_sum",
    "_fire",
    "_active_sum",
    "_code_sum",
    "_pop_sum",
    "_near_zero",
)


def per_sample_fvu(x: Tensor, x_hat: Tensor) -> float:
    """MSAE's per-sample FVU: (1/N) Σ_n Var_d(x_n − x̂_n) / Var_d(x_n), over `x`, `x_hat` [n, d_in].

    The variances run across the d_in coordinates of one row (same normalisation for both, so the
    ddof choice cancels), then the ratio is averaged over rows, as MSAE's
    `metrics.py:explained_variance_full` does. This is NOT the dataset-level FVU of
    `MetricsAccumulator` (Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄‖²): it ignores a constant offset of the
    residual within a row and weights every row equally. Kept only for parity with MSAE numbers.
    A row with Var_d(x_n) = 0 gives inf or NaN, as in MSAE.
    """
    _check_pair(x, x_hat)
    x64 = x.detach().to(_F64)
    r = x64 - x_hat.detach().to(device=x64.device, dtype=_F64)
    ratio = r.var(dim=1, unbiased=False) / x64.var(dim=1, unbiased=False)
    return float(ratio.mean())


def _check_pair(x: Tensor, x_hat: Tensor) -> None:
    if x.ndim != 2 or x.shape != x_hat.shape:
        shapes = f"{tuple(x.shape)} and {tuple(x_hat.shape)}"
        raise ValueError(f"x and x_hat must both be [n, d_in]; got {shapes}")


@dataclass
class MetricsAccumulator:
    """Running sums for the metrics of the module docstring; feed batches with `update`."""

    d_in: int
    d_sae: int
    dense_threshold: float = 0.1
    near_zero_eps: float = 1e-6

    n_rows: int = field(default=0, init=False)
    _sum_x: Tensor = field(init=False, repr=False)  # float64 [d_in]   Σ_n x_nd
    _sum_x2: Tensor = field(init=False, repr=False)  # float64 [d_in]   Σ_n x_nd²
    _sse: Tensor = field(init=False, repr=False)  # float64 []       Σ_n ‖x_n − x̂_n‖²
    _cos_sum: Tensor = field(init=False, repr=False)  # float64 []       Σ_n cos(x_n, x̂_n)
    _fire: Tensor = field(init=False, repr=False)  # int64   [d_sae]  Σ_n a_nj
    _active_sum: Tensor = field(init=False, repr=False)  # float64 [d_sae]  Σ_n c_nj a_nj
    _code_sum: Tensor = field(init=False, repr=False)  # float64 []       Σ_nj c_nj
    _pop_sum: Tensor = field(init=False, repr=False)  # float64 []       Σ_n (Σ_j a_nj / d_sae)
    _near_zero: Tensor = field(init=False, repr=False)  # int64   []       #{|c_nj| <= eps}

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be >= 1; got {self.d_in}, {self.d_sae}")
        self._reset(torch.device("cpu"))

    def _reset(self, device: torch.device) -> None:
        self.n_rows = 0
        self._sum_x = torch.zeros(self.d_in, dtype=_F64, device=device)
        self._sum_x2 = torch.zeros(self.d_in, dtype=_F64, device=device)
        self._sse = torch.zeros((), dtype=_F64, device=device)
        self._cos_sum = torch.zeros((), dtype=_F64, device=device)
        self._fire = torch.zeros(self.d_sae, dtype=torch.int64, device=device)
        self._active_sum = torch.zeros(self.d_sae, dtype=_F64, device=device)
        self._code_sum = torch.zeros((), dtype=_F64, device=device)
        self._pop_sum = torch.zeros((), dtype=_F64, device=device)
        self._near_zero = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        """Where the accumulators live: the device of the first non-empty batch (CPU before it)."""
        return self._fire.device

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, codes: Tensor) -> None:
        """Add one batch: `x`, `x_hat` [n, d_in] (any float dtype), `codes` [n, d_sae] dense, >= 0."""
        _check_pair(x, x_hat)
        if x.shape[1] != self.d_in:
            raise ValueError(f"x has d_in={x.shape[1]}, expected {self.d_in}")
        if codes.shape != (x.shape[0], self.d_sae):
            raise ValueError(f"codes must be [{x.shape[0]}, {self.d_sae}]; got {tuple(codes.shape)}")
        n = x.shape[0]
        if n == 0:
            return
        if self.n_rows == 0 and self.device != x.device:
            self._reset(x.device)
        dev = self.device
        x64 = x.detach().to(device=dev, dtype=_F64)
        xh64 = x_hat.detach().to(device=dev, dtype=_F64)
        codes = codes.detach().to(dev)

        self._sum_x += x64.sum(0)
        self._sum_x2 += (x64 * x64).sum(0)
        self._sse += (x64 - xh64).square().sum()
        self._cos_sum += _row_cosines(x64, xh64).sum()

        active = codes > 0  # bool [n, d_sae]
        self._fire += active.sum(0)
        self._active_sum += torch.where(active, codes, 0).sum(0, dtype=_F64)
        self._code_sum += codes.sum(dtype=_F64)
        self._pop_sum += (active.sum(1, dtype=_F64) / self.d_sae).sum()
        mags = codes.abs()
        if mags.dtype.itemsize < 4:  # half precision would round eps itself (fp16(1e-6) > 1e-6)
            mags = mags.float()
        self._near_zero += (mags <= self.near_zero_eps).sum()
        self.n_rows += n

    def merge(self, other: MetricsAccumulator) -> None:
        """Add the sums of `other` (same d_in, d_sae, near_zero_eps; disjoint rows) into this one."""
        if (other.d_in, other.d_sae) != (self.d_in, self.d_sae):
            raise ValueError(f"cannot merge d_in/d_sae {other.d_in}/{other.d_sae} into {self.d_in}/{self.d_sae}")
        if other.near_zero_eps != self.near_zero_eps:
            raise ValueError("cannot merge accumulators with different near_zero_eps")
        if other.n_rows == 0:
            return
        if self.n_rows == 0 and self.device != other.device:
            self._reset(other.device)
        dev = self.device
        for name in _SUMS:
            getattr(self, name).add_(getattr(other, name).to(dev))
        self.n_rows += other.n_rows

    def _require_rows(self) -> int:
        if self.n_rows == 0:
            raise ValueError("no rows seen yet: call update() first")
        return self.n_rows

    def firing_counts(self) -> Tensor:
        """int64 [d_sae]: number of rows on which each latent was active."""
        return self._fire.clone()

    def lifetime_sparsity(self) -> Tensor:
        """float64 [d_sae]: fraction of rows on which each latent was active (its firing frequency)."""
        return self._fire.to(_F64) / self._require_rows()

    def mean_activation_when_active(self) -> Tensor:
        """float64 [d_sae]: mean code of each latent over the rows where it was active; NaN if never."""
        fire = self._fire.to(_F64)
        return torch.where(self._fire > 0, self._active_sum / fire.clamp(min=1), math.nan)

    def frequency_histogram(self, bins: int = 20, log10_range: tuple[float, float] | None = None) -> dict:
        """Histogram of log10(firing frequency) over the live latents, plus the dead-latent count.

        The default range is [log10(1/N), 0], every frequency a live latent can have after N rows, so
        histograms over the same N line up. Returns {"edges": [bins + 1 floats], "counts": [bins ints],
        "n_live", "n_dead", "n_out_of_range" (live latents outside a user-given range), "n_rows"}.
        """
        n = self._require_rows()
        fire = self._fire.cpu().numpy()
        live = fire > 0
        # 1/N is computed exactly as a count of 1 divided by N, so the rarest latent sits on the low edge.
        lo, hi = log10_range if log10_range is not None else (float(np.log10(1.0 / n)), 0.0)
        log_freq = np.log10(fire[live] / n)
        counts, edges = np.histogram(log_freq, bins=bins, range=(lo, hi))
        return {
            "edges": [float(e) for e in edges],
            "counts": [int(c) for c in counts],
            "n_live": int(live.sum()),
            "n_dead": int((~live).sum()),
            "n_out_of_range": int(live.sum() - counts.sum()),
            "n_rows": n,
        }

    def compute(self) -> dict[str, float | int]:
        """The summary of the module docstring as plain Python floats and ints."""
        n = self._require_rows()
        sse = float(self._sse)
        total_var = float((self._sum_x2 - self._sum_x.square() / n).sum())
        global_var = float(self._sum_x2.sum() - self._sum_x.sum().square() / (n * self.d_in))
        lifetime = self.lifetime_sparsity()
        n_dead = int((self._fire == 0).sum())
        n_dense = int((lifetime > self.dense_threshold).sum())
        per_latent_mean = self.mean_activation_when_active()
        live_means = per_latent_mean[self._fire > 0]
        return {
            "n_rows": n,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "fvu": sse / total_var if total_var > 0 else math.nan,
            "r2_overcomplete": 1 - sse / global_var if global_var > 0 else math.nan,
            "cosine": float(self._cos_sum) / n,
            "mse": sse / (n * self.d_in),
            "l0": float(self._fire.sum()) / n,
            "population_sparsity": float(self._pop_sum) / n,
            "mean_lifetime_sparsity": float(lifetime.mean()),
            "dead_fraction": n_dead / self.d_sae,
            "n_dead": n_dead,
            "dense_fraction": n_dense / self.d_sae,
            "n_dense": n_dense,
            "mean_activation": float(self._code_sum) / (n * self.d_sae),
            "mean_activation_when_active": float(live_means.mean()) if live_means.numel() else math.nan,
            "near_zero_fraction": int(self._near_zero) / (n * self.d_sae),
        }


def _row_cosines(x: Tensor, x_hat: Tensor) -> Tensor:
    """float64 [n]: cos(x_n, x̂_n); 1 where both rows are zero, 0 where exactly one is."""
    nx = x.norm(dim=1)
    nh = x_hat.norm(dim=1)
    denom = nx * nh
    cos = (x * x_hat).sum(1) / torch.where(denom > 0, denom, 1.0)
    both_zero = (nx == 0) & (nh == 0)
    cos = torch.where(denom > 0, cos.clamp(-1.0, 1.0), both_zero.to(x.dtype))
    return cos
