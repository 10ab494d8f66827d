"""sae.nn.metrics against direct float64 numpy computations on the concatenated data."""

import json
import math

import numpy as np
import pytest
import torch

from sae.nn.metrics import MetricsAccumulator, per_sample_fvu

D_IN, D_SAE = 12, 30
DEAD, ALWAYS = 0, 1  # latent that never fires / fires on every row (in _batches)
EPS = 1e-6


def _batch(rng, n, dtype=torch.float32, zero_codes=False):
    """x with a non-zero mean, a noisy x_hat, sparse codes incl. some active but near-zero values."""
    x = rng.normal(size=(n, D_IN)) * rng.uniform(0.5, 2.0, size=D_IN) + 3.0
    x_hat = x + 0.3 * rng.normal(size=(n, D_IN))
    codes = rng.exponential(size=(n, D_SAE)) * (rng.random((n, D_SAE)) < 0.2)
    codes[rng.random((n, D_SAE)) < 0.03] = 1e-8  # active (> 0) yet near zero
    codes[rng.random((n, D_SAE)) < 0.02] = EPS  # on the near-zero boundary (<= counts) in float64
    codes[:, DEAD] = 0.0
    codes[:, ALWAYS] = rng.uniform(0.5, 1.5, size=n)
    if zero_codes:
        codes[:] = 0.0
    return tuple(torch.from_numpy(a).to(dtype) for a in (x, x_hat, codes))


def _reference(batches):
    """Every metric straight from the definitions, on all rows at once (numpy float64)."""
    x, xh, c = (np.concatenate([b[i].double().cpu().numpy() for b in batches]) for i in range(3))
    n = len(x)
    fvu = ((x - xh) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
    cos = []
    for a, b in zip(x, xh):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        cos.append(1.0 if na == nb == 0 else 0.0 if na * nb == 0 else a @ b / (na * nb))
    active = c > 0
    fire = active.sum(axis=0)
    lifetime = fire / n
    when_active = np.full(D_SAE, np.nan)
    for j in range(D_SAE):
        if fire[j]:
            when_active[j] = c[active[:, j], j].mean()
    ref = {
        "n_rows": n,
        "fvu": fvu,
        "r2_overcomplete": 1 - np.mean((x - xh) ** 2) / np.mean((x - x.mean()) ** 2),  # overcomplete's r2_score
        "cosine": np.mean(cos),
        "mse": np.mean((x - xh) ** 2),
        "l0": np.mean([row.sum() for row in active]),
        "population_sparsity": np.mean([row.sum() / D_SAE for row in active]),
        "mean_lifetime_sparsity": lifetime.mean(),
        "dead_fraction": np.mean(fire == 0),
        "dense_fraction": np.mean(lifetime > 0.1),
        "mean_activation": c.mean(),
        "mean_activation_when_active": np.nanmean(when_active),
        "near_zero_fraction": np.mean(np.abs(c) <= EPS),
    }
    return ref, fire, lifetime, when_active


def _fed(batches, device="cpu"):
    acc = MetricsAccumulator(D_IN, D_SAE)
    for b in batches:
        acc.update(*(t.to(device) for t in b))
    return acc


def _assert_matches(acc, batches):
    ref, fire, lifetime, when_active = _reference(batches)
    out = acc.compute()
    for key, want in ref.items():
        assert out[key] == pytest.approx(want, rel=1e-10, abs=1e-12), key
    np.testing.assert_array_equal(acc.firing_counts().cpu().numpy(), fire)
    np.testing.assert_allclose(acc.lifetime_sparsity().cpu().numpy(), lifetime, rtol=1e-12)
    np.testing.assert_allclose(acc.mean_activation_when_active().cpu().numpy(), when_active, rtol=1e-10)
    json.dumps(out)
    assert all(type(v) in (int, float) for v in out.values())
    return out, fire


def test_matches_numpy_on_uneven_batches():
    rng = np.random.default_rng(0)
    batches = [_batch(rng, 37), _batch(rng, 50, dtype=torch.float64), _batch(rng, 13, dtype=torch.bfloat16)]
    out, fire = _assert_matches(_fed(batches), batches)
    assert fire[DEAD] == 0 and fire[ALWAYS] == 100
    assert math.isnan(_fed(batches).mean_activation_when_active()[DEAD])
    assert out["dead_fraction"] == 1 / D_SAE
    assert 0 < out["near_zero_fraction"] - (1 - out["population_sparsity"]) < 0.05  # 1e-8 codes count


def test_matches_numpy_with_all_zero_code_batch():
    rng = np.random.default_rng(1)
    batches = [_batch(rng, 37), _batch(rng, 50, zero_codes=True), _batch(rng, 13, dtype=torch.float16)]
    out, fire = _assert_matches(_fed(batches), batches)
    assert fire[ALWAYS] == 50 and fire.sum() > 0


def test_lifetime_equals_population_sparsity():
    rng = np.random.default_rng(2)
    out = _fed([_batch(rng, 37), _batch(rng, 50), _batch(rng, 13)]).compute()
    assert out["population_sparsity"] == pytest.approx(out["mean_lifetime_sparsity"], rel=1e-12)
    assert out["l0"] == pytest.approx(out["population_sparsity"] * D_SAE, rel=1e-12)


def test_merge_equals_single_accumulator():
    rng = np.random.default_rng(3)
    batches = [_batch(rng, 37), _batch(rng, 50), _batch(rng, 13)]
    whole = _fed(batches)
    a, b, empty = _fed(batches[:2]), _fed(batches[2:]), MetricsAccumulator(D_IN, D_SAE)
    a.merge(b)
    a.merge(empty)
    empty.merge(a)
    for merged in (a, empty):
        got, want = merged.compute(), whole.compute()
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-12), key
        assert torch.equal(merged.firing_counts(), whole.firing_counts())
    with pytest.raises(ValueError, match="cannot merge d_in/d_sae"):
        a.merge(MetricsAccumulator(D_IN, D_SAE + 1))


