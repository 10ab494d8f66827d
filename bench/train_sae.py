"""Training throughput (samples/s) of each SAE architecture against a dense PyTorch TopK baseline.

The baseline is the straightforward implementation: dense pre-activations, topk, scatter into a dense
[batch, d_sae] code matrix, dense decoder matmul, autograd for everything. It starts from the same
weights as our `topk` SAE, and the script checks that both give the same loss curve over the timed
steps (our TopK uses k_aux=0 here so that both optimise the same objective).

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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae.config import ARCHITECTURES, SAEConfig  # noqa: E402
from sae.model import SparseAutoencoder  # noqa: E402


def dense_topk_step(params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, x: torch.Tensor, k: int) -> float:
    """One step of the plain dense TopK SAE (same objective and decoder constraint as ours)."""
    W_enc, b_enc, W_dec, b_dec = params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"]
    pre = (x - b_dec) @ W_enc + b_enc
    top = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    loss = ((z @ W_dec + b_dec - x) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
    opt.step()
    with torch.no_grad():
        W_dec /= W_dec.norm(dim=1, keepdim=True)
    return float(loss.detach())


def our_step(sae: SparseAutoencoder, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda)
    with autocast:
        out = sae.training_loss(x)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    sae.remove_parallel_grad_()
    opt.step()
    sae.normalize_decoder_()
    return float(out.loss.detach())


def timed(step, n_steps: int, device: torch.device) -> tuple[float, list[float]]:
    """Median seconds per step over n_steps after one warm-up step, and the losses of all steps."""
    losses = [step()]
    times = []
    for _ in range(n_steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(step())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_in", type=int, default=768)
    p.add_argument("--expansions", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--ks", type=int, nargs="+", default=[32, 64])
    p.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after 1 warm-up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}), "
          f"d_in {args.d_in}, batch {args.batch}, median of {args.steps} steps after 1 warm-up")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.d_in, generator=gen).to(device)
    for expansion in args.expansions:
        d_sae = expansion * args.d_in
        for k in args.ks:
            cfg = SAEConfig(architecture="topk", d_in=args.d_in, d_sae=d_sae, k=k, k_aux=0)
            ref = SparseAutoencoder(cfg, device=device)
            params = {n: t.detach().clone().requires_grad_(True) for n, t in ref.named_parameters()}
            opt = torch.optim.Adam(params.values(), lr=1e-4)
            base_s, base_losses = timed(lambda: dense_topk_step(params, opt, x, k), args.steps, device)
            base_rate = args.batch / base_s
            print(f"  expansion {expansion:>2} (d_sae {d_sae}), k {k}: dense baseline {base_rate:9.0f} samples/s")
            for arch in args.archs:
                kw = {"k_levels": [k, 2 * k, d_sae]} if arch.startswith("msae") else {}
                sae = SparseAutoencoder(SAEConfig(architecture=arch, d_in=args.d_in, d_sae=d_sae, k=k, k_aux=0, **kw),
                                        device=device)
                with torch.no_grad():
                    for n, t in sae.named_parameters():
                        t.copy_(dict(ref.named_parameters())[n])
                opt2 = torch.optim.Adam(sae.parameters(), lr=1e-4)
                s, losses = timed(lambda: our_step(sae, opt2, x), args.steps, device)
                note = ""
                if arch == "topk":
                    rel = max(abs(a - b) / abs(b) for a, b in zip(losses, base_losses))
                    note = f"  loss curve vs baseline: max rel. diff {rel:.1e}"
                    if device.type == "cpu" and rel > 1e-3:
                        note += "  <-- MISMATCH"
                print(f"    {arch:<10} {args.batch / s:9.0f} samples/s  {base_s / s:5.2f}x baseline{note}")


if __name__ == "__main__":
    main()
