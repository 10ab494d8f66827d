"""Top-activating rows of every SAE feature of a run: 3x3 image grids, captions, an HTML browser.

    uv run show.py --run R [--layer L] [--out previews/R] [--min_support 16] [--features 12 40 77]
                   [--size 100] [--html]

Rows are fetched from the run's own dataset (run.json) by row id. Layout and file names: docs/show.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from sae.util.cli import add_dataclass_args, dataclass_from_args, run_cli
from sae.viz.previews import ShowConfig
from sae.viz.show_run import show


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    add_dataclass_args(parser, ShowConfig)
    cfg = dataclass_from_args(ShowConfig, parser.parse_args(argv))
    result = show(cfg)
    print(
        f"{len(result.previews)} features of run '{result.manifest['run']}' layer {result.manifest['layer']} "
        f"in {result.out} ({result.written} grids written, {result.skipped} already there"
        + (f", {len(result.removed)} files of features no longer shown removed" if result.removed else "")
        + ")"
        + (f"; browser: {result.browser}" if result.browser else "")
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
