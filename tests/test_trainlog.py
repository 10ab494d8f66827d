"""train_log.jsonl: one curve per SAE, written while training, cut back and continued on resume; wandb."""

from __future__ import annotations

import sys

import pytest
from helpers import one_thread

from sae.nn.config import SAEConfig, TrainConfig
from sae.nn.sources import ActivationSource
from sae.nn.synthetic import planted_activations
from sae.nn.trainer import SAESpec, lr_factor, train_saes
from sae.nn.trainlog import read_train_log
from sae.util.errors import InputError


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def source():
    return ActivationSource({"x": [planted_activations(n=2000, d=16, n_concepts=32, active_per_row=2, seed=3).x]})


def _specs():
    return [
        SAESpec("a", "x", SAEConfig(d_sae=64, k=4, seed=0)),
        SAESpec("b", "x", SAEConfig(architecture="relu", d_sae=64, seed=1)),
    ]


def _tcfg(**kw):
    base = {"epochs": 2, "batch_size": 200, "lr": 1e-3, "device": "cpu", "checkpoint_every": 5, "log_every": 1}
    return TrainConfig(**{**base, **kw})


def test_log_has_every_step_with_its_schedule(tmp_path, source):
    train_saes(source, _specs(), _tcfg(), tmp_path, progress=False)
    log = read_train_log(tmp_path / "a")
    assert [e["step"] for e in log] == list(range(1, 21))  # 2 epochs of 10 steps
    warmup = 1  # min(1000, max(1, 20 // 20))
    for e in log:
        assert e["lr"] == pytest.approx(1e-3 * lr_factor(e["step"] - 1, 20, warmup, 0.2))
        assert e["l0"] == 4.0  # topk: k per row
        assert e["rows_seen"] == 200 * e["step"]
        assert 0 <= e["fvu"] < 2 and e["loss"] > 0
    assert log[-1]["lr"] == pytest.approx(1e-3 * 0.25)  # linear decay over the last 4 steps
    relu = read_train_log(tmp_path / "b")
    assert len(relu) == 20 and relu[0]["l0"] != relu[-1]["l0"]  # relu's L0 is measured, not fixed
    # dead fraction: none before one dead window of rows (default: rows / 10 = 400 rows, 2 steps)
    assert log[0]["dead_fraction"] is None and log[-1]["dead_fraction"] is not None


def test_log_every_and_last_step(tmp_path, source):
    train_saes(source, _specs()[:1], _tcfg(log_every=6), tmp_path, progress=False)
    assert [e["step"] for e in read_train_log(tmp_path / "a")] == [6, 12, 18, 20]


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path, source):
    train_saes(source, _specs(), _tcfg(), tmp_path / "full", progress=False)

    def crash_at_step_13(step):
        if step == 12:  # after the checkpoint of step 10: steps 11-13 are lost
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train_saes(source, _specs(), _tcfg(), tmp_path / "cut", progress=False, on_step=crash_at_step_13)
    assert read_train_log(tmp_path / "cut" / "a")[-1]["step"] == 13
    with (tmp_path / "cut" / "a" / "train_log.jsonl").open("a") as f:
        f.write('{"step": 14, "lo')  # a line cut by the kill
    train_saes(source, _specs(), _tcfg(), tmp_path / "cut", progress=False)
    for name in ("a", "b"):
        assert read_train_log(tmp_path / "cut" / name) == read_train_log(tmp_path / "full" / name)


def test_wandb_missing_is_a_one_line_error(tmp_path, source, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(InputError, match="--wandb needs the wandb package"):
        train_saes(source, _specs()[:1], _tcfg(wandb="proj"), tmp_path, progress=False)


def test_wandb_offline_run_gets_the_curves(tmp_path, source, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    train_saes(source, _specs()[:1], _tcfg(wandb="proj", log_every=5), tmp_path / "run", progress=False)
    runs = list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
