"""Joint image+text SAEs: modality score, energy, the Bridge Score and its identity, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import one_thread

import analyze
from sae.analysis.bridge import (
    alignment_terms,
    analyze_codes,
    analyze_joint,
    bridge_matrix,
    bridge_summary,
    modality_buckets,
    modality_stats,
    train_joint_saes,
    training_rows,
)
from sae.analysis.stability import encode_codes
from sae.data.features import SparseCodes
from sae.nn.config import SAEConfig, TrainConfig
from sae.nn.model import SparseAutoencoder
from sae.util.errors import InputError


def sparse_codes(rng, n, c, density=0.15):
    return rng.random((n, c)) * (rng.random((n, c)) < density)


def unit(rng, c, d):
    D = rng.standard_normal((c, d))
    return D / np.linalg.norm(D, axis=1, keepdims=True)


def test_bridge_matrix_identity_and_streamed_summary_against_float64():
    rng = np.random.default_rng(0)
    n, c, d = 300, 40, 16
    zi, zt = sparse_codes(rng, n, c), sparse_codes(rng, n, c)
    D = unit(rng, c, d)
    ref = np.einsum("ni,nj->ij", zi, zt) / n * (D @ D.T)  # B_ij = E[z_img_i z_txt_j] cos(d_i, d_j)
    np.testing.assert_allclose(bridge_matrix(zi, zt, D), ref, rtol=1e-12, atol=1e-15)
    # the identity: sum B = mean over pairs of <z_img D, z_txt D> (no decoder bias)
    mean_dot = np.mean(np.sum((zi @ D) * (zt @ D), axis=1))
    mu = rng.random(c)
    mu[5] = np.nan
    s = bridge_summary(
        SparseCodes.from_dense(zi.astype(np.float32)), torch.from_numpy(zt), D, top=15, modality=mu, block=7
    )
    zi32, zt32 = zi.astype(np.float32).astype(np.float64), zt
    ref32 = np.einsum("ni,nj->ij", zi32, zt32) / n * (D @ D.T)
    assert s.total == pytest.approx(ref32.sum(), rel=1e-12)
    assert bridge_matrix(zi, zt, D).sum() == pytest.approx(mean_dot, rel=1e-12)
    assert s.diagonal_total == pytest.approx(np.trace(ref32), rel=1e-12)
    np.testing.assert_allclose(s.mass_image, np.abs(ref32).sum(1), rtol=1e-12)
    np.testing.assert_allclose(s.mass_text, np.abs(ref32).sum(0), rtol=1e-12)
    off = ref32.copy()
    np.fill_diagonal(off, -np.inf)
    want = np.argsort(-off, axis=None, kind="stable")[:15]
    assert [(p.i, p.j) for p in s.top_pairs] == [tuple(map(int, np.unravel_index(w, off.shape))) for w in want]
    for p in s.top_pairs:
        assert p.bridge == pytest.approx(ref32[p.i, p.j])
        assert p.coactivation == pytest.approx((zi32[:, p.i] * zt32[:, p.j]).mean())
        assert p.cosine == pytest.approx(D[p.i] @ D[p.j])
    cross = np.where((mu[:, None] > 0.5) & (mu[None, :] < 0.5) & ~np.eye(c, dtype=bool), ref32, -np.inf)
    want = np.argsort(-cross, axis=None, kind="stable")[:15]
    assert [(p.i, p.j) for p in s.top_cross_pairs] == [tuple(map(int, np.unravel_index(w, off.shape))) for w in want]
    assert [p.i for p in s.top_diagonal] == list(np.argsort(-np.diag(ref32), kind="stable")[:15])


def test_identity_with_decoder_bias_and_input_scale_equals_our_reconstructions():
    """mean <x_hat_img, x_hat_txt> of our SAE (x_hat = (z W_dec + b_dec) / s) from B and the bias terms."""
    cfg = SAEConfig(d_in=10, d_sae=30, k=5, seed=1, input_scale=0.7)
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(10, generator=torch.Generator().manual_seed(0)))
        sae.b_enc.fill_(0.3)
    rng = np.random.default_rng(1)
    img = rng.standard_normal((200, 10)).astype(np.float32)
    txt = rng.standard_normal((200, 10)).astype(np.float32)
    zi = encode_codes(sae, img, device="cpu", batch_size=64)
    zt = encode_codes(sae, txt, device="cpu", batch_size=64)
    W = sae.W_dec.detach().double().numpy()
    b = sae.b_dec.detach().double().numpy()
    Zi, Zt = zi.to_dense(np.float64), zt.to_dense(np.float64)
    xi, xt = (Zi @ W + b) / 0.7, (Zt @ W + b) / 0.7
    terms = alignment_terms(zi, zt, W, b, scale=0.7)
    assert terms["input_units_total"] == pytest.approx(np.mean(np.sum(xi * xt, 1)), rel=1e-10)
    assert terms["sum_B"] == pytest.approx(np.mean(np.sum((Zi @ W) * (Zt @ W), 1)), rel=1e-10)
    with torch.no_grad():  # and the float32 reconstructions of the model itself agree
        dec = (sae.decode(torch.from_numpy(Zi).float()) * sae.decode(torch.from_numpy(Zt).float())).sum(1).mean()
    assert terms["input_units_total"] == pytest.approx(float(dec), rel=1e-4)
    report = analyze_joint(sae, img, txt, device="cpu")
    assert report.alignment["input_units_total"] == pytest.approx(terms["input_units_total"], rel=1e-10)
    assert report.extra["mean_pair_dot"] == pytest.approx(np.mean(np.sum(img.astype(np.float64) * txt, 1)))


def test_modality_score_energy_and_buckets():
    rng = np.random.default_rng(2)
    n_img, n_txt, c = 50, 80, 6
    zi, zt = np.zeros((n_img, c)), np.zeros((n_txt, c))
    zi[:, 0] = rng.random(n_img) + 0.1  # image only -> mu = 1
    zt[:, 1] = rng.random(n_txt) + 0.1  # text only -> mu = 0
    zi[::2, 2] = 1.0  # 0.5 mean on images ...
    zt[::4, 2] = 2.0  # ... and 0.5 mean on texts: mu = 0.5 despite different row counts
    zi[:, 3] = 0.2
    zt[:, 3] = 0.05  # mu = 0.8
    zi[0, 4] = 0.01  # nearly image-only: mu > 0.95
    # feature 5 dead
    st = modality_stats(zi, zt)
    mu = st.modality
    np.testing.assert_allclose(mu[:5], [1, 0, 0.5, 0.8, 1])
    assert np.isnan(mu[5]) and st.dead.tolist() == [False] * 5 + [True]
    both = np.vstack([zi, zt])
    np.testing.assert_allclose(st.energy, both.mean(0))
    np.testing.assert_allclose(st.energy_sq, (both**2).mean(0))
    np.testing.assert_allclose(st.frequency, (both > 0).mean(0))
    # repeating the text rows changes N_txt, not mu (the E_img / (2 E_all) bug would move it)
    np.testing.assert_allclose(modality_stats(zi, np.vstack([zt, zt, zt])).modality[:5], mu[:5])
    b = modality_buckets(st, eps=0.05)
    assert (b["image"]["count"], b["text"]["count"], b["bimodal"]["count"], b["n_dead"]) == (2, 1, 2, 1)
    e = both.mean(0)[:5]
    assert b["image"]["energy_fraction"] == pytest.approx((e[0] + e[4]) / e.sum())
    assert b["bimodal"]["energy_fraction"] == pytest.approx((e[2] + e[3]) / e.sum())
    with pytest.raises(InputError, match="paired rows"):
        bridge_summary(zi, zt, unit(rng, c, 4))


def test_training_rows_for_a_data_diet():
    assert training_rows(100, 100, None) == (100, 100)
    assert training_rows(100, 100, 0.25) == (33, 100)
    assert training_rows(1000, 100, 0.5) == (100, 100)
    with pytest.raises(InputError, match=r"--image_fraction must be in \(0, 1\)"):
        training_rows(100, 100, 1.0)


def planted_pairs(n=3000, d=24, P=10, seed=0):
    """P image concepts, each paired with a text concept at cosine ~0.6; a pair's two concepts fire
    together on the image and the caption of the same pair (20 % of pairs each)."""
    rng = np.random.default_rng(seed)
    Di = unit(rng, P, d)
    Dt = 0.6 * Di + 0.8 * unit(rng, P, d)
    Dt /= np.linalg.norm(Dt, axis=1, keepdims=True)
    on = rng.random((n, P)) < 0.2
    img = on * rng.uniform(0.5, 1.5, (n, P)) @ Di + 0.02 * rng.standard_normal((n, d))
    txt = on * rng.uniform(0.5, 1.5, (n, P)) @ Dt + 0.02 * rng.standard_normal((n, d))
    return img.astype(np.float32), txt.astype(np.float32), Di, Dt


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    img, txt, Di, Dt = planted_pairs()
    out = tmp_path_factory.mktemp("joint")
    with one_thread():
        res = train_joint_saes(
            img,
            txt,
            {"": SAEConfig(d_sae=32, k=3, seed=0)},
            TrainConfig(epochs=8, batch_size=256, lr=1e-2, device="cpu"),
            out,
            progress=False,
        )
    return img, txt, Di, Dt, res[""], out


def test_planted_bridges_are_found_and_vanish_when_pairs_are_shuffled(joint):
    img, txt, Di, Dt, trained, out = joint
    assert json.loads((out / "joint.json").read_text())["n_image"] == 3000
    sae = trained.sae
    report = analyze_joint(sae, img, txt, top=8, device="cpu")
    W = sae.W_dec.detach().double().numpy()
    fi, ft = (Di @ W.T).argmax(1), (Dt @ W.T).argmax(1)  # the features that learned each concept
    mu = report.stats.modality
    assert (mu[fi] > 0.9).sum() >= 8 and (mu[ft] < 0.1).sum() >= 8
    planted = {(int(i), int(j)) for i, j in zip(fi, ft) if i != j}
    found = [(p.i, p.j) in planted for p in report.bridge.top_cross_pairs]
    assert sum(found) >= 7, report.bridge.to_json(report.stats)["top_cross_modal_pairs"]
    # the reconstructions' alignment (identity, with bias terms) is close to the raw pairs' alignment
    assert report.alignment["input_units_total"] == pytest.approx(report.extra["mean_pair_dot"], rel=0.15)
    # shuffling the pairing destroys the planted co-activation: the planted entries fall
    perm = np.random.default_rng(5).permutation(len(txt))
    zi, zt = encode_codes(sae, img, device="cpu"), encode_codes(sae, txt[perm], device="cpu")
    B_true = bridge_matrix(encode_codes(sae, img, device="cpu"), encode_codes(sae, txt, device="cpu"), W)
    B_null = bridge_matrix(zi, zt, W)
    idx = tuple(np.array(sorted(planted)).T)
    assert B_null[idx].mean() < 0.4 * B_true[idx].mean()
    # analyze_codes on the same codes gives the same summary as analyze_joint
    again = analyze_codes(
        encode_codes(sae, img, device="cpu"),
        encode_codes(sae, txt, device="cpu"),
        W,
        b=sae.b_dec.detach().double().numpy(),
        scale=sae.cfg.input_scale,
        top=8,
    )
    assert again.bridge.total == pytest.approx(report.bridge.total, rel=1e-12)


def test_bridge_and_joint_cli(joint, tmp_path, capsys):
    img, txt, _, _, trained, out = joint
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "txt.npy", txt)
    base = [
        "--image_embeddings",
        str(tmp_path / "img.npy"),
        "--text_embeddings",
        str(tmp_path / "txt.npy"),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert (
        analyze.main(["bridge", "--sae", str(out), "--top", "5", "--json", "--out", str(tmp_path / "b.npz")] + base)
        == 0
    )
    js = json.loads(capsys.readouterr().out)
    assert len(js["bridge"]["top_pairs"]) == 5 and {"mu_i", "mu_j", "bridge"} <= set(js["bridge"]["top_pairs"][0])
    assert set(js["modality"]["buckets"]) >= {"image", "text", "bimodal"}
    assert np.load(tmp_path / "b.npz")["modality"].shape == (32,)
    assert analyze.main(["bridge", "--sae", str(out)] + base) == 0
    assert "strongest off-diagonal bridges" in capsys.readouterr().out
    # train two seeds on a small slice, then the bridge report of each and their stability
    np.save(tmp_path / "img_s.npy", img[:600])
    np.save(tmp_path / "txt_s.npy", txt[:600])
    with one_thread():
        assert (
            analyze.main(
                [
                    "joint",
                    "--image_embeddings",
                    str(tmp_path / "img_s.npy"),
                    "--text_embeddings",
                    str(tmp_path / "txt_s.npy"),
                    "--out",
                    str(tmp_path / "j"),
                    "--seeds",
                    "0",
                    "1",
                    "--d_sae",
                    "32",
                    "--k",
                    "3",
                    "--epochs",
                    "1",
                    "--batch_size",
                    "200",
                    "--device",
                    "cpu",
                    "--no-progress",
                    "--json",
                    "--top",
                    "3",
                ]
            )
            == 0
        )
    js = json.loads(capsys.readouterr().out)
    assert set(js["saes"]) == {"seed0", "seed1"} and "seed0_vs_seed1" in js["stability"]
    assert (tmp_path / "j" / "seed1" / "joint.json").exists()
    # errors: unpaired rows, another width, missing file
    np.save(tmp_path / "short.npy", txt[:10])
    with pytest.raises(InputError, match="pair"):
        analyze.main(
            [
                "bridge",
                "--sae",
                str(out),
                "--image_embeddings",
                str(tmp_path / "img.npy"),
                "--text_embeddings",
                str(tmp_path / "short.npy"),
            ]
        )
    np.save(tmp_path / "narrow.npy", img[:, :8])
    with pytest.raises(InputError, match="width"):
        analyze.main(
            [
                "bridge",
                "--sae",
                str(out),
                "--image_embeddings",
                str(tmp_path / "narrow.npy"),
                "--text_embeddings",
                str(tmp_path / "narrow.npy"),
            ]
        )
    with pytest.raises(InputError, match="image embeddings file not found"):
        analyze.main(
            [
                "bridge",
                "--sae",
                str(out),
                "--image_embeddings",
                str(tmp_path / "nope.npy"),
                "--text_embeddings",
                str(tmp_path / "txt.npy"),
            ]
        )
    np.savez(tmp_path / "both.npz", img=img, txt=txt)
    for bad, why in ((tmp_path, "is a directory"), (tmp_path / "both.npz", "an .npz archive")):
        with pytest.raises(InputError, match=why):
            analyze.main(
                [
                    "bridge",
                    "--sae",
                    str(out),
                    "--image_embeddings",
                    str(bad),
                    "--text_embeddings",
                    str(tmp_path / "txt.npy"),
                ]
            )


def test_joint_relu_reports_the_saved_sae_with_folded_decoder_norms(joint, tmp_path, capsys):
    """A ReLU SAE's decoder rows are not unit-norm in memory; the checkpoint folds them. `joint` must
    report what `bridge` reports on the saved checkpoint, with true cosines of its decoder rows."""
    from sae.nn.checkpoint import load_sae

    img, txt = joint[0][:600], joint[1][:600]
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "txt.npy", txt)
    emb = [
        "--image_embeddings",
        str(tmp_path / "img.npy"),
        "--text_embeddings",
        str(tmp_path / "txt.npy"),
        "--device",
        "cpu",
        "--no-progress",
        "--json",
        "--top",
        "5",
    ]
    with one_thread():
        assert (
            analyze.main(
                [
                    "joint",
                    *emb,
                    "--out",
                    str(tmp_path / "r"),
                    "--sae",
                    "relu",
                    "--l1_coef",
                    "1e-3",
                    "--d_sae",
                    "32",
                    "--epochs",
                    "2",
                    "--batch_size",
                    "100",
                    "--lr",
                    "3e-2",
                ]
            )
            == 0
        )
    joint_js = json.loads(capsys.readouterr().out)["saes"]["sae"]
    saved = load_sae(tmp_path / "r")
    W = saved.W_dec.detach().double().numpy()
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), 1, atol=1e-5)
    assert analyze.main(["bridge", "--sae", str(tmp_path / "r"), *emb]) == 0
    bridge_js = json.loads(capsys.readouterr().out)
    for key in ("bridge", "modality", "alignment"):
        assert joint_js[key] == bridge_js[key]
    pairs = joint_js["bridge"]["top_pairs"]
    assert pairs
    for p in pairs:
        cos = W[p["i"]] @ W[p["j"]] / np.linalg.norm(W[p["i"]]) / np.linalg.norm(W[p["j"]])
        assert p["cosine"] == pytest.approx(cos, abs=1e-6)
