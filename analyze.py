"""Analyses of trained SAEs and recorded features: stability, joint image+text SAEs, overlap, names.

    uv run analyze.py stability --sae_a A/ --sae_b B/ [--activations X.npy | --run R] [--out S.npz] [--json]
    uv run analyze.py embed --vlm clip --clip_model_name ViT-B/32-quickgelu --dataset coco --out E/
    uv run analyze.py joint --embeddings E/ --out J/ [--seeds 0 1] [SAE flags]
    uv run analyze.py bridge --sae J/ --embeddings E/ [--top 20] [--json]
    uv run analyze.py overlap --run_a RN50 --run_b ViT [--k 9] [--null 5] [--json]
    uv run analyze.py names --sae J/ --vlm clip --clip_model_name ViT-B/32-quickgelu [--run R] [--top 5] [--json]

`joint` / `bridge` also take the two arrays as --image_embeddings I.npy --text_embeddings T.npy, and
`names` the vocabulary's embeddings as --vocab_embeddings V.npy. Definitions and output fields:
docs/analyses.md. Bad input is one line `error: ...` (exit status 2).
"""

from __future__ import annotations

import argparse
import json as jsonlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sae.util.cli import add_dataclass_args, dataclass_from_args, run_cli
from sae.util.errors import InputError

PER_FEATURE_JSON_LIMIT = 1024  # stability: per-feature arrays go into --json up to this many features


def _h(text: str, **extra: Any) -> Any:
    return {"help": text, **extra}


@dataclass
class Common:
    json: bool = field(default=False, metadata=_h("print one JSON object instead of the text report"))
    device: str = field(default="auto", metadata=_h("auto (CUDA if present), cpu or cuda[:i]"))
    progress: bool = field(default=True, metadata=_h("progress bars on stderr"))


@dataclass
class StabilityArgs(Common):
    sae_a: str | None = field(default=None, metadata=_h("SAE checkpoint folder A (cfg.json + sae.safetensors)"))
    sae_b: str | None = field(default=None, metadata=_h("SAE checkpoint folder B (same d_in as A)"))
    use: str = field(
        default="decoder",
        metadata=_h(
            "match decoder rows (the paper) or encoder columns (MSAE's default)", choices=("decoder", "encoder")
        ),
    )
    activations: str | None = field(
        default=None,
        metadata=_h(
            "optional .npy [rows, d_in] of A's inputs: energy / frequency of A's features for the binned report"
        ),
    )
    features_dir: str = field(default="sae_features", metadata=_h("folder of feature runs (with --run)"))
    run: str | None = field(
        default=None,
        metadata=_h("optional feature run recorded with SAE A (instead of --activations) for energy / frequency"),
    )
    layer: int | None = field(default=None, metadata=_h("layer of --run (default: its deepest)"))
    threshold: float = field(default=0.7, metadata=_h("a feature is shared when its matched cosine >= this"))
    bins: int = field(default=10, metadata=_h("equal-count energy / frequency bins"))
    null: bool = field(default=False, metadata=_h("also match A against a random dictionary of B's shape"))
    seed: int = field(default=0, metadata=_h("seed of --null"))
    batch_size: int = field(default=1024, metadata=_h("rows encoded at a time"))
    out: str | None = field(
        default=None,
        metadata=_h("save per-feature arrays (stability, partner, energy, energy_sq, frequency) to this .npz"),
    )


EMBEDDINGS_HELP = "folder written by `analyze.py embed` (image.npy + text.npy of the same pairs)"


