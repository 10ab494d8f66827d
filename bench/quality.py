"""SAE quality against peer trainers on planted data: the same rows, steps, batch and width for everyone.

Each cell of the grid is one planted regime (sae.nn.synthetic.planted_activations): n_concepts =
`ratio` * d unit atoms in d dimensions (superposition m/d), `active` atoms per row with uniform
U(0.5, 1.5) or heavy-tailed (log-normal, sigma 1) coefficients, a shared mean offset of norm 0 or
`--big_offset`, an SAE of width `--expansion` * d with k active latents, trained for `steps` steps of
`--batch` rows. Contenders:

- ours: `train_saes` with its defaults (sae/nn/trainer.py) for --archs (topk, batchtopk, matryoshka);
- sparsify: a plain loop around EleutherAI sparsify's `SparseCoder` (TopK; its Adam lr rule
  2e-4 / sqrt(d_sae / 2^14), b_dec = the first batch's mean, loss FVU + AuxK / 32, both normalised by
  the batch variance, linear warm-up then linear decay to 0, as its trainer; our dead window);
- saelens-<arch>: SAELens' training SAEs (TopK, BatchTopK, Matryoshka-BatchTopK) through their
  `training_forward_pass`, Adam with the same lr rule and schedule, AuxK / 32, inputs scaled to mean
  squared norm d_in (its `expected_average_only_in`), its own initialisation (decoder norm 0.1).

Scores on held-out rows of the same regime, all in float64:
    cos   mean over the true atoms of the max cosine with a decoder row (sae.nn.synthetic.recovery)
    fvu   sum ||x - x_hat||^2 / sum ||x - mean x||^2 (inference codes)
    dead  fraction of latents that fire on no held-out row
    L0    mean number of active latents per held-out row (inference codes: batchtopk uses its threshold)
Each of our rows ends with cos / best peer cos (the highest cos of any peer in the cell) and FVU - best
peer FVU (the lowest FVU of the peers whose inference L0 is within 10% of k: a BatchTopK peer whose
threshold lets 6k latents fire is not a fair FVU reference). The goal is ours >= best peer: cos no
lower by more than 0.01 and FVU no higher by more than 0.01 ("ok", else "BELOW").

    uv sync --group bench
    uv run python bench/quality.py       # the full grid at the issue's size (d 64, batch 4096): hours on 2 cores
    uv run python bench/quality.py --d 32 --rows 40000 --batch 1024 --ratios 2 8 --ks 8 --budgets 1   # reduced

Needs the `bench` dependency group (eai-sparsify, sae-lens); on CPU sparsify runs with
SPARSIFY_DISABLE_TRITON=1 (set here).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae.nn.config import SAEConfig, TrainConfig  # noqa: E402
from sae.nn.sources import ActivationSource  # noqa: E402
from sae.nn.synthetic import PlantedData, planted_activations, recovery  # noqa: E402
from sae.nn.trainer import SAESpec, default_dead_window, default_lr, train_saes  # noqa: E402

# encode: x [n, d] float32 (input units) -> dense codes [n, d_sae]; decode: codes -> [n, d]
Model = tuple[np.ndarray, Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


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


def schedule(steps: int) -> tuple[int, Callable[[int], float]]:
    """Warm-up and the sparsify-style multiplier: linear warm-up, then linear decay to 0."""
    warmup = min(1000, max(1, steps // 20))
    return warmup, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))


def train_ours(arch: str, cell: Cell, x: np.ndarray, args: argparse.Namespace) -> Model:
    cfg = SAEConfig(architecture=arch, d_sae=args.expansion * args.d, k=cell.k)
    epochs = cell.steps / math.ceil(len(x) / args.batch)
    tcfg = TrainConfig(epochs=epochs, batch_size=args.batch, device="cpu", eval_rows=4096)
    with tempfile.TemporaryDirectory() as tmp:
        sae = train_saes(ActivationSource({"x": [x]}), [SAESpec("", "x", cfg)], tcfg, tmp, progress=False)[""].sae
    sae.eval()
    return sae.W_dec.detach().numpy(), sae.encode, sae.decode


def train_sparsify(cell: Cell, x: np.ndarray, args: argparse.Namespace) -> Model:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(args.seed)
    d_sae = args.expansion * args.d
    sae = SparseCoder(args.d, SparseCoderConfig(num_latents=d_sae, k=cell.k))
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / math.sqrt(d_sae / 2**14))
    warmup, factor = schedule(cell.steps)
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
            g["lr"] = 2e-4 / math.sqrt(d_sae / 2**14) * factor(step)
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


def train_saelens(arch: str, cell: Cell, x: np.ndarray, args: argparse.Namespace) -> Model:
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
        widths = sorted({max(1, d_sae // f) for f in (16, 8, 4, 2)} | {d_sae})
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=widths, **common))
    xt = torch.from_numpy(x)
    scale = math.sqrt(args.d / float(xt[:16384].double().pow(2).sum(1).mean()))
    lr = default_lr(d_sae)
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

    def encode(xb: torch.Tensor) -> torch.Tensor:
        pre = (xb * scale - sae.b_dec) @ W_enc + b_enc
        if arch == "topk":
            top = pre.topk(cell.k, dim=1)
            return torch.zeros_like(pre).scatter_(1, top.indices, top.values.clamp_min(0))
        return pre * (pre > thr)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return (z @ W_dec + sae.b_dec) / scale

    return W_dec.detach().numpy(), encode, decode


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", type=int, nargs="+", default=[2, 4, 8], help="superposition m/d")
    p.add_argument("--coefs", nargs="+", default=["uniform", "heavy"], choices=["uniform", "heavy"])
    p.add_argument("--offsets", type=float, nargs="+", default=[0.0, 10.0], help="norm of the shared mean")
    p.add_argument("--ks", type=int, nargs="+", default=[4, 8, 32])
    p.add_argument("--steps", type=int, default=400, help="the short budget, in steps")
    p.add_argument("--budgets", type=int, nargs="+", default=[1, 10], help="multiples of --steps")
    p.add_argument("--archs", nargs="+", default=["topk", "batchtopk", "matryoshka"])
    p.add_argument(
        "--peers", nargs="+", default=["sparsify", "saelens-topk", "saelens-batchtopk", "saelens-matryoshka"]
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
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"d {args.d}, d_sae {args.expansion * args.d}, {args.active} atoms per row, {args.rows} rows, "
        f"batch {args.batch}, held-out {args.eval_rows} rows, seed {args.seed}"
    )
    print(f"{'cell':<48} {'trainer':<20} {'cos':>6} {'fvu':>6} {'dead':>6} {'L0':>6} {'cos/best':>9} {'fvu-best':>9}")
    worst: dict[str, list[tuple[float, float]]] = {}
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
    for cell in grid:
        k = cell.k
        data, held = make_data(cell, args)
        peers = {}
        for peer in args.peers:
            if peer == "sparsify":
                m = train_sparsify(cell, data.x, args)
            else:
                m = train_saelens(peer.split("-", 1)[1], cell, data.x, args)
            peers[peer] = score(m, data, held)
        for name, r in peers.items():
            print(f"{cell.name():<48} {name:<20} {_fmt(r)}", flush=True)
        best_cos = max(r["cos"] for r in peers.values())
        keeping_k = [r["fvu"] for r in peers.values() if abs(r["l0"] - k) <= 0.1 * k]
        best_fvu = min(keeping_k) if keeping_k else min(r["fvu"] for r in peers.values())
        for arch in args.archs:
            r = score(train_ours(arch, cell, data.x, args), data, held)
            dc, df = r["cos"] - best_cos, r["fvu"] - best_fvu
            worst.setdefault(arch, []).append((dc, df))
            ok = "ok" if dc >= -0.01 and df <= 0.01 else "BELOW"
            print(
                f"{cell.name():<48} {'ours-' + arch:<20} {_fmt(r)} {r['cos'] / best_cos:>9.3f} {df:>+9.3f} {ok}",
                flush=True,
            )
    print("summary over the cells run: ours - best peer (cos: higher is better, fvu: lower is better)")
    for arch in args.archs:
        dcs, dfs = [d[0] for d in worst[arch]], [d[1] for d in worst[arch]]
        n_ok = sum(dc >= -0.01 and df <= 0.01 for dc, df in worst[arch])
        print(
            f"  {arch:<11} cos worst {min(dcs):+.3f} mean {np.mean(dcs):+.3f} | fvu worst {max(dfs):+.3f} "
            f"mean {np.mean(dfs):+.3f} | goal met in {n_ok}/{len(dcs)} cells"
        )
    return 0


def _fmt(r: dict[str, float]) -> str:
    return f"{r['cos']:>6.3f} {r['fvu']:>6.3f} {r['dead']:>6.1%} {r['l0']:>6.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
