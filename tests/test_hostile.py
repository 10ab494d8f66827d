"""Hostile but fair inputs: a planted pickle never runs, run names cannot reach outside --features_dir,
only this toolkit's run folders are ever deleted, and a second command on a busy run is refused."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import train_image
from sae.__main__ import main as sae_main
from sae.encoders.tiny import build_open_clip
from sae.nn.checkpoint import load_trainer_state, save_trainer_state
from sae.util.errors import InputError
from sae.util.lock import exclusive


class _Payload:
    """Unpickling this creates the file `marker`: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _one_line_error(fn, *args) -> str:
    with pytest.raises(InputError, match=r"\A[^\n]+\Z") as info:  # one line
        fn(*args)
    return str(info.value)


@pytest.mark.parametrize("where", ["trainer_state.pt", "trainer_state.safetensors"])
def test_a_planted_pickle_never_runs(tmp_path, where):
    """A malicious checkpoint in the output folder, under the old pickle name or the new one: training
    refuses with one line naming the file, and the payload's file is never created."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32))
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "evil": _Payload(marker)}, out / where)
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control"))).close()  # the payload is live: control
    assert (tmp_path / "control").exists()
    args = ["train", "--activations", str(tmp_path / "x.npy"), "--k", "2", "--expansion_factor", "2"]
    message = _one_line_error(sae_main, [*args, "--epochs", "1", "--out", str(out), "--quiet"])
    assert str(out / where) in message
    assert ("old pickle format" if where.endswith(".pt") else "unreadable training checkpoint") in message
    assert not marker.exists()


def test_trainer_state_round_trip_keeps_types(tmp_path):
    groups = [{"betas": (0.9, 0.99), "fused": None}]
    state = {"step": 3, "opts": {"a": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": groups}}}
    save_trainer_state(state, tmp_path / "s.safetensors")
    back = load_trainer_state(tmp_path / "s.safetensors")
    assert back["step"] == 3 and list(back["opts"]["a"]["state"]) == [0]
    assert torch.equal(back["opts"]["a"]["state"][0]["exp_avg"], torch.ones(2))
    assert back["opts"]["a"]["param_groups"][0] == {"betas": [0.9, 0.99], "fused": None}


# ------------------------------------------------------------------------------ run names and run folders


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    with contextlib.redirect_stderr(io.StringIO()):
        build_open_clip(root)
    return root / "tiny-open-clip"


def _args(clip: Path, tmp_path: Path, runname: str, *extra: str) -> list[str]:
    return [
        "--model",
        "ClipVision",
        "--clip_model_name",
        str(clip),
        "--layers",
        "-1",
        "--dataset",
        "shapes:12",
        "--data_root",
        str(clip.parent / "data"),  # generated once for the module
        "--cache_dir",
        str(tmp_path / "cache"),
        "--features_dir",
        str(tmp_path / "features"),
        "--device",
        "cpu",
        "--quiet",
        "--k",
        "2",
        "--expansion_factor",
        "2",
        "--runname",
        runname,
        *extra,
    ]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("runname", ["..", ".", "", "a/b", "/abs", ".hidden"])
def test_a_run_name_is_one_plain_folder_name(clip, tmp_path, runname, monkeypatch):
    """`--runname .. --overwrite` once emptied the working directory: now nothing is touched."""
    features = tmp_path / "features"
    (features / "other").mkdir(parents=True)
    (features / "other" / "settings.json").write_text("{}")
    (tmp_path / "unrelated.txt").write_text("keep me")
    (tmp_path / f".x.tmp-{2**22 + 1}").write_text("old temporary")
    monkeypatch.chdir(features)
    before = _tree(tmp_path)
    message = _one_line_error(train_image.main, _args(clip, tmp_path, runname, "--overwrite"))
    assert "must be a plain folder name" in message
    assert _tree(tmp_path) == before


def test_only_this_toolkits_run_folders_are_deleted(clip, tmp_path):
    """A folder without settings.json is never deleted, --overwrite or not, and the refusal of a run
    with other settings says what --overwrite would delete."""
    mine = tmp_path / "features" / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    message = _one_line_error(train_image.main, _args(clip, tmp_path, "mine", "--overwrite"))
    assert "not a run of this toolkit" in message and "--overwrite" not in message
    assert (mine / "notes.txt").read_text() == "my notes"

    run = tmp_path / "features" / "r"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({"fingerprint": "other"}))
    (run / "layer02").mkdir()
    (run / "layer02" / "values.npy").write_bytes(b"features")
    message = _one_line_error(train_image.main, _args(clip, tmp_path, "r"))
    assert "other settings" in message and "--overwrite would delete its features and SAEs" in message
    assert (run / "layer02" / "values.npy").exists()


def test_a_second_command_on_a_busy_run_is_refused(clip, tmp_path):
    """While one command holds the run's lock, another with other settings neither replaces its
    settings.json nor touches anything else."""
    run = tmp_path / "features" / "r"
    run.mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps({"fingerprint": "the running one"}))
    with exclusive(tmp_path / "features" / ".r.lock", "busy"):
        before = _tree(tmp_path / "features")
        message = _one_line_error(train_image.main, _args(clip, tmp_path, "r", "--overwrite"))
        assert "being written by another process" in message
        assert _tree(tmp_path / "features") == before


# ------------------------------------------------------------------------------ different data, same row ids


def _run_on(root: Path, name: str, x: np.ndarray, fingerprint: str) -> None:
    from sae.data.features import SparseCodes, write_layer, write_run_info

    write_layer(root / name, 3, SparseCodes.from_dense(x))
    dataset = {"name": "shapes", "split": "train", "fingerprint": fingerprint}
    info = {"name": name, "n_rows": len(x), "layers": [3], "row_ids": list(range(len(x))), "dataset": dataset}
    write_run_info(root / name, info)


@pytest.fixture
def other_data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 1.0, (60, 8)).astype(np.float32) * (rng.random((60, 8)) < 0.3)
    _run_on(tmp_path, "A", x, "f-one")
    _run_on(tmp_path, "A2", x[::-1].copy(), "f-one")
    _run_on(tmp_path, "B", x, "f-two")
    return tmp_path


def test_runs_of_different_data_are_refused_unless_allowed(other_data, capsys):
    """Row ids 0..N-1 on both sides, datasets differ: every comparison refuses with one line; with
    --allow_different_data it runs and the result says so."""
    import analyze
    import comp_sharedness
    import wmppc

    common = ["--features_dir", str(other_data), "--no-progress"]
    calls = [
        (wmppc.main, ["--source", "A", "--target", "B", "--device", "cpu", "--no-save", *common]),
        (comp_sharedness.main, ["--source", "A", "--min_group", "A2", "--max_group", "B", "--no-save", *common]),
        (analyze.main, ["overlap", "--run_a", "A", "--run_b", "B", "--k", "3", *common]),
    ]
    for main, argv in calls:
        message = _one_line_error(main, argv)
        assert "recorded on different data" in message and "f-one" in message and "f-two" in message
        assert "--allow_different_data" in message
        assert main([*argv, "--allow_different_data"]) == 0
        assert "WARNING --allow_different_data: runs 'A'" in capsys.readouterr().out
        assert main([*argv, "--allow_different_data", "--json"]) == 0
        assert "f-two" in json.loads(capsys.readouterr().out)["allow_different_data"]
    assert wmppc.main(["--source", "A", "--target", "A2", "--device", "cpu", "--no-save", *common]) == 0


def test_an_unwritable_comparisons_folder_is_a_warning_after_the_result(other_data, capsys):
    import wmppc

    (other_data / "A" / "comparisons").write_text("a file where the folder goes")  # as root, chmod would not stop it
    argv = ["--source", "A", "--target", "A2", "--features_dir", str(other_data), "--no-progress", "--device", "cpu"]
    assert wmppc.main(argv) == 0
    out, err = capsys.readouterr()
    assert "All Layers :" in out
    assert err.strip().splitlines()[-1].startswith("warning: comparison results not saved:")
    assert "Traceback" not in err


# ------------------------------------------------------------------------------ full disks


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (skips the test where mounting is not allowed)."""
    import shutil
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small file system for a disk-full test")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"mounting a tmpfs is not allowed here ({proc.stderr.decode().strip()})")
    try:
        yield lambda new_size: subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_memory_map_on_a_full_disk_is_a_one_line_error(tmp_path):
    """The file behind a memory map is reserved before any write: a full disk is an error naming the
    file and the space it needs, not a SIGBUS."""
    from sae.util.disk import open_memmap

    with small_tmpfs(tmp_path / "mnt", "64k"):
        message = _one_line_error(open_memmap, tmp_path / "mnt" / "x.npy", "w+", np.float32, (1 << 18,))
        assert str(tmp_path / "mnt" / "x.npy") in message and "needs 1 MiB" in message and "KiB free" in message


