"""The SAE module: sparse training path equals a dense float64 reference; inference rules."""

import numpy as np
import pytest
import torch

from sae.nn.checkpoint import load_sae, save_sae
from sae.nn.config import SAEConfig
from sae.nn.model import (
    DENSE_AUX_RATIO,
    ENC_INIT_SCALE,
    SparseAutoencoder,
    _SelectedPreActs,
    batch_topk_entries,
    geometric_median,
)


def _sae(arch="topk", d_in=12, d_sae=40, k=5, **kw):
    return SparseAutoencoder(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k, **kw))


def test_selected_pre_acts_backward_matches_dense_autograd_in_float64():
    """Any entry order, repeated columns (as AuxK gives), rows with no entry."""
    torch.manual_seed(0)
    x = torch.randn(30, 12, dtype=torch.float64, requires_grad=True)
    W = torch.randn(12, 40, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True)
    pre = (x @ W + b).detach()
    keep = torch.rand(30, 40) < 0.3
    keep[:, :3] = True  # every row uses columns 0-2
    keep[5] = False  # row 5 selects nothing
    rows, cols = keep.nonzero(as_tuple=True)
    perm = torch.randperm(len(rows))
    rows, cols = rows[perm], cols[perm]
    vals = _SelectedPreActs.apply(x, W, b, pre, rows, cols)
    g = torch.randn_like(vals)
    (vals * g).sum().backward()
    sparse_grads = [_grad(t).clone() for t in (x, W, b)]
    for t in (x, W, b):
        t.grad = None
    ref = (x @ W + b)[rows, cols]
    torch.testing.assert_close(vals, ref.detach())
    (ref * g).sum().backward()
    for got, t in zip(sparse_grads, (x, W, b)):
        torch.testing.assert_close(got, t.grad)


def _grad(t: torch.Tensor) -> torch.Tensor:
    assert t.grad is not None, "backward() reached it"
    return t.grad


def _dense_topk(pre, k):
    t = pre.topk(k, 1)
    return torch.zeros_like(pre).scatter(1, t.indices, t.values.clamp_min(0))


def _dense_reference_loss(arch, P, xs, k, dead, k_aux):
    """The training loss written densely with plain autograd ops (parameters P, float64)."""
    pre = (xs - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    if arch == "batchtopk":
        acts = pre.clamp_min(0).flatten()
        top = acts.topk(k * xs.shape[0])
        z = torch.zeros_like(acts).scatter(0, top.indices, top.values).view_as(pre)
    else:
        z = _dense_topk(pre, k)
    x_hat = z @ P["W_dec"] + P["b_dec"]
    loss = ((x_hat - xs) ** 2).mean()
    if k_aux:
        z_aux = _dense_topk(pre.masked_fill(~dead, float("-inf")), k_aux)
        e = xs - x_hat.detach()
        loss = loss + ((z_aux @ P["W_dec"] - e) ** 2).mean() / 32
    return loss


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("k_aux", [0, 4, 10])  # 30 dead latents: AuxK's sparse path at 4, its dense one at 10
def test_sparse_training_loss_and_gradients_equal_the_dense_path_in_float64(arch, k_aux):
    assert (30 <= DENSE_AUX_RATIO * k_aux) == (k_aux == 10)
    torch.manual_seed(1)
    sae = SparseAutoencoder(SAEConfig(architecture=arch, d_in=16, d_sae=96, k=6, k_aux=k_aux)).double()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.3)
    xs = torch.randn(50, 16, dtype=torch.float64) * torch.rand(50, 1, dtype=torch.float64) * 3  # uneven rows
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96)[:30]] = True
    with torch.no_grad():  # dead latents fire rarely: some rows' AuxK picks are negative, so the ReLU matters
        sae.b_enc[dead] -= 1.5
    out = sae.training_loss(xs, dead)
    out.loss.backward()
    P = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters()}
    ref = _dense_reference_loss(arch, P, xs, 6, dead, k_aux)
    ref.backward()
    torch.testing.assert_close(out.loss.detach(), ref.detach(), rtol=1e-12, atol=0)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, P[name].grad, rtol=1e-10, atol=1e-12)
    assert out.l0 == pytest.approx(6)


