"""The pipeline behind train_image.py / train_text.py: extract, train, record.

1. extract: one pass of the encoder over the dataset into the activation cache (every requested
   layer; all real tokens, plus the recorded position of each row), reused when it exists;
2. train: one SAE per layer (and per `--seeds` value) in one pass over the cached tokens;
3. record: the codes of the first seed's SAE at each row's recorded position, written to
   `<features_dir>/<runname>/layerNN/` (format csr-v1), then `run.json` last. `--record_codes`
   chooses the codes: `sae` (the SAE's inference codes) or `ungated` (relu of every latent's
   pre-activation, the original repo's definition); run.json["record_codes"] says which.

Killed at any stage and started again with the same flags, it resumes: the cache resumes from its
last finished shard, the trainer from its last checkpoint, and features are rewritten whole.
SAE checkpoints live in `<features_dir>/<runname>/saes/layerNN[_seedS]/`. Layers whose token layouts
differ (the stages of a CLIP ResNet: H*W tokens each, one for the attention pool) train in separate
passes, one per layout, in `saes/groupNN/layerNN[_seedS]/` (NN: the group's first layer); run.json's
`sae_dirs` names every SAE's folder. Each layer's SAE is sized from its own width (d_sae =
--expansion_factor x d_in, or --d_sae).

`--recipe original` sets every training and recording choice of the original repo (ORIGINAL below;
flags given explicitly win); docs/definitions.md lists each difference from the default recipe.

A run folder is protected: --runname is one plain folder name; a rerun with other settings is refused
(--overwrite replaces it), except when the run has no outputs yet (it failed before training, e.g. on an
unreadable image): then it is replaced. Only a folder holding this toolkit's settings.json is ever
deleted or cleaned of dead processes' temporary files. A lock (`<features_dir>/.<runname>.lock`) is held
for the command's whole life: a second command on the same run is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sae.data.cache import CacheConfig
from sae.data.cache_parallel import extract_activations
from sae.data.datasets import DataConfig, pairs_from_config
from sae.data.features import FORMAT, RECORD_CODES, LayerWriter, SparseCodes, layer_dir_name, write_run_info
from sae.nn.config import TrainConfig, add_sae_args, sae_config_from_args
from sae.nn.model import SparseAutoencoder
from sae.nn.sources import ActivationSource
from sae.nn.trainer import SAESpec, train_saes
from sae.util import distributed
from sae.util.atomic import read_json, remove_dead_temporaries, write_json
from sae.util.cli import add_dataclass_args, dataclass_from_args
from sae.util.errors import InputError
from sae.util.lock import exclusive
from sae.util.provenance import provenance

SETTINGS_FILE = "settings.json"


def build_parser(modality: str, description: str) -> argparse.ArgumentParser:
    """All flags of train_image.py (modality 'image') or train_text.py ('text')."""
    from sae.encoders import registry

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    registry.add_model_args(parser, modality)
    parser.add_argument(
        "--runname", default=None, help="name of the run under --features_dir (default: the --model name, lowercased)"
    )
    parser.add_argument("--features_dir", default="sae_features", help="where runs are written")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="train one SAE per seed and layer in the same pass (features: the first seed)",
    )
    parser.add_argument(
        "--record_codes",
        default="sae",
        choices=tuple(RECORD_CODES),
        help="recorded features: sae = the SAE's inference codes (default); ungated = relu(pre-activations) of "
        "every latent, the original repo's definition (docs/definitions.md)",
    )
    add_recipe_arg(parser)
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


def record_codes(sae: SparseAutoencoder, x: torch.Tensor, codes: str = "sae") -> torch.Tensor:
    """x [n, d_in] -> recorded features [n, d_sae]: the inference codes (`sae`) or relu(pre) (`ungated`)."""
    if codes == "ungated":
        return sae.pre_acts(x).clamp_min(0)
    return sae.encode(x)


def _record(
    sae: SparseAutoencoder,
    pooled: np.ndarray,
    run_dir: Path,
    layer: int,
    progress: bool,
    codes: str = "sae",
    batch: int = 1024,
) -> None:
    """Encode the recorded vectors [N, d] of one layer and write them as sparse codes (zeros not stored)."""
    device = sae.W_dec.device
    with LayerWriter(run_dir, layer, sae.cfg.d_sae) as writer, torch.no_grad():
        for start in tqdm(
            range(0, len(pooled), batch),
            desc=f"recording layer {layer}",
            disable=not progress,
            unit="batch",
            leave=False,
        ):
            x = torch.from_numpy(np.asarray(pooled[start : start + batch], dtype=np.float32)).to(device)
            if pooled.dtype == np.uint16:  # bfloat16 bits
                x = torch.from_numpy(np.array(pooled[start : start + batch])).view(torch.bfloat16).float().to(device)
            writer.append(SparseCodes.from_dense(record_codes(sae, x, codes).cpu().numpy()))


def _replaceable(run_dir: Path) -> bool:
    """A run folder with no outputs yet (only settings.json and temporaries): a run that failed before
    training, e.g. on an unreadable image, which a rerun with other flags may replace."""
    return all(p.name == SETTINGS_FILE or p.name.startswith(".") for p in run_dir.iterdir())


def sae_groups(cache: Any, layers: Sequence[int]) -> list[list[int]]:
    """`layers` grouped by token layout: the SAEs of one group train together on the same token rows."""
    return [
        [layer for layer in group if layer in layers]
        for group in cache.layouts
        if any(layer in layers for layer in group)
    ]


def run(modality: str, argv: Sequence[str] | None, description: str) -> int:
    """Parse the flags and run the three stages; returns the exit status."""
    from sae.encoders import registry

    args = parse_with_recipe(build_parser(modality, description), argv, modality)
    spec = registry.spec_from_args(args)
    layers = spec.info().resolve_layers(args.layers)
    data_cfg = dataclass_from_args(DataConfig, args)
    cache_cfg = dataclass_from_args(CacheConfig, args)
    tcfg = dataclass_from_args(TrainConfig, args)
    seeds = args.seeds or [args.seed]
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds must be distinct (got {seeds})")
    runname = check_runname(args.runname) if args.runname is not None else default_runname(args.model)
    run_dir = Path(args.features_dir) / runname

    pairs = pairs_from_config(data_cfg)
    settings = {
        "model": spec.identity(),
        "data": pairs.identity(modality),
        "layers": layers,
        "token": args.token,
        "skip_bad": data_cfg.skip_bad,
        "cache_dtype": cache_cfg.cache_dtype,
        "sae": {k: v for k, v in vars(args).items() if k in _SAE_FLAGS},
        "train": tcfg.to_dict(),
        "seeds": seeds,
        **({"record_codes": args.record_codes} if args.record_codes != "sae" else {}),  # old runs keep their key
        **({"recipe": args.recipe} if args.recipe != "default" else {}),
    }
    fingerprint = _fingerprint({**settings, "train": {k: v for k, v in tcfg.to_dict().items() if k != "device"}})
    stages = (args, modality, spec, pairs, layers, cache_cfg, data_cfg, tcfg, seeds, run_dir, runname)
    distributed.init(tcfg.device)  # under torchrun every stage is split over the ranks; rank 0 owns the folder
    if not distributed.is_main():
        if distributed.broadcast_object(None):  # rank 0 claimed the run folder
            _extract_train_record(*stages)
        return 0
    busy = f"run '{runname}' in {args.features_dir} is being written by another process; wait for it or stop it"
    with exclusive(Path(args.features_dir) / f".{runname}.lock", busy):
        try:
            claimed = _claim_run_dir(run_dir, runname, fingerprint, args.overwrite)
            if claimed:
                write_json(run_dir / SETTINGS_FILE, {"fingerprint": fingerprint, **settings})
        except BaseException:
            distributed.broadcast_object(False)
            raise
        distributed.broadcast_object(claimed)
        if not claimed:
            print(f"run '{runname}' is already complete in {run_dir}")
            return 0
        _extract_train_record(*stages)
    return 0


def check_runname(name: str) -> str:
    """`name` when it is one plain path component (a folder directly under --features_dir)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise InputError(
            f"--runname {name!r} must be a plain folder name (no '/', not '.' or '..', not starting with '.')"
        )
    return name