@dataclass
class BridgeArgs(Common):
    sae: str | None = field(default=None, metadata=_h("joint SAE checkpoint folder"))
    embeddings: str | None = field(default=None, metadata=_h(EMBEDDINGS_HELP + "; or give the two .npy flags"))
    image_embeddings: str | None = field(default=None, metadata=_h(".npy [N, d]: image embeddings of N pairs"))
    text_embeddings: str | None = field(
        default=None, metadata=_h(".npy [N, d]: text embeddings, row n pairs with image n")
    )
    top: int = field(default=20, metadata=_h("bridge pairs listed"))
    eps: float = field(default=0.05, metadata=_h("modality buckets: text-only mu < eps, image-only mu > 1 - eps"))
    batch_size: int = field(default=1024, metadata=_h("rows encoded at a time"))
    out: str | None = field(default=None, metadata=_h("save per-concept arrays (modality, energy, ...) to this .npz"))


@dataclass
class JointArgs(Common):
    embeddings: str | None = field(default=None, metadata=_h(EMBEDDINGS_HELP + "; or give the two .npy flags"))
    image_embeddings: str | None = field(default=None, metadata=_h(".npy [N, d]: image embeddings of N pairs"))
    text_embeddings: str | None = field(
        default=None, metadata=_h(".npy [N, d]: text embeddings, row n pairs with image n")
    )
    out: str | None = field(default=None, metadata=_h("output folder (one SAE, or seed<S>/ per --seeds)"))
    seeds: list[int] | None = field(
        default=None,
        metadata=_h(
            "train one SAE per initialisation seed in the same pass (folders seed<S>/); stability of the first "
            "against each other is reported"
        ),
    )
    image_fraction: float | None = field(
        default=None, metadata=_h("data diet: train on image:text rows in this proportion (default: all rows of both)")
    )
    normalize: bool = field(
        default=True,
        metadata=_h(
            "L2-normalise every embedding before training and analysis (the Bridge Score paper's joint SAE; "
            "--no-normalize keeps them as they are)"
        ),
    )
    top: int = field(default=20, metadata=_h("bridge pairs listed"))
    eps: float = field(default=0.05, metadata=_h("modality buckets: text-only mu < eps, image-only mu > 1 - eps"))
    threshold: float = field(default=0.7, metadata=_h("stability: shared when matched cosine >= this"))


@dataclass
class EmbedArgs(Common):
    out: str | None = field(
        default=None,
        metadata=_h("output folder: image.npy, text.npy [N, d], row_ids.npy, meta.json (written atomically)"),
    )
    batch_size: int = field(default=256, metadata=_h("pairs embedded at a time"))
    num_workers: int = field(default=0, metadata=_h("DataLoader worker processes (image decoding, preprocessing)"))
    normalize: bool = field(
        default=False, metadata=_h("L2-normalise every embedding (as the Bridge Score paper's follow-up code does)")
    )
    overwrite: bool = field(default=False, metadata=_h("replace --out when it holds other embeddings"))


@dataclass
class OverlapArgs(Common):
    run_a: str | None = field(default=None, metadata=_h("feature run A (a folder under --features_dir)"))
    run_b: str | None = field(default=None, metadata=_h("feature run B, recorded on the same rows"))
    allow_different_data: bool = field(
        default=False, metadata=_h("compare runs recorded on different datasets (said in the result)")
    )
    features_dir: str = field(default="sae_features", metadata=_h("folder holding the runs"))
    layer_a: int | None = field(default=None, metadata=_h("layer of A (default: its deepest)"))
    layer_b: int | None = field(default=None, metadata=_h("layer of B (default: its deepest)"))
    k: int = field(default=9, metadata=_h("top rows per feature (the report's top-9 grid; 16 for Fry's 4x4)"))
    min_rows: int | None = field(
        default=None,
        metadata=_h(
            "a feature is live when it fires on at least this many rows (default: k, so that every live feature "
            "has a full top-k set)"
        ),
    )
    denominator: str = field(
        default="k",
        metadata=_h(
            "overlap = |T_A & T_B| / k, or / min(|T_A|, |T_B|) (counts short top-k sets as full)", choices=("k", "min")
        ),
    )
    null: int = field(default=5, metadata=_h("random row permutations of B for the null baseline (0: none)"))
    seed: int = field(default=0, metadata=_h("seed of the null permutations"))
    pairing: list[str] = field(
        default_factory=lambda: ["argmax", "mutual", "hungarian"],
        metadata=_h("pairings to compute (hungarian: one-to-one, exact)", choices=("argmax", "mutual", "hungarian")),
    )
    top: int = field(default=10, metadata=_h("pairs listed per pairing"))
    out: str | None = field(default=None, metadata=_h("save best matches and all pairs to this .npz"))