def test_batch_topk_entries_equal_a_top_k_over_the_whole_batch():
    torch.manual_seed(5)
    cases = [(torch.randn(40, 30), 120, 3)]  # random rows
    skewed = torch.randn(40, 30) - 1
    skewed[7] += 5  # one row holds far more than `start` of the batch's largest entries: it must grow
    cases.append((skewed, 100, 2))
    cases.append((torch.randn(40, 30) - 2.5, 600, 4))  # fewer positive entries than asked for
    for _ in range(100):  # random sizes, row offsets, `total` up to every entry, `start` up to d
        n, d = int(torch.randint(1, 30, ()).item()), int(torch.randint(2, 60, ()).item())
        pre = torch.randn(n, d) + torch.randn(n, 1) * torch.rand(()) * 2 - torch.rand(()) * 2
        cases.append((pre, int(torch.randint(1, n * d + 1, ()).item()), int(torch.randint(1, d + 1, ()).item())))
    for pre, total, start in cases:
        rows, cols = batch_topk_entries(pre, total, start)
        top = pre.clamp_min(0).flatten().topk(total)
        want = top.indices[top.values > 0].sort().values
        assert torch.equal(rows * pre.shape[1] + cols, want)
    assert (batch_topk_entries(skewed, 100, 2)[0] == 7).sum() == 30


def test_topk_training_loss_equals_dense_formula():
    torch.manual_seed(1)
    sae = _sae(k_aux=0)
    xs = torch.randn(64, 12)
    out = sae.training_loss(xs)
    pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(5, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.clamp_min(0))
    x_hat = z @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(out.x_hat, x_hat.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, (x_hat - xs).pow(2).mean(), rtol=1e-5, atol=1e-6)


def test_encoder_starts_as_a_copy_of_the_decoder_transpose_not_a_view():
    relu = SparseAutoencoder(SAEConfig(architecture="relu", d_in=12, d_sae=40))
    assert torch.equal(relu.W_enc, relu.W_dec.t())
    msae = SparseAutoencoder(SAEConfig(architecture="msae_rw", d_in=12, d_sae=40, k=4))
    assert torch.equal(msae.W_enc, msae.W_dec.t())  # the MSAE code's tied unit-norm start
    sae = _sae()
    assert sae.cfg.architecture == "topk" and ENC_INIT_SCALE == 0.2
    assert torch.equal(sae.W_enc, 0.2 * sae.W_dec.t())  # the topk family starts smaller
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))


def test_decoder_constraint_removes_parallel_gradient_and_renormalises():
    sae = _sae()
    sae.training_loss(torch.randn(32, 12)).loss.backward()
    sae.remove_parallel_grad_()
    assert sae.W_dec.grad is not None
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert parallel.abs().max() < 1e-6
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))


def test_batchtopk_inference_codes_do_not_depend_on_the_batch():
    torch.manual_seed(2)
    sae = _sae("batchtopk")
    for _ in range(5):
        sae.training_loss(torch.randn(128, 12))
    assert sae.threshold > 0
    x = torch.randn(20, 12)
    alone = sae.encode(x[:3])
    together = sae.encode(x)[:3]
    assert torch.equal(alone > 0, together > 0)  # same support; values equal up to BLAS blocking
    torch.testing.assert_close(alone, together)
    pre = sae.pre_acts(x[:3])
    assert torch.equal(alone, torch.where(pre > sae.threshold, pre, 0.0))


def test_batchtopk_threshold_changes_only_in_training_steps():
    torch.manual_seed(6)
    sae = _sae("batchtopk")
    with torch.no_grad():
        sae.threshold.fill_(0.5)
    x = torch.randn(8, 12)
    before = sae.encode(x)
    sae.eval()
    sae(torch.randn(256, 12) * 3)  # eval mode, autograd on
    sae.train()
    with torch.no_grad():
        sae(torch.randn(256, 12) * 3)  # training mode, autograd off
        sae.training_loss(torch.randn(256, 12) * 3)
    assert float(sae.threshold) == 0.5
    assert torch.equal(sae.encode(x), before)
    sae.training_loss(torch.randn(256, 12) * 3).loss.backward()  # a training step moves it
    assert float(sae.threshold) != 0.5


def test_batchtopk_training_keeps_k_per_row_on_average():
    sae = _sae("batchtopk")
    out = sae.training_loss(torch.randn(64, 12) * 3)
    assert out.l0 == pytest.approx(5, abs=0.01)


def test_default_k_is_32_and_64_for_msae():
    assert SAEConfig(architecture="topk").k == SAEConfig(architecture="batchtopk").k == 32
    assert SAEConfig(architecture="matryoshka").k == 32
    cfg = SAEConfig(architecture="msae_rw", d_in=8, d_sae=6144)
    assert cfg.k == 64
    assert cfg.levels == [64, 128, 256, 512, 1024, 2048, 4096, 6144]  # MSAE's rule for ViT-L/14 x8
    assert SAEConfig(architecture="msae_uw", d_sae=6144, k=32).levels[:2] == [32, 64]
    assert SAEConfig(architecture="msae_uw", d_sae=64, k_levels=[4, 16, 64]).k == 4


