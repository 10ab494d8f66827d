"""Train SAEs on the layers of an image encoder and record their features: see sae/pipeline.py.

uv run train_image.py --model ClipVision --clip_model_name ViT-B/32-quickgelu \
    --layers 0 1 2 3 4 5 6 7 8 9 10 11 --runname clipvision_coco
"""

import sys

from sae.pipeline import run
from sae.util.cli import run_cli


def main(argv=None) -> int:
    return run("image", argv, __doc__ or "")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
