"""The trainer: several SAEs per pass, schedule, resume after a real SIGTERM, data order, CLI."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae.__main__ import main as sae_main
from sae.cli import InputError
from sae.config import SAEConfig, TrainConfig
from sae.sources import ActivationSource, epoch_batches
from sae.synthetic import planted_activations
from sae.trainer import SAESpec, TrainingInterrupted, lr_factor, train_saes

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data():
    return planted_activations(n=3000, d=16, n_concepts=32, active_per_row=2, seed=5).x


def _specs():
    return [SAESpec("a", "x", SAEConfig(d_sae=64, k=4, seed=0)),
            SAESpec("b", "x", SAEConfig(architecture="batchtopk", d_sae=64, k=4, seed=1))]


def _tcfg(**kw):
    return TrainConfig(epochs=3, batch_size=256, lr=1e-3, device="cpu", checkpoint_every=5, **kw)


def test_resume_after_sigterm_gives_identical_weights(tmp_path, data):
    source = ActivationSource({"x": [data]})
    full = train_saes(source, _specs(), _tcfg(), tmp_path / "full", progress=False)

    def kill_at_step_7(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="after step 8/36"):
        train_saes(source, _specs(), _tcfg(), tmp_path / "cut", progress=False, on_step=kill_at_step_7)
    assert not (tmp_path / "cut" / "a" / "sae.safetensors").exists()
    resumed = train_saes(source, _specs(), _tcfg(), tmp_path / "cut", progress=False)
    for name in ("a", "b"):
        for p, q in zip(full[name].sae.state_dict().values(), resumed[name].sae.state_dict().values()):
            assert torch.equal(p, q)
        assert full[name].metrics == resumed[name].metrics
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_other_settings_in_the_same_directory_is_an_error(tmp_path, data):
    source = ActivationSource({"x": [data]})
    train_saes(source, _specs()[:1], _tcfg(), tmp_path, progress=False)
    with pytest.raises(InputError, match="other settings"):
        train_saes(source, _specs()[:1], TrainConfig(epochs=1, batch_size=128, device="cpu"), tmp_path,
                   progress=False)


def test_several_saes_on_several_keys_in_one_pass(tmp_path, data):
    source = ActivationSource({"layer0": [data[:1000], data[1000:]], "layer1": [data[:, ::-1].copy() * 5]})
    specs = [SAESpec("layer0", "layer0", SAEConfig(d_sae=48, k=3)),
             SAESpec("layer1", "layer1", SAEConfig(d_sae=48, k=3)),
             SAESpec("layer1_seed1", "layer1", SAEConfig(d_sae=48, k=3, seed=1))]
    out = train_saes(source, specs, TrainConfig(epochs=1, batch_size=500, device="cpu"), tmp_path, progress=False)
    assert set(out) == {"layer0", "layer1", "layer1_seed1"}
    cfg0 = json.loads((tmp_path / "layer0" / "cfg.json").read_text())
    cfg1 = json.loads((tmp_path / "layer1" / "cfg.json").read_text())
    # input scaling: mean squared norm of the scaled rows is d_in
    np.testing.assert_allclose(cfg0["input_scale"] ** 2 * (data.astype(np.float64) ** 2).sum(1).mean(), 16, rtol=1e-3)
    assert cfg1["input_scale"] == pytest.approx(cfg0["input_scale"] / 5, rel=1e-3)
    assert not torch.equal(out["layer1"].sae.W_dec, out["layer1_seed1"].sae.W_dec)
    for name in out:
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert {"fvu", "cosine", "l0", "dead_fraction"} <= set(metrics)


def test_epoch_batches_cover_every_row_once_and_resume_mid_epoch():
    full = list(epoch_batches(1000, 64, seed=3, epoch=2, window=300))
    rows = np.concatenate(full)
    assert sorted(rows.tolist()) == list(range(1000)) and len(full) == 16
    assert [b.tolist() for b in epoch_batches(1000, 64, 3, 2, start_step=5, window=300)] == [b.tolist() for b in full[5:]]
    other = np.concatenate(list(epoch_batches(1000, 64, seed=3, epoch=3, window=300)))
    assert not np.array_equal(rows, other)


def test_lr_schedule_warms_up_and_decays_to_zero():
    f = [lr_factor(s, 100, warmup=10, decay_fraction=0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1 and f[50] == 1
    assert f[80] == 1 and f[99] == pytest.approx(0.05) and all(a >= b for a, b in zip(f[80:], f[81:]))


def test_source_reads_rows_in_any_order_across_shards_and_bf16():
    a = np.arange(20, dtype=np.float32).reshape(10, 2)
    bf16 = torch.from_numpy(a[6:]).bfloat16().view(torch.uint16).numpy()
    src = ActivationSource({"x": [a[:3], a[3:6].astype(np.float16), bf16]})
    rows = np.array([9, 0, 4, 4, 7])
    np.testing.assert_array_equal(src.read("x", rows).numpy(), a[rows])


def test_cli_train_writes_checkpoint_and_metrics(tmp_path, data, capsys):
    np.save(tmp_path / "x.npy", data.astype(np.float16))
    sae_main(["train", "--activations", str(tmp_path / "x.npy"), "--sae", "topk", "--k", "4",
              "--expansion_factor", "4", "--epochs", "1", "--batch_size", "512", "--out", str(tmp_path / "o"),
              "--quiet"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["l0"] == pytest.approx(4, abs=0.05)
    assert {p.name for p in (tmp_path / "o").iterdir()} >= {"sae.safetensors", "cfg.json", "metrics.json"}
    assert json.loads((tmp_path / "o" / "cfg.json").read_text())["d_sae"] == 64


@pytest.mark.parametrize("setup, args, message", [
    (None, ["--activations", "missing.npy"], "not found"),
    ("3d", ["--activations", "x.npy"], "2-D"),
    ("nan", ["--activations", "x.npy"], "row 7 holds NaN"),
    ("ok", ["--activations", "x.npy", "--k", "64", "--expansion_factor", "4"], "0 < k < d_sae"),
    ("ok", ["--activations", "x.npy", "--sae", "nope"], "invalid choice"),
    ("ok", ["--activations", "x.npy", "--epochs", "0"], "--epochs must be positive"),
])
def test_bad_input_is_one_line_error(tmp_path, setup, args, message):
    x = np.ones((20, 16), dtype=np.float32)
    if setup == "3d":
        x = x.reshape(20, 4, 4)
    if setup == "nan":
        x[7, 3] = np.nan
    if setup:
        np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-m", "sae", "train", "--out", str(tmp_path / "o"), *args],
                          cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert message in last and "error:" in last  # the problem is named on one line (argparse adds usage above)