def test_msae_levels_and_weights():
    sae = SparseAutoencoder(SAEConfig(architecture="msae_rw", d_in=8, d_sae=32, k=4, k_levels=[4, 16, 32]))
    xs = torch.randn(16, 8)
    pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
    losses = []
    for k in (4, 16):
        t = pre.topk(k, 1)
        z = torch.zeros_like(pre).scatter(1, t.indices, t.values.clamp_min(0))
        losses.append(((z @ sae.W_dec + sae.b_dec - xs) ** 2).mean())
    losses.append(((pre.clamp_min(0) @ sae.W_dec + sae.b_dec - xs) ** 2).mean())
    expected_rw = (3 * losses[0] + 2 * losses[1] + 1 * losses[2]) / 6  # largest weight on smallest k
    torch.testing.assert_close(sae.training_loss(xs).loss, expected_rw, rtol=1e-5, atol=1e-6)
    sae.cfg.architecture = "msae_uw"
    torch.testing.assert_close(sae.training_loss(xs).loss, sum(losses) / 3, rtol=1e-5, atol=1e-6)


def test_matryoshka_prefixes_each_reconstruct():
    sae = _sae("matryoshka", d_sae=32, k=6, prefixes=[4, 16, 32], k_aux=0)
    xs = torch.randn(16, 12)
    pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
    t = pre.topk(6, 1)
    z = torch.zeros_like(pre).scatter(1, t.indices, t.values.clamp_min(0))
    losses = [((z[:, :p] @ sae.W_dec[:p] + sae.b_dec - xs) ** 2).mean() for p in (4, 16, 32)]
    torch.testing.assert_close(sae.training_loss(xs).loss, torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)


def test_matryoshka_default_prefixes_halve_down_to_4k():
    assert SAEConfig(architecture="matryoshka", d_sae=6144, k=32).prefix_sizes == [384, 768, 1536, 3072, 6144]
    assert SAEConfig(architecture="matryoshka", d_sae=512, k=8).prefix_sizes == [32, 64, 128, 256, 512]
    assert SAEConfig(architecture="matryoshka", d_sae=512, k=32).prefix_sizes == [128, 256, 512]
    assert SAEConfig(architecture="matryoshka", d_sae=64, k=32).prefix_sizes == [64]  # plain TopK
    assert SAEConfig(architecture="matryoshka", d_sae=512, k=32, prefixes=[32, 512]).prefix_sizes == [32, 512]


def test_relu_fold_decoder_norms_keeps_the_function(tmp_path):
    torch.manual_seed(3)
    sae = _sae("relu", input_scale=0.5)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(40, 1) + 0.5)
    x = torch.randn(10, 12)
    before = sae.decode(sae.encode(x))
    loaded = load_sae(save_sae(sae, tmp_path / "s"))
    torch.testing.assert_close(loaded.W_dec.norm(dim=1), torch.ones(40))
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "msae_uw", "matryoshka", "relu"])
def test_reconstruction_from_the_files_alone_equals_the_module(tmp_path, arch):
    """Re-implements the documented formula with numpy + safetensors only (no sae code)."""
    import json

    from safetensors.numpy import load_file

    torch.manual_seed(4)
    sae = _sae(arch, input_scale=0.7)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
        sae.threshold.fill_(0.3)
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    t = load_file(str(tmp_path / "sae.safetensors"))
    assert t["W_enc"].shape == (12, 40) and t["W_dec"].shape == (40, 12)
    x = np.random.default_rng(0).standard_normal((9, 12)).astype(np.float64)
    s = cfg["input_scale"]
    pre = (s * x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if cfg["architecture"] == "relu":
        z = np.maximum(pre, 0)
    elif cfg["architecture"] == "batchtopk":
        z = pre * (pre > t["threshold"])
    else:
        z = np.zeros_like(pre)
        keep = np.argsort(-pre, axis=1)[:, : cfg["k"]]
        np.put_along_axis(z, keep, np.maximum(np.take_along_axis(pre, keep, 1), 0), 1)
    x_hat = (z @ t["W_dec"] + t["b_dec"]) / s
    module = sae.decode(sae.encode(torch.from_numpy(x).float())).detach().numpy()
    np.testing.assert_allclose(x_hat, module, rtol=1e-4, atol=1e-4)
    assert cfg["provenance"]["share_concepts"] and "git_commit" in cfg["provenance"]


def test_geometric_median_resists_outliers():
    x = torch.zeros(101, 3)
    x[:60] = torch.tensor([1.0, 2.0, 3.0])
    x[60:] = torch.randn(41, 3) * 100
    torch.testing.assert_close(geometric_median(x), torch.tensor([1.0, 2.0, 3.0]), atol=1e-3, rtol=0)