@dataclass
class NamesArgs(Common):
    sae: str | None = field(default=None, metadata=_h("SAE checkpoint folder (trained on embeddings)"))
    vocab: str | None = field(
        default=None,
        metadata=_h("word list, one word or phrase per line (default: vocab/default.txt of this repository)"),
    )
    vocab_embeddings: str | None = field(
        default=None,
        metadata=_h(
            ".npy [V, d]: the --vocab words embedded by the text tower of the SAE's model, rows in file order "
            "(instead of --vlm)"
        ),
    )
    vocab_cache: str = field(
        default=str(Path(__file__).resolve().parent / "vocab" / "cache"),
        metadata=_h("where --vlm caches the vocabulary's embeddings (one .npy per text model and word list)"),
    )
    batch_size: int = field(default=256, metadata=_h("words embedded at a time (--vlm)"))
    top: int = field(default=5, metadata=_h("words per feature"))
    offset: str = field(
        default="none",
        metadata=_h(
            "feature direction: decoder row (none) or decoder row + b_dec (MSAE's '+ mean')", choices=("none", "b_dec")
        ),
    )
    center_vocab: bool = field(default=False, metadata=_h("subtract the vocabulary's mean embedding first"))
    features_dir: str = field(default="sae_features", metadata=_h("folder of feature runs (with --run)"))
    run: str | None = field(
        default=None,
        metadata=_h("write <features_dir>/<run>/names_layerNN.json for show.py (the run's features come from --sae)"),
    )
    layer: int | None = field(default=None, metadata=_h("layer of --run (default: its deepest)"))
    out: str | None = field(default=None, metadata=_h("write the names JSON here (instead of / besides --run)"))
    show: int = field(default=20, metadata=_h("features listed in the text report"))


def _require(**flags: str | None) -> list[str]:
    """The values of required flags, in order; InputError naming every missing one."""
    missing = [f"--{k}" for k, v in flags.items() if v is None]
    if missing:
        raise InputError(f"missing {', '.join(missing)}")
    return [v for v in flags.values() if v is not None]


