"""train_image.py / train_text.py end to end on the generated shapes data: run.json, the recorded
features (checked against an independent float64 encoding of the recorded vectors by the saved SAE
files), CLIP ResNet stages of different widths and token counts, the real MiniLM, kill-and-resume
through the CLI, and a failed run that a rerun with other flags may replace."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import train_image
import train_text
import wrappedmodels as wm
from sae import pipeline
from sae.data.cache import open_cache
from sae.data.datasets import load_pairs
from sae.data.features import open_run
from sae.encoders.tiny import build_open_clip, build_open_clip_resnet, minilm_dir
from sae.nn.trainer import TrainingInterrupted
from sae.util.errors import InputError
from sae.util.provenance import REPO_ROOT

N = 40
VERSIONS = ("torch", "transformers", "open_clip_torch", "datasets", "tokenizers", "pillow", "numpy", "python")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    with contextlib.redirect_stderr(io.StringIO()):
        build_open_clip(root)
        build_open_clip_resnet(root)
    return root


def common(root: Path, features: Path, *extra: str) -> list[str]:
    """Flags of every run here; `extra` flags come last and win over these (argparse keeps the last)."""
    return [
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
        "--epochs",
        "2",
        "--batch_size",
        "128",
        "--lr",
        "1e-2",
        "--k_aux",
        "8",
        *extra,
    ]


def reference_codes(sae_dir: Path, x: np.ndarray) -> np.ndarray:
    """TopK codes [n, d_sae] in float64 from the checkpoint files alone (sae/nn/checkpoint.py's formula)."""
    w = {k: v.astype(np.float64) for k, v in load_file(sae_dir / "sae.safetensors").items()}
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    pre = (cfg["input_scale"] * x.astype(np.float64) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    z = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, : cfg["k"]]
    np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    return z


def check_run(features: Path, name: str, model: str, layers: list[int]) -> dict:
    """run.json fields every run has, and each layer's features = the SAE's codes of the recorded vectors."""
    info = json.loads((features / name / "run.json").read_text())
    assert info["name"] == name and info["model"] == model and info["layers"] == layers
    assert info["dataset"]["name"].endswith(f"shapes-{N}-seed0") and info["dataset"]["fingerprint"]
    assert info["split"] == info["dataset"]["split"] == "train" and info["format"] == "csr-v1"
    assert info["n_rows"] == N and info["row_ids"] == list(range(N)) and info["bad_rows"] == []
    assert info["k"] == 4 and info["architecture"] == "topk"
    prov = info["provenance"]
    assert all(prov[v] for v in VERSIONS) and prov["torch"] == torch.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert prov["git_commit"].startswith(head)
    cache = open_cache(info["activation_cache"])
    run = open_run(features, name)
    assert run.layers == layers
    for layer in layers:
        m = info["sae_metrics"][str(layer)]
        assert 0 < m["l0"] <= 4 and m["eval_rows"] > 0 and 0 <= m["fvu"] and m["r2_overcomplete"] > 0.5
        x = cache.to_tensor(cache.pooled(layer)).double()
        if (x - x.mean(0)).pow(2).sum() > 1e-4 * x.pow(2).sum():
            # FVU divides by the spread between rows; a random tiny CLIP ResNet's attention pool is nearly
            # constant (spread 1.5e-6 of its squared norm), where FVU is the ratio of two tiny numbers
            assert m["fvu"] < 10
        sae_dir = features / name / info["sae_dirs"][f"layer{layer:02d}"]
        codes = run.load(layer)
        d_sae = info["d_sae"] if isinstance(info["d_sae"], int) else info["d_sae"][str(layer)]
        assert codes.n_rows == N and codes.d_sae == d_sae == 2 * cache.d_of(layer)
        ref = reference_codes(sae_dir, cache.to_tensor(cache.pooled(layer)).numpy())
        np.testing.assert_allclose(codes.to_dense(), ref, rtol=1e-4, atol=1e-5)
        assert (np.diff(codes.indptr) <= 4).all() and codes.nnz > 0
    return info


def test_train_image_and_text_clip(root, tmp_path):
    features = tmp_path / "features"
    clip = str(root / "tiny-open-clip")
    assert (
        train_image.main(
            [
                "--model",
                "ClipVision",
                "--clip_model_name",
                clip,
                "--layers",
                "0",
                "-1",
                "--runname",
                "img",
                *common(root, features),
            ]
        )
        == 0
    )
    info = check_run(features, "img", "ClipVision", [0, 2])
    assert info["modality"] == "image" and info["model_name"] == clip and info["token"] == "pooled"
    assert info["token_rule"] == "first" and info["train_tokens"] == "real tokens"
    assert info["d_sae"] == 64 and info["n_tokens"] == N * 17 and set(info["sae_dirs"]) == {"layer00", "layer02"}
    # the recorded vectors are the CLS tokens of the adapter's own forward
    pairs = load_pairs(info["dataset"]["name"])
    adapter = wm.ModelSpec("ClipVision", clip).load("cpu")
    out = adapter.forward(adapter.preprocess([pairs.image(n) for n in range(N)]), [2])
    cache = open_cache(info["activation_cache"])
    torch.testing.assert_close(cache.to_tensor(cache.pooled(2)), out.hidden[2][:, 0], rtol=1e-2, atol=1e-2)

    text_args = [
        "--model",
        "ClipText",
        "--clip_model_name",
        clip,
        "--layers",
        "-1",
        "--runname",
        "txt",
        "--row_ids_from",
        str(features / "img"),
        *common(root, features),
    ]
    assert train_text.main(text_args) == 0
    info = check_run(features, "txt", "ClipText", [2])
    assert info["modality"] == "text" and info["token_rule"] == "last"  # EOT
    ids = wm.ModelSpec("ClipText", clip).load("cpu").preprocess(pairs.texts())["input_ids"]
    assert info["n_tokens"] == int((ids.argmax(1) + 1).sum())  # SOT..EOT of every caption, no padding
    # a second call finds the run complete
    assert train_text.main(text_args) == 0


def test_relu_run_records_and_reports_the_saved_folded_sae(root, tmp_path):
    """A relu SAE trains with free decoder norms and is saved folded: the recorded features and
    metrics.json are those of the saved files, not of the unfolded in-memory SAE (S_i differs by ||W_dec_i||)."""
    features = tmp_path / "features"
    clip = str(root / "tiny-open-clip")
    flags = ["--model", "ClipText", "--clip_model_name", clip, "--layers", "-1", "--runname", "relu"]
    assert train_text.main([*flags, *common(root, features, "--sae", "relu", "--l1_coef", "0.01")]) == 0
    info = json.loads((features / "relu" / "run.json").read_text())
    sae_dir = features / "relu" / info["sae_dirs"]["layer02"]
    w = {k: v.astype(np.float64) for k, v in load_file(sae_dir / "sae.safetensors").items()}
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    norms = np.linalg.norm(w["W_dec"], axis=1)
    np.testing.assert_allclose(norms, 1, atol=1e-5)
    cache = open_cache(info["activation_cache"])

    def codes(x: np.ndarray) -> np.ndarray:
        return np.maximum((cfg["input_scale"] * x.astype(np.float64) - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)

    recorded = open_run(features, "relu").load(2).to_dense()
    ref = codes(cache.to_tensor(cache.pooled(2)).numpy())
    assert (ref > 0).any()
    np.testing.assert_allclose(recorded, ref, rtol=1e-4, atol=1e-5)
    tokens = np.concatenate([cache.to_tensor(t).numpy() for t in cache.token_shards(2)])
    m = info["sae_metrics"]["2"]
    assert m["eval_rows"] == len(tokens)  # every token row, so the means below are over the same rows
    z = codes(tokens)
    assert m["mean_activation"] == pytest.approx(z.mean(), rel=1e-4)
    assert m["l0"] == pytest.approx((z > 0).sum(1).mean(), rel=1e-3)
    assert json.loads((sae_dir / "metrics.json").read_text())["mean_activation"] == m["mean_activation"]


def test_train_text_real_minilm(root, tmp_path):
    features = tmp_path / "features"
    assert (
        train_text.main(
            [
                "--model",
                "Bert",
                "--bert_model_name",
                str(minilm_dir()),
                "--layers",
                "1",
                "-1",
                "--runname",
                "minilm",
                *common(root, features, "--expansion_factor", "1"),
            ]
        )
        == 0
    )
    info = check_run_bert(features)
    assert info["layers"] == [1, 5] and info["token_rule"] == "first"  # [CLS]


def check_run_bert(features: Path) -> dict:
    info = json.loads((features / "minilm" / "run.json").read_text())
    assert info["model_name"] == str(minilm_dir()) and info["d_sae"] == 384
    from transformers import AutoTokenizer, BertModel

    pairs = load_pairs(info["dataset"]["name"])
    enc = AutoTokenizer.from_pretrained(minilm_dir())(pairs.texts(), padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = BertModel.from_pretrained(minilm_dir()).eval()(**enc, output_hidden_states=True).hidden_states
    cache = open_cache(info["activation_cache"])
    assert info["n_tokens"] == int(enc["attention_mask"].sum())
    torch.testing.assert_close(cache.to_tensor(cache.pooled(5)), hs[6][:, 0], rtol=1e-2, atol=2e-2)
    run = open_run(features, "minilm")
    for layer in (1, 5):
        ref = reference_codes(
            features / "minilm" / info["sae_dirs"][f"layer{layer:02d}"], cache.to_tensor(cache.pooled(layer)).numpy()
        )
        np.testing.assert_allclose(run.load(layer).to_dense(), ref, rtol=1e-4, atol=1e-5)
    return info


def test_train_image_clip_resnet_stage_and_attnpool(root, tmp_path):
    """--layers 0 -1 on a CLIP ResNet: stage 1 (8x8 = 64 tokens of width 32) and the attention pool (one
    token of width 16) train in separate passes, each SAE sized from its own width."""
    features = tmp_path / "features"
    rn = str(root / "tiny-open-clip-rn")
    assert (
        train_image.main(
            [
                "--model",
                "ClipVision",
                "--clip_model_name",
                rn,
                "--layers",
                "0",
                "-1",
                "--runname",
                "rn",
                *common(root, features),
            ]
        )
        == 0
    )
    info = check_run(features, "rn", "ClipVision", [0, 4])
    assert info["d_in"] == {"0": 32, "4": 16} and info["d_sae"] == {"0": 64, "4": 32}
    assert info["n_tokens"] == {"0": N * 64, "4": N} and info["token_rule"] == "mean"
    assert info["sae_dirs"] == {"layer00": "saes/group00/layer00", "layer04": "saes/group04/layer04"}
    cache = open_cache(info["activation_cache"])
    assert cache.layouts == [[0], [4]] and cache.meta["token_files"] == "per_layer"
    assert np.bincount(cache.token_row(0)).tolist() == [64] * N and cache.token_row(4).tolist() == list(range(N))
    # the attention pool's recorded vector is the image embedding (open_clip encode_image)
    pairs = load_pairs(info["dataset"]["name"])
    adapter = wm.ModelSpec("ClipVision", rn).load("cpu")
    emb = adapter.embed(adapter.preprocess([pairs.image(n) for n in range(N)]))
    torch.testing.assert_close(cache.to_tensor(cache.pooled(4)), emb, rtol=1e-2, atol=1e-3)


def _files(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and (p.suffix == ".npy" or p.name == "sae.safetensors")
    }


def test_kill_and_resume_through_the_cli(root, tmp_path, monkeypatch):
    """Killed during extraction, then during training (SIGTERM), then run to the end: the same features
    and SAE weights, bit for bit, as an uninterrupted run."""
    clip = str(root / "tiny-open-clip")
    args = ["--model", "ClipVision", "--clip_model_name", clip, "--layers", "1", "--runname", "r"]
    more = ("--checkpoint_every", "3", "--batch_size", "64", "--epochs", "3")
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    assert train_image.main(args + common(root, ref, *more)) == 0
    mine = args + common(root, resumed, *more, "--cache_dir", str(tmp_path / "cache"))  # extract again, kill it

    forward = wm.Adapter.forward
    calls = []

    def dying_forward(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(self, *a, **k)

    monkeypatch.setattr(wm.Adapter, "forward", dying_forward)
    with pytest.raises(KeyboardInterrupt, match="^$"):  # raised by dying_forward
        train_image.main(mine)
    assert list((tmp_path / "cache").glob(".*.partial")) and not (resumed / "r" / "run.json").exists()
    monkeypatch.setattr(wm.Adapter, "forward", forward)

    train_saes = pipeline.train_saes
    stopped = []

    def sigterm_at_step_7(*a, **k):
        def on_step(step: int) -> None:
            if step == 7 and not stopped:
                stopped.append(step)
                os.kill(os.getpid(), signal.SIGTERM)  # the trainer checkpoints, then stops

        return train_saes(*a, on_step=on_step, **k)

    monkeypatch.setattr(pipeline, "train_saes", sigterm_at_step_7)
    with pytest.raises(TrainingInterrupted, match="checkpoint saved in"):
        train_image.main(mine)
    assert stopped and (resumed / "r" / "saes" / "trainer_state.safetensors").exists()
    assert not (resumed / "r" / "run.json").exists()
    monkeypatch.setattr(pipeline, "train_saes", train_saes)
    assert train_image.main(mine) == 0
    a, b = _files(ref / "r"), _files(resumed / "r")
    assert set(a) == set(b) and {"layer01/values.npy", "saes/layer01/sae.safetensors"} <= set(a)
    assert all(a[name] == b[name] for name in a), [name for name in a if a[name] != b[name]]


def _dead_pid() -> int:
    """The id of a process that has exited."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_failed_run_can_be_rerun_with_other_flags(root, tmp_path):
    """A run that stopped on an unreadable image (no outputs yet) is replaced by a rerun with --skip_bad;
    a run with outputs stays protected."""
    data = load_pairs("shapes:12", data_root=str(root / "data"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in Path(data.source).iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "000005.png").write_bytes(b"\x89PNG broken")
    args = [
        "--model",
        "ClipVision",
        "--clip_model_name",
        str(root / "tiny-open-clip"),
        "--layers",
        "-1",
        "--runname",
        "b",
        *common(root, tmp_path / "f"),
        "--dataset",
        str(bad),
    ]
    with pytest.raises(InputError, match=r"row 5: unreadable image .*--skip_bad"):
        train_image.main(args)
    assert (tmp_path / "f" / "b" / "settings.json").exists()
    dead = _dead_pid()
    (tmp_path / "f" / "b" / f".layer02.tmp-{dead}").mkdir()  # left by a killed recording, an hour ago
    hour_ago = time.time() - 3600
    os.utime(tmp_path / "f" / "b" / f".layer02.tmp-{dead}", (hour_ago, hour_ago))
    assert train_image.main(args + ["--skip_bad"]) == 0
    assert not (tmp_path / "f" / "b" / f".layer02.tmp-{dead}").exists()
    info = json.loads((tmp_path / "f" / "b" / "run.json").read_text())
    assert info["row_ids"] == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11] and info["bad_rows"] == [5]
    assert open_run(tmp_path / "f", "b").load(2).n_rows == 11
    with pytest.raises(InputError, match="made with other settings"):
        train_image.main(args + ["--skip_bad", "--k", "3"])
    assert (tmp_path / "f" / "b" / "run.json").exists()
