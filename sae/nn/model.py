"""The sparse autoencoder: one module, six training objectives.

Shapes: x [n, d_in]; W_enc [d_in, d_sae]; b_enc [d_sae]; W_dec [d_sae, d_in]; b_dec [d_in].
Inputs are first multiplied by `cfg.input_scale` (training sets it so that the centred rows' mean squared
norm is d_in); reconstructions are divided by it, so users see input units. With s = input_scale:

    pre(x)   = (s x - b_dec) W_enc + b_enc                          [n, d_sae]
    codes    = act(pre)                                             [n, d_sae], >= 0
    x_hat    = (codes W_dec + b_dec) / s                            [n, d_in]

act is, per architecture:
- topk, matryoshka, msae_*: keep the k largest entries of `pre` per row, then ReLU (msae_* use k = cfg.k,
  the smallest nested level; `encode(x, k=d_sae)` gives MSAE's ungated ReLU path);
- batchtopk: at inference, JumpReLU with one global threshold (pre > threshold), estimated during
  training, so a row's codes never depend on its batch (the MSAE repo's BatchTopK keeps batch
  selection at inference: a bug we do not copy);
- relu: ReLU;
- jumprelu (read from SAELens folders, inference only): pre * (pre > threshold_i), one threshold per latent.

Training (`training_loss`) differs per architecture; see each `_loss_*` docstring. Decoder rows of the
constrained architectures are kept at unit norm after every step, with the gradient component
parallel to each row removed first (`remove_parallel_grad_`, `normalize_decoder_`), unless
cfg.unit_decoder is off (the original repo's recipe; cfg.encoder_bias off keeps b_enc = 0, and
cfg.decoder_bias off keeps b_dec = 0, the Bridge Score paper's joint SAE). The training path
of topk, batchtopk and matryoshka is sparse: the encoder backward and the decoder only touch the
selected latents of each row (k per row, or k * batch in all for batchtopk): `_SelectedPreActs`,
`sparse_t_matmul`, `F.embedding_bag`; AuxK touches only the dead latents. This is what makes it fast on
CPU (bench/train_sae.py).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae.nn.config import SAEConfig
from sae.util import distributed

CONSTRAINED = ("topk", "batchtopk", "msae_uw", "msae_rw", "matryoshka")
# AuxK is computed densely (BLAS products over the dead columns only) when there are at most this many
# times k_aux dead latents, else sparsely. On 2 CPU cores (d_in 768, batch 4096, k_aux 384) the dense
# path's whole training step was 2.3x / 1.5x / 1.1x / 0.94x / 0.73x as fast at 1 / 2 / 4 / 6 / 8 x k_aux.
DENSE_AUX_RATIO = 4
# The topk family's encoder starts at ENC_INIT_SCALE * W_dec^T (peers: sparsify's kaiming-scaled encoder is
# ~0.58 W_dec^T, SAELens' 0.1). Small pre-activations at the start let Adam's first steps set the encoder's
# scale instead of undoing a unit-norm one. bench/quality.py, d 32, d_sae 256, 400 steps, TopK, cosine / FVU,
# encoder at 1 / 0.5 / 0.2 / 0.1 x W_dec^T: 8x superposition, heavy-tailed, k 8: 0.585 / 0.222, 0.657 / 0.147,
# 0.660 / 0.147, 0.664 / 0.155; 4x, heavy-tailed, offset 10, k 32: 0.461 / 0.132, 0.535 / 0.045, 0.578 / 0.034,
# 0.582 / 0.036. msae_* keep the tied unit start of the MSAE code; relu learns its scale through the L1 term.
ENC_INIT_SCALE = 0.2
SCALED_START = ("topk", "batchtopk", "matryoshka")


@dataclass
class TrainOutput:
    """One training step's result. Losses are scalars; codes describe the inference-k selection."""

    loss: Tensor  # the scalar to minimise
    recon_loss: Tensor  # mean squared error of the main reconstruction (scaled units)
    aux_loss: Tensor  # AuxK (topk family) or L1 penalty (relu); 0 otherwise
    x_hat: Tensor  # [n, d_in] main reconstruction, scaled units, detached
    fired: Tensor  # bool [d_sae]: latents active on at least one row of the batch
    l0: float  # mean active latents per row