def _clean(obj: Any, strict: bool = True) -> Any:
    """numpy -> Python, and with `strict` NaN/inf -> None, so the output is strict JSON (the text
    reports take strict=False: they print nan)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v, strict) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, strict) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist(), strict)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) or not strict else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def dumps(obj: Any) -> str:
    return jsonlib.dumps(_clean(obj), indent=2, allow_nan=False)


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)  # pyright: ignore[reportArgumentType]  # numpy stub matches **arrays to allow_pickle
    except OSError as e:
        raise InputError(f"cannot write {path}: {e}") from None


# ------------------------------------------------------------------------------------------------


def cmd_stability(a: StabilityArgs) -> int:
    from sae.analysis.stability import code_stats, dictionary_of, format_stability, iter_codes, stability
    from sae.nn.checkpoint import load_sae

    path_a, path_b = _require(sae_a=a.sae_a, sae_b=a.sae_b)
    if a.activations and a.run:
        raise InputError("give --activations or --run for the feature statistics, not both")
    sae_a, sae_b = load_sae(path_a), load_sae(path_b)
    if sae_a.cfg.d_in != sae_b.cfg.d_in:
        raise InputError(
            f"the SAEs have different d_in ({a.sae_a}: {sae_a.cfg.d_in}, {a.sae_b}: "
            f"{sae_b.cfg.d_in}); stability compares SAEs trained on the same activations"
        )
    stats = None
    if a.activations:
        from sae.nn.sources import check_finite_rows, load_npy

        x = load_npy(a.activations, "activation")
        check_finite_rows(x, str(a.activations))
        stats = code_stats(iter_codes(sae_a, x, batch_size=a.batch_size, device=a.device, progress=a.progress))
    elif a.run:
        from sae.analysis.overlap import load_layer
        from sae.data.features import open_run

        layer, codes = load_layer(open_run(a.features_dir, a.run), a.layer)
        if codes.d_sae != sae_a.cfg.d_sae:
            raise InputError(f"run '{a.run}' layer {layer} has {codes.d_sae} features, SAE A {sae_a.cfg.d_sae}")
        stats = code_stats(codes)
    res = stability(
        dictionary_of(sae_a, a.use),
        dictionary_of(sae_b, a.use),
        stats=stats,
        threshold=a.threshold,
        n_bins=a.bins,
        null=a.null,
        seed=a.seed,
        device=a.device,
        progress=a.progress,
    )
    summary = {"sae_a": a.sae_a, "sae_b": a.sae_b, "use": a.use, **res.summary()}
    if a.out:
        _save_npz(a.out, res.per_feature())
        summary["out"] = a.out
    if a.json:
        if res.c_a <= PER_FEATURE_JSON_LIMIT:
            summary["per_feature"] = {k: v for k, v in res.per_feature().items()}
        print(dumps(summary))
    else:
        print(format_stability(summary))
    return 0


def _embeddings(a: BridgeArgs | JointArgs) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(image [N, d], text [N, d], where they came from) from --embeddings DIR or the two .npy flags."""
    from sae.analysis.bridge import check_embeddings
    from sae.nn.sources import load_npy

    if a.embeddings is not None:
        if a.image_embeddings is not None or a.text_embeddings is not None:
            raise InputError("give --embeddings DIR or --image_embeddings/--text_embeddings, not both")
        from sae.analysis.embed import open_embeddings

        emb = open_embeddings(a.embeddings)
        img, txt = emb.image, emb.text
        source = {
            "embeddings": str(emb.path),
            "vlm": emb.meta.get("vlm"),
            "image_model": emb.meta.get("identity", {}).get("image", {}).get("name"),
            "text_model": emb.meta.get("identity", {}).get("text", {}).get("name"),
            "dataset": emb.meta.get("dataset", {}).get("name"),
        }
    else:
        if a.image_embeddings is None or a.text_embeddings is None:
            raise InputError("missing --embeddings DIR (or both --image_embeddings and --text_embeddings)")
        img = load_npy(a.image_embeddings, "image embeddings")
        txt = load_npy(a.text_embeddings, "text embeddings")
        source = {"image_embeddings": a.image_embeddings, "text_embeddings": a.text_embeddings}
    check_embeddings(img, txt, paired=True)
    return img, txt, source


def cmd_bridge(a: BridgeArgs) -> int:
    from sae.analysis.bridge import analyze_joint, format_report
    from sae.nn.checkpoint import load_sae

    [sae_dir] = _require(sae=a.sae)
    sae = load_sae(sae_dir)
    img, txt, _ = _embeddings(a)
    joint_json = Path(sae_dir) / "joint.json"
    if joint_json.is_file() and jsonlib.loads(joint_json.read_text()).get("normalized"):
        from sae.analysis.bridge import unit_rows

        img, txt = unit_rows(img), unit_rows(txt)  # as the SAE was trained
    report = analyze_joint(
        sae, img, txt, top=a.top, eps=a.eps, batch_size=a.batch_size, device=a.device, progress=a.progress
    )
    js = {"sae": a.sae, **report.to_json()}
    if a.out:
        _save_npz(a.out, report.per_concept())
        js["out"] = a.out
    print(dumps(js) if a.json else format_report(_clean(js, strict=False), top=a.top))
    return 0


