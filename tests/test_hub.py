"""Hub push and pull, offline: the folder `push` uploads, laid into huggingface_hub's cache as a downloaded
repository would be, then read back with load_sae("hf://ORG/NAME/layerNN") under HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import pytest
import torch

from sae.__main__ import main as sae_main
from sae.nn.checkpoint import load_sae, save_sae
from sae.nn.config import SAEConfig
from sae.nn.hub import parse_hf
from sae.nn.model import SparseAutoencoder
from sae.util.errors import InputError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _run(tmp_path):
    run = tmp_path / "run"
    for layer in (3, 5):
        sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=32, k=4, seed=layer, input_scale=2.5))
        save_sae(sae, run / "saes" / f"layer{layer:02d}")
        (run / "saes" / f"layer{layer:02d}" / "train_log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    metrics = {"fvu": 0.125, "cosine": 0.93, "l0": 4.0, "dead_fraction": 0.0, "eval_rows": 100}
    info = {
        "name": "tiny",
        "modality": "image",
        "model": "tiny-clip",
        "model_name": "tiny-clip",
        "layers": [3, 5],
        "architecture": "topk",
        "k": 4,
        "d_sae": 32,
        "dataset": "shapes:40",
        "split": "train",
        "n_rows": 40,
        "token": "cls",
        "row_ids": list(range(40)),
        "activation_cache": "/somewhere/local",
        "sae_metrics": {"3": metrics, "5": {**metrics, "fvu": 0.25}},
        "sae_dirs": {"layer03": "saes/layer03", "layer05": "saes/layer05"},
        "provenance": {"share_concepts": "0.1.0", "git_commit": "abc123"},
    }
    (run / "run.json").write_text(json.dumps(info))
    return run


def test_push_folder_then_pull_through_the_hub_cache(tmp_path, monkeypatch):
    run = _run(tmp_path)
    staged = tmp_path / "staged"
    assert sae_main(["push", "--run", str(run), "--repo", "org/tiny-saes", "--out", str(staged)]) == 0
    assert sorted(p.name for p in staged.iterdir()) == ["README.md", "layer03", "layer05", "run.json"]
    assert sorted(p.name for p in (staged / "layer05").iterdir()) == [
        "cfg.json",
        "sae.safetensors",
        "train_log.jsonl",
    ]
    public = json.loads((staged / "run.json").read_text())
    assert "row_ids" not in public and "activation_cache" not in public and public["model"] == "tiny-clip"
    card = (staged / "README.md").read_text()
    assert 'load_sae("hf://org/tiny-saes/layer03")' in card
    assert "| layer05 | 0.25 | 0.93 | 4 | 0 | 100 |" in card and "git_commit: abc123" in card

    cache = tmp_path / "hub_cache"  # huggingface_hub's cache layout for a downloaded model repository
    repo = cache / "models--org--tiny-saes"
    shutil.copytree(staged, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pulled = load_sae("hf://org/tiny-saes/layer05")
    local = load_sae(run / "saes" / "layer05")
    x = torch.randn(20, 8)
    with torch.no_grad():
        assert torch.equal(pulled.encode(x), local.encode(x))
    assert pulled.cfg.input_scale == 2.5
    with pytest.raises(InputError, match="has no folder 'layer07'|cannot get"):
        load_sae("hf://org/tiny-saes/layer07")
    with pytest.raises(InputError, match="cannot get hf://org/absent/layer05"):
        load_sae("hf://org/absent/layer05")


def test_hf_paths():
    assert parse_hf("hf://org/name/layer05") == ("org/name", None, "layer05")
    assert parse_hf("hf://org/name@v1/saes/layer05") == ("org/name", "v1", "saes/layer05")
    with pytest.raises(InputError, match="not a Hub path"):
        parse_hf("hf://name")
    with pytest.raises(InputError, match="not a finished run"):
        sae_main(["push", "--run", "/nonexistent", "--repo", "org/x", "--out", "/tmp/never"])