def default_runname(model: str) -> str:
    """The --model name as a folder name: lowercased, characters other than [a-z0-9._-] replaced by '_'."""
    name = re.sub(r"[^a-z0-9._-]+", "_", model.lower()).strip("._")
    return name or "run"


def _claim_run_dir(run_dir: Path, runname: str, fingerprint: str, overwrite: bool) -> bool:
    """Make `run_dir` ready for a run with `fingerprint` (the run's lock held); False when that run is
    already complete. Only a folder holding this toolkit's settings file is ever deleted."""
    settings_path = run_dir / SETTINGS_FILE
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise InputError(f"{run_dir} exists and is not a run folder; choose another --runname")
    if not settings_path.is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise InputError(
                f"{run_dir} exists and is not a run of this toolkit (no {SETTINGS_FILE}); choose another --runname"
            )
        return True
    remove_dead_temporaries(run_dir)
    try:
        saved = read_json(settings_path).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        saved = None  # unreadable settings: treated as other settings
    if saved != fingerprint:
        if _replaceable(run_dir):
            print(f"run '{runname}' had no outputs yet: starting it again with these settings")
        elif not overwrite:
            raise InputError(
                f"run '{runname}' in {run_dir.parent} was made with other settings; choose another --runname "
                f"(--overwrite would delete its features and SAEs)"
            )
        shutil.rmtree(run_dir)
        return True
    return not (run_dir / "run.json").exists()


