"""The pipeline behind train_image.py / train_text.py: extract, train, record.

1. extract: one pass of the encoder over the dataset into the activation cache (every requested
   layer; all real tokens, plus the recorded position of each row), reused when it exists;
2. train: one SAE per layer (and per `--seeds` value) in one pass over the cached tokens;
3. record: the codes of the first seed's SAE at each row's recorded position, written to
   `<features_dir>/<runname>/layerNN/` (format csr-v1), then `run.json` last.

Killed at any stage and started again with the same flags, it resumes: the cache resumes from its
last finished shard, the trainer from its last checkpoint, and features are rewritten whole.
SAE checkpoints live in `<features_dir>/<runname>/saes/layerNN[_seedS]/`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sae.activation_cache import CacheConfig, extract_activations
from sae.atomic import read_json, write_json
from sae.cli import InputError, add_dataclass_args, dataclass_from_args
from sae.config import TrainConfig, add_sae_args, sae_config_from_args
from sae.data import DataConfig, pairs_from_config
from sae.features import FORMAT, LayerWriter, SparseCodes, write_run_info
from sae.provenance import provenance
from sae.sources import ActivationSource
from sae.trainer import SAESpec, train_saes

SETTINGS_FILE = "settings.json"


def build_parser(modality: str, description: str) -> argparse.ArgumentParser:
    """All flags of train_image.py (modality 'image') or train_text.py ('text')."""
    import wrappedmodels

    parser = argparse.ArgumentParser(description=description)
    wrappedmodels.add_model_args(parser, modality)
    parser.add_argument("--runname", default=None,
                        help="name of the run under --features_dir (default: the --model name, lowercased)")
    parser.add_argument("--features_dir", default="sae_features", help="where runs are written")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="train one SAE per seed and layer in the same pass (features: the first seed)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run made with other settings")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_dataclass_args(parser.add_argument_group("dataset"), DataConfig)
    add_dataclass_args(parser.add_argument_group("activation cache"), CacheConfig)
    sae_group = parser.add_argument_group("SAE training")
    add_sae_args(sae_group)
    parser.set_defaults(epochs=1)  # the paper trains one pass over all tokens
    return parser


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _record(sae: torch.nn.Module, pooled: np.ndarray, run_dir: Path, layer: int, progress: bool,
            batch: int = 1024) -> None:
    """Encode the recorded vectors [N, d] of one layer and write them as sparse codes."""
    device = sae.W_dec.device
    with LayerWriter(run_dir, layer, sae.cfg.d_sae) as writer, torch.no_grad():
        for start in tqdm(range(0, len(pooled), batch), desc=f"recording layer {layer}", disable=not progress,
                          unit="batch", leave=False):
            x = torch.from_numpy(np.asarray(pooled[start : start + batch], dtype=np.float32)).to(device)
            if pooled.dtype == np.uint16:  # bfloat16 bits
                x = torch.from_numpy(np.array(pooled[start : start + batch])).view(torch.bfloat16).float().to(device)
            writer.append(SparseCodes.from_dense(sae.encode(x).cpu().numpy()))


def run(modality: str, argv: Sequence[str] | None, description: str) -> int:
    """Parse the flags and run the three stages; returns the exit status."""
    import wrappedmodels

    args = build_parser(modality, description).parse_args(argv)
    spec = wrappedmodels.spec_from_args(args)
    layers = spec.info().resolve_layers(args.layers)
    data_cfg = dataclass_from_args(DataConfig, args)
    cache_cfg = dataclass_from_args(CacheConfig, args)
    tcfg = dataclass_from_args(TrainConfig, args)
    seeds = args.seeds or [args.seed]
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds must be distinct (got {seeds})")
    runname = args.runname or args.model.lower()
    run_dir = Path(args.features_dir) / runname
    progress = not args.quiet

    pairs = pairs_from_config(data_cfg)
    settings = {"model": spec.identity(), "data": pairs.identity(modality), "layers": layers,
                "token": args.token, "skip_bad": data_cfg.skip_bad, "cache_dtype": cache_cfg.cache_dtype,
                "sae": {k: v for k, v in vars(args).items() if k in _SAE_FLAGS}, "train": tcfg.to_dict(),
                "seeds": seeds}
    fingerprint = _fingerprint({**settings, "train": {k: v for k, v in tcfg.to_dict().items() if k != "device"}})
    settings_path = run_dir / SETTINGS_FILE
    if settings_path.exists() and read_json(settings_path).get("fingerprint") != fingerprint:
        if not args.overwrite:
            raise InputError(f"run '{runname}' in {args.features_dir} was made with other settings; "
                             "choose another --runname or pass --overwrite")
        shutil.rmtree(run_dir)
    elif not settings_path.exists() and run_dir.exists() and any(run_dir.iterdir()):
        if not args.overwrite:
            raise InputError(f"{run_dir} exists and is not a run of this toolkit; pass --overwrite to replace it")
        shutil.rmtree(run_dir)
    if (run_dir / "run.json").exists():
        print(f"run '{runname}' is already complete in {run_dir}")
        return 0
    write_json(settings_path, {"fingerprint": fingerprint, **settings})

    cache = extract_activations(spec, pairs, layers, cache_cfg, token=args.token, skip_bad=data_cfg.skip_bad,
                                device=tcfg.device, progress=progress)
    source = ActivationSource({f"layer{layer:02d}": cache.token_shards(layer) for layer in layers})
    specs = [SAESpec(f"layer{layer:02d}" + (f"_seed{seed}" if i else ""), f"layer{layer:02d}",
                     sae_config_from_args(args, cache.d_model, seed=seed))
             for layer in layers for i, seed in enumerate(seeds)]
    print(f"training {len(specs)} SAE(s) on {source.n_rows} tokens of {cache.n_rows} rows "
          f"(layers {layers}, d_in {cache.d_model}, d_sae {specs[0].cfg.d_sae})")
    trained = train_saes(source, specs, tcfg, run_dir / "saes", progress=progress)

    for layer in layers:
        _record(trained[f"layer{layer:02d}"].sae, cache.pooled(layer), run_dir, layer, progress)
    first = trained[f"layer{layers[0]:02d}"].sae.cfg
    info = {
        "name": runname, "modality": modality, "model": args.model, "model_name": spec.name,
        "layers": layers, "token": args.token, "dataset": pairs.describe(), "n_rows": cache.n_rows,
        "n_tokens": source.n_rows, "row_ids": [int(r) for r in cache.row_ids],
        "architecture": first.architecture, "d_sae": first.d_sae, "k": first.k, "seeds": seeds,
        "sae_metrics": {str(layer): trained[f"layer{layer:02d}"].metrics for layer in layers},
        "sae_dirs": {s.name: str(trained[s.name].path.relative_to(run_dir)) for s in specs},
        "activation_cache": str(cache.path), "format": FORMAT, "provenance": provenance(),
    }
    write_run_info(run_dir, info)
    for layer in layers:
        m = info["sae_metrics"][str(layer)]
        print(f"layer {layer}: FVU {m['fvu']:.3f}, cosine {m['cosine']:.3f}, L0 {m['l0']:.1f}, "
              f"dead {m['dead_fraction']:.1%} (on {m['eval_rows']} tokens)")
    print(f"features of {cache.n_rows} rows written to {run_dir}")
    return 0


_SAE_FLAGS = ("sae", "expansion_factor", "d_sae", "k", "k_levels", "prefixes", "l1_coef", "k_aux", "aux_coef",
              "b_dec_init")
