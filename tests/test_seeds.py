"""`--seeds` end to end: train_image.py trains one SAE per seed and layer in one pass over a tiny
random CLIP on the generated shapes data, and `analyze.py stability` compares two seeds' SAEs."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import analyze
import train_image
from sae.encoders.tiny import build_open_clip
from sae.nn.checkpoint import load_sae


def test_train_image_seeds_then_stability(tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    with contextlib.redirect_stderr(io.StringIO()):
        clip = build_open_clip(models)
    features = tmp_path / "sae_features"
    assert (
        train_image.main(
            [
                "--model",
                "ClipVision",
                "--clip_model_name",
                str(clip),
                "--layers",
                "1",
                "--runname",
                "clipv",
                "--dataset",
                "shapes:40",
                "--data_root",
                str(tmp_path / "data"),
                "--features_dir",
                str(features),
                "--cache_dir",
                str(tmp_path / "cache"),
                "--num_workers",
                "0",
                "--device",
                "cpu",
                "--quiet",
                "--seeds",
                "0",
                "1",
                "--expansion_factor",
                "2",
                "--k",
                "4",
                "--epochs",
                "3",
                "--batch_size",
                "128",
                "--lr",
                "1e-2",
            ]
        )
        == 0
    )
    capsys.readouterr()
    run = features / "clipv"
    info = json.loads((run / "run.json").read_text())
    assert info["seeds"] == [0, 1] and set(info["sae_dirs"]) == {"layer01", "layer01_seed1"}
    a, b = run / "saes" / "layer01", run / "saes" / "layer01_seed1"
    sae_a, sae_b = load_sae(a), load_sae(b)
    assert sae_a.cfg.seed == 0 and sae_b.cfg.seed == 1 and sae_a.cfg.d_sae == sae_b.cfg.d_sae == 64

    args = [
        "stability",
        "--sae_a",
        str(a),
        "--sae_b",
        str(b),
        "--run",
        "clipv",
        "--layer",
        "1",
        "--features_dir",
        str(features),
        "--device",
        "cpu",
        "--no-progress",
        "--json",
        "--bins",
        "4",
    ]
    assert analyze.main(args) == 0
    js = json.loads(capsys.readouterr().out)
    # independent float64 reference: unit decoder rows, Hungarian on the cosine matrix
    unit = lambda W: W / np.linalg.norm(W, axis=1, keepdims=True)  # noqa: E731
    S = unit(sae_a.W_dec.detach().double().numpy()) @ unit(sae_b.W_dec.detach().double().numpy()).T
    r, c = linear_sum_assignment(S, maximize=True)
    assert js["n_matched"] == 64 and js["mean_cosine"] == pytest.approx(S[r, c].mean(), abs=1e-6)
    assert 0 < js["mean_cosine"] < 0.999  # different initialisations: not the same dictionary
    assert js["n_rows"] == 40 and len(js["by_energy"]) == 4 and "spearman_energy" in js
    # an SAE against itself is perfectly stable
    assert (
        analyze.main(["stability", "--sae_a", str(a), "--sae_b", str(a), "--json", "--no-progress", "--device", "cpu"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