def cmd_joint(a: JointArgs, args: argparse.Namespace) -> int:
    from sae.analysis.bridge import analyze_joint, format_report, train_joint_saes
    from sae.analysis.stability import CodeStats, format_stability, stability
    from sae.nn.checkpoint import load_sae
    from sae.nn.config import TrainConfig, sae_config_from_args

    [out_dir] = _require(out=a.out)
    img, txt, source = _embeddings(a)
    if a.normalize:
        from sae.analysis.bridge import unit_rows

        img, txt = unit_rows(img), unit_rows(txt)
    tcfg = dataclass_from_args(TrainConfig, args)
    seeds = a.seeds if a.seeds else [args.seed]
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds repeats a seed: {seeds}")
    cfgs = {}
    for s in seeds:
        cfg = sae_config_from_args(args, img.shape[1], seed=s)
        cfg.validate()
        cfgs[f"seed{s}" if a.seeds else ""] = cfg
    trained = train_joint_saes(
        img,
        txt,
        cfgs,
        tcfg,
        out_dir,
        image_fraction=a.image_fraction,
        source=source,
        normalized=a.normalize,
        progress=a.progress,
    )
    # analyse the saved checkpoints, not the in-memory SAEs: saving folds a ReLU SAE's decoder norms
    saved = {name: load_sae(t.path) for name, t in trained.items()}
    out: dict[str, Any] = {"out": a.out, "saes": {}}
    reports = {}
    for name, t in trained.items():
        rep = analyze_joint(saved[name], img, txt, top=a.top, eps=a.eps, device=a.device, progress=a.progress)
        reports[name] = rep
        out["saes"][name or "sae"] = {
            "path": str(t.path),
            "normalized": a.normalize,
            "metrics": t.metrics,
            **rep.to_json(),
        }
    if len(trained) > 1:
        names = list(trained)
        first = reports[names[0]].stats
        stats = CodeStats(first.n_image + first.n_text, first.energy, first.energy_sq, first.frequency)
        out["stability"] = {}
        for other in names[1:]:
            res = stability(
                saved[names[0]].W_dec,
                saved[other].W_dec,
                stats=stats,
                threshold=a.threshold,
                device=a.device,
                progress=a.progress,
            )
            out["stability"][f"{names[0]}_vs_{other}"] = res.summary()
    if a.json:
        print(dumps(out))
    else:
        js = _clean(out, strict=False)
        for name, rep in js["saes"].items():
            m = rep["metrics"]
            print(
                f"== {name}: {rep['path']} (FVU {m['fvu']:.3f}, R^2 {m['r2_overcomplete']:.3f} as overcomplete's "
                f"r2_score, L0 {m['l0']:.1f}; embeddings {'L2-normalised' if a.normalize else 'as given'})"
            )
            print(format_report(rep, top=min(a.top, 10)))
        for pair, summary in out.get("stability", {}).items():
            print(f"== stability {pair}")
            print(format_stability(summary))
    return 0