def test_perfect_and_mean_reconstructions():
    rng = np.random.default_rng(4)
    batches = [_batch(rng, n, dtype=torch.float64) for n in (37, 50, 13)]
    perfect = _fed([(x, x.clone(), c) for x, _, c in batches]).compute()
    assert perfect["fvu"] == 0.0 and perfect["mse"] == 0.0
    assert perfect["cosine"] == pytest.approx(1.0, abs=1e-12)
    mean = torch.cat([x for x, _, _ in batches]).mean(0)
    at_mean = _fed([(x, mean.expand_as(x), c) for x, _, c in batches]).compute()
    assert at_mean["fvu"] == pytest.approx(1.0, rel=1e-12)


def test_zero_rows_cosine_convention():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    x_hat = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 0.0], [-1.0, -1.0]])
    acc = MetricsAccumulator(2, 3)
    acc.update(x, x_hat, torch.zeros(4, 3))
    assert acc.compute()["cosine"] == pytest.approx((1 + 0 + 0 - 1) / 4)


def test_frequency_histogram():
    acc = MetricsAccumulator(2, 5)
    codes = torch.zeros(100, 5)
    codes[:1, 0] = 1.0  # frequency 0.01
    codes[:10, 1] = 1.0  # 0.1
    codes[:, 2] = 1.0  # 1; latents 3 and 4 dead
    acc.update(torch.randn(100, 2), torch.randn(100, 2), codes)
    h = acc.frequency_histogram(bins=2)
    assert h["edges"] == pytest.approx([-2.0, -1.0, 0.0])
    assert h["counts"] == [1, 2] and h["n_dead"] == 2 and h["n_live"] == 3 and h["n_out_of_range"] == 0
    h = acc.frequency_histogram(bins=4, log10_range=(-1.5, 0.0))
    assert sum(h["counts"]) == 2 and h["n_out_of_range"] == 1


def test_per_sample_fvu_differs_from_dataset_fvu():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, D_IN)) + rng.normal(size=(40, 1)) * 5
    x_hat = x + rng.normal(size=(40, D_IN)) * 0.2 + rng.normal(size=(40, 1))  # per-row offsets
    want = np.mean([np.var(a - b) / np.var(a) for a, b in zip(x, x_hat)])
    xt, xht = torch.from_numpy(x), torch.from_numpy(x_hat)
    assert per_sample_fvu(xt, xht) == pytest.approx(want, rel=1e-12)
    acc = MetricsAccumulator(D_IN, 1)
    acc.update(xt, xht, torch.zeros(40, 1))
    assert abs(acc.compute()["fvu"] - per_sample_fvu(xt, xht)) > 0.01


def test_input_validation():
    acc = MetricsAccumulator(D_IN, D_SAE)
    with pytest.raises(ValueError, match="no rows seen yet"):
        acc.compute()
    with pytest.raises(ValueError, match="x and x_hat must both be"):
        acc.update(torch.zeros(3, D_IN), torch.zeros(3, D_IN + 1), torch.zeros(3, D_SAE))
    with pytest.raises(ValueError, match="codes must be"):
        acc.update(torch.zeros(3, D_IN), torch.zeros(3, D_IN), torch.zeros(4, D_SAE))
    acc.update(torch.zeros(0, D_IN), torch.zeros(0, D_IN), torch.zeros(0, D_SAE))
    assert acc.n_rows == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_numpy():
    rng = np.random.default_rng(6)
    batches = [_batch(rng, 37), _batch(rng, 50, zero_codes=True), _batch(rng, 13, dtype=torch.float16)]
    acc = _fed(batches, device="cuda")
    assert acc.device.type == "cuda" and acc.firing_counts().is_cuda
    _assert_matches(acc, batches)
    cpu = _fed(batches)
    cpu.merge(acc)  # cross-device merge lands on the CPU accumulator
    assert cpu.n_rows == 200 and cpu.device.type == "cpu"
