"""The papers' definitions on demand: --record_codes ungated (the original's recorded features), and
every comparison naming the definition each run used (with a warning when they differ)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import one_thread
from safetensors.numpy import load_file
from torch import nn

import analyze
import comp_sharedness
import train_image
import wmppc
from sae.analysis.bridge import joint_source
from sae.analysis.compare import comparative_sharedness
from sae.analysis.stability import encode_codes
from sae.data.cache import open_cache
from sae.data.features import open_run
from sae.encoders.tiny import build_open_clip
from sae.nn.checkpoint import load_sae
from sae.nn.config import TrainConfig, sae_config_from_args
from sae.nn.sources import ActivationSource
from sae.nn.trainer import SAESpec, train_saes
from sae.pipeline import build_parser, parse_with_recipe
from sae.util.cli import dataclass_from_args
from sae.util.errors import InputError
from sae.viz.plots import sharedness_figure, symlog_threshold
from tests.test_bridge import planted_pairs
from tests.test_compare import sparse_matrix, write_run

if TYPE_CHECKING:
    from sae.analysis.compare import SharednessResult

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


# ---- --recipe original ------------------------------------------------------------------------------


def original_loop(batches: list[torch.Tensor], d_in: int, d_sae: int, k: int, seed: int, lr: float) -> dict:
    """The original repo's TopKSAE and training loop written out directly (sparse_autoencoders.py,
    train_image.py): W_enc kaiming-uniform [d_in, d_sae], W_dec = W_enc^T with unit rows, b_dec = 0, no
    b_enc; x_hat = topk(relu((x - b_dec) W_enc)) W_dec + b_dec; MSE; Adam; nothing else."""
    gen = torch.Generator().manual_seed(seed)
    W_enc = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d_in, d_sae), generator=gen))
    b_dec = nn.Parameter(torch.zeros(d_in))
    W_dec = nn.Parameter(W_enc.detach().t() / W_enc.detach().t().norm(dim=-1, keepdim=True))
    opt = torch.optim.Adam([W_enc, b_dec, W_dec], lr=lr)
    for x in batches:
        acts = F.relu((x - b_dec) @ W_enc)
        top = torch.topk(acts, k, dim=-1)
        feats = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        loss = nn.MSELoss()(x, feats @ W_dec + b_dec)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"W_enc": W_enc.detach(), "W_dec": W_dec.detach(), "b_dec": b_dec.detach()}


def recipe_args(modality: str, *extra: str) -> argparse.Namespace:
    return parse_with_recipe(build_parser(modality, ""), ["--recipe", "original", *extra], modality)


def test_original_recipe_sets_every_choice_and_explicit_flags_win():
    args = recipe_args("image")
    tcfg = dataclass_from_args(TrainConfig, args)
    cfg = sae_config_from_args(args, d_in=8)
    assert (cfg.architecture, cfg.k, cfg.d_sae, cfg.aux_k, cfg.b_dec_init) == ("topk", 32, 64, 0, "zeros")
    assert (cfg.encoder_bias, cfg.unit_decoder, cfg.init) == (False, False, "original")
    assert (tcfg.lr, tcfg.warmup_steps, tcfg.decay_fraction, tcfg.epochs) == (5e-5, 0, 0.0, 1)
    assert (tcfg.batch_groups, tcfg.scale_inputs, tcfg.autocast) == (16, False, False)
    assert (args.record_codes, args.token) == ("ungated", "first")
    assert recipe_args("text").batch_groups == 256
    assert recipe_args("image", "--lr", "1e-3", "--record_codes", "sae").lr == 1e-3
    default = parse_with_recipe(build_parser("image", ""), [], "image")
    assert (default.record_codes, default.k_aux, default.batch_groups, default.encoder_bias) == ("sae", None, 0, True)


def test_group_batches_take_whole_inputs():
    token_row = np.repeat(np.arange(10), [3, 1, 4, 2, 5, 3, 1, 2, 4, 3])
    source = ActivationSource({"x": [np.zeros((len(token_row), 2), np.float32)]}, groups=token_row)
    assert source.steps_per_epoch(999, groups_per_batch=3) == 4
    for epoch in (0, 1):
        batches = list(source.batches(999, 0, epoch, groups_per_batch=3))
        assert [len(np.unique(token_row[b])) for b in batches] == [3, 3, 3, 1]
        for b in batches:  # every token of each chosen input, none of another
            assert sorted(b) == sorted(np.flatnonzero(np.isin(token_row, token_row[b])))
        assert sorted(np.concatenate(batches)) == list(range(len(token_row)))
    assert not np.array_equal(
        np.concatenate(list(source.batches(999, 0, 0, groups_per_batch=3))),
        np.concatenate(list(source.batches(999, 0, 1, groups_per_batch=3))),
    )
    with pytest.raises(InputError, match="non-decreasing"):
        ActivationSource({"x": [np.zeros((3, 2), np.float32)]}, groups=np.array([1, 0, 0]))


def test_original_recipe_training_equals_the_original_loop(tmp_path):
    rng = np.random.default_rng(0)
    token_row = np.repeat(np.arange(12), rng.integers(2, 7, 12))
    x = (rng.normal(size=(len(token_row), 6)) + 2.0).astype(np.float32)  # off-centre: b_dec moves
    source = ActivationSource({"x": [x]}, groups=token_row)
    args = recipe_args("image", "--k", "3", "--expansion_factor", "4", "--lr", "1e-2", "--batch_groups", "5")
    args.epochs = 2
    tcfg = dataclass_from_args(TrainConfig, args, device="cpu")
    cfg = sae_config_from_args(args, d_in=6, seed=3)
    with one_thread():
        sae = train_saes(source, [SAESpec("s", "x", cfg)], tcfg, tmp_path, progress=False)["s"].sae
        batches = [
            source.read("x", rows)
            for epoch in range(2)
            for rows in source.batches(0, tcfg.seed, epoch, groups_per_batch=5)
        ]
        assert len(batches) == 6
        ref = original_loop(batches, 6, 24, 3, seed=3, lr=1e-2)
        init = original_loop([], 6, 24, 3, seed=3, lr=1e-2)
    for name in ("W_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).detach(), ref[name], rtol=1e-4, atol=1e-5)
        assert (ref[name] - init[name]).abs().max() > 1e-2  # the steps moved every tensor
    assert cfg.input_scale == 1.0 and not sae.b_enc.any()
    norms = sae.W_dec.detach().norm(dim=1)
    assert (norms - 1).abs().max() > 1e-3  # decoder rows were not renormalised
    # negative control: the default recipe's first step already differs
    default = parse_with_recipe(build_parser("image", ""), ["--k", "3", "--expansion_factor", "4"], "image")
    other = sae_config_from_args(default, d_in=6, seed=3)
    with one_thread():
        trained = train_saes(
            source,
            [SAESpec("s", "x", other)],
            dataclass_from_args(TrainConfig, default, device="cpu", epochs=0.1, lr=1e-2),
            tmp_path / "default",
            progress=False,
        )["s"].sae
    assert not torch.allclose(trained.W_enc.detach(), ref["W_enc"], atol=1e-3)


def test_original_recipe_through_the_pipeline(clip_root, tmp_path):
    features = tmp_path / "f"
    info = image_run(clip_root, features, "orig", "--recipe", "original", "--batch_groups", "4")
    assert info["recipe"] == "original" and info["record_codes"] == "ungated" and info["token_rule"] == "first"
    cache = open_cache(info["activation_cache"])
    run = open_run(features, "orig")
    for layer in info["layers"]:
        sae_dir = features / "orig" / info["sae_dirs"][f"layer{layer:02d}"]
        w = {k: v.astype(np.float64) for k, v in load_file(sae_dir / "sae.safetensors").items()}
        assert not w["b_enc"].any() and json.loads((sae_dir / "cfg.json").read_text())["input_scale"] == 1.0
        x = cache.to_tensor(cache.pooled(layer)).numpy().astype(np.float64)
        ref = np.maximum((x - w["b_dec"]) @ w["W_enc"], 0)  # get_cls_features
        np.testing.assert_allclose(run.load(layer).to_dense(np.float64), ref, rtol=1e-4, atol=1e-5)


# ---- Bridge Score as the paper, joint batches ---------------------------------------------------------


def test_joint_no_b_dec_sum_B_is_the_alignment_of_the_reconstructions(tmp_path):
    img, txt, _, _ = planted_pairs(n=800)
    img, txt = img * 3.0, txt * 0.5  # not unit norm: the default normalises them
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "txt.npy", txt)
    flags = ["--d_sae", "32", "--k", "3", "--epochs", "3", "--batch_size", "128", "--lr", "1e-2", "--device", "cpu"]
    out = io.StringIO()
    with one_thread(), contextlib.redirect_stdout(out):
        analyze.main(
            ["joint", "--image_embeddings", str(tmp_path / "img.npy"), "--text_embeddings", str(tmp_path / "txt.npy")]
            + ["--out", str(tmp_path / "j"), "--no_b_dec", "--no-progress", "--json", *flags]
        )
    js = json.loads(out.getvalue())["saes"]["sae"]
    sae = load_sae(tmp_path / "j")
    assert not sae.cfg.decoder_bias and not sae.b_dec.any() and js["normalized"] and js["decoder_bias"] is False
    assert json.loads((tmp_path / "j" / "joint.json").read_text())["normalized"] is True
    # float64 from the saved decoder and the codes of the unit-normalised embeddings
    ui, ut = (a / np.linalg.norm(a.astype(np.float64), axis=1, keepdims=True) for a in (img, txt))
    zi, zt = (encode_codes(sae, u.astype(np.float32), device="cpu").to_dense(np.float64) for u in (ui, ut))
    D, s = sae.W_dec.detach().double().numpy(), sae.cfg.input_scale
    xi, xt = zi @ D / s, zt @ D / s  # x_hat in input units: no decoder bias
    want = float((xi * xt).sum(1).mean())
    bridge = js["bridge"]
    assert bridge["sum_B_input_units"] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert js["alignment"]["input_units_total"] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert js["mean_norm_product"] == pytest.approx(1.0, rel=1e-6)  # unit rows: per unit norm = input units
    assert bridge["sum_B_per_unit_norm"] == pytest.approx(want, rel=1e-6)
    assert bridge["sum_B"] == pytest.approx(want * s**2, rel=1e-9) and "Papadimitriou" in bridge["definition"]
    top = bridge["top_pairs"][0]
    assert top["bridge_input_units"] == pytest.approx(top["bridge"] / s**2)
    m = json.loads((tmp_path / "j" / "metrics.json").read_text())
    assert 0 < m["r2_overcomplete"] <= 1 and m["r2_overcomplete"] != pytest.approx(1 - m["fvu"])
    # the text report names the definitions
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        analyze.main(
            ["bridge", "--sae", str(tmp_path / "j"), "--image_embeddings", str(tmp_path / "img.npy")]
            + ["--text_embeddings", str(tmp_path / "txt.npy"), "--device", "cpu", "--no-progress"]
        )
    text = out.getvalue()
    assert f"sum B = {want:.6f} in input units" in text and "= sum B: no decoder bias (the paper's)" in text


def test_joint_batches_mix_the_modalities_at_every_scale():
    n_img, n_txt, batch = 2_700_000, 300_000, 4096  # > 2^20 rows: the old windows gave single-modality batches
    source = joint_source(np.zeros((n_img, 1), np.float16), np.zeros((n_txt, 1), np.float16))
    ratio = n_img / (n_img + n_txt)
    batches = list(source.batches(batch, 0, 0))
    assert len(batches) == source.steps_per_epoch(batch) == -(-(n_img + n_txt) // batch)
    frac = np.array([(b < n_img).mean() for b in batches[:-1]])
    assert np.abs(frac - ratio).max() <= 0.1 * min(ratio, 1 - ratio)  # image and text shares within 10 %
    assert np.abs(frac - ratio).max() <= 1 / batch + 1e-12  # in fact to one row
    rows = np.concatenate(batches)
    assert len(rows) == n_img + n_txt and (np.bincount(rows, minlength=n_img + n_txt) == 1).all()
    resumed = list(source.batches(batch, 0, 0, start_step=300))
    assert all(np.array_equal(a, b) for a, b in zip(resumed, batches[300:])) and len(resumed) == len(batches) - 300
    assert not np.array_equal(np.concatenate(list(source.batches(batch, 0, 1))[:2]), rows[: 2 * batch])


# ---- comparative sharedness: dead features, readable plot ----------------------------------------------


def test_sharedness_top_list_never_holds_dead_features(tmp_path):
    rng = np.random.default_rng(3)
    m = sparse_matrix(rng, 400, 30, density=0.2)
    m[:, :10] = 0  # dead
    write_run(tmp_path, "M", {0: m})
    write_run(tmp_path, "H", {0: m * 1.5})  # every live feature is better shared with H: all Delta < 0
    write_run(tmp_path, "G", {0: sparse_matrix(rng, 400, 30, density=0.2)})
    runs = {n: open_run(tmp_path, n) for n in "MGH"}
    res = comparative_sharedness(runs["M"], [runs["G"]], [runs["H"]], top=0.5)
    assert res.dead_features == 10 and (res.delta[10:] < 0).all() and (res.delta[:10] == 0).all()
    assert len(res.selected) == 15 and (res.selected >= 10).all()  # without the rule: the 10 dead (Delta 0) first
    assert list(res.delta[res.selected]) == sorted(res.delta[res.selected], reverse=True)


def test_sharedness_plot_uses_symlog_when_a_few_features_are_far_below():
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    d = 200
    weight = rng.uniform(1, 10, d)
    diff = rng.uniform(-0.2, 0.3, d)
    selected = np.argsort(-diff)[:5]
    result = SimpleNamespace(
        source="M", layer=0, min_group=["G"], max_group=["H"], weight=weight, top=0.025, selected=selected
    )
    result.delta = weight * diff
    fig = sharedness_figure(cast("SharednessResult", result))  # only the fields the figure reads
    assert fig.axes[0].get_yscale() == "linear"
    plt.close(fig)
    result.delta = result.delta.copy()
    result.delta[[3, 7]] = -5000.0  # two features far below the rest
    fig = sharedness_figure(cast("SharednessResult", result))  # only the fields the figure reads
    ax = fig.axes[0]
    assert ax.get_yscale() == "symlog"
    lin = symlog_threshold(result.delta, result.delta[selected])
    assert lin is not None and np.abs(result.delta[selected]).max() <= lin  # the selected stay in the linear part
    plt.close(fig)
