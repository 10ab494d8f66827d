"""The trainer: several SAEs per pass, schedule, resume after a real SIGTERM, data order, CLI."""

import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from sae.__main__ import main as sae_main
from sae.nn.checkpoint import load_trainer_state
from sae.nn.config import SAEConfig, TrainConfig
from sae.nn.sources import ActivationSource, epoch_batches
from sae.nn.synthetic import planted_activations
from sae.nn.trainer import SAESpec, TrainingInterrupted, _prepare, default_dead_window, lr_factor, train_saes
from sae.util.cli import run_cli
from sae.util.errors import InputError


@pytest.fixture(scope="module")
def data():
    return planted_activations(n=3000, d=16, n_concepts=32, active_per_row=2, seed=5).x


def _specs():
    return [
        SAESpec("a", "x", SAEConfig(d_sae=64, k=4, seed=0)),
        SAESpec("b", "x", SAEConfig(architecture="batchtopk", d_sae=64, k=4, seed=1)),
    ]


def _tcfg(**kw):
    return TrainConfig(**{"epochs": 3, "batch_size": 256, "lr": 1e-3, "device": "cpu", "checkpoint_every": 5, **kw})


def test_resume_after_sigterm_gives_identical_weights(tmp_path, data):
    source = ActivationSource({"x": [data]})
    full = train_saes(source, _specs(), _tcfg(), tmp_path / "full", progress=False)

    def kill_at_step_7(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="after step 8/36"):
        train_saes(source, _specs(), _tcfg(), tmp_path / "cut", progress=False, on_step=kill_at_step_7)
    assert not (tmp_path / "cut" / "a" / "sae.safetensors").exists()
    steps_run = []
    resumed = train_saes(source, _specs(), _tcfg(), tmp_path / "cut", progress=False, on_step=steps_run.append)
    assert steps_run == list(range(8, 36))  # it resumed at the checkpoint: steps 0-7 were not run again
    for name in ("a", "b"):
        for p, q in zip(full[name].sae.state_dict().values(), resumed[name].sae.state_dict().values()):
            assert torch.equal(p, q)
        assert full[name].metrics == resumed[name].metrics
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_other_settings_in_the_same_directory_is_an_error(tmp_path, data):
    source = ActivationSource({"x": [data]})
    train_saes(source, _specs()[:1], _tcfg(), tmp_path, progress=False)
    with pytest.raises(InputError, match="other settings"):
        train_saes(source, _specs()[:1], TrainConfig(epochs=1, batch_size=128, device="cpu"), tmp_path, progress=False)


def test_several_saes_on_several_keys_in_one_pass(tmp_path, data):
    source = ActivationSource({"layer0": [data[:1000], data[1000:]], "layer1": [data[:, ::-1].copy() * 5]})
    specs = [
        SAESpec("layer0", "layer0", SAEConfig(d_sae=48, k=3)),
        SAESpec("layer1", "layer1", SAEConfig(d_sae=48, k=3)),
        SAESpec("layer1_seed1", "layer1", SAEConfig(d_sae=48, k=3, seed=1)),
    ]
    out = train_saes(source, specs, TrainConfig(epochs=1, batch_size=500, device="cpu"), tmp_path, progress=False)
    assert set(out) == {"layer0", "layer1", "layer1_seed1"}
    cfg0 = json.loads((tmp_path / "layer0" / "cfg.json").read_text())
    cfg1 = json.loads((tmp_path / "layer1" / "cfg.json").read_text())
    # input scaling: the scaled rows' mean squared distance to their mean is d_in
    centred = data.astype(np.float64) - data.astype(np.float64).mean(0)
    np.testing.assert_allclose(cfg0["input_scale"] ** 2 * (centred**2).sum(1).mean(), 16, rtol=1e-3)
    assert cfg1["input_scale"] == pytest.approx(cfg0["input_scale"] / 5, rel=1e-3)
    assert not torch.equal(out["layer1"].sae.W_dec, out["layer1_seed1"].sae.W_dec)
    for name in out:
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert {"fvu", "cosine", "l0", "dead_fraction"} <= set(metrics)


