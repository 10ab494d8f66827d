"""`python -m sae <command>`: train an SAE on an activation array, or run the embedded demo (sae/demo.py).

python -m sae train --activations X.npy --sae topk --k 32 --expansion_factor 8 --epochs 5 --out DIR
python -m sae demo
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


def cmd_demo(args: argparse.Namespace) -> int:
    from sae.demo import run_demo

    run_demo(args.out, n_rows=args.rows, quiet=args.quiet)
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
    demo = sub.add_parser("demo", help="the embedded default: the whole pipeline on generated data, offline, CPU")
    demo.add_argument("--out", default="demo_out", help="output directory")
    demo.add_argument("--rows", type=int, default=400, help="rows of the generated captioned dataset")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


def cli() -> None:
    """The `share-concepts` console script: same as `python -m sae`."""
    run_cli(main, sys.argv[1:])


if __name__ == "__main__":
    cli()
