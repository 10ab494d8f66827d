"""Stability across seeds: Hungarian matching of decoder rows, stability vs energy, the CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from helpers import one_thread

import analyze
from sae.analysis.stability import code_stats, encode_codes, match_dictionaries, quantile_bins, stability, top_k_curve
from sae.data.features import SparseCodes
from sae.nn.checkpoint import save_sae
from sae.nn.config import SAEConfig, TrainConfig
from sae.nn.model import SparseAutoencoder
from sae.nn.sources import ActivationSource
from sae.nn.trainer import SAESpec, train_saes
from sae.util.errors import InputError


def unit(rng, c, d):
    D = rng.standard_normal((c, d))
    return D / np.linalg.norm(D, axis=1, keepdims=True)


def permuted_copy(sae: SparseAutoencoder, perm: np.ndarray) -> SparseAutoencoder:
    """SAE B whose feature j is feature perm[j] of A (the same function, features reordered)."""
    b = SparseAutoencoder(SAEConfig.from_dict(sae.cfg.to_dict()))
    p = torch.from_numpy(perm)
    with torch.no_grad():
        b.W_dec.copy_(sae.W_dec[p])
        b.W_enc.copy_(sae.W_enc[:, p])
        b.b_enc.copy_(sae.b_enc[p])
        b.b_dec.copy_(sae.b_dec)
    return b


def test_permuted_sae_has_stability_one_and_the_permutation_is_recovered(tmp_path, capsys):
    sae_a = SparseAutoencoder(SAEConfig(d_in=12, d_sae=40, k=4, seed=3))
    perm = np.random.default_rng(0).permutation(40)
    sae_b = permuted_copy(sae_a, perm)
    res = stability(sae_a.W_dec, sae_b.W_dec, device="cpu")
    inverse = np.argsort(perm)  # feature i of A is feature inverse[i] of B
    np.testing.assert_array_equal(res.matching.partner, inverse)
    np.testing.assert_allclose(res.stability, 1.0, atol=1e-6)
    assert res.summary()["shared_fraction"] == 1.0
    # the same through checkpoints and the CLI, with per-feature arrays in the JSON and the .npz
    save_sae(sae_a, tmp_path / "a")
    save_sae(sae_b, tmp_path / "b")
    assert (
        analyze.main(
            [
                "stability",
                "--sae_a",
                str(tmp_path / "a"),
                "--sae_b",
                str(tmp_path / "b"),
                "--json",
                "--no-progress",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "s.npz"),
            ]
        )
        == 0
    )
    js = json.loads(capsys.readouterr().out)
    assert js["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert js["per_feature"]["partner"] == inverse.tolist()
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["partner"], inverse)


def test_matching_is_the_best_permutation_by_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(5):
        A, B = unit(rng, 6, 4), unit(rng, 6, 4)
        S = A @ B.T
        best = max(itertools.permutations(range(6)), key=lambda p: sum(S[i, p[i]] for i in range(6)))
        m = match_dictionaries(A, B, device="cpu")
        np.testing.assert_array_equal(m.partner, best)
        assert m.mean_cosine == pytest.approx(np.mean([S[i, best[i]] for i in range(6)]), abs=1e-6)
    # more features in A than in B: the extra ones are unmatched (NaN) and count as not shared
    A, B = unit(rng, 7, 4), unit(rng, 5, 4)
    S = A @ B.T
    best = max(itertools.permutations(range(7), 5), key=lambda rows: sum(S[r, j] for j, r in enumerate(rows)))
    res = stability(A, B, device="cpu", threshold=-1.0)
    assert (res.matching.partner >= 0).sum() == 5
    assert np.isnan(res.stability).sum() == 2
    assert sorted(np.flatnonzero(res.matching.partner >= 0)) == sorted(best)
    assert res.summary()["shared_fraction"] == pytest.approx(5 / 7)


def test_statistics_bins_and_curves_against_numpy():
    rng = np.random.default_rng(2)
    dense = rng.random((500, 30)) * (rng.random((500, 30)) < np.linspace(0.01, 0.6, 30))
    dense[:, 7] = 0  # a dead feature
    chunks = [SparseCodes.from_dense(dense[s : s + 128]) for s in range(0, 500, 128)]
    st = code_stats(iter(chunks))
    np.testing.assert_allclose(st.energy, dense.mean(0), rtol=1e-6)
    np.testing.assert_allclose(st.energy_sq, (dense.astype(np.float64) ** 2).mean(0), rtol=1e-5)
    np.testing.assert_allclose(st.frequency, (dense > 0).mean(0))
    stab = rng.random(30)
    stab[3] = np.nan
    bins = quantile_bins(st.energy, stab, 3)
    order = np.argsort(st.energy, kind="stable")
    for b, part in zip(bins, np.array_split(order, 3)):
        assert b["n"] == len(part) and b["mean_stability"] == pytest.approx(np.nanmean(stab[part]))
    curve = {p["k"]: p["mean_stability"] for p in top_k_curve(st.energy, stab)}
    assert set(curve) == {1, 2, 4, 8, 16, 30}
    top8 = np.argsort(-st.energy, kind="stable")[:8]
    assert curve[8] == pytest.approx(np.nanmean(stab[top8]))
    # energy-weighted mean over live matched features
    D = unit(rng, 30, 8)
    res = stability(D, D[::-1].copy(), stats=st, device="cpu")
    s = res.summary()
    alive = dense.sum(0) > 0
    w = dense.mean(0)[alive]
    assert s["n_alive"] == 29
    assert s["energy_weighted_mean_cosine"] == pytest.approx((w * res.stability[alive]).sum() / w.sum(), rel=1e-6)


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """Planted concepts of very different frequencies (12 at 15 %, 24 at 0.4 %) and two TopK SAEs
    with different seeds trained on them in one pass."""
    rng = np.random.default_rng(0)
    n, d = 4000, 16
    D = unit(rng, 36, d)
    p = np.r_[np.full(12, 0.15), np.full(24, 0.004)]
    coef = (rng.random((n, 36)) < p) * rng.uniform(0.5, 1.5, (n, 36))
    x = (coef @ D + 0.02 * rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    specs = [SAESpec(f"seed{s}", "x", SAEConfig(d_sae=36, k=3, seed=s)) for s in (0, 1)]
    out = tmp_path_factory.mktemp("seeds")
    with one_thread():
        res = train_saes(
            ActivationSource({"x": [x]}),
            specs,
            TrainConfig(epochs=8, batch_size=256, lr=1e-2, device="cpu"),
            out,
            progress=False,
        )
    return x, D, res, out


def test_frequent_concepts_are_stable_and_rare_ones_are_not(two_seeds):
    x, D, trained, _ = two_seeds
    sae_a, sae_b = trained["seed0"].sae, trained["seed1"].sae
    st = code_stats(encode_codes(sae_a, x, device="cpu"))
    res = stability(sae_a.W_dec, sae_b.W_dec, stats=st, n_bins=3, device="cpu")
    s = res.summary()
    bins = [b["mean_stability"] for b in s["by_energy"]]
    assert bins[-1] > bins[0] + 0.2, s["by_energy"]
    assert s["spearman_energy"] > 0.4
    assert s["energy_weighted_mean_cosine"] > s["mean_cosine"] + 0.05
    # the top-K curve runs over the live features: its last point is their mean
    assert s["top_k_by_energy"][-1]["mean_stability"] == pytest.approx(s["mean_cosine_alive"])
    # ground truth: A's features that recovered a frequent planted concept are stabler than the rest
    W = sae_a.W_dec.detach().double().numpy()
    cos = D @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T  # [36 concepts, 36 features]
    frequent = np.unique(cos[:12].argmax(1))
    assert len(frequent) >= 10 and (cos[:12].max(1) > 0.8).all()
    others = np.setdiff1d(np.arange(36), frequent)
    assert res.stability[frequent].mean() > 0.8
    assert res.stability[frequent].mean() > res.stability[others].mean() + 0.2


def test_stability_cli_with_activations_text_and_errors(two_seeds, tmp_path, capsys):
    x, _, _, out = two_seeds
    np.save(tmp_path / "x.npy", x)
    args = [
        "stability",
        "--sae_a",
        str(out / "seed0"),
        "--sae_b",
        str(out / "seed1"),
        "--device",
        "cpu",
        "--no-progress",
        "--activations",
        str(tmp_path / "x.npy"),
        "--bins",
        "3",
    ]
    assert analyze.main(args + ["--null"]) == 0
    text = capsys.readouterr().out
    assert "mean matched cosine" in text and "energy bin" in text and "null" in text
    assert analyze.main(args + ["--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["n_rows"] == 4000 and len(js["by_energy"]) == 3 and len(js["per_feature"]["stability"]) == 36
    other = SparseAutoencoder(SAEConfig(d_in=8, d_sae=36, k=3))
    save_sae(other, tmp_path / "narrow")
    with pytest.raises(InputError, match="different d_in"):
        analyze.main(["stability", "--sae_a", str(out / "seed0"), "--sae_b", str(tmp_path / "narrow")])
    with pytest.raises(InputError, match="not an SAE checkpoint"):
        analyze.main(["stability", "--sae_a", str(out / "seed0"), "--sae_b", str(tmp_path / "missing")])
    with pytest.raises(InputError, match="missing --sae_b"):
        analyze.main(["stability", "--sae_a", str(out / "seed0")])
    np.save(tmp_path / "bad.npy", x[:, :8])
    with pytest.raises(InputError, match="do not fit"):
        analyze.main(args[:-4] + ["--activations", str(tmp_path / "bad.npy")])
