"""wMPPC of a source run against a target run, from their recorded SAE features.

    uv run wmppc.py --source A --target B [--json] [--plot matrix.png] [--null 10] [--no-save]

Prints `All Layers : x | Last layer : y` (the only line with `All Layers :`), MPPC, the null baseline, the
feature definition of each run (`features: A = sae, B = ungated`, with a warning when they differ;
docs/definitions.md) and the per-layer-pair matrix. Reads this toolkit's runs and the original repo's
dense `layerNN.pt` runs.
Definitions: docs/comparison.md.
Unless --no-save, the results are also saved next to the source run for the feature browser
(format: sae/analysis/comparison_files.py): <features_dir>/A/comparisons/L{a:02d}__B__wmppc.json,
per source layer a, the best match of every feature over all of B's layers, and comparisons/wmppc__B.json,
the full result. Only runs recorded by this toolkit (with a run.json) get them; one line on stderr says
where, or why not.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

from sae.util.cli import add_dataclass_args, dataclass_from_args, run_cli
from sae.util.errors import InputError


@dataclass
class WMPPCConfig:
    source: str | None = field(default=None, metadata={"help": "source run A (a folder under --features_dir)"})
    target: str | None = field(default=None, metadata={"help": "target run B"})
    features_dir: str = field(default="sae_features", metadata={"help": "folder holding the runs"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of the text report"})
    plot: str | None = field(default=None, metadata={"help": "save the per-layer matrix as a heatmap (.png)"})
    plot_autoscale: bool = field(
        default=False,
        metadata={
            "help": "fit the heatmap's colour scale to the matrix (default: fixed 0..1, comparable across pairs)"
        },
    )
    save: bool = field(
        default=True, metadata={"help": "save the best matches and the result in the source run's comparisons/ folder"}
    )
    null: int = field(default=0, metadata={"help": "K random row permutations of the target for a null baseline"})
    seed: int = field(default=0, metadata={"help": "seed of the --null permutations"})
    source_layers: list[int] | None = field(default=None, metadata={"help": "only these layers of A"})
    target_layers: list[int] | None = field(default=None, metadata={"help": "only these layers of B"})
    original_scaling: bool = field(
        default=False, metadata={"help": "scale correlations by (N-1)/N like the original code; off: exact Pearson"}
    )
    allow_different_data: bool = field(
        default=False, metadata={"help": "compare runs recorded on different datasets (said in the result)"}
    )
    device: str = field(default="auto", metadata={"help": "auto (CUDA if present), cpu, or cuda[:N]"})
    progress: bool = field(default=True, metadata={"help": "progress bar on stderr"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    add_dataclass_args(parser, WMPPCConfig)
    cfg = dataclass_from_args(WMPPCConfig, parser.parse_args(argv))
    if not cfg.source or not cfg.target:
        raise InputError("give both --source and --target (run names under --features_dir)")

    import sys

    from sae.analysis.compare import codes_warning, dumps, format_wmppc, plot_matrix, save_and_say, save_wmppc, wmppc
    from sae.analysis.correlation import make_engine
    from sae.data.features import open_run

    source = open_run(cfg.features_dir, cfg.source)
    target = open_run(cfg.features_dir, cfg.target)
    from sae.util import distributed

    distributed.init(cfg.device)  # under torchrun: the layer pairs are split over the ranks
    result = wmppc(
        source,
        target,
        source_layers=cfg.source_layers,
        target_layers=cfg.target_layers,
        engine=make_engine(distributed.engine_device(cfg.device)),
        original_scaling=cfg.original_scaling,
        null=cfg.null,
        seed=cfg.seed,
        progress=cfg.progress and distributed.is_main(),
        allow_different_data=cfg.allow_different_data,
    )
    if not distributed.is_main():  # rank 0 reports and saves
        return 0
    if cfg.plot:
        plot_matrix(result, cfg.plot, **({"vmin": None, "vmax": None} if cfg.plot_autoscale else {}))
    print(dumps(result.to_json()) if cfg.json else format_wmppc(result))
    if cfg.json and len(set(result.codes.values())) > 1:
        print(codes_warning(result.codes), file=sys.stderr)
    if cfg.save:
        print(save_and_say(save_wmppc, result, source), file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
