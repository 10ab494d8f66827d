"""SAE quality against peer trainers on planted data: the same rows, steps, batch and width for everyone.

Each cell of the grid is one planted regime (sae.nn.synthetic.planted_activations): n_concepts =
`ratio` * d unit atoms in d dimensions (superposition m/d), `active` atoms per row with uniform
U(0.5, 1.5) or heavy-tailed (log-normal, sigma 1) coefficients, a shared mean offset of norm
`--offsets`, an SAE of width `--expansion` * d with k active latents, trained for `steps` steps of
`--batch` rows. Contenders:

- ours: `train_saes` with its defaults (sae/nn/trainer.py; topk's peak lr is twice sparsify's, LR_SCALE) for
  --archs (topk, batchtopk, matryoshka);
- sparsify: a plain loop around EleutherAI sparsify's `SparseCoder` (TopK; its Adam lr rule
  2e-4 / sqrt(d_sae / 2^14), b_dec = the first batch's mean, loss FVU + AuxK / 32, both normalised by
  the batch variance, linear warm-up then linear decay to 0, as its trainer; our dead window);
  sparsify-const: the same with a constant lr after the warm-up (a plain loop without a schedule);
- saelens-<arch>: SAELens' training SAEs (TopK, BatchTopK, Matryoshka-BatchTopK) through their
  `training_forward_pass`, Adam with the same lr rule and schedule, AuxK / 32, inputs scaled to mean
  squared norm d_in (its `expected_average_only_in`), its own initialisation (decoder norm 0.1).
  saelens-batchtopk@k and saelens-matryoshka@k: the same trained weights with the inference threshold
  estimated at the final weights as ours is (Bussmann et al.'s estimate), so that they keep k at inference;
  SAELens' own threshold (an EMA over training) lets 2-3x k latents fire after these short runs;
- dl-<arch>: dictionary_learning's TopK, BatchTopK and Matryoshka-BatchTopK trainers (the last two by
  Bussmann et al.) through their own update step and recipe (`train_dictionary_learning`), with @k rows
  as SAELens'. Matryoshka peers get our prefixes (sae.nn.config: SAEConfig.prefix_sizes);
- atoms-<arch> (--start_at_atoms): ours with the same recipe, started at the truth (`start_at_atoms`):
  where the loss leads from the planted atoms. Below a peer there means the architecture's loss, not our
  optimisation, keeps it from that peer's score; above ours, that our usual start falls short of the loss.

Scores on held-out rows of the same regime, all in float64:
    cos   mean over the true atoms of the max cosine with a decoder row (sae.nn.synthetic.recovery)
    fvu   sum ||x - x_hat||^2 / sum ||x - mean x||^2 (inference codes)
    dead  fraction of latents that fire on no held-out row
    L0    mean number of active latents per held-out row (inference codes: batchtopk uses its threshold)
Each of our rows ends with cos / best peer cos, cos - best peer cos and FVU - best peer FVU against the
peers of the same architecture (topk: sparsify, sparsify-const, saelens-topk and dl-topk; batchtopk:
saelens-batchtopk, dl-batchtopk and their @k rows; matryoshka: the same for the two Matryoshkas), then the
two differences against every peer in the cell. Best cos is the highest; best FVU the lowest among the peers whose
inference L0 is within 10% of k (a peer whose threshold lets 2k latents fire is not a fair FVU reference;
when none keeps k, the lowest of all). The goal is ours >= best peer: cos no lower by more than 0.01 and
FVU no higher by more than 0.01 ("ok", else "BELOW"). The best cos and the best FVU may come from two
peers (a trade-off, e.g. an lr schedule that buys cos with FVU), so the summary also counts the cells
where one peer that keeps k is better than ours on both by more than 0.01, and those where no trainer, ours
or a peer, meets the goal against all the others (the goal's two bests are then two trainers' that no one
reaches together).

    uv sync --group bench      # then run it as `uv run --group bench python bench/quality.py ...`:
    bench/quality.py           # the full grid, d 64, batch 4096, 400 and 4000 steps: a day on 2 cores
    # docs/quality.md reports bench/results/quality-*.json; each holds the arguments that made it ("args"):
    bench/quality.py --d 64 --rows 40000 --batch 1024 --steps 200 --budgets 1 --json short.json  # ~40 min
    bench/quality.py --d 64 --rows 40000 --batch 1024 --steps 200 --budgets 10 --ratios 2 8 --ks 8 \
        --offsets 0 --json long.json                                                           # ~40 min
    bench/quality.py ... --cells 4,heavy,0,8 8,uniform,10,8 --archs topk --peers sparsify  # chosen cells, trainers
    bench/quality.py ... --ks 8 --archs --peers dl-topk dl-batchtopk dl-matryoshka --json dl.json  # peers only
    bench/quality.py ... --cells 8,heavy,0,8 --peers --start_at_atoms  # ours from the usual start and from the atoms
    bench/quality.py ... --archs topk --peers --lr_scale 2 --json lr_x2.json  # ours at twice the default peak lr
    bench/quality.py --report short.json long.json [--markdown]   # the tables again, without training

Needs the `bench` dependency group (eai-sparsify, sae-lens, dictionary-learning); on CPU sparsify runs with
SPARSIFY_DISABLE_TRITON=1 (set here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae.nn import trainer  # noqa: E402
from sae.nn.config import SAEConfig, TrainConfig  # noqa: E402
from sae.nn.model import batch_topk_entries  # noqa: E402
from sae.nn.sources import ActivationSource  # noqa: E402
from sae.nn.synthetic import PlantedData, planted_activations, recovery  # noqa: E402
from sae.nn.trainer import (  # noqa: E402
    THRESHOLD_ROWS,
    SAESpec,
    default_dead_window,
    default_lr,
    sparsify_lr,
    train_saes,
)

# encode: x [n, d] float32 (input units) -> dense codes [n, d_sae]; decode: codes -> [n, d]
Model = tuple[np.ndarray, Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


PEER_ARCH = {
    "sparsify": "topk",
    "sparsify-const": "topk",
    "saelens-topk": "topk",
    "saelens-batchtopk": "batchtopk",
    "saelens-batchtopk@k": "batchtopk",  # SAELens' weights, the threshold estimated as ours (train_saelens)
    "saelens-matryoshka": "matryoshka",
    "saelens-matryoshka@k": "matryoshka",
    "dl-topk": "topk",
    "dl-batchtopk": "batchtopk",
    "dl-batchtopk@k": "batchtopk",
    "dl-matryoshka": "matryoshka",
    "dl-matryoshka@k": "matryoshka",
}

OURS = ["ours-topk", "ours-batchtopk", "ours-matryoshka"]  # the order of the tables
ATOMS = ["atoms-topk", "atoms-batchtopk", "atoms-matryoshka"]  # ours started at the planted atoms


@dataclass
class Cell:
    ratio: int
    coef: str
    offset: float
    k: int
    steps: int

    def name(self) -> str:
        return f"m/d={self.ratio} {self.coef:<7} offset={self.offset:<4g} k={self.k:<2} steps={self.steps}"


def make_data(cell: Cell, args: argparse.Namespace) -> tuple[PlantedData, np.ndarray]:
    """Training rows and held-out rows [n_eval, d] of one regime (same dictionary)."""
    data = planted_activations(
        n=args.rows + args.eval_rows,
        d=args.d,
        n_concepts=cell.ratio * args.d,
        active_per_row=args.active,
        noise=0.05,
        offset=cell.offset,
        coefficients=cell.coef,
        seed=args.seed,
    )
    held = data.x[args.rows :]
    data.x = data.x[: args.rows]
    return data, held


def batches(n_rows: int, batch: int, steps: int, seed: int):
    """Row indices of `steps` batches: shuffled epochs, as every contender sees them."""
    rng = np.random.default_rng(seed)
    step = 0
    while True:
        order = rng.permutation(n_rows)
        for start in range(0, n_rows - batch + 1, batch):
            if step == steps:
                return
            yield step, order[start : start + batch]
            step += 1


def schedule(steps: int, decay: bool = True) -> tuple[int, Callable[[int], float]]:
    """Warm-up and the lr multiplier: linear warm-up, then linear decay to 0 (sparsify's trainer) or constant."""
    warmup = min(1000, max(1, steps // 20))
    if not decay:
        return warmup, lambda s: (s + 1) / warmup if s < warmup else 1.0
    return warmup, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))


def train_ours(arch: str, cell: Cell, x: np.ndarray, args: argparse.Namespace) -> Model:
    cfg = SAEConfig(architecture=arch, d_sae=args.expansion * args.d, k=cell.k)
    epochs = cell.steps / math.ceil(len(x) / args.batch)
    lr = args.lr_scale * default_lr(cfg) if args.lr_scale != 1 else None  # None: the trainer's default
    tcfg = TrainConfig(epochs=epochs, batch_size=args.batch, device="cpu", eval_rows=4096, lr=lr)
    with tempfile.TemporaryDirectory() as tmp:
        sae = train_saes(ActivationSource({"x": [x]}), [SAESpec("", "x", cfg)], tcfg, tmp, progress=False)[""].sae
    sae.eval()
    return sae.W_dec.detach().numpy(), sae.encode, sae.decode


@contextmanager
def start_at_atoms(atoms: np.ndarray) -> Iterator[None]:
    """Within it, our trainer starts as usual (b_dec, input scale, the other latents), then sets its first
    n_concepts decoder rows to the planted atoms [n_concepts, d] and the matching encoder columns to them at
    the start's encoder norm (cos 1 before any step). Made by wrapping the trainer's `_prepare`."""
    prepare = trainer._prepare

    def prepared(*args: Any, **kwargs: Any) -> list:
        saes = prepare(*args, **kwargs)
        for sae in saes:
            n = min(len(atoms), sae.cfg.d_sae)
            a = torch.as_tensor(atoms[:n], dtype=sae.W_dec.dtype, device=sae.W_dec.device)
            with torch.no_grad():
                enc_norm = sae.W_enc[:, :n].norm(dim=0, keepdim=True)
                sae.W_dec[:n] = a
                sae.W_enc[:, :n] = a.t() * enc_norm
        return saes

    trainer._prepare = prepared
    try:
        yield
    finally:
        trainer._prepare = prepare


def train_sparsify(cell: Cell, x: np.ndarray, args: argparse.Namespace, decay: bool = True) -> Model:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(args.seed)
    d_sae = args.expansion * args.d
    sae = SparseCoder(args.d, SparseCoderConfig(num_latents=d_sae, k=cell.k))
    opt = torch.optim.Adam(sae.parameters(), lr=sparsify_lr(d_sae))
    warmup, factor = schedule(cell.steps, decay)
    window = default_dead_window(len(x), cell.steps * args.batch, args.batch)
    since = torch.zeros(d_sae, dtype=torch.long)
    xt = torch.from_numpy(x)
    for step, rows in batches(len(x), args.batch, cell.steps, args.seed):
        xb = xt[rows]
        if step == 0:
            sae.b_dec.data = xb.mean(0)
        out = sae(xb, dead_mask=since > window)
        loss = out.fvu + out.auxk_loss / 32
        opt.zero_grad()
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        for g in opt.param_groups:
            g["lr"] = sparsify_lr(d_sae) * factor(step)
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
        since += len(rows)
        since[out.latent_indices.flatten()] = 0

    def encode(xb: torch.Tensor) -> torch.Tensor:
        enc = sae.encode(xb)
        return torch.zeros(len(xb), d_sae).scatter_(1, enc.top_indices, enc.top_acts)

    W_dec = sae.W_dec
    assert W_dec is not None  # a SparseCoder built with a decoder (not a transcoder without one)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return z @ W_dec + sae.b_dec

    return W_dec.detach().numpy(), encode, decode


def train_saelens(arch: str, cell: Cell, x: np.ndarray, args: argparse.Namespace) -> dict[str, Model]:
    """{"saelens-<arch>": as SAELens saves it} and, for its threshold SAEs (batchtopk, matryoshka), also
    {"saelens-<arch>@k": the same weights with the threshold estimated at the final weights as ours is
    (`SparseAutoencoder.estimate_threshold_`: the mean over training batches of the smallest value BatchTopK
    keeps), so that its inference L0 is k and its FVU compares with ours at the same L0."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(args.seed)
    d_sae = args.expansion * args.d
    common = dict(d_in=args.d, d_sae=d_sae, k=cell.k, aux_loss_coefficient=1 / 32, device="cpu")
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common))
    elif arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    else:
        widths = our_prefixes(cell, args)
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=widths, **common))
    xt = torch.from_numpy(x)
    scale = math.sqrt(args.d / float(xt[:16384].double().pow(2).sum(1).mean()))
    lr = sparsify_lr(d_sae)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    _, factor = schedule(cell.steps)
    window = default_dead_window(len(x), cell.steps * args.batch, args.batch)
    since = torch.zeros(d_sae, dtype=torch.long)
    for step, rows in batches(len(x), args.batch, cell.steps, args.seed):
        xb = xt[rows] * scale
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=xb,
                coefficients={},
                dead_neuron_mask=since > window,
                n_training_steps=step,
                is_logging_step=False,
            )
        )
        opt.zero_grad()
        out.loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr * factor(step)
        opt.step()
        since += len(rows)
        since[(out.feature_acts > 0).any(0)] = 0
    sae.eval()
    # the inference function SAELens saves: W_dec folded to unit norm, BatchTopK as a JumpReLU
    with torch.no_grad():
        norms = sae.W_dec.norm(dim=1)
        W_enc = sae.W_enc * norms if sae.cfg.rescale_acts_by_decoder_norm else sae.W_enc * 1
        b_enc = sae.b_enc * norms if sae.cfg.rescale_acts_by_decoder_norm else sae.b_enc * 1
        W_dec = sae.W_dec / norms[:, None]
        thr = float(getattr(sae, "topk_threshold", 0.0))

    def pre_acts(xb: torch.Tensor) -> torch.Tensor:
        return (xb * scale - sae.b_dec) @ W_enc + b_enc

    def encode(xb: torch.Tensor, thr: float = thr) -> torch.Tensor:
        pre = pre_acts(xb)
        if arch == "topk":
            top = pre.topk(cell.k, dim=1)
            return torch.zeros_like(pre).scatter_(1, top.indices, top.values.clamp_min(0))
        return pre * (pre > thr)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return (z @ W_dec + sae.b_dec) / scale

    name, W = f"saelens-{arch}", W_dec.detach().numpy()
    if arch == "topk":
        return {name: (W, encode, decode)}
    thr_k = threshold_at_k(pre_acts, x, cell.k, args)
    return {name: (W, encode, decode), name + "@k": (W, lambda xb: encode(xb, thr_k), decode)}


def train_dictionary_learning(arch: str, cell: Cell, x: np.ndarray, args: argparse.Namespace) -> dict[str, Model]:
    """{"dl-<arch>": dictionary_learning's TopKTrainer, BatchTopKTrainer or MatryoshkaBatchTopKTrainer (the
    latter two Bussmann et al.'s) through their own `update` step, and for the two threshold SAEs "dl-<arch>@k":
    the same weights with the threshold estimated at the final weights as ours is}. Their recipe: unit-norm
    tied start, lr 2e-4 / sqrt(d_sae / 2^14), grad-norm clip 1, uniform prefix weights, EMA threshold after the
    warm-up, inputs scaled to unit mean squared norm (their `normalize_activations`). Ours: the prefixes, the
    bench's warm-up, lr decay over the last 20 % (their demo's `decay_start`) and the dead window (their 10M
    tokens is more than these runs see)."""
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer

    d_sae = args.expansion * args.d
    warmup, _ = schedule(cell.steps)
    common: dict[str, Any] = dict(
        steps=cell.steps,
        activation_dim=args.d,
        dict_size=d_sae,
        k=cell.k,
        layer=0,
        lm_name="planted",
        warmup_steps=warmup,
        decay_start=max(warmup + 1, int(0.8 * cell.steps)),
        threshold_start_step=warmup,
        seed=args.seed,
        device="cpu",
    )
    if arch == "topk":
        trainer = TopKTrainer(**common)
    elif arch == "batchtopk":
        trainer = BatchTopKTrainer(**common)
    else:
        prefixes = our_prefixes(cell, args)
        groups = [b - a for a, b in zip([0, *prefixes[:-1]], prefixes)]
        trainer = MatryoshkaBatchTopKTrainer(**common, group_fractions=[g / d_sae for g in groups])
    trainer.dead_feature_threshold = default_dead_window(len(x), cell.steps * args.batch, args.batch)
    xt = torch.from_numpy(x)
    scale = 1 / math.sqrt(float(xt[:16384].double().pow(2).sum(1).mean()))
    for step, rows in batches(len(x), args.batch, cell.steps, args.seed):
        trainer.update(step, xt[rows] * scale)
    ae = trainer.ae.eval()
    W_dec = (ae.W_dec if arch == "matryoshka" else ae.decoder.weight.T).detach()

    def pre_acts(xb: torch.Tensor) -> torch.Tensor:
        return ae.encode(xb * scale, return_active=True, use_threshold=False)[2]  # ReLU'd pre-activations

    def encode(xb: torch.Tensor, thr: float | None = None) -> torch.Tensor:
        if thr is None:
            return ae.encode(xb * scale)  # their inference: per-row top k, or their saved threshold
        pre = pre_acts(xb)
        return pre * (pre > thr)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return ae.decode(z) / scale

    name, W = f"dl-{arch}", W_dec.numpy()
    if arch == "topk":
        return {name: (W, encode, decode)}
    thr_k = threshold_at_k(pre_acts, x, cell.k, args)
    return {name: (W, encode, decode), name + "@k": (W, lambda xb: encode(xb, thr_k), decode)}


def our_prefixes(cell: Cell, args: argparse.Namespace) -> list[int]:
    """Our matryoshka's default prefix sizes in this cell (SAEConfig.prefix_sizes), which the peers' Matryoshkas
    train at too, so that only the training differs."""
    return SAEConfig(architecture="matryoshka", d_sae=args.expansion * args.d, k=cell.k).prefix_sizes


def threshold_at_k(
    pre_acts: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, k: int, args: argparse.Namespace
) -> float:
    """Our inference threshold (`SparseAutoencoder.estimate_threshold_`, Bussmann et al.'s estimate) for a peer's
    final weights: the mean over the first epoch's training batches, up to THRESHOLD_ROWS rows, of the smallest
    value BatchTopK keeps. pre_acts: x [n, d] input units -> [n, d_sae]."""
    xt = torch.from_numpy(x)
    with torch.no_grad():
        n_batches = max(1, min(len(x) // args.batch, -(-THRESHOLD_ROWS // args.batch)))
        mins = []
        for _, rows in batches(len(x), args.batch, n_batches, args.seed):
            pre = pre_acts(xt[rows])
            r, c = batch_topk_entries(pre, k * len(rows), start=2 * k)
            mins.append(pre[r, c].min())
        return float(torch.stack(mins).mean())


def score(model: Model, data: PlantedData, held: np.ndarray) -> dict[str, float]:
    W_dec, encode, decode = model
    with torch.no_grad():
        xt = torch.from_numpy(held)
        z = torch.cat([encode(xt[i : i + 4096]) for i in range(0, len(xt), 4096)])
        x_hat = torch.cat([decode(z[i : i + 4096]) for i in range(0, len(z), 4096)])
    x64, r = held.astype(np.float64), x_hat.double().numpy()
    fvu = float(((x64 - r) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum())
    active = (z > 0).numpy()
    return {
        "cos": recovery(data.dictionary, W_dec),
        "fvu": fvu,
        "dead": float((~active.any(0)).mean()),
        "l0": float(active.sum(1).mean()),
    }


def by_row_norm(model: Model, data: PlantedData, held: np.ndarray, n_train: int) -> str:
    """Inference L0 per quartile of the held-out rows' norm, and how many of those latents match a planted
    atom of the row (the atom nearest to the latent's decoder row has a non-zero coefficient there)."""
    W_dec, encode, _ = model
    with torch.no_grad():
        xt = torch.from_numpy(held)
        active = torch.cat([encode(xt[i : i + 4096]) > 0 for i in range(0, len(xt), 4096)]).numpy()
    W = W_dec / np.maximum(np.linalg.norm(W_dec, axis=1, keepdims=True), 1e-12)
    nearest = (W @ data.dictionary.T).argmax(1)  # [d_sae] planted atom of each latent
    planted = data.coefficients[n_train:][:, nearest] > 0  # [n_held, d_sae]
    norms = np.linalg.norm(held, axis=1)
    edges = np.quantile(norms, [0, 0.25, 0.5, 0.75, 1])
    parts = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        rows = (norms >= lo) & (norms <= hi)
        a = active[rows]
        parts.append(f"{a.sum(1).mean():5.1f} ({(a & planted[rows]).sum(1).mean():.1f})")
    return "L0 (of them planted) by row-norm quartile, low to high: " + " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", type=int, nargs="+", default=[2, 4, 8], help="superposition m/d")
    p.add_argument("--coefs", nargs="+", default=["uniform", "heavy"], choices=["uniform", "heavy"])
    p.add_argument("--offsets", type=float, nargs="+", default=[0.0, 10.0], help="norm of the shared mean")
    p.add_argument("--ks", type=int, nargs="+", default=[4, 8, 32])
    p.add_argument("--steps", type=int, default=400, help="the short budget, in steps")
    p.add_argument("--budgets", type=int, nargs="+", default=[1, 10], help="multiples of --steps")
    p.add_argument("--archs", nargs="*", default=["topk", "batchtopk", "matryoshka"], help="ours to train")
    p.add_argument(
        "--peers",
        nargs="*",
        default=[
            "sparsify",
            "sparsify-const",
            "saelens-topk",
            "saelens-batchtopk",
            "saelens-matryoshka",
            "dl-topk",
            "dl-batchtopk",
            "dl-matryoshka",
        ],
    )
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--active", type=int, default=6, help="planted atoms per row")
    p.add_argument("--rows", type=int, default=80000)
    p.add_argument("--eval_rows", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cells", nargs="+", help="explicit cells ratio,coef,offset,k (e.g. 8,heavy,0,8) instead of the grid"
    )
    p.add_argument("--json", help="also write every score to this JSON file (rewritten after each cell)")
    p.add_argument("--by_norm", action="store_true", help="also print each trainer's L0 by row-norm quartile")
    p.add_argument(
        "--lr_scale",
        type=float,
        default=1.0,
        help="train ours at this multiple of the default peak lr (sae.nn.trainer.default_lr); the JSON's args "
        "carry a note that --report prints",
    )
    p.add_argument(
        "--start_at_atoms",
        action="store_true",
        help="also train each of --archs started at the planted atoms (rows atoms-<arch>; start_at_atoms)",
    )
    p.add_argument(
        "--report",
        nargs="+",
        help="train nothing: print the tables of these --json files (files of the same sizes merge; for the "
        "same cell and trainer the latest run's row counts)",
    )
    p.add_argument("--markdown", action="store_true", help="with --report: the summary as one markdown table")
    args = p.parse_args(argv)
    if args.report:  # files of the same sizes merge (e.g. one more peer run over the same grid)
        runs: dict[tuple, tuple[dict, list[dict]]] = {}
        files = [json.loads(Path(path).read_text()) for path in args.report]
        for path, saved in zip(args.report, files):  # a run made with another recipe says so in its "note"
            if "note" in saved["args"]:
                print(f"{path}: {saved['args']['note']}")
        # a later run's row for the same cell and trainer replaces an earlier one (files without a time first)
        for saved in sorted(files, key=lambda f: f["args"].get("run_at", "")):
            size = tuple(saved["args"][a] for a in ("d", "expansion", "active", "rows", "eval_rows", "batch", "seed"))
            runs.setdefault(size, (saved["args"], []))[1].extend(saved["results"])
        for run_args, results in runs.values():
            print("\n".join(_summary(results, markdown=True)) if args.markdown else _report(run_args, results))
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.run_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if args.lr_scale != 1:
        args.note = f"ours at peak lr x {args.lr_scale:g} (default_lr times --lr_scale)"
    print(_header(vars(args)))
    grid = [
        Cell(ratio, coef, offset, k, args.steps * budget)
        for ratio in args.ratios
        for coef in args.coefs
        for offset in args.offsets
        for k in args.ks
        for budget in args.budgets
    ]
    if args.cells:
        grid = [
            Cell(int(r), c, float(o), int(k), args.steps * b)
            for r, c, o, k in (spec.split(",") for spec in args.cells)
            for b in args.budgets
        ]
    results: list[dict] = []
    for cell in grid:
        data, held = make_data(cell, args)
        models: dict[str, Model] = {}
        for peer in args.peers:
            if peer.startswith("sparsify"):
                models[peer] = train_sparsify(cell, data.x, args, decay=peer == "sparsify")
            elif peer.startswith("dl-"):
                models.update(train_dictionary_learning(peer.split("-", 1)[1], cell, data.x, args))
            else:
                models.update(train_saelens(peer.split("-", 1)[1], cell, data.x, args))
        for arch in args.archs:
            models["ours-" + arch] = train_ours(arch, cell, data.x, args)
            if args.start_at_atoms:
                with start_at_atoms(data.dictionary):
                    models["atoms-" + arch] = train_ours(arch, cell, data.x, args)
        scores = {name: score(m, data, held) for name, m in models.items()}
        results += [{"cell": asdict(cell), "trainer": name, **r} for name, r in scores.items()]
        print("\n".join(_cell_lines(cell, scores)), flush=True)
        if args.by_norm:
            for name, m in models.items():
                print(f"{cell.name():<48} {name:<20} {by_row_norm(m, data, held, args.rows)}")
        if args.json:  # a long grid can be stopped and still reported
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print("\n".join(_summary(results)))
    return 0


def _report(args: dict, results: list[dict]) -> str:
    """The per-cell table and the summary of saved results (--json files of runs of the same sizes)."""
    lines = [_header(args)]
    for key, scores in _by_cell(results).items():
        known = [*PEER_ARCH, *OURS, *ATOMS]
        order = sorted(scores, key=lambda n: known.index(n) if n in known else len(known))
        lines += _cell_lines(Cell(*key), {n: scores[n] for n in order})
    return "\n".join(lines + _summary(results))


def _by_cell(results: list[dict]) -> dict[tuple, dict[str, dict]]:
    """Saved results grouped {Cell fields: {trainer: scores}}, in the order they were run."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in results:
        cells.setdefault(tuple(r["cell"].values()), {})[r["trainer"]] = r
    return cells


def _header(args: dict) -> str:
    return (
        f"d {args['d']}, d_sae {args['expansion'] * args['d']}, {args['active']} atoms per row, {args['rows']} rows, "
        f"batch {args['batch']}, held-out {args['eval_rows']} rows, seed {args['seed']}\n"
        f"{'cell':<48} {'trainer':<20} {'cos':>6} {'fvu':>6} {'dead':>6} {'L0':>6}   "
        f"{'vs same-architecture peers: cos/best dcos dfvu':<47} {'vs any peer: dcos dfvu'}"
    )


def _cell_lines(cell: Cell, scores: dict[str, dict[str, float]]) -> list[str]:
    """The cell's rows: every peer, then each of ours with its gaps to the best peers."""
    peers = {n: r for n, r in scores.items() if n in PEER_ARCH}
    lines = [f"{cell.name():<48} {n:<20} {_fmt(r)}" for n, r in peers.items()]
    for name, r in scores.items():
        if name in PEER_ARCH:
            continue
        cols = []
        for group, ref in _references(name, peers):
            dc, df = _gap(r, ref, cell.k)
            ratio = f"{r['cos'] / max(p['cos'] for p in ref.values()):>8.3f} " if group == "same" else ""
            cols.append(f"{ratio}{dc:>+6.3f} {df:>+6.3f} {'ok' if _ok(dc, df) else 'BELOW':<5}")
        if len(cols) == 1:  # no peer of our architecture in the cell: leave its columns blank
            cols.insert(0, " " * 28)
        lines.append(f"{cell.name():<48} {name:<20} {_fmt(r)}    {'      '.join(cols)}")
    return lines


def _gaps(results: list[dict]) -> dict[tuple[str, int, str], list[tuple[float, float, bool, bool]]]:
    """{(our trainer, steps, "same" | "any"): [(dcos, dfvu, dominated, unmet) per cell]}: gaps to the best peers,
    whether one peer alone is better on both (`_dominated`) and whether no trainer meets the goal (`_unmet`)."""
    gaps: dict[tuple[str, int, str], list[tuple[float, float, bool, bool]]] = {}
    for key, scores in _by_cell(results).items():
        cell = Cell(*key)
        peers = {n: r for n, r in scores.items() if n in PEER_ARCH}
        for name, r in scores.items():
            if name not in PEER_ARCH:
                for group, ref in _references(name, peers):
                    row = (*_gap(r, ref, cell.k), _dominated(r, ref, cell.k), _unmet({name: r, **ref}, cell.k))
                    gaps.setdefault((name, cell.steps, group), []).append(row)
    known = [*OURS, *ATOMS]
    rank = {name: known.index(name) if name in known else len(known) for name, _, _ in gaps}
    return dict(sorted(gaps.items(), key=lambda item: (item[0][1], rank[item[0][0]], item[0][2] == "any")))


def _summary(results: list[dict], markdown: bool = False) -> list[str]:
    """Per architecture and budget, against same-architecture peers and against every peer: the cells where
    the goal is met and the worst and mean gaps; as text lines, or as a markdown table (the README's)."""
    if markdown:
        out = [
            "| ours | steps | against | goal met | cos - best peer: worst / mean | FVU - best peer: worst / mean "
            "| one peer better on both | met by no trainer |",
            "|---|---|---|---|---|---|---|---|",
        ]
    else:
        out = [
            "summary: ours - best peer (cos: higher is better; fvu: lower is better; goal: dcos >= -0.01, dfvu <= 0.01)"
        ]
    for (name, steps, group), g in _gaps(results).items():
        dcs, dfs, n_ok = [d[0] for d in g], [d[1] for d in g], sum(_ok(d[0], d[1]) for d in g)
        n_dom, n_unmet = sum(d[2] for d in g), sum(d[3] for d in g)
        cos, fvu = f"{min(dcs):+.3f} / {np.mean(dcs):+.3f}", f"{max(dfs):+.3f} / {np.mean(dfs):+.3f}"
        if markdown:
            against = "same architecture" if group == "same" else "every peer"
            row = (
                f"| {name.removeprefix('ours-')} | {steps} | {against} | {n_ok}/{len(g)} | {cos} | {fvu} | {n_dom} "
                f"| {n_unmet} |"
            )
            out.append(row)
        else:
            out.append(
                f"  {name:<16} steps {steps:<5} vs {group:<4} peers: goal met in {n_ok}/{len(g)} cells | cos worst / "
                f"mean {cos} | fvu worst / mean {fvu} | one peer better on both in {n_dom} | met by no trainer in "
                f"{n_unmet}"
            )
    return out


def _references(name: str, peers: dict[str, dict[str, float]]) -> list[tuple[str, dict[str, dict[str, float]]]]:
    """("same", the peers of our architecture) when there are any, and ("any", every peer) when there are any."""
    same = {n: p for n, p in peers.items() if PEER_ARCH[n] == name.split("-", 1)[1]}
    return ([("same", same)] if same else []) + ([("any", peers)] if peers else [])


def _ok(dcos: float, dfvu: float) -> bool:
    return dcos >= -0.01 and dfvu <= 0.01


def _keeps_k(p: dict[str, float], k: int) -> bool:
    """Whether a trainer's inference L0 is within 10% of k (a fair FVU reference)."""
    return abs(p["l0"] - k) <= 0.1 * k


def _gap(r: dict[str, float], peers: dict[str, dict[str, float]], k: int) -> tuple[float, float]:
    """(cos - best peer cos, FVU - best peer FVU); the FVU reference keeps k (L0 within 10%) where one does."""
    keeping_k = [p["fvu"] for p in peers.values() if _keeps_k(p, k)]
    best_fvu = min(keeping_k) if keeping_k else min(p["fvu"] for p in peers.values())
    return r["cos"] - max(p["cos"] for p in peers.values()), r["fvu"] - best_fvu


def _dominated(r: dict[str, float], peers: dict[str, dict[str, float]], k: int) -> bool:
    """Whether one peer that keeps k is better than ours on both cos and FVU, each by more than 0.01."""
    return any(p["cos"] - r["cos"] > 0.01 and r["fvu"] - p["fvu"] > 0.01 for p in peers.values() if _keeps_k(p, k))


def _unmet(trainers: dict[str, dict[str, float]], k: int) -> bool:
    """Whether no trainer of the cell (ours and the peers compared with it) meets the goal against all the others:
    the best cos and the best FVU are then two trainers' and no trainer reaches both."""
    return not any(_ok(*_gap(r, {m: p for m, p in trainers.items() if m != n}, k)) for n, r in trainers.items())


def _fmt(r: dict[str, float]) -> str:
    return f"{r['cos']:>6.3f} {r['fvu']:>6.3f} {r['dead']:>6.1%} {r['l0']:>6.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