def _extract_train_record(
    args: argparse.Namespace,
    modality: str,
    spec: Any,
    pairs: Any,
    layers: list[int],
    cache_cfg: CacheConfig,
    data_cfg: DataConfig,
    tcfg: TrainConfig,
    seeds: list[int],
    run_dir: Path,
    runname: str,
) -> None:
    """The three stages (module docstring) into `run_dir`, whose lock is held (by rank 0 under torchrun:
    every rank runs this, each doing its share)."""
    progress = not args.quiet and distributed.is_main()
    say = print if distributed.is_main() else (lambda *a, **k: None)

    cache = extract_activations(
        spec,
        pairs,
        layers,
        cache_cfg,
        token=args.token,
        skip_bad=data_cfg.skip_bad,
        device=tcfg.device,
        progress=progress,
    )
    groups = sae_groups(cache, layers)
    trained: dict[str, Any] = {}
    n_tokens: dict[int, int] = {}
    for group in groups:
        source = ActivationSource(
            {layer_dir_name(layer): cache.token_shards(layer) for layer in group},
            groups=np.asarray(cache.token_row(group[0])) if tcfg.batch_groups else None,  # the input of each token
        )
        specs = [
            SAESpec(
                layer_dir_name(layer) + (f"_seed{seed}" if i else ""),
                layer_dir_name(layer),
                sae_config_from_args(args, cache.d_of(layer), seed=seed),
            )
            for layer in group
            for i, seed in enumerate(seeds)
        ]
        out_dir = run_dir / "saes" if len(groups) == 1 else run_dir / "saes" / f"group{group[0]:02d}"
        widths = sorted({cache.d_of(layer) for layer in group})
        say(
            f"training {len(specs)} SAE(s) on {source.n_rows} tokens of {cache.n_rows} rows "
            f"(layers {group}, d_in {'/'.join(map(str, widths))}, "
            f"d_sae {'/'.join(str(d) for d in sorted({s.cfg.d_sae for s in specs}))})"
        )
        trained.update(train_saes(source, specs, tcfg, out_dir, progress=progress))
        n_tokens.update(dict.fromkeys(group, source.n_rows))

    saes = {layer: trained[layer_dir_name(layer)].sae for layer in layers}
    for layer in layers[distributed.rank() :: distributed.world_size()]:  # the layers are split over the ranks
        _record(saes[layer], cache.pooled(layer), run_dir, layer, progress, args.record_codes)
    distributed.barrier()
    if not distributed.is_main():
        return
    first = saes[layers[0]].cfg
    d_sae = {str(layer): int(saes[layer].cfg.d_sae) for layer in layers}
    info = {
        "name": runname,
        "modality": modality,
        "model": args.model,
        "model_name": spec.name,
        "layers": layers,
        "token": args.token,
        "token_rule": cache.meta["token_rule"],
        "train_tokens": cache.meta["train_tokens"],
        "dataset": pairs.describe(),
        "split": pairs.split,
        "n_rows": cache.n_rows,
        "n_tokens": _one_or_map({str(layer): n_tokens[layer] for layer in layers}),
        "row_ids": [int(r) for r in cache.row_ids],
        "bad_rows": cache.meta["bad_rows"],
        "architecture": first.architecture,
        "d_sae": _one_or_map(d_sae),
        "d_in": {str(layer): cache.d_of(layer) for layer in layers},
        "k": first.k,
        "seeds": seeds,
        "record_codes": args.record_codes,
        "recipe": args.recipe,
        "sae_metrics": {str(layer): trained[layer_dir_name(layer)].metrics for layer in layers},
        "sae_dirs": {name: str(t.path.relative_to(run_dir)) for name, t in trained.items()},
        "activation_cache": str(cache.path),
        "world_size": distributed.world_size(),
        "format": FORMAT,
        "provenance": provenance(),
    }
    write_run_info(run_dir, info)
    for layer in layers:
        m = info["sae_metrics"][str(layer)]
        print(
            f"layer {layer}: FVU {m['fvu']:.3f}, R^2 {m['r2_overcomplete']:.3f} (overcomplete's), "
            f"cosine {m['cosine']:.3f}, L0 {m['l0']:.1f}, "
            f"dead {m['dead_fraction']:.1%} (on {m['eval_rows']} tokens)"
        )
    print(
        f"features of {cache.n_rows} rows written to {run_dir} ({args.record_codes} codes: "
        f"{RECORD_CODES[args.record_codes]}; recipe {args.recipe})"
    )


