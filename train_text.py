"""Train SAEs on the layers of a text encoder and record their features: see sae/pipeline.py.

uv run train_text.py --model ClipText --clip_model_name ViT-B/32-quickgelu \
    --layers 0 1 2 3 4 5 6 7 8 9 10 11 --runname cliptext_coco
"""

import sys

from sae.pipeline import run
from sae.util.cli import run_cli


def main(argv=None) -> int:
    return run("text", argv, __doc__ or "")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
