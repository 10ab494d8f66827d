"""Extraction throughput: the activation cache (hooks, early stop, inference_mode, bf16 autocast on
CUDA, shards written to disk) against a naive loop (torch.no_grad, fp32, the full forward with
output_hidden_states, the real tokens of the requested layers copied to the CPU, nothing written),
on the same rows with the same DataLoader, in the same run.

    uv run python bench/extract.py                      # MiniLM (the dev package) on 2048 shapes captions
    uv run python bench/extract.py --layers 0 1         # early layers: the early stop pays off
    uv run python bench/extract.py --model ViT --vit_model_name google/vit-base-patch16-224 --dataset coco
    uv run python bench/extract.py --compare_workers 0 1 2   # the cache with each DataLoader worker count

Each repeat times, alternating: the naive loop over all N rows, a cache extraction of all N rows
(into a fresh directory), and a cache extraction of one batch. Medians and best runs are reported
(on a shared machine other processes only ever add time, so the best run is the steadier figure).
The cache's fixed overhead (directory set-up, DataLoader start, final concatenation, meta.json with
provenance) is separated from its per-row cost by the two sizes, from the best runs:
t(n) = fixed + n / per-row rate. Model loading and one warm-up pass of each loop are excluded.
`--compare_workers` also times the cache with each given --num_workers, interleaved in the same repeats
(how the CPU default of 0 workers was chosen).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import wrappedmodels as wm  # noqa: E402
from sae.data.cache import CacheConfig, _Collate, default_workers, extract_activations  # noqa: E402
from sae.data.datasets import DataConfig, Pairs, pairs_from_config  # noqa: E402
from sae.encoders.open_clip import _spatial_tokens  # noqa: E402
from sae.encoders.tiny import minilm_dir  # noqa: E402
from sae.util.cli import add_dataclass_args, dataclass_from_args, run_cli  # noqa: E402


def _minilm_dir() -> str | None:
    try:
        return str(minilm_dir())
    except ImportError:
        return None


def _naive_call(adapter: wm.Adapter, batch: dict[str, torch.Tensor], layers: list[int]) -> dict[int, torch.Tensor]:
    """The full forward with every hidden state, the way one would without hooks: {layer: [B, T, d]}."""
    m: Any = adapter.module  # open_clip / transformers model: called with its own forward signature
    if adapter.model == "ClipVision" and adapter.widths is not None:  # CLIP ResNet: stem + 4 stages, attnpool
        out = m.forward_intermediates(batch["pixel_values"], output_fmt="NCHW")
        maps = out["image_intermediates"][1:] + [out["image_features"]]
        return {i: _spatial_tokens(maps[i]) for i in layers}
    if adapter.model == "ClipVision":
        out = m.forward_intermediates(batch["pixel_values"], output_fmt="NLC", output_extra_tokens=True)
        return {i: torch.cat([out["image_intermediates_prefix"][i], out["image_intermediates"][i]], 1) for i in layers}
    if adapter.model == "ClipText":
        out = m.forward_intermediates(text=batch["input_ids"])
        return {i: out["text_intermediates"][i] for i in layers}
    inputs = {"input_ids": batch["input_ids"]} if adapter.model == "SiglipText" else batch
    hs = m(**inputs, output_hidden_states=True).hidden_states
    return {i: hs[i + 1] for i in layers}


def naive_seconds(adapter: wm.Adapter, loader: torch.utils.data.DataLoader, layers: list[int]) -> float:
    """Wall time of the naive loop over every batch of `loader`."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for _, _, batch in loader:
            batch = {k: v.to(adapter.device) for k, v in batch.items()}
            hidden = _naive_call(adapter, batch, layers)
            for h in hidden.values():
                mask = adapter.real_mask(batch, h.shape[1]).bool()
                h[mask].float().cpu()
    if adapter.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def cache_seconds(
    spec: wm.ModelSpec, pairs: Pairs, layers: list[int], cfg: CacheConfig, token: str, adapter: wm.Adapter
) -> tuple[float, int, int]:
    """(wall time, stored tokens, bytes written) of one extraction into a fresh directory."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = CacheConfig(**{**vars(cfg), "cache_dir": tmp})
        t0 = time.perf_counter()
        cache = extract_activations(spec, pairs, layers, cfg, token=token, adapter=adapter, progress=False)
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(cache.path).rglob("*") if f.is_file())
        return seconds, sum(cache.n_tokens_of(layout[0]) for layout in cache.layouts), size


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    wm.add_model_args(p)
    add_dataclass_args(p, DataConfig)
    add_dataclass_args(p, CacheConfig, skip=("cache_dir",))
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda[:i]")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each loop, alternating (medians kept)")
    p.add_argument(
        "--compare_workers",
        type=int,
        nargs="+",
        default=[],
        help="also time the cache with each of these --num_workers values (interleaved)",
    )
    minilm = _minilm_dir()
    p.set_defaults(
        model="Bert",
        dataset="shapes:2048",
        extract_batch_size=32,
        data_root=str(Path(tempfile.gettempdir()) / "share-concepts-bench"),
        **({"bert_model_name": minilm} if minilm else {}),
    )
    args = p.parse_args(argv)
    spec = wm.spec_from_args(args)
    data = dataclass_from_args(DataConfig, args)
    pairs = pairs_from_config(data)
    layers = spec.info().resolve_layers(args.layers)
    t = time.perf_counter()
    adapter = spec.load(args.device)
    load_s = time.perf_counter() - t
    if args.num_workers is None:
        args.num_workers = default_workers(adapter.device)
    cfg = dataclass_from_args(CacheConfig, args, cache_dir="unused")
    widths = sorted({adapter.d_of(layer) for layer in layers})
    print(
        f"model: --model {spec.model} {spec.name} ({adapter.n_blocks} blocks, d={'/'.join(map(str, widths))}), "
        f"device {adapter.device}, loaded in {load_s:.1f}s"
    )
    print(
        f"data: {data.dataset} ({len(pairs)} rows, {spec.modality}), layers {layers}, token {args.token}, "
        f"batch {args.extract_batch_size}, workers {args.num_workers}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

    from torch.utils.data import DataLoader, Dataset

    loader = DataLoader(
        cast(Dataset, pairs.torch_dataset(spec.modality)),  # a map-style dataset (__len__, __getitem__)
        batch_size=args.extract_batch_size,
        num_workers=args.num_workers,
        collate_fn=_Collate(adapter.preprocess),
        pin_memory=adapter.device.type == "cuda",
    )
    one_batch = pairs_from_config(DataConfig(**{**vars(data), "max_samples": args.extract_batch_size}))
    n, n1 = len(pairs), len(one_batch)
    naive_seconds(
        adapter,
        DataLoader(
            cast(Dataset, one_batch.torch_dataset(spec.modality)),
            batch_size=args.extract_batch_size,
            collate_fn=_Collate(adapter.preprocess),
        ),
        layers,
    )  # warm-up
    cache_seconds(spec, one_batch, layers, cfg, args.token, adapter)  # warm-up
    naive, full, small = [], [], []
    by_workers: dict[int, list[float]] = {w: [] for w in args.compare_workers}
    for _ in range(args.repeats):
        naive.append(naive_seconds(adapter, loader, layers))
        seconds, n_tok, size = cache_seconds(spec, pairs, layers, cfg, args.token, adapter)
        full.append(seconds)
        small.append(cache_seconds(spec, one_batch, layers, cfg, args.token, adapter)[0])
        for w, times in by_workers.items():
            times.append(
                cache_seconds(spec, pairs, layers, CacheConfig(**{**vars(cfg), "num_workers": w}), args.token, adapter)[
                    0
                ]
            )
    t_naive, t_full = statistics.median(naive), statistics.median(full)
    # the fixed overhead from the fastest runs: interference from other processes only adds time
    per_row = max(1e-12, (min(full) - min(small)) / max(1, n - n1))
    fixed = max(0.0, min(small) - n1 * per_row)
    spread = lambda xs: f"runs {min(xs):.3f}..{max(xs):.3f} s"  # noqa: E731
    print(
        f"naive loop (no_grad, full forward, output_hidden_states, no cache): {n / t_naive:9.1f} rows/s median, "
        f"{n / min(naive):.1f} best ({n} rows; {spread(naive)})"
    )
    print(
        f"activation cache (hooks, early stop, shards on disk, {cfg.cache_dtype}): {n / t_full:9.1f} rows/s median, "
        f"{n / min(full):.1f} best ({spread(full)}; {n_tok} tokens, {size / 2**20:.1f} MiB written)"
    )
    print(
        f"cache fixed overhead per extraction: {fixed:.3f} s (best one-batch extraction {min(small):.3f} s for "
        f"{n1} rows); per-row rate without it: {1 / per_row:.1f} rows/s"
    )
    print(
        f"ratio cache / naive: {t_naive / t_full:.2f}x (medians of {args.repeats}), "
        f"{min(naive) / min(full):.2f}x (best runs), {min(naive) / (n * per_row):.2f}x without the fixed overhead"
    )
    for w, times in by_workers.items():
        print(
            f"activation cache with --num_workers {w}: {n / statistics.median(times):9.1f} rows/s median, "
            f"{n / min(times):.1f} best ({spread(times)})"
        )
    return 0


if __name__ == "__main__":
    run_cli(main)