class _SelectedPreActs(torch.autograd.Function):
    """Selected entries of the pre-activations x W + b, with a sparse backward.

    forward(x [n, d_in], W [d_in, d_sae], b [d_sae], pre [n, d_sae], rows [nnz], cols [nnz])
      -> pre[rows, cols] [nnz]
    `pre` must equal x W + b (the caller computes it without autograd, then selects). The backward
    never forms a dense [n, d_sae] gradient: with G the sparse [n, d_sae] matrix holding the output
    gradient at (rows, cols), grad_x = G W^T (an embedding_bag over the selected encoder columns),
    grad_W = (G^T x)^T (a CSR matrix product, sparse_t_matmul) and grad_b = column sums of G.
    Entries may come in any order and repeat neither (row, col) pair.
    """

    @staticmethod
    def forward(ctx, x, W, b, pre, rows, cols):  # type: ignore[override]
        ctx.save_for_backward(x, W, rows, cols)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, W, rows, cols = ctx.saved_tensors
        g = grad.to(x.dtype)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            if rows.numel() > 1 and bool((rows[1:] < rows[:-1]).any()):
                order = torch.argsort(rows, stable=True)
                rows_s, cols_s, g_s = rows[order], cols[order], g[order]
            else:
                rows_s, cols_s, g_s = rows, cols, g
            counts = torch.bincount(rows_s, minlength=x.shape[0])
            offsets = counts.cumsum(0) - counts
            grad_x = F.embedding_bag(
                cols_s, W.t().contiguous(), offsets, mode="sum", per_sample_weights=g_s.to(W.dtype)
            ).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W.shape[1], dtype=W.dtype, device=W.device)
            grad_b.index_add_(0, cols, g.to(W.dtype))
        if ctx.needs_input_grad[1]:
            grad_W = sparse_t_matmul(rows, cols, g, x, W.shape[1]).to(W.dtype).t()
        return grad_x, grad_W, grad_b, None, None, None


def sparse_t_matmul(rows: Tensor, cols: Tensor, values: Tensor, x: Tensor, n_cols: int) -> Tensor:
    """G^T x -> [n_cols, d_in], for x [n, d_in] and G [n, n_cols] holding `values` at (rows, cols).

    Built as a CSR matrix [n_cols, n] (entries grouped by column with a stable sort), so the
    product does n_nonzero * d_in work whatever the index distribution; repeated columns, as AuxK
    gives when all rows pick among the same few dead latents, cost nothing extra (an index_add_ of
    [n, d_in] slices per selected column is 10-20x slower there on CPU).
    """
    order = torch.argsort(cols, stable=True)
    crow = torch.zeros(n_cols + 1, dtype=torch.int64, device=x.device)
    crow[1:] = torch.bincount(cols, minlength=n_cols).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is stable
        warnings.simplefilter("ignore", UserWarning)
        G_t = torch.sparse_csr_tensor(crow, rows[order], values[order].to(x.dtype), (n_cols, x.shape[0]))
    return G_t @ x