def test_epoch_batches_cover_every_row_once_and_resume_mid_epoch():
    full = list(epoch_batches(1000, 64, seed=3, epoch=2, window=300))
    rows = np.concatenate(full)
    assert sorted(rows.tolist()) == list(range(1000)) and len(full) == 16
    assert [b.tolist() for b in epoch_batches(1000, 64, 3, 2, start_step=5, window=300)] == [
        b.tolist() for b in full[5:]
    ]
    other = np.concatenate(list(epoch_batches(1000, 64, seed=3, epoch=3, window=300)))
    assert not np.array_equal(rows, other)


def test_lr_schedule_warms_up_and_decays_to_zero():
    f = [lr_factor(s, 100, warmup=10, decay_fraction=0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1 and f[50] == 1
    assert f[80] == 1 and f[99] == pytest.approx(0.05) and all(a >= b for a, b in zip(f[80:], f[81:]))


def test_decoder_learning_rate_is_scaled_where_the_decoder_rows_are_unit_norm(tmp_path, data):
    """topk/batchtopk/matryoshka with unit-norm rows step W_dec at DECODER_LR_SCALE x lr; relu, msae_* and a
    free decoder (the original recipe) at lr; --decoder_lr_scale overrides. Read back from the checkpoint."""
    expected = {"topk": 10.0, "matryoshka": 10.0, "relu": 1.0, "msae_rw": 1.0}
    specs = [SAESpec(arch, "a", SAEConfig(architecture=arch, d_sae=32, k=4)) for arch in expected]
    specs.append(SAESpec("free", "a", SAEConfig(architecture="topk", d_sae=32, k=4, unit_decoder=False)))
    expected["free"] = 1.0
    tcfg = TrainConfig(epochs=1, batch_size=512, lr=1e-3, device="cpu", decay_fraction=0, warmup_steps=1, eval_rows=256)
    train_saes(ActivationSource({"a": [data]}), specs, tcfg, tmp_path / "default", progress=False)
    state = load_trainer_state(tmp_path / "default" / "trainer_state.safetensors")
    for name, scale in expected.items():
        groups = state["opts"][name]["param_groups"]
        assert [(g["lr_scale"], g["lr"]) for g in groups] == [(scale, pytest.approx(1e-3 * scale)), (1.0, 1e-3)], name
    tcfg = TrainConfig(epochs=1, batch_size=512, lr=1e-3, device="cpu", decoder_lr_scale=3.0)
    train_saes(ActivationSource({"a": [data]}), specs[:1], tcfg, tmp_path / "override", progress=False)
    groups = load_trainer_state(tmp_path / "override" / "trainer_state.safetensors")["opts"]["topk"]["param_groups"]
    assert groups[0]["lr_scale"] == 3.0


def test_default_peak_lr_is_twice_sparsify_rule_for_topk_and_is_recorded(tmp_path, data):
    """Without --lr: topk at twice 2e-4 * sqrt(16384 / d_sae), batchtopk at it; metrics.json says which, and
    the optimiser's last step (no decay) ran at it."""
    specs = [SAESpec(arch, "a", SAEConfig(architecture=arch, d_sae=32, k=4)) for arch in ("topk", "batchtopk")]
    tcfg = TrainConfig(epochs=1, batch_size=512, device="cpu", decay_fraction=0, warmup_steps=1, eval_rows=256)
    train_saes(ActivationSource({"a": [data]}), specs, tcfg, tmp_path, progress=False)
    state = load_trainer_state(tmp_path / "trainer_state.safetensors")
    rule = 2e-4 * math.sqrt(16384 / 32)
    for arch, lr in (("topk", 2 * rule), ("batchtopk", rule)):
        assert json.loads((tmp_path / arch / "metrics.json").read_text())["peak_lr"] == pytest.approx(lr)
        assert state["opts"][arch]["param_groups"][1]["lr"] == pytest.approx(lr)


def test_source_reads_rows_in_any_order_across_shards_and_bf16():
    a = np.arange(20, dtype=np.float32).reshape(10, 2)
    bf16 = torch.from_numpy(a[6:]).bfloat16().view(torch.uint16).numpy()
    src = ActivationSource({"x": [a[:3], a[3:6].astype(np.float16), bf16]})
    rows = np.array([9, 0, 4, 4, 7])
    np.testing.assert_array_equal(src.read("x", rows).numpy(), a[rows])


def test_cli_train_writes_checkpoint_and_metrics(tmp_path, data, capsys):
    np.save(tmp_path / "x.npy", data.astype(np.float16))
    sae_main(
        [
            "train",
            "--activations",
            str(tmp_path / "x.npy"),
            "--sae",
            "topk",
            "--k",
            "4",
            "--expansion_factor",
            "4",
            "--epochs",
            "1",
            "--batch_size",
            "512",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["l0"] == pytest.approx(4, abs=0.05)
    assert {p.name for p in (tmp_path / "o").iterdir()} >= {"sae.safetensors", "cfg.json", "metrics.json"}
    assert json.loads((tmp_path / "o" / "cfg.json").read_text())["d_sae"] == 64


def test_any_float_dtype_trains_float128_included(tmp_path, data):
    """X.npy of any float dtype: float16/32/64 go to torch directly, float128 through float64."""
    x = data[:2000].astype(np.longdouble)
    if x.dtype.itemsize <= 8:
        pytest.skip("no float128 on this platform")
    np.save(tmp_path / "x.npy", x)
    src = ActivationSource.from_npy(str(tmp_path / "x.npy"))
    np.testing.assert_array_equal(src.read("x", np.array([5, 0, 1999])).numpy(), data[[5, 0, 1999]])
    sae_main(
        [
            "train",
            "--activations",
            str(tmp_path / "x.npy"),
            "--k",
            "4",
            "--expansion_factor",
            "4",
            "--epochs",
            "1",
            "--batch_size",
            "512",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert (tmp_path / "o" / "sae.safetensors").exists()


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (None, ["--activations", "missing.npy"], "not found"),
        ("3d", ["--activations", "x.npy"], "2-D"),
        ("nan", ["--activations", "x.npy"], "row 7 holds NaN"),
        ("ok", ["--activations", "x.npy", "--k", "64", "--expansion_factor", "4"], "0 < k < d_sae"),
        ("ok", ["--activations", "x.npy", "--sae", "nope"], "invalid choice"),
        ("ok", ["--activations", "x.npy", "--epochs", "0"], "--epochs must be positive"),
        ("ok", ["--activations", "."], ". is a directory"),
        ("npz", ["--activations", "x.npz"], "an .npz archive"),
        ("ok", ["--activations", "x.npy", "--out", "x.npy"], "x.npy is an existing file"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, monkeypatch, capsys, setup, args, message):
    """In-process through run_cli, what `python -m sae` runs (test_hostile runs the real process once): any
    other exception than the exit would escape pytest.raises and fail the test, as a traceback would."""
    x = np.ones((20, 16), dtype=np.float32)
    if setup == "3d":
        x = x.reshape(20, 4, 4)
    if setup == "nan":
        x[7, 3] = np.nan
    if setup == "npz":
        np.savez(tmp_path / "x.npz", x=x)
    elif setup:
        np.save(tmp_path / "x.npy", x)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="^2$"):  # status 2
        run_cli(sae_main, ["train", "--out", str(tmp_path / "o"), *args])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last and "error:" in last  # the problem is named on one line (argparse adds usage above)


def test_metrics_json_holds_the_firing_histogram_of_the_saved_sae(tmp_path, data):
    """Recomputed with numpy from the checkpoint's own codes on every row."""
    from sae.nn.checkpoint import load_sae

    out = train_saes(ActivationSource({"x": [data]}), _specs()[:1], _tcfg(epochs=1), tmp_path, progress=False)["a"]
    hist = json.loads((tmp_path / "a" / "metrics.json").read_text())["firing_histogram"]
    with torch.no_grad():
        fire = (load_sae(tmp_path / "a").encode(torch.from_numpy(data)) > 0).sum(0).numpy()
    n = len(data)
    counts, edges = np.histogram(np.log10(fire[fire > 0] / n), bins=20, range=(np.log10(1 / n), 0))
    assert hist["counts"] == counts.tolist() and hist["edges"] == pytest.approx(edges.tolist())
    assert hist["n_dead"] == int((fire == 0).sum()) == out.metrics["n_dead"]
    assert hist["n_live"] + hist["n_dead"] == 64 and hist["n_rows"] == n


def test_b_dec_starts_at_the_mean_of_rows_spread_over_the_whole_source():
    x = np.zeros((20000, 4), dtype=np.float32)
    x[:5000] = 10.0  # the first quarter differs from the rest
    spec = SAESpec("m", "x", SAEConfig(d_sae=8, k=2, b_dec_init="mean"))
    spec.cfg.d_in = 4
    sae = _prepare(ActivationSource({"x": [x]}), [spec], torch.device("cpu"))[0]
    np.testing.assert_allclose(sae.b_dec.detach().numpy() / spec.cfg.input_scale, 2.5, rtol=0.01)


def test_default_dead_window():
    assert default_dead_window(10**9, 10**10, 4096) == 10_000_000  # Gao et al.'s 10M rows
    assert default_dead_window(3000, 5 * 3000, 256) == 1500  # a tenth of a short run
    assert default_dead_window(3000, 100 * 3000, 256) == 3000  # at most one epoch
    assert default_dead_window(3000, 1000, 256) == 256  # at least one batch


@pytest.mark.parametrize("k, epochs", [(4, 0.5), (8, 1), (4, 3)])
def test_batchtopk_inference_l0_is_k_after_any_run(tmp_path, k, epochs):
    """The threshold is estimated at the final weights, so the saved SAE keeps about k latents per row
    on data it did not train on, even after half an epoch (the EMA of the training steps gave 1.3 for k = 4)."""
    from sae.nn.checkpoint import load_sae

    planted = planted_activations(n=6000, d=16, n_concepts=64, active_per_row=3, seed=2, coefficients="heavy")
    train, held = planted.x[:4000], planted.x[4000:]
    spec = SAESpec("b", "x", SAEConfig(architecture="batchtopk", d_sae=128, k=k))
    out = train_saes(ActivationSource({"x": [train]}), [spec], _tcfg(epochs=epochs), tmp_path, progress=False)["b"]
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["l0"] == out.metrics["l0"] and abs(metrics["l0"] - k) <= 0.1 * k, metrics["l0"]
    assert metrics["threshold"] == pytest.approx(float(out.sae.threshold)) and metrics["threshold_rows"] == 4000
    with torch.no_grad():
        l0_held = float((load_sae(tmp_path / "b").encode(torch.from_numpy(held)) > 0).sum(1).float().mean())
    assert abs(l0_held - k) <= 0.1 * k, l0_held


def test_a_shared_mean_changes_nothing(tmp_path, data):
    """Rows shifted by one constant vector (of norm 10, against rows of norm ~1.8) train the same SAE: the input
    scale sees the centred rows and b_dec takes the mean. Scaled by the raw mean squared norm instead, the
    shifted rows' signal would shrink about 6x and the two runs would differ."""
    shift = np.random.default_rng(0).standard_normal(data.shape[1]).astype(np.float32)
    shifted = data + 10 * shift / np.linalg.norm(shift)
    out = {}
    for name, x in (("plain", data), ("shifted", shifted)):
        spec = SAESpec("", "x", SAEConfig(d_sae=64, k=4, seed=0))
        out[name] = train_saes(ActivationSource({"x": [x]}), [spec], _tcfg(), tmp_path / name, progress=False)[""]
    a, b = out["plain"], out["shifted"]
    assert a.sae.cfg.input_scale == pytest.approx(b.sae.cfg.input_scale, rel=1e-6)
    torch.testing.assert_close(a.sae.W_dec, b.sae.W_dec, atol=1e-3, rtol=0)
    assert a.metrics["fvu"] == pytest.approx(b.metrics["fvu"], abs=1e-3)