def _one_or_map(values: dict[str, int]) -> int | dict[str, int]:
    """The value shared by every layer, or the per-layer map when they differ (CLIP ResNets)."""
    return next(iter(values.values())) if len(set(values.values())) == 1 else values


_SAE_FLAGS = (
    "sae",
    "expansion_factor",
    "d_sae",
    "k",
    "k_levels",
    "prefixes",
    "l1_coef",
    "k_aux",
    "aux_coef",
    "b_dec_init",
    "decoder_bias",
    "encoder_bias",
    "unit_decoder",
    "init",
)


# ---- recipes ----------------------------------------------------------------------------------------

RECIPES = ("default", "original")

_ORIGINAL_COMMON: dict[str, Any] = {
    "sae": "topk",  # sparse_autoencoders.py: TopKSAE
    "k": 32,  # train_*.py: --top_k 32
    "expansion_factor": 8,  # train_*.py: --expansion_factor 8
    "k_aux": 0,  # sparse_autoencoders.py: TopKSAE.loss is the MSE alone (no AuxK)
    "encoder_bias": False,  # TopKSAE.forward: relu((x - b_dec) @ W_enc), no b_enc
    "unit_decoder": False,  # SparseAutoencoder.__init__ normalises W_dec rows once; the loop never again
    "init": "original",  # SparseAutoencoder.__init__: W_enc kaiming_uniform_ [d_in, d_sae], W_dec = W_enc^T, unit rows
    "b_dec_init": "zeros",  # SparseAutoencoder.__init__: b_dec = zeros
    "scale_inputs": False,  # train_*.py: the hooked layer output goes to the SAE as it is
    "lr": 5e-5,  # train_*.py: torch.optim.Adam(sae.parameters(), lr=5e-5)
    "warmup_steps": 0,  # no scheduler
    "decay_fraction": 0.0,
    "epochs": 1,  # train_*.py: one `for batch in dl_train` loop
    "autocast": False,  # fp32 throughout
    "record_codes": "ungated",  # TopKSAE.get_cls_features: relu((x - b_dec) @ W_enc), no TopK
    "token": "first",  # TopKSAE.get_cls_features: features[..., 0, :]
}

ORIGINAL: dict[str, dict[str, Any]] = {
    "image": {**_ORIGINAL_COMMON, "batch_groups": 16},  # train_image.py: --batch_size 16 images, all their tokens
    "text": {**_ORIGINAL_COMMON, "batch_groups": 256},  # train_text.py: --batch_size 256 captions
}


def add_recipe_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe",
        default="default",
        choices=RECIPES,
        help="original: every training and recording choice of the original repo (flags given explicitly win; "
        "docs/definitions.md)",
    )


def parse_with_recipe(parser: argparse.ArgumentParser, argv: Sequence[str] | None, modality: str) -> argparse.Namespace:
    """Parse `argv`, with the defaults of the recipe it names (`--recipe`)."""
    known, _ = parser.parse_known_args(argv)
    if known.recipe == "original":
        parser.set_defaults(**ORIGINAL[modality])
    return parser.parse_args(argv)
