"""Training throughput (samples/s) of each SAE architecture against a dense PyTorch TopK baseline.

The baseline is the straightforward implementation: dense pre-activations, topk, scatter into a dense
[batch, d_sae] code matrix, dense decoder matmul, autograd for everything. It starts from the same
weights as our `topk` SAE, and the script checks that both give the same loss curve over the timed
steps (that `topk` row uses k_aux=0 so that both optimise the same objective).

Rows named `<arch>+auxk` train with AuxK active, as real training does once latents die: a fixed
random `--dead_fraction` of the latents is marked dead and the default k_aux (d_in / 2) is used.
Their ratio is still against the plain dense TopK baseline (which has no AuxK at all).

Timing: every contender of one (expansion, k) takes one warm-up step, then the contenders take turns,
one step each, `--steps` times (baseline, topk, batchtopk, ..., baseline, topk, ...), so a swing in
machine load hits all of them alike; each reports its median step time.

    uv run python bench/train_sae.py                                  # the issue's full grid
    uv run python bench/train_sae.py --expansions 32 --ks 32 --archs topk --steps 3   # quick on CPU

Prints one line per (architecture, expansion, k) with samples/s and the ratio to the baseline
measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae.nn.config import ARCHITECTURES, SAEConfig  # noqa: E402
from sae.nn.model import SparseAutoencoder  # noqa: E402

AUXK_ARCHS = ("topk", "batchtopk", "matryoshka")


def dense_topk_step(params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, x: torch.Tensor, k: int) -> float:
    """One step of the plain dense TopK SAE (same objective and decoder constraint as ours)."""
    W_enc, b_enc, W_dec, b_dec = params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"]
    pre = (x - b_dec) @ W_enc + b_enc
    top = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    loss = ((z @ W_dec + b_dec - x) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    assert W_dec.grad is not None, "loss.backward() filled it"
    with torch.no_grad():
        W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
    opt.step()
    with torch.no_grad():
        W_dec /= W_dec.norm(dim=1, keepdim=True)
    return float(loss.detach())


def our_step(sae: SparseAutoencoder, opt: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor | None) -> float:
    """One step exactly as sae/nn/trainer.py takes it."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda)
    with autocast:
        out = sae.training_loss(x, dead)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    sae.remove_parallel_grad_()
    opt.step()
    sae.normalize_decoder_()
    return float(out.loss.detach())


def interleaved(
    steps: dict[str, Callable[[], float]], n_steps: int, device: torch.device
) -> dict[str, tuple[float, list[float]]]:
    """Median seconds per step of each contender and its losses (warm-up step included), taking
    turns one step at a time after one warm-up step each."""
    losses = {name: [step()] for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n_steps):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            losses[name].append(step())
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {name: (statistics.median(times[name]), losses[name]) for name in steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_in", type=int, default=768)
    p.add_argument("--expansions", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--ks", type=int, nargs="+", default=[32, 64])
    p.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    p.add_argument(
        "--dead_fraction",
        type=float,
        default=0.1,
        help="fraction of latents marked dead in the +auxk rows (0 = no such rows)",
    )
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5, help="timed steps per contender (after 1 warm-up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(
        f"device {device} ({where}), d_in {args.d_in}, batch {args.batch}, median of {args.steps} interleaved "
        f"steps after 1 warm-up; msae_* levels k, 2k, d_sae; +auxk rows: {args.dead_fraction:.0%} of latents "
        f"dead, k_aux {SAEConfig(d_in=args.d_in).aux_k}",
        flush=True,
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.d_in, generator=gen).to(device)
    for expansion in args.expansions:
        d_sae = expansion * args.d_in
        dead = (torch.rand(d_sae, generator=gen) < args.dead_fraction).to(device)
        for k in args.ks:
            ref = SparseAutoencoder(
                SAEConfig(architecture="topk", d_in=args.d_in, d_sae=d_sae, k=k, k_aux=0), device=device
            )
            params = {n: t.detach().clone().requires_grad_(True) for n, t in ref.named_parameters()}
            base_opt = torch.optim.Adam(params.values(), lr=1e-4)
            steps: dict[str, Callable[[], float]] = {"baseline": partial(dense_topk_step, params, base_opt, x, k)}
            rows = [(arch, False) for arch in args.archs]
            if args.dead_fraction > 0:
                rows += [(arch, True) for arch in args.archs if arch in AUXK_ARCHS]
            for arch, auxk in rows:
                levels = [k, 2 * k, d_sae] if arch.startswith("msae") else None
                cfg = SAEConfig(
                    architecture=arch, d_in=args.d_in, d_sae=d_sae, k=k, k_aux=None if auxk else 0, k_levels=levels
                )
                sae = SparseAutoencoder(cfg, device=device)
                with torch.no_grad():
                    for n, t in sae.named_parameters():
                        t.copy_(dict(ref.named_parameters())[n])
                opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
                mask = dead if auxk else None
                steps[arch + ("+auxk" if auxk else "")] = lambda sae=sae, opt=opt, mask=mask: our_step(
                    sae, opt, x, mask
                )
            results = interleaved(steps, args.steps, device)
            base_s, base_losses = results.pop("baseline")
            print(
                f"  expansion {expansion:>2} (d_sae {d_sae}), k {k}: dense baseline "
                f"{args.batch / base_s:9.0f} samples/s",
                flush=True,
            )
            for name, (s, losses) in results.items():
                note = ""
                if name == "topk":
                    rel = max(abs(a - b) / abs(b) for a, b in zip(losses, base_losses))
                    note = f"  loss curve vs baseline: max rel. diff {rel:.1e}"
                    if device.type == "cpu" and rel > 1e-3:
                        note += "  <-- MISMATCH"
                print(f"    {name:<16} {args.batch / s:9.0f} samples/s  {base_s / s:5.2f}x baseline{note}", flush=True)
            del steps, results


if __name__ == "__main__":
    main()
