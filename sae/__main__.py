"""`python -m sae <command>`: train an SAE on an activation array, or run the embedded demo (sae/demo.py).

python -m sae train --activations X.npy --sae topk --k 32 --expansion_factor 8 --epochs 5 --out DIR
python -m sae demo
python -m sae export --format saelens --sae RUN/saes/layer05 --out OUT   (or sparsify, dictionary_learning)
python -m sae push --run RUN --repo ORG/NAME                             (Hugging Face Hub)
python -m sae convert sae_features/RUN      # original-format layerNN.pt -> layerNN.csr-v1/ copies, once
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from sae.nn.config import TrainConfig, add_sae_args, sae_config_from_args
from sae.util.cli import dataclass_from_args, run_cli


def cmd_train(args: argparse.Namespace) -> int:
    from sae.nn.sources import ActivationSource
    from sae.nn.trainer import SAESpec, train_saes

    source = ActivationSource.from_npy(args.activations)
    source.check_finite("x")
    cfg = sae_config_from_args(args, source.d_in("x"))
    cfg.validate()
    tcfg = dataclass_from_args(TrainConfig, args)
    result = train_saes(source, [SAESpec("", "x", cfg)], tcfg, args.out, progress=not args.quiet)[""]
    summary = {k: v for k, v in result.metrics.items() if k != "firing_histogram"}  # that one: metrics.json
    print(json.dumps({"out": str(result.path), **summary}, indent=2))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sae.data.features import FeatureRun, convert_layer, sidecar_path
    from sae.util.errors import InputError

    for folder in args.runs:
        run = FeatureRun(Path(folder)) if Path(folder).is_dir() else None
        if run is None or run.format == "csr-v1":
            raise InputError(f"{folder} is not a folder of original-format layerNN.pt files")
        for layer in run.layers:
            codes = convert_layer(run.layer_path(layer), layer, progress=not args.quiet)
            print(f"{sidecar_path(run.layer_path(layer))}: {codes.n_rows} rows, {codes.nnz} non-zeros")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sae.demo import run_demo

    run_demo(args.out, n_rows=args.rows, quiet=args.quiet)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sae.nn.checkpoint import load_sae
    from sae.nn.interop import export_sae, run_metadata

    sae = load_sae(args.sae)
    meta = run_metadata(Path(args.sae)) if not str(args.sae).startswith("hf://") else {}
    out = export_sae(sae, args.format, args.out, meta)
    print(f"{sae.cfg.architecture} SAE written for {args.format} in {out}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from sae.nn.hub import push_run, stage_run

    if args.out:
        print(f"folder for {args.repo} written to {stage_run(args.run, args.out, args.repo)} (not uploaded)")
        return 0
    print(f"uploaded: {push_run(args.run, args.repo, private=args.private)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one SAE on a .npy activation array [rows, d_in]")
    train.add_argument("--activations", required=True, help=".npy file [rows, d_in], any float dtype (memory-mapped)")
    train.add_argument("--out", required=True, help="output directory (resumes if it holds a checkpoint)")
    add_sae_args(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)
    convert = sub.add_parser(
        "convert", help="convert original-format runs (dense layerNN.pt) to csr-v1 copies kept beside them"
    )
    convert.add_argument("runs", nargs="+", help="run folders holding layerNN.pt files")
    convert.add_argument("--quiet", action="store_true")
    convert.set_defaults(func=cmd_convert)
    demo = sub.add_parser("demo", help="the embedded default: the whole pipeline on generated data, offline, CPU")
    demo.add_argument("--out", default="demo_out", help="output directory")
    demo.add_argument("--rows", type=int, default=400, help="rows of the generated captioned dataset")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)
    export = sub.add_parser("export", help="write an SAE as a SAELens, sparsify or dictionary_learning folder")
    export.add_argument("--format", required=True, choices=("saelens", "sparsify", "dictionary_learning"))
    export.add_argument("--sae", required=True, help="SAE folder (RUN/saes/layerNN) or hf://ORG/NAME/SUBFOLDER")
    export.add_argument("--out", required=True, help="output folder")
    export.set_defaults(func=cmd_export)
    push = sub.add_parser("push", help="upload a run's SAEs, run.json and a model card to the Hugging Face Hub")
    push.add_argument("--run", required=True, help="run folder (holds run.json)")
    push.add_argument("--repo", required=True, help="Hub repository ORG/NAME (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--out", default=None, help="only write the folder that would be uploaded here")
    push.set_defaults(func=cmd_push)
    args = parser.parse_args(argv)
    return args.func(args)


def cli() -> None:
    """The `share-concepts` console script: same as `python -m sae`."""
    run_cli(main, sys.argv[1:])


if __name__ == "__main__":
    cli()