def cmd_embed(a: EmbedArgs, args: argparse.Namespace) -> int:
    from sae.analysis.embed import embed_pairs, embedding_identity, existing, specs_from_args
    from sae.data.datasets import DataConfig, pairs_from_config

    [out_dir] = _require(out=a.out)
    image_spec, text_spec = specs_from_args(args)
    pairs = pairs_from_config(dataclass_from_args(DataConfig, args))
    identity = embedding_identity(image_spec, text_spec, pairs, a.normalize, args.skip_bad)
    emb = existing(out_dir, identity, a.overwrite)
    reused = emb is not None
    if emb is None:
        image_adapter, text_adapter = image_spec.load(a.device), text_spec.load(a.device)
        emb = embed_pairs(
            image_adapter,
            text_adapter,
            pairs,
            out_dir,
            batch_size=a.batch_size,
            num_workers=a.num_workers,
            skip_bad=args.skip_bad,
            normalize=a.normalize,
            vlm=args.vlm,
            identity=identity,
            progress=a.progress,
        )
    m = emb.meta
    summary = {
        "out": str(emb.path),
        "reused": reused,
        "vlm": m["vlm"],
        "image_model": image_spec.name,
        "text_model": text_spec.name,
        "dataset": m["dataset"],
        "n_rows": m["n_rows"],
        "d": m["d"],
        "normalize": m["normalize"],
        "n_skipped": len(m["skipped"]),
    }
    if a.json:
        print(dumps(summary))
    else:
        print(
            ("reused " if reused else "") + f"{m['n_rows']} pairs x {m['d']} dimensions ({image_spec.model} + "
            f"{text_spec.model} {image_spec.name}) of {m['dataset']['name']} in {emb.path}"
            + (f"; {len(m['skipped'])} unreadable rows skipped" if m["skipped"] else "")
        )
    return 0


def cmd_overlap(a: OverlapArgs) -> int:
    from sae.analysis.overlap import check_same_rows, format_overlap, load_layer, overlap_analysis
    from sae.data.features import open_run

    name_a, name_b = _require(run_a=a.run_a, run_b=a.run_b)
    if a.null < 0:
        raise InputError(f"--null must be >= 0 (got {a.null})")
    run_a, run_b = open_run(a.features_dir, name_a), open_run(a.features_dir, name_b)
    la, ca = load_layer(run_a, a.layer_a)
    lb, cb = load_layer(run_b, a.layer_b)
    different = check_same_rows(run_a, run_b, ca.n_rows, cb.n_rows, a.allow_different_data)
    res = overlap_analysis(
        ca,
        cb,
        k=a.k,
        null=a.null,
        seed=a.seed,
        min_rows=a.min_rows,
        denominator=a.denominator,
        methods=a.pairing,
        progress=a.progress,
    )
    res.extra.update(run_a=a.run_a, layer_a=la, run_b=a.run_b, layer_b=lb)
    if different:
        res.extra["allow_different_data"] = different
    js = res.to_json(top=a.top)
    if a.out:
        _save_npz(a.out, res.arrays())
        js["out"] = a.out
    print(dumps(js) if a.json else format_overlap(_clean(js, strict=False), top=a.top))
    return 0