def test_a_full_cache_disk_is_one_line_and_a_rerun_with_space_completes(clip, tmp_path):
    cache = tmp_path / "cache"
    with small_tmpfs(cache, "16k") as resize:
        message = _one_line_error(train_image.main, _args(clip, tmp_path, "r", "--epochs", "1"))
        assert "the activation cache needs about" in message and "KiB" in message and "0.0 GiB" not in message
        resize("16m")
        assert train_image.main(_args(clip, tmp_path, "r", "--epochs", "1")) == 0
        assert (tmp_path / "features" / "r" / "run.json").exists()


def test_a_checkpoint_that_cannot_be_written_says_so_and_a_rerun_resumes(tmp_path):
    """The file-size limit (RLIMIT_FSIZE) stands in for a full disk where no tmpfs can be mounted."""
    import resource
    import signal
    import subprocess
    import sys

    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32))
    cmd = [sys.executable, "-m", "sae", "train", "--activations", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o")]
    cmd += ["--k", "2", "--expansion_factor", "2", "--epochs", "2", "--batch_size", "64", "--quiet"]

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": repo}
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "trainer_state.safetensors" in last and "could not write" in last
    assert not list((tmp_path / "o").glob(".*tmp*"))  # no half-written temporary left behind
    assert sae_main(cmd[3:]) == 0  # the rerun, with space (in-process: faster)
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["fvu"] is not None


# ------------------------------------------------------------------------------ NaN, inf and degenerate inputs


@pytest.mark.parametrize(
    "rows, message",
    [
        (np.zeros((0, 8), np.float32), "have no rows"),
        (np.ones((1, 8), np.float32), "at least 2 rows"),
        (np.tile(np.arange(8, dtype=np.float32), (50, 1)), "every row is the same"),
        (np.zeros(0, np.float32), "2-D"),
    ],
)
def test_training_on_degenerate_rows_is_one_line(tmp_path, rows, message):
    np.save(tmp_path / "x.npy", rows)
    argv = ["train", "--activations", str(tmp_path / "x.npy"), "--k", "2", "--expansion_factor", "2"]
    assert message in _one_line_error(sae_main, [*argv, "--out", str(tmp_path / "o"), "--quiet"])
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_json_files_are_strict_json():
    from sae.util.atomic import json_safe

    assert json.dumps(json_safe({"fvu": float("nan"), "x": [1.0, float("inf")], "n": np.float64("nan")})) == (
        '{"fvu": null, "x": [1.0, null], "n": null}'
    )


def _codes_run(root: Path, name: str, x: np.ndarray) -> None:
    from sae.data.features import SparseCodes, write_layer, write_run_info

    write_layer(root / name, 0, SparseCodes.from_dense(x))
    write_run_info(root / name, {"name": name, "n_rows": len(x), "layers": [0], "row_ids": list(range(len(x)))})


def test_nan_int64_values_and_a_too_large_k_are_one_line(tmp_path):
    import analyze

    rng = np.random.default_rng(1)
    x = rng.gamma(2.0, 1.0, (30, 6)).astype(np.float32) * (rng.random((30, 6)) < 0.5)
    for name in ("A", "NAN", "INT"):
        _codes_run(tmp_path, name, x)
    values = np.load(tmp_path / "NAN" / "layer00" / "values.npy")
    values[3] = np.nan
    np.save(tmp_path / "NAN" / "layer00" / "values.npy", values)
    np.save(tmp_path / "INT" / "layer00" / "values.npy", np.nan_to_num(values).astype(np.int64))
    base = ["overlap", "--run_a", "A", "--features_dir", str(tmp_path), "--no-progress", "--k", "3"]
    assert "values.npy holds 1 non-finite" in _one_line_error(analyze.main, [*base, "--run_b", "NAN"])
    assert "values.npy is int64" in _one_line_error(analyze.main, [*base, "--run_b", "INT"])
    too_many = _one_line_error(analyze.main, [*base, "--run_b", "A", "--k", "31"])
    assert "--k must be between 1 and the number of rows, 30" in too_many


def test_nan_embeddings_and_activations_are_one_line(tmp_path):
    import analyze
    from sae.nn.checkpoint import save_sae
    from sae.nn.config import SAEConfig
    from sae.nn.model import SparseAutoencoder

    save_sae(SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, k=2)), tmp_path / "sae")
    x = np.random.default_rng(2).normal(size=(20, 8)).astype(np.float32)
    x[5, 1] = np.inf
    np.save(tmp_path / "bad.npy", x)
    np.save(tmp_path / "ok.npy", np.nan_to_num(x, posinf=1.0))
    bridge = ["bridge", "--sae", str(tmp_path / "sae"), "--device", "cpu", "--no-progress"]
    message = _one_line_error(
        analyze.main,
        [*bridge, "--image_embeddings", str(tmp_path / "ok.npy"), "--text_embeddings", str(tmp_path / "bad.npy")],
    )
    assert "text embeddings row 5 holds NaN or inf" in message
    stab = ["stability", "--sae_a", str(tmp_path / "sae"), "--sae_b", str(tmp_path / "sae"), "--device", "cpu"]
    message = _one_line_error(analyze.main, [*stab, "--activations", str(tmp_path / "bad.npy"), "--no-progress"])
    assert "bad.npy row 5 holds NaN or inf" in message
