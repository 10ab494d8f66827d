"""GPU check: three side-by-side ratios on one GPU, each contender measured in the same run.

    bench/gpu_check.sh                 # the one command (installs nothing; eai-sparsify through `uv run --with`)
    uv run python bench/gpu_check.py --quick     # the CPU fallback at toy sizes, to check the script itself

1. Extraction rows/s: the real open_clip ViT-B/32 image tower (random weights, 224 px, 12 blocks), the
   toolkit's adapter recording layers 5 and 11 (early stop after block 11), bf16 autocast against fp32.
2. SAE training samples/s: the toolkit's TopK SAE (d_in 768, expansion 32, k 32, AuxK) against
   eai-sparsify's SparseCoder (its Triton kernels on) with the same sizes, the same data and the same
   optimiser, both under bf16 autocast.
3. wMPPC: the torch engine on the GPU against the numpy engine on the CPU, 2 x 2 layers of TopK codes.

Each figure is the best of `--repeats` timed runs after a warm-up; sizes are chosen to finish within 8
minutes on one GPU. Nothing is written outside a temporary folder. Ratios > 1 mean the first named is faster.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def best_of(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def extraction(device: str, rows: int, repeats: int, quick: bool) -> tuple[float, float]:
    """Rows/s of the open_clip ViT-B/32 adapter, (bf16 autocast, fp32)."""
    import wrappedmodels as wm
    from sae.encoders.tiny import _save_open_clip

    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    width, layers, size = (32, 3, 32) if quick else (768, 12, 224)
    cfg = {
        "embed_dim": 16 if quick else 512,
        "vision_cfg": {
            "image_size": size,
            "layers": layers,
            "width": width,
            "patch_size": 8 if quick else 32,
            "head_width": 16 if quick else 64,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    model_dir = _save_open_clip(work / "vit-b-32", cfg)
    adapter = wm.ModelSpec("ClipVision", str(model_dir)).load(device)
    batch = {"pixel_values": torch.rand(rows, 3, size, size, device=device)}
    wanted = [layers // 2 - 1, layers - 1]
    rates = []
    for bf16 in (True, False):
        adapter.autocast = bf16  # the adapter's own bf16 autocast on CUDA, or fp32

        def run() -> None:
            out = adapter.forward(batch, wanted, token="pooled")
            for layer in wanted:
                out.hidden[layer].float().cpu()

        rates.append(rows / best_of(run, repeats))
    return rates[0], rates[1]


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def training(device: str, batch: int, d_in: int, expansion: int, k: int, steps: int) -> tuple[float, float | str]:
    """Samples/s of (toolkit TopK SAE, eai-sparsify SparseCoder) on the same random batches."""
    from train_sae import our_step

    from sae.nn.config import SAEConfig
    from sae.nn.model import SparseAutoencoder

    gen = torch.Generator(device="cpu").manual_seed(0)
    data = torch.randn(steps, batch, d_in, generator=gen).to(device)
    d_sae = d_in * expansion
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device != "cpu" else _null()

    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k)
    ours = SparseAutoencoder(cfg, device=device)
    opt = torch.optim.Adam(ours.parameters(), lr=1e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool, device=device)
    dead[: d_sae // 10] = True  # AuxK on, as in a real run

    def ours_run() -> None:
        for x in data:
            our_step(ours, opt, x, dead)  # bf16 autocast on CUDA, as the trainer

    ours_rate = steps * batch / best_of(ours_run, 2)
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as e:
        return ours_rate, f"n/a (eai-sparsify not importable: {e})"
    try:
        theirs = SparseCoder(d_in, SparseCoderConfig(expansion_factor=expansion, k=k), device=device)
        opt2 = torch.optim.Adam(theirs.parameters(), lr=1e-4)

        def theirs_run() -> None:
            for x in data:
                with autocast:
                    out = theirs(x, dead_mask=dead)
                    loss = out.fvu + out.auxk_loss / 32
                opt2.zero_grad(set_to_none=True)
                loss.backward()
                theirs.remove_gradient_parallel_to_decoder_directions()
                opt2.step()
                theirs.set_decoder_norm_to_unit_norm()

        return ours_rate, steps * batch / best_of(theirs_run, 2)
    except Exception as e:  # noqa: BLE001 - an API change of the peer is reported, not fatal
        return ours_rate, f"n/a (eai-sparsify failed: {type(e).__name__}: {e})"


def wmppc_engines(device: str, n: int, d: int, k: int, repeats: int) -> tuple[float, float, float]:
    """Seconds of wMPPC 2 x 2 layers: (torch engine on `device`, numpy engine), and max |difference|."""
    from sae.analysis.compare import wmppc
    from sae.analysis.correlation import NumpyEngine, TorchEngine
    from sae.data.features import SparseCodes, open_run, write_layer, write_run_info

    work = Path(tempfile.mkdtemp(prefix="gpu_check_wmppc_"))
    rng = np.random.default_rng(0)
    concepts = rng.integers(0, d, (n, k))
    for run_name in ("A", "B"):
        for layer in range(2):
            idx = np.where(rng.random((n, k)) < 0.3, rng.integers(0, d, (n, k)), rng.permutation(d)[concepts])
            vals = rng.gamma(2.0, 1.0, (n, k)).astype(np.float32)
            idx = np.sort(idx, axis=1)
            vals[:, 1:][idx[:, 1:] == idx[:, :-1]] = 0
            write_layer(work / run_name, layer, SparseCodes.from_topk(vals, idx, d))
        write_run_info(work / run_name, {"name": run_name, "n_rows": n, "row_ids": list(range(n)), "layers": [0, 1]})
    results = {}
    for name, engine in (("torch", TorchEngine(device)), ("numpy", NumpyEngine())):

        def compare(engine=engine, name=name) -> None:
            results[name] = wmppc(open_run(work, "A"), open_run(work, "B"), engine=engine).matrix

        results[name + "_s"] = best_of(compare, repeats)
    return results["torch_s"], results["numpy_s"], float(np.abs(results["torch"] - results["numpy"]).max())


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="toy sizes (the CPU fallback: checks the script runs)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    quick = args.quick or not cuda
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"# GPU check on {name}, torch {torch.__version__}{' (toy sizes: --quick or no GPU)' if quick else ''}")
    t0 = time.perf_counter()

    bf16, fp32 = extraction(device, 8 if quick else 256, args.repeats, quick)
    sizes = (
        dict(batch=256, d_in=64, expansion=4, k=8, steps=3)
        if quick
        else dict(batch=4096, d_in=768, expansion=32, k=32, steps=20)
    )
    ours, theirs = training(device, **sizes)
    wm_args = (2000, 512, 16) if quick else (100_000, 16384, 32)
    t_torch, t_numpy, diff = wmppc_engines(device, *wm_args, 1 if quick else 2)

    rows = [
        ("extraction rows/s, ViT-B/32", "bf16 autocast", bf16, "fp32", fp32),
        ("SAE training samples/s", "toolkit", ours, "eai-sparsify", theirs),
        ("wMPPC 2x2 layers, s (lower is better)", "torch engine", t_torch, "numpy engine", t_numpy),
    ]
    print(f"{'measure':40s} {'A':>14s} {'value A':>12s} {'B':>14s} {'value B':>14s} {'A/B speed':>10s}")
    for what, a, va, b, vb in rows:
        if isinstance(vb, str):
            print(f"{what:40s} {a:>14s} {va:12.1f} {b:>14s} {vb}")
            continue
        ratio = vb / va if "lower" in what else va / vb
        print(f"{what:40s} {a:>14s} {va:12.1f} {b:>14s} {vb:14.1f} {ratio:9.2f}x")
    print(
        f"sizes: extraction {'8' if quick else '256'} images a batch; training {sizes}; wMPPC N={wm_args[0]}, "
        f"d_sae={wm_args[1]}, k={wm_args[2]}; torch vs numpy wMPPC max |diff| {diff:.1e}"
    )
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