def batch_topk_entries(pre: Tensor, total: int, start: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) [m] of the `total` largest positive entries of pre [n, d_sae], in row-major order.

    Equals a top-`total` over all n * d_sae entries (BatchTopK's selection; fewer entries when fewer
    are positive), without that slow top-k: each row's `start` largest entries are candidates, and
    tau is the total-th largest candidate (-inf while there are fewer candidates than `total`). An
    entry left out of row r is <= that row's smallest candidate, so once no row has a positive
    smallest candidate above tau the candidates hold the answer; rows that do get 4x more
    candidates, and the check repeats.
    """
    n, d = pre.shape
    done_vals: list[Tensor] = []
    done_flat: list[Tensor] = []
    pending = None  # rows still growing; None = all rows
    m = min(start, d)
    while True:
        block = pre if pending is None else pre.index_select(0, pending)
        top = block.topk(m, dim=1, sorted=False)
        row_ids = torch.arange(n, device=pre.device) if pending is None else pending
        flat = row_ids[:, None] * d + top.indices
        vals = torch.cat(done_vals + [top.values.flatten()])
        best = vals.topk(min(total, vals.numel()), sorted=False)
        tau = best.values.min() if vals.numel() >= total else float("-inf")  # fewer candidates: no bound
        smallest = top.values.min(1).values
        grow = (smallest > tau) & (smallest > 0) if m < d else torch.zeros_like(smallest, dtype=torch.bool)
        if not bool(grow.any()):
            chosen = torch.cat(done_flat + [flat.flatten()])[best.indices]
            chosen = chosen[best.values > 0].sort().values
            return chosen // d, chosen % d
        keep = ~grow
        done_vals.append(top.values[keep].flatten())
        done_flat.append(flat[keep].flatten())
        pending = row_ids[grow]
        m = min(4 * m, d)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, offsets: Tensor | None = None) -> Tensor:
    """sum_j values[n, j] * W_dec[indices[n, j]] -> [n, d_in] without a dense [n, d_sae] matrix.

    With `offsets` [n], `values` and `indices` are flat [nnz] and row n owns entries
    offsets[n]:offsets[n + 1] (rows of different lengths, as BatchTopK gives)."""
    return F.embedding_bag(indices, W_dec, offsets, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's algorithm in float64: the point minimising the sum of distances to the rows of x."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-12):
            return y_new.float()
        y = y_new
    return y.float()


class SparseAutoencoder(nn.Module):
    """An SAE with parameters W_enc, b_enc, W_dec, b_dec (and `threshold` for batchtopk)."""

    threshold: Tensor  # [] buffer: batchtopk's inference threshold

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu"):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        if cfg.init == "original":  # the original repo: W_enc kaiming-uniform [d_in, d_sae], W_dec its unit rows^T
            W_enc = nn.init.kaiming_uniform_(torch.empty(cfg.d_in, cfg.d_sae), generator=gen)
            W_dec = W_enc.t() / W_enc.t().norm(dim=1, keepdim=True)
        else:
            bound = math.sqrt(6 / cfg.d_in)  # kaiming-uniform for a [d_sae, d_in] matrix
            W_dec = (torch.rand(cfg.d_sae, cfg.d_in, generator=gen) * 2 - 1) * bound
            W_dec /= W_dec.norm(dim=1, keepdim=True)
            W_enc = W_dec.t() * (ENC_INIT_SCALE if cfg.architecture in SCALED_START else 1.0)
        self.W_dec = nn.Parameter(W_dec.contiguous().to(device))
        self.W_enc = nn.Parameter(W_enc.clone().contiguous().to(device))  # a copy
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, device=device), requires_grad=cfg.encoder_bias)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device), requires_grad=cfg.decoder_bias)
        shape = (cfg.d_sae,) if cfg.architecture == "jumprelu" else ()  # one per latent, or batchtopk's global one
        self.register_buffer("threshold", torch.zeros(shape, device=device))

    # ---- inference -------------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """[n, d_in] input units -> [n, d_sae] pre-activations."""
        x = x.to(self.W_enc.dtype) * self.cfg.input_scale
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def encode(self, x: Tensor, k: int | None = None) -> Tensor:
        """[n, d_in] -> dense codes [n, d_sae] (>= 0). `k` overrides the number kept (TopK family)."""
        pre = self.pre_acts(x)
        arch = self.cfg.architecture
        if arch == "relu" or (k is not None and k >= self.cfg.d_sae):
            return pre.clamp_min(0)
        if arch in ("batchtopk", "jumprelu") and k is None:
            return torch.where(pre > self.threshold.clamp_min(0), pre, torch.zeros_like(pre))
        top = pre.topk(k or self.cfg.active_k, dim=1)
        return torch.zeros_like(pre).scatter_(1, top.indices, top.values.clamp_min(0))

    def decode(self, codes: Tensor) -> Tensor:
        """[n, d_sae] -> [n, d_in] reconstruction in input units."""
        return (codes @ self.W_dec + self.b_dec) / self.cfg.input_scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """x [n, d_in] -> (reconstruction [n, d_in], codes [n, d_sae], training losses by name).

        Reconstruction and codes are the inference ones (`encode`). Computing the losses changes no
        state except in a training step (training mode with autograd enabled), where batchtopk
        updates its inference threshold; in eval mode or under no_grad, forward() has no effect."""
        codes = self.encode(x)
        out = self.training_loss(x.to(self.W_enc.dtype) * self.cfg.input_scale)
        return self.decode(codes), codes, {"loss": out.loss, "recon": out.recon_loss, "aux": out.aux_loss}

    # ---- training --------------------------------------------------------------------------------
    def training_loss(self, xs: Tensor, dead: Tensor | None = None) -> TrainOutput:
        """xs [n, d_in] already scaled; `dead` bool [d_sae] marks latents for the AuxK loss."""
        arch = self.cfg.architecture
        if arch == "jumprelu":
            raise ValueError("jumprelu SAEs are read from other libraries for inference; they are not trained here")
        if arch in ("topk", "matryoshka"):
            return self._loss_topk(xs, dead)
        if arch == "batchtopk":
            return self._loss_batchtopk(xs, dead)
        if arch.startswith("msae"):
            return self._loss_msae(xs)
        return self._loss_relu(xs)

    def _aux_loss(self, xs: Tensor, x_hat: Tensor, xc: Tensor, pre: Tensor, dead: Tensor | None) -> Tensor:
        """AuxK (Gao et al. 2024): each row's k_aux = min(cfg.aux_k, number of dead latents) largest
        pre-activations among the dead latents reconstruct the residual e = x - x_hat (x_hat
        detached); the loss is its mean squared error, so that it weighs against the main MSE as in Gao
        et al. (both terms over the data variance): aux_coef * SSE_aux / SSE-scale of the main term. (We
        used to divide by the residual's variance instead, which weighs AuxK 1 / FVU times more, 21x on
        data with a large mean; measured with the encoder scale above, bench/quality.py as there, cosine
        / FVU: TopK 2x/uniform/offset 10/k 4 0.981 / 0.098 -> 0.990 / 0.091, BatchTopK 0.972 / 0.128 ->
        0.976 / 0.117, 8x/heavy/k 8 0.660 / 0.147 -> 0.663 / 0.145.)

        xs, x_hat, xc = xs - b_dec: [n, d_in]; pre [n, d_sae] (no autograd); dead bool [d_sae].
        Two equal computations, the cheaper one chosen: with few dead latents (at most
        DENSE_AUX_RATIO * k_aux) a dense product over the dead columns only (BLAS beats a gather of
        k_aux rows per sample there); otherwise the selected entries alone (`_SelectedPreActs`,
        `sparse_decode`)."""
        n_dead = int(dead.sum()) if dead is not None else 0
        k_aux = min(self.cfg.aux_k, n_dead)
        if k_aux == 0 or dead is None:
            return xs.new_zeros(())
        dead_idx = dead.nonzero().squeeze(1)  # [n_dead]
        with torch.no_grad():
            pre_dead = pre.index_select(1, dead_idx)  # [n, n_dead]
            pick = pre_dead.topk(k_aux, dim=1, sorted=False).indices  # [n, k_aux], columns of pre_dead
        if n_dead <= DENSE_AUX_RATIO * k_aux:
            pre_dead = torch.addmm(self.b_enc[dead_idx], xc, self.W_enc[:, dead_idx])  # with autograd
            keep = torch.zeros_like(pre_dead, dtype=torch.bool).scatter_(1, pick, True)
            e_hat = (pre_dead.clamp_min(0) * keep) @ self.W_dec[dead_idx]
        else:
            idx = dead_idx[pick]  # [n, k_aux] latent indices
            rows = torch.arange(xs.shape[0], device=xs.device).repeat_interleave(k_aux)
            vals = _SelectedPreActs.apply(xc, self.W_enc, self.b_enc, pre, rows, idx.flatten()).clamp_min(0)
            e_hat = sparse_decode(vals.view_as(idx), idx, self.W_dec)
        return (e_hat - (xs - x_hat.detach())).pow(2).mean()

    def _loss_topk(self, xs: Tensor, dead: Tensor | None) -> TrainOutput:
        """topk: MSE + aux_coef * AuxK. matryoshka: the mean MSE of every nested prefix's own
        reconstruction (latents >= prefix are dropped), with per-row TopK selection over the whole
        dictionary (Bussmann et al. use BatchTopK and add a b_dec-only term; we use per-row TopK so
        codes never depend on the batch) + AuxK. Sparse: only the k + k_aux selected latents of a row
        get gradient (`_SelectedPreActs`) or are decoded (`sparse_decode`)."""
        xc = xs - self.b_dec
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, xc, self.W_enc)
            idx = pre.topk(self.cfg.active_k, dim=1, sorted=False).indices  # [n, k]
        n, k = idx.shape
        rows = torch.arange(n, device=xs.device).repeat_interleave(k)
        vals = _SelectedPreActs.apply(xc, self.W_enc, self.b_enc, pre, rows, idx.flatten()).clamp_min(0).view(n, k)
        x_hat = sparse_decode(vals, idx, self.W_dec) + self.b_dec
        recon = (x_hat - xs).pow(2).mean()
        loss = recon
        if self.cfg.architecture == "matryoshka":
            prefix_losses = [recon]
            for p in self.cfg.prefix_sizes[:-1]:
                xp = sparse_decode(vals * (idx < p), idx, self.W_dec) + self.b_dec
                prefix_losses.append((xp - xs).pow(2).mean())
            loss = torch.stack(prefix_losses).mean()
        aux = self._aux_loss(xs, x_hat, xc, pre, dead)
        loss = loss + self.cfg.aux_coef * aux
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=xs.device)
        fired[idx[vals > 0]] = True
        l0 = float((vals > 0).sum()) / n
        return TrainOutput(loss, recon.detach(), aux.detach(), x_hat.detach(), fired, l0)

    def _loss_batchtopk(self, xs: Tensor, dead: Tensor | None) -> TrainOutput:
        """BatchTopK (Bussmann et al. 2024): keep the k * n largest ReLU pre-activations of the whole
        batch (`batch_topk_entries`), + AuxK as for topk. Sparse like topk: rows keep different
        numbers of latents, decoded with per-row offsets. While training, the inference threshold is
        an EMA (rate 0.01) of the smallest kept value, updated only by training steps (module in
        training mode and autograd enabled), so inference codes never depend on earlier calls; the
        trainer replaces it at the end by `estimate_threshold_` at the final weights."""
        xc = xs - self.b_dec
        n = xs.shape[0]
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, xc, self.W_enc)
            n_batch = distributed.batch_rows(n)  # the global batch under torchrun, else n
            rows, cols = batch_topk_entries(pre, self.cfg.active_k * n_batch, start=2 * self.cfg.active_k)  # row-major
            if n_batch != n:  # this rank's entries of the global batch's top k * n_batch
                keep = distributed.global_top_mask(pre[rows, cols], self.cfg.active_k * n_batch)
                rows, cols = rows[keep], cols[keep]
        n_kept = rows.numel()
        vals = _SelectedPreActs.apply(xc, self.W_enc, self.b_enc, pre, rows, cols).clamp_min(0)
        counts = torch.bincount(rows, minlength=n)
        x_hat = sparse_decode(vals, cols, self.W_dec, offsets=counts.cumsum(0) - counts) + self.b_dec
        recon = (x_hat - xs).pow(2).mean()
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                local_min = vals.min() if n_kept else pre.new_tensor(float("inf"))
                batch_min = distributed.all_min(local_min.to(self.threshold.dtype))  # every rank's kept values
                if bool(torch.isfinite(batch_min)):
                    first = bool(self.threshold == 0)
                    self.threshold.copy_(batch_min if first else 0.99 * self.threshold + 0.01 * batch_min)
        aux = self._aux_loss(xs, x_hat, xc, pre, dead)
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=xs.device)
        fired[cols] = True
        return TrainOutput(
            recon + self.cfg.aux_coef * aux, recon.detach(), aux.detach(), x_hat.detach(), fired, n_kept / n
        )

    def _loss_msae(self, xs: Tensor) -> TrainOutput:
        """Matryoshka over k (Zaigrajew et al. 2025): one dictionary, nested TopK levels k_1 < ... <
        k_h = d_sae on the same pre-activations; loss = sum_i w_i MSE_i / sum_i w_i with w_i = 1 (UW)
        or w_i = h - i + 1 (RW: the largest weight on the smallest k, as the MSAE code does; its
        comment says the reverse). MSE, not NMSE, as the MSAE README recommends. No AuxK (parity)."""
        pre = torch.addmm(self.b_enc, xs - self.b_dec, self.W_enc)
        levels = self.cfg.levels
        h = len(levels)
        weights = [1.0] * h if self.cfg.architecture == "msae_uw" else [float(h - i) for i in range(h)]
        sparse_levels = [k for k in levels if k < self.cfg.d_sae]
        losses = []
        if sparse_levels:
            top = pre.topk(max(sparse_levels), dim=1, sorted=True)
            vals = top.values.clamp_min(0)
            for k in sparse_levels:
                x_hat_k = sparse_decode(vals[:, :k], top.indices[:, :k], self.W_dec) + self.b_dec
                losses.append((x_hat_k - xs).pow(2).mean())
        if levels[-1] == self.cfg.d_sae:
            x_full = pre.clamp_min(0) @ self.W_dec + self.b_dec
            losses.append((x_full - xs).pow(2).mean())
        w = torch.tensor(weights, device=xs.device)
        loss = (torch.stack(losses) * w).sum() / w.sum()
        k = self.cfg.active_k
        with torch.no_grad():
            top_k = pre.topk(k, dim=1, sorted=False)
            vals_k = top_k.values.clamp_min(0)
            x_hat = sparse_decode(vals_k, top_k.indices, self.W_dec) + self.b_dec
            fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=xs.device)
            fired[top_k.indices[vals_k > 0]] = True
        recon = (x_hat - xs).pow(2).mean()
        return TrainOutput(loss, recon, xs.new_zeros(()), x_hat, fired, float((vals_k > 0).sum()) / xs.shape[0])

    def _loss_relu(self, xs: Tensor) -> TrainOutput:
        """ReLU SAE: MSE + l1_coef * mean_n sum_i z_ni ||W_dec_i|| (decoder rows unconstrained while
        training; their norms are folded into the encoder when saved)."""
        z = torch.addmm(self.b_enc, xs - self.b_dec, self.W_enc).clamp_min(0)
        x_hat = z @ self.W_dec + self.b_dec
        recon = (x_hat - xs).pow(2).mean()
        penalty = (z * self.W_dec.norm(dim=1)).sum(1).mean()
        active = z > 0
        return TrainOutput(
            recon + self.cfg.l1_coef * penalty,
            recon.detach(),
            penalty.detach(),
            x_hat.detach(),
            active.any(0),
            float(active.sum()) / xs.shape[0],
        )

    @torch.no_grad()
    def estimate_threshold_(self, batches: Iterable[Tensor]) -> int:
        """batchtopk: set the inference threshold at the current weights to the mean, over training
        batches xs [n, d_in] (scaled inputs), of the smallest activation BatchTopK keeps in each batch,
        as Bussmann et al. (2024) estimate it after training. Returns the number of rows used.

        The EMA kept during training lags the weights (seeded from the first batch, it left an inference
        L0 of 1.3 for k = 4 after a short run); estimated at the final weights from 32 batches of 4096
        rows, inference L0 is within a few percent of k (tests/test_trainer.py checks 10%)."""
        mins, rows, k = [], 0, int(self.cfg.k or 0)
        for xs in batches:
            pre = torch.addmm(self.b_enc, xs.to(self.W_enc.dtype) - self.b_dec, self.W_enc)
            r, c = batch_topk_entries(pre, k * len(xs), start=2 * k)
            if r.numel():
                mins.append(pre[r, c].min())
            rows += len(xs)
        if mins:
            self.threshold.copy_(torch.stack(mins).mean().to(self.threshold.dtype))
        return rows

    # ---- decoder constraint ------------------------------------------------------------------------
    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the component of each decoder row's gradient parallel to that (unit) row."""
        if self.cfg.architecture in CONSTRAINED and self.cfg.unit_decoder and self.W_dec.grad is not None:
            W, g = self.W_dec, self.W_dec.grad
            g -= (g * W).sum(1, keepdim=True) * W

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (constrained architectures, unless cfg.unit_decoder is off)."""
        if self.cfg.architecture in CONSTRAINED and self.cfg.unit_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_decoder_norms_(self) -> None:
        """Make decoder rows unit-norm without changing the function (exact for ReLU-type codes):
        W_dec[i] /= n_i, W_enc[:, i] *= n_i, b_enc[i] *= n_i (jumprelu: threshold[i] *= n_i); codes scale by n_i."""
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        if torch.allclose(norms, torch.ones_like(norms)):
            return
        if self.cfg.architecture not in ("relu", "jumprelu"):
            if not self.cfg.unit_decoder:
                return  # a free TopK-family decoder stays as trained: scaling would change the selection
            raise RuntimeError("only ReLU and JumpReLU SAEs have unconstrained decoder norms to fold")
        if self.cfg.architecture == "jumprelu":
            self.threshold *= norms
        self.W_dec /= norms[:, None]
        self.W_enc *= norms[None, :]
        self.b_enc *= norms

    @torch.no_grad()
    def init_b_dec_(self, xs: Tensor) -> None:
        """Initialise b_dec from a sample of scaled inputs xs [n, d_in] per cfg.b_dec_init."""
        if not self.cfg.decoder_bias:
            return  # no decoder bias: b_dec stays 0
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(xs.cpu()).to(self.b_dec.device))
        elif self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(xs.double().mean(0).float().to(self.b_dec.device))