def cmd_names(a: NamesArgs, args: argparse.Namespace) -> int:
    from sae.analysis.naming import (
        DEFAULT_VOCAB,
        feature_directions,
        load_vocab,
        name_features,
        names_path,
        write_names,
    )
    from sae.nn.checkpoint import load_sae

    [sae_dir] = _require(sae=a.sae)
    if (a.vocab_embeddings is None) == (args.vlm is None):
        raise InputError(
            "give --vlm clip|siglip2 (embeds the --vocab words with that model's text tower) or "
            "--vocab_embeddings V.npy (the words already embedded, one row per word in file order)"
        )
    if a.top < 1:
        raise InputError(f"--top must be at least 1 (got {a.top})")
    sae = load_sae(sae_dir)
    words = load_vocab(a.vocab or DEFAULT_VOCAB)
    vocab_source: dict[str, Any]
    if args.vlm is not None:
        from sae.analysis.embed import embed_texts, specs_from_args

        _, text_spec = specs_from_args(args)
        _warn_other_model(sae_dir, text_spec.identity().get("name") or text_spec.name)
        V, cache_file, cached = embed_texts(
            text_spec, words, a.vocab_cache, device=a.device, batch_size=a.batch_size, progress=a.progress
        )
        vocab_source = {"text_model": text_spec.name, "vocab_cache": str(cache_file), "cached": cached}
    else:
        from sae.nn.sources import load_npy

        assert a.vocab_embeddings is not None, "checked above: --vlm or --vocab_embeddings"
        V = np.asarray(load_npy(a.vocab_embeddings, "vocabulary embeddings"))
        vocab_source = {"vocab_embeddings": a.vocab_embeddings}
    targets = []
    if a.run:
        from sae.analysis.overlap import load_layer
        from sae.data.features import open_run

        layer, codes = load_layer(open_run(a.features_dir, a.run), a.layer)
        if codes.d_sae != sae.cfg.d_sae:
            raise InputError(f"run '{a.run}' layer {layer} has {codes.d_sae} features, the SAE {sae.cfg.d_sae}")
        targets.append(names_path(a.features_dir, a.run, layer))
    if a.out:
        targets.append(Path(a.out))
    names = name_features(
        feature_directions(sae, a.offset),
        V,
        words,
        a.top,
        center_vocab=a.center_vocab,
        device=a.device,
        progress=a.progress,
    )
    mapping = names.to_json()
    for path in targets:
        try:
            write_names(path, mapping)
        except OSError as e:
            raise InputError(f"cannot write {path}: {e}") from None
    if a.json:
        print(
            dumps(
                {
                    "sae": a.sae,
                    "vocab": str(a.vocab or DEFAULT_VOCAB),
                    "n_words": len(words),
                    **vocab_source,
                    "offset": a.offset,
                    "written": [str(p) for p in targets],
                    "names": mapping,
                }
            )
        )
    else:
        for p in targets:
            print(f"names of {len(mapping)} features written to {p}")
        for f in range(min(a.show, len(mapping))):
            print(f"{f:>6}  " + ", ".join(f"{w} ({c:.2f})" for w, c in mapping[str(f)]))
    return 0


def _warn_other_model(sae_dir: str, text_model: str) -> None:
    """A warning on stderr when the SAE's joint.json says it was trained on another model's embeddings."""
    import sys

    path = Path(sae_dir) / "joint.json"
    if not path.exists():
        return
    try:
        trained_on = jsonlib.loads(path.read_text()).get("source", {}).get("text_model")
    except (ValueError, AttributeError):
        return
    if trained_on and trained_on != text_model:
        print(
            f"warning: {sae_dir} was trained on embeddings of {trained_on}, the vocabulary is embedded with "
            f"{text_model}",
            file=sys.stderr,
        )


COMMANDS = {
    "stability": (StabilityArgs, "match the features of two SAEs (Hungarian on cosine); stability vs energy"),
    "bridge": (BridgeArgs, "modality scores, energy and the Bridge Score of a joint image+text SAE"),
    "embed": (EmbedArgs, "final projected image and text embeddings of a dataset's pairs by a vision-language model"),
    "joint": (JointArgs, "train a joint image+text SAE (or one per seed), then the bridge report"),
    "overlap": (OverlapArgs, "top-k row overlap between the features of two runs, with a null and pairings"),
    "names": (NamesArgs, "name the features of an embedding-space SAE by their nearest vocabulary words"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "joint":
            from sae.nn.config import add_sae_args

            add_dataclass_args(p, cls, skip=("device",))  # --device comes with the training flags
            add_sae_args(p)
        else:
            add_dataclass_args(p, cls)
        if name in ("embed", "names"):
            from sae.analysis.embed import add_vlm_args

            add_vlm_args(p, default="clip" if name == "embed" else None)
        if name == "embed":
            from sae.data.datasets import DataConfig

            add_dataclass_args(p.add_argument_group("dataset"), DataConfig)
    args = parser.parse_args(argv)
    cls = COMMANDS[args.command][0]
    cfg = dataclass_from_args(cls, args)
    if args.command in ("joint", "embed", "names"):
        return {"joint": cmd_joint, "embed": cmd_embed, "names": cmd_names}[args.command](cfg, args)
    return {"stability": cmd_stability, "bridge": cmd_bridge, "overlap": cmd_overlap}[args.command](cfg)


if __name__ == "__main__":
    run_cli(main)
