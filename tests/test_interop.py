"""Export to SAELens / sparsify / dictionary_learning and import from SAELens / sparsify, checked through
the real libraries' own loaders (the `interop` dependency group): same codes, same reconstructions."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest
import torch

from sae.__main__ import main as sae_main
from sae.nn.checkpoint import load_sae, save_sae
from sae.nn.config import SAEConfig
from sae.nn.interop import export_sae, folded_weights
from sae.nn.model import SparseAutoencoder
from sae.util.errors import InputError

D_IN, D_SAE = 16, 48
ARCHS = ("topk", "matryoshka", "msae_rw", "batchtopk", "relu")


def _sae(arch: str, seed: int = 0) -> SparseAutoencoder:
    """Random weights, biases, a batchtopk threshold and input_scale 3.7: every term of the formulas matters."""
    kw: dict[str, Any] = {"k": 6} if arch != "msae_rw" else {"k_levels": [6, 12, D_SAE]}
    sae = SparseAutoencoder(SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, seed=seed, input_scale=3.7, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=g))
        sae.b_enc.copy_(0.2 * torch.randn(D_SAE, generator=g))
        sae.b_dec.copy_(torch.randn(D_IN, generator=g))
        sae.threshold.fill_(0.4)
    return sae


def _x(n: int = 64) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(7).standard_normal((n, D_IN)).astype(np.float32)) * 0.5 + 0.2


def _ours(sae: SparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        codes = sae.encode(x)
        return codes, sae.decode(codes)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as the pipeline writes it: run.json and saes/layerNN/ (one architecture per layer)."""
    run = tmp_path_factory.mktemp("run")
    for layer, arch in enumerate(ARCHS):
        save_sae(_sae(arch, seed=layer), run / "saes" / f"layer{layer:02d}")
    info: dict[str, Any] = {"name": "tiny", "model": "tiny-clip", "model_name": "tiny-clip", "modality": "image"}
    info.update(dataset="shapes:40", token="cls", layers=list(range(len(ARCHS))))
    (run / "run.json").write_text(json.dumps(info))
    return run


def test_folding_input_scale_keeps_codes_and_a_naive_copy_does_not():
    sae, x = _sae("topk"), _x()
    w = folded_weights(sae)
    ref = (x.double() - w["b_dec"].double()) @ w["W_enc"].double() + w["b_enc"].double()  # float64, no input_scale
    top = ref.topk(6, dim=1)
    codes = torch.zeros_like(ref).scatter_(1, top.indices, top.values.clamp_min(0))
    _close(codes, _ours(sae, x)[0])
    _close(codes @ w["W_dec"].double() + w["b_dec"].double(), _ours(sae, x)[1])
    naive = (x.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()  # input_scale ignored
    same_support = (naive.topk(6, dim=1).indices.sort(1).values == top.indices.sort(1).values).all(1)
    assert float(same_support.float().mean()) < 0.5  # negative control: without folding the codes are wrong


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_export_then_load_sae_round_trip(tmp_path, run_dir, fmt):
    x = _x()
    for layer, arch in enumerate(ARCHS):
        if fmt == "sparsify" and arch in ("batchtopk", "relu"):
            continue
        ours = load_sae(run_dir / "saes" / f"layer{layer:02d}")
        back = load_sae(export_sae(ours, fmt, tmp_path / f"{arch}"))
        assert back.cfg.input_scale == 1.0
        for a, b in zip(_ours(ours, x), _ours(back, x)):
            _close(a, b)


def test_sparsify_refuses_what_it_has_no_architecture_for(tmp_path):
    with pytest.raises(InputError, match="sparsify has only TopK SAEs"):
        export_sae(_sae("batchtopk"), "sparsify", tmp_path)


def test_cli_export_writes_run_metadata(tmp_path, run_dir):
    assert (
        sae_main(["export", "--format", "saelens", "--sae", str(run_dir / "saes" / "layer03"), "--out", str(tmp_path)])
        == 0
    )
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == D_SAE
    meta = cfg["metadata"]
    assert (meta["model_name"], meta["hook_name"], meta["hook_layer"], meta["dataset_path"]) == (
        "tiny-clip",
        "layer03",
        3,
        "shapes:40",
    )
    with pytest.raises(InputError, match="not an SAE checkpoint"):
        load_sae(tmp_path / "missing")


def test_saelens_loads_exports_and_its_own_folders_load_here(tmp_path, run_dir):
    sae_lens = pytest.importorskip("sae_lens")
    x = _x()
    for layer, arch in enumerate(ARCHS):
        ours = load_sae(run_dir / "saes" / f"layer{layer:02d}")
        folder = export_sae(ours, "saelens", tmp_path / arch)
        theirs = sae_lens.SAE.load_from_disk(str(folder))
        expected = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard"}.get(arch, "topk")
        assert theirs.cfg.architecture() == expected
        with torch.no_grad():
            codes = theirs.encode(x)
            _close(codes, _ours(ours, x)[0])
            _close(theirs.decode(codes), _ours(ours, x)[1])
    # a JumpReLU SAE saved by SAELens itself, per-latent thresholds, b_dec not subtracted from inputs
    cfg = sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)
    theirs = sae_lens.JumpReLUSAE(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        theirs.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.6)
    theirs.save_model(tmp_path / "theirs")
    ours = load_sae(tmp_path / "theirs")
    assert ours.cfg.architecture == "jumprelu"
    with torch.no_grad():
        codes = theirs.encode(x)
        assert 0 < float((codes > 0).float().mean()) < 0.5
        _close(_ours(ours, x)[0], codes)
        _close(_ours(ours, x)[1], theirs.decode(codes))


