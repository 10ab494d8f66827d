"""Generalized comparative sharedness: features of M better shared with every run of G than any of H.

    uv run comp_sharedness.py --source M --min_group G1 G2 --max_group H1 H2 [--top 0.01] [--json] [--csv FILE]
                              [--plot delta.png] [--no-save]

Delta_i = S_i ((rho_iG^+)^2 - (rho_iH^+)^2), rho^+ = max(rho, 0); prints the top live features by Delta and
the feature definition of each run (a warning when they differ; docs/definitions.md).
Definitions: docs/comparison.md.
Unless --no-save, the results are also saved next to M for the feature browser
(format: sae/analysis/comparison_files.py): <features_dir>/M/comparisons/L{layer:02d}__{run}__comp_sharedness.json,
the best match of every feature in each compared run, and comparisons/sharedness_L{layer:02d}.json, the full
result. Only runs recorded by this toolkit (with a run.json) get them; one line on stderr says where, or why not.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

from sae.util.cli import add_dataclass_args, dataclass_from_args, run_cli
from sae.util.errors import InputError


@dataclass
class SharednessConfig:
    source: str | None = field(default=None, metadata={"help": "run M whose features are scored"})
    min_group: list[str] = field(
        default_factory=list,
        metadata={"help": "runs G: a feature must be shared with every one (min of the best correlations)"},
    )
    max_group: list[str] = field(
        default_factory=list,
        metadata={"help": "runs H: a feature must be shared with none (max of the best correlations)"},
    )
    features_dir: str = field(default="sae_features", metadata={"help": "folder holding the runs"})
    layer: int | None = field(default=None, metadata={"help": "layer of M (default: its deepest)"})
    target_layer: str = field(
        default="last",
        metadata={"help": "layer of each G/H run: 'last' (deepest), an index, or 'all' (best over every layer)"},
    )
    top: float = field(default=0.01, metadata={"help": "fraction of M's features to print, by Delta"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of the table"})
    csv: str | None = field(default=None, metadata={"help": "also write the selected features to this CSV"})
    plot: str | None = field(
        default=None,
        metadata={"help": "save the Delta-against-S scatter of every feature (.png; see sae/viz/plots.py)"},
    )
    save: bool = field(
        default=True, metadata={"help": "save the best matches and the result in M's comparisons/ folder"}
    )
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
    add_dataclass_args(parser, SharednessConfig, skip=("min_group", "max_group"))
    # nargs="*" so that an empty group is reported by the library's one-line error
    parser.add_argument(
        "--min_group", nargs="*", default=[], help=SharednessConfig.__dataclass_fields__["min_group"].metadata["help"]
    )
    parser.add_argument(
        "--max_group", nargs="*", default=[], help=SharednessConfig.__dataclass_fields__["max_group"].metadata["help"]
    )
    cfg = dataclass_from_args(SharednessConfig, parser.parse_args(argv))
    if not cfg.source:
        raise InputError("give --source (the run M whose features are scored)")

    import sys

    from sae.analysis.compare import (
        codes_warning,
        comparative_sharedness,
        dumps,
        format_sharedness,
        save_and_say,
        save_sharedness,
        write_sharedness_csv,
    )
    from sae.analysis.correlation import make_engine
    from sae.data.features import open_run

    source = open_run(cfg.features_dir, cfg.source)
    groups = [[open_run(cfg.features_dir, name) for name in names] for names in (cfg.min_group, cfg.max_group)]
    from sae.util import distributed

    distributed.init(cfg.device)  # under torchrun: the layer pairs are split over the ranks
    result = comparative_sharedness(
        source,
        groups[0],
        groups[1],
        layer=cfg.layer,
        target_layer=cfg.target_layer,
        top=cfg.top,
        engine=make_engine(distributed.engine_device(cfg.device)),
        original_scaling=cfg.original_scaling,
        progress=cfg.progress and distributed.is_main(),
        allow_different_data=cfg.allow_different_data,
    )
    if not distributed.is_main():  # rank 0 reports and saves
        return 0
    if cfg.csv:
        write_sharedness_csv(result, cfg.csv)
    if cfg.plot:
        from sae.viz.plots import plot_sharedness

        plot_sharedness(result, cfg.plot)
    print(dumps(result.to_json()) if cfg.json else format_sharedness(result))
    if cfg.json and len(set(result.codes.values())) > 1:
        print(codes_warning(result.codes), file=sys.stderr)
    if cfg.save:
        print(save_and_say(save_sharedness, result, source), file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
