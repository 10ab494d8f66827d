"""The sparse autoencoder: one module, six training objectives.

Shapes: x [n, d_in]; W_enc [d_in, d_sae]; b_enc [d_sae]; W_dec [d_sae, d_in]; b_dec [d_in].
Inputs are first multiplied by `cfg.input_scale` (training sets it so the mean squared norm is d_in);
reconstructions are divided by it, so users see input units. With s = input_scale:

    pre(x)   = (s x - b_dec) W_enc + b_enc                          [n, d_sae]
    codes    = act(pre)                                             [n, d_sae], >= 0
    x_hat    = (codes W_dec + b_dec) / s                            [n, d_in]

act is, per architecture:
- topk, matryoshka, msae_*: keep the k largest entries of `pre` per row, then ReLU (msae_* use k = cfg.k,
  the smallest nested level; `encode(x, k=d_sae)` gives MSAE's ungated ReLU path);
- batchtopk: at inference, JumpReLU with one global threshold (pre > threshold), estimated during
  training, so a row's codes never depend on its batch (the MSAE repo's BatchTopK keeps batch
  selection at inference: a bug we do not copy);
- relu: ReLU.

Training (`training_loss`) differs per architecture; see each `_loss_*` docstring. Decoder rows of the
constrained architectures are kept at unit norm after every step, with the gradient component
parallel to each row removed first (`constrain_decoder_`). The TopK-family training path is sparse:
the encoder backward and the decoder only touch the k selected latents per row (`_TopKEncode`,
`F.embedding_bag`), which is what makes it fast on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae.config import SAEConfig

CONSTRAINED = ("topk", "batchtopk", "msae_uw", "msae_rw", "matryoshka")


@dataclass
class TrainOutput:
    """One training step's result. Losses are scalars; codes describe the inference-k selection."""

    loss: Tensor  # the scalar to minimise
    recon_loss: Tensor  # mean squared error of the main reconstruction (scaled units)
    aux_loss: Tensor  # AuxK (topk family) or L1 penalty (relu); 0 otherwise
    x_hat: Tensor  # [n, d_in] main reconstruction, scaled units, detached
    fired: Tensor  # bool [d_sae]: latents active on at least one row of the batch
    l0: float  # mean active latents per row


