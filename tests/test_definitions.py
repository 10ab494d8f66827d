"""The papers' definitions on demand: --record_codes ungated (the original's recorded features), and
every comparison naming the definition each run used (with a warning when they differ)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import comp_sharedness
import train_image
import wmppc
from sae.data.cache import open_cache
from sae.data.features import open_run
from sae.encoders.tiny import build_open_clip

N = 24


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("definitions")
    with contextlib.redirect_stderr(io.StringIO()):
        build_open_clip(root)
    return root


def image_run(root: Path, features: Path, name: str, *extra: str) -> dict:
    """A two-layer run of the tiny CLIP on N generated images; returns its run.json."""
    argv = [
        "--model",
        "ClipVision",
        "--clip_model_name",
        str(root / "tiny-open-clip"),
        "--layers",
        "1",
        "-1",
        "--runname",
        name,
        "--dataset",
        f"shapes:{N}",
        "--data_root",
        str(root / "data"),
        "--cache_dir",
        str(root / "cache"),
        "--features_dir",
        str(features),
        "--device",
        "cpu",
        "--quiet",
        "--k",
        "4",
        "--expansion_factor",
        "2",
        "--batch_size",
        "64",
        "--lr",
        "1e-2",
        *extra,
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_image.main(argv) == 0
    return json.loads((features / name / "run.json").read_text())


def test_ungated_codes_are_relu_of_the_saved_preactivations(clip_root, tmp_path):
    features = tmp_path / "f"
    info = image_run(clip_root, features, "ungated", "--record_codes", "ungated")
    assert info["record_codes"] == "ungated"
    run = open_run(features, "ungated")
    assert run.record_codes == "ungated"
    cache = open_cache(info["activation_cache"])
    for layer in info["layers"]:
        sae_dir = features / "ungated" / info["sae_dirs"][f"layer{layer:02d}"]
        w = {k: v.astype(np.float64) for k, v in load_file(sae_dir / "sae.safetensors").items()}
        s = json.loads((sae_dir / "cfg.json").read_text())["input_scale"]
        x = cache.to_tensor(cache.pooled(layer)).numpy().astype(np.float64)
        ref = np.maximum((s * x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
        codes = run.load(layer)
        np.testing.assert_allclose(codes.to_dense(np.float64), ref, rtol=1e-4, atol=1e-5)
        assert codes.nnz == int((ref > 0).sum())  # zeros are not stored
        assert (np.diff(codes.indptr) > 4).any()  # not TopK: more than k latents per row

    # the default run's codes are TopK; comparisons name each run's definition and warn
    info = image_run(clip_root, features, "gated")
    assert "record_codes" in info and open_run(features, "gated").record_codes == "sae"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        wmppc.main(["--source", "gated", "--target", "ungated", "--features_dir", str(features), "--no-save"])
    text = out.getvalue()
    assert "features: gated = sae, ungated = ungated" in text
    assert "warning: the compared runs record different features" in text
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        wmppc.main(["--source", "gated", "--target", "gated", "--features_dir", str(features), "--no-save", "--json"])
    assert json.loads(out.getvalue())["record_codes"] == {"gated": "sae"} and "warning" not in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        comp_sharedness.main(
            [
                "--source",
                "gated",
                "--min_group",
                "ungated",
                "--max_group",
                "gated",
                "--features_dir",
                str(features),
                "--no-save",
                "--json",
            ]
        )
    assert json.loads(out.getvalue())["record_codes"] == {"gated": "sae", "ungated": "ungated"}
    assert "warning: the compared runs record different features" in err.getvalue()