def test_sparsify_loads_exports_and_its_own_folders_load_here(tmp_path, run_dir):
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    sparsify = pytest.importorskip("sparsify")
    x = _x()

    def dense(coder):
        out = coder.encode(x)
        codes = torch.zeros(len(x), coder.num_latents).scatter_(1, out.top_indices, out.top_acts)
        return codes, coder.decode(out.top_acts, out.top_indices)

    for layer, arch in enumerate(ARCHS[:3]):  # the TopK family
        ours = load_sae(run_dir / "saes" / f"layer{layer:02d}")
        theirs = sparsify.SparseCoder.load_from_disk(export_sae(ours, "sparsify", tmp_path / arch))
        with torch.no_grad():
            for a, b in zip(dense(theirs), _ours(ours, x)):
                _close(a, b)
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=5), decoder=True)
    with torch.no_grad():
        coder.encoder.bias.copy_(torch.randn(D_SAE) * 0.1)
        coder.b_dec.copy_(torch.randn(D_IN) * 0.1)
    coder.save_to_disk(tmp_path / "theirs")
    ours = load_sae(tmp_path / "theirs")
    with torch.no_grad():
        for a, b in zip(dense(coder), _ours(ours, x)):
            _close(a, b)


def test_dictionary_learning_loads_exports(tmp_path, run_dir):
    pytest.importorskip("dictionary_learning")
    from dictionary_learning.utils import load_dictionary

    x = _x()
    for layer, arch in enumerate(ARCHS):
        ours = load_sae(run_dir / "saes" / f"layer{layer:02d}")
        theirs, config = load_dictionary(str(export_sae(ours, "dictionary_learning", tmp_path / arch)), "cpu")
        expected = {"batchtopk": "BatchTopKSAE", "relu": "JumpReluAutoEncoder"}.get(arch, "AutoEncoderTopK")
        assert config["trainer"]["dict_class"] == expected == type(theirs).__name__
        with torch.no_grad():
            codes = theirs.encode(x)
            _close(codes, _ours(ours, x)[0])
            _close(theirs.decode(codes), _ours(ours, x)[1])