class _TopKEncode(torch.autograd.Function):
    """ReLU(TopK(x W + b)) with a sparse backward; optionally also the AuxK selection.

    forward(x [n, d_in], W [d_in, d_sae], b [d_sae], k, dead [d_sae] bool | None, k_aux)
      -> values [n, k], indices [n, k], aux_values [n, k_aux'], aux_indices [n, k_aux']
    The backward never forms a dense [n, d_sae] gradient: grad_x is an embedding_bag over the
    selected encoder columns, grad_W is accumulated per selected latent (n * k * d_in work).
    """

    @staticmethod
    def forward(ctx, x, W, b, k, dead, k_aux):  # type: ignore[override]
        pre = torch.addmm(b, x, W)
        top = pre.topk(k, dim=1, sorted=False)
        idx = top.indices
        vals = top.values
        if dead is not None and k_aux > 0:
            aux = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1, sorted=False)
            aux_idx, aux_vals = aux.indices, aux.values
        else:
            aux_idx = idx.new_zeros((x.shape[0], 0))
            aux_vals = vals.new_zeros((x.shape[0], 0))
        all_idx = torch.cat([idx, aux_idx], 1)
        all_vals = torch.cat([vals, aux_vals], 1)
        ctx.save_for_backward(x, W, all_idx, all_vals > 0)
        ctx.k = k
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals.clamp_min(0), idx, aux_vals.clamp_min(0), aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):  # type: ignore[override]
        x, W, all_idx, positive = ctx.saved_tensors
        if g_aux is None or g_aux.numel() == 0:
            g = g_vals
            idx = all_idx[:, : ctx.k]
            positive = positive[:, : ctx.k]
        else:
            g = torch.cat([g_vals, g_aux], 1)
            idx = all_idx
        g = (g * positive).to(x.dtype)  # ReLU gate
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, W.t().contiguous(), per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W.shape[1], dtype=W.dtype, device=W.device)
            grad_b.index_add_(0, idx.reshape(-1), g.reshape(-1).to(W.dtype))
        if ctx.needs_input_grad[1]:
            grad_Wt = torch.zeros(W.shape[1], W.shape[0], dtype=W.dtype, device=W.device)
            for j in range(idx.shape[1]):  # chunk over k: never materialise [n, k, d_in]
                grad_Wt.index_add_(0, idx[:, j], g[:, j : j + 1] * x)
            grad_W = grad_Wt.t()
        return grad_x, grad_W, grad_b, None, None, None


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[n, j] * W_dec[indices[n, j]] -> [n, d_in] without a dense [n, d_sae] matrix."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


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

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu"):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        bound = math.sqrt(6 / cfg.d_in)  # kaiming-uniform for a [d_sae, d_in] matrix
        W_dec = (torch.rand(cfg.d_sae, cfg.d_in, generator=gen) * 2 - 1) * bound
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(device))
        self.W_enc = nn.Parameter(W_dec.t().clone().contiguous().to(device))  # tied init, a copy
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device))
        self.register_buffer("threshold", torch.zeros((), device=device))

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
        if arch == "batchtopk" and k is None:
            return torch.where(pre > self.threshold.clamp_min(0), pre, torch.zeros_like(pre))
        top = pre.topk(k or self.cfg.k, dim=1)
        return torch.zeros_like(pre).scatter_(1, top.indices, top.values.clamp_min(0))

    def decode(self, codes: Tensor) -> Tensor:
        """[n, d_sae] -> [n, d_in] reconstruction in input units."""
        return (codes @ self.W_dec + self.b_dec) / self.cfg.input_scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """x [n, d_in] -> (reconstruction [n, d_in], codes [n, d_sae], training losses by name)."""
        codes = self.encode(x)
        out = self.training_loss(x.to(self.W_enc.dtype) * self.cfg.input_scale)
        return self.decode(codes), codes, {"loss": out.loss, "recon": out.recon_loss, "aux": out.aux_loss}

    # ---- training --------------------------------------------------------------------------------
    def training_loss(self, xs: Tensor, dead: Tensor | None = None) -> TrainOutput:
        """xs [n, d_in] already scaled; `dead` bool [d_sae] marks latents for the AuxK loss."""
        arch = self.cfg.architecture
        if arch in ("topk", "matryoshka"):
            return self._loss_topk(xs, dead)
        if arch == "batchtopk":
            return self._loss_batchtopk(xs, dead)
        if arch.startswith("msae"):
            return self._loss_msae(xs)
        return self._loss_relu(xs)

    def _aux_loss(self, xs: Tensor, x_hat: Tensor, aux_vals: Tensor, aux_idx: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024): dead latents reconstruct the residual e = x - x_hat (x_hat
        detached); normalised by the residual's variance about its batch mean."""
        if aux_idx.shape[1] == 0:
            return xs.new_zeros(())
        e = xs - x_hat.detach()
        e_hat = sparse_decode(aux_vals, aux_idx, self.W_dec)
        denom = (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
        return (e_hat - e).pow(2).sum() / denom

    def _loss_topk(self, xs: Tensor, dead: Tensor | None) -> TrainOutput:
        """topk: MSE + aux_coef * AuxK. matryoshka: the mean MSE of every nested prefix's own
        reconstruction (latents >= prefix are dropped), with per-row TopK selection over the whole
        dictionary (Bussmann et al. use BatchTopK and add a b_dec-only term; we use per-row TopK so
        codes never depend on the batch) + AuxK."""
        k_aux = min(self.cfg.aux_k, int(dead.sum())) if dead is not None else 0
        vals, idx, aux_vals, aux_idx = _TopKEncode.apply(
            xs - self.b_dec, self.W_enc, self.b_enc, self.cfg.k, dead, k_aux)
        x_hat = sparse_decode(vals, idx, self.W_dec) + self.b_dec
        recon = (x_hat - xs).pow(2).mean()
        loss = recon
        if self.cfg.architecture == "matryoshka":
            prefix_losses = [recon]
            for p in self.cfg.prefix_sizes[:-1]:
                xp = sparse_decode(vals * (idx < p), idx, self.W_dec) + self.b_dec
                prefix_losses.append((xp - xs).pow(2).mean())
            loss = torch.stack(prefix_losses).mean()
        aux = self._aux_loss(xs, x_hat, aux_vals, aux_idx)
        loss = loss + self.cfg.aux_coef * aux
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=xs.device)
        fired[idx[vals > 0]] = True
        l0 = float((vals > 0).sum()) / xs.shape[0]
        return TrainOutput(loss, recon.detach(), aux.detach(), x_hat.detach(), fired, l0)

    def _loss_batchtopk(self, xs: Tensor, dead: Tensor | None) -> TrainOutput:
        """BatchTopK (Bussmann et al. 2024): keep the k * n largest ReLU pre-activations of the whole
        batch. The inference threshold is an EMA (rate 0.01) of the smallest kept value."""
        pre = torch.addmm(self.b_enc, xs - self.b_dec, self.W_enc)
        acts = pre.clamp_min(0)
        n = xs.shape[0]
        top = acts.flatten().topk(self.cfg.k * n, sorted=False)
        codes = torch.zeros_like(acts).flatten().scatter_(0, top.indices, top.values).view_as(acts)
        x_hat = codes @ self.W_dec + self.b_dec
        recon = (x_hat - xs).pow(2).mean()
        with torch.no_grad():
            kept = top.values[top.values > 0]
            if kept.numel():
                batch_min = kept.min()
                first = bool(self.threshold == 0)
                self.threshold.copy_(batch_min if first else 0.99 * self.threshold + 0.01 * batch_min)
        aux = xs.new_zeros(())
        k_aux = min(self.cfg.aux_k, int(dead.sum())) if dead is not None else 0
        if k_aux > 0:
            aux_top = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1, sorted=False)
            aux = self._aux_loss(xs, x_hat, aux_top.values.clamp_min(0), aux_top.indices)
        active = codes > 0
        return TrainOutput(recon + self.cfg.aux_coef * aux, recon.detach(), aux.detach(),
                           x_hat.detach(), active.any(0), float(active.sum()) / n)

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
        k = self.cfg.k
        with torch.no_grad():
            top_k = pre.topk(k, dim=1, sorted=False)
            vals_k = top_k.values.clamp_min(0)
            x_hat = sparse_decode(vals_k, top_k.indices, self.W_dec) + self.b_dec
            fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=xs.device)
            fired[top_k.indices[vals_k > 0]] = True
        recon = (x_hat - xs).pow(2).mean()
        return TrainOutput(loss, recon, xs.new_zeros(()), x_hat, fired,
                           float((vals_k > 0).sum()) / xs.shape[0])

    def _loss_relu(self, xs: Tensor) -> TrainOutput:
        """ReLU SAE: MSE + l1_coef * mean_n sum_i z_ni ||W_dec_i|| (decoder rows unconstrained while
        training; their norms are folded into the encoder when saved)."""
        z = torch.addmm(self.b_enc, xs - self.b_dec, self.W_enc).clamp_min(0)
        x_hat = z @ self.W_dec + self.b_dec
        recon = (x_hat - xs).pow(2).mean()
        penalty = (z * self.W_dec.norm(dim=1)).sum(1).mean()
        active = z > 0
        return TrainOutput(recon + self.cfg.l1_coef * penalty, recon.detach(), penalty.detach(),
                           x_hat.detach(), active.any(0), float(active.sum()) / xs.shape[0])

    # ---- decoder constraint ------------------------------------------------------------------------
    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the component of each decoder row's gradient parallel to that (unit) row."""
        if self.cfg.architecture in CONSTRAINED and self.W_dec.grad is not None:
            W, g = self.W_dec, self.W_dec.grad
            g -= (g * W).sum(1, keepdim=True) * W

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (constrained architectures)."""
        if self.cfg.architecture in CONSTRAINED:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_decoder_norms_(self) -> None:
        """Make decoder rows unit-norm without changing the function (exact for ReLU-type codes):
        W_dec[i] /= n_i, W_enc[:, i] *= n_i, b_enc[i] *= n_i, threshold unchanged only if all n_i = 1."""
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        if torch.allclose(norms, torch.ones_like(norms)):
            return
        if self.cfg.architecture != "relu":
            raise RuntimeError("only ReLU SAEs have unconstrained decoder norms to fold")
        self.W_dec /= norms[:, None]
        self.W_enc *= norms[None, :]
        self.b_enc *= norms

    @torch.no_grad()
    def init_b_dec_(self, xs: Tensor) -> None:
        """Initialise b_dec from a sample of scaled inputs xs [n, d_in] per cfg.b_dec_init."""
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(xs.cpu()).to(self.b_dec.device))
        elif self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(xs.double().mean(0).float().to(self.b_dec.device))
