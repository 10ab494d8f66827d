"""The corruption matrix: every file of a run (this toolkit's and the original format), an SAE folder,
an activation cache and user-given .npy files is truncated, emptied and garbled in turn; every entry
point that reads it must stop with one line naming the file (`error: <file>: ...`, exit 2) and leave
every other file as it was. In-process through each script's main(argv) (fast); one subprocess proves
the exit status and stderr."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import analyze
import comp_sharedness
import show
import train_image
import wmppc
from sae.data.cache import open_cache
from sae.encoders.tiny import build_open_clip
from sae.util.errors import InputError

REPO = Path(__file__).resolve().parent.parent
MODES = ("truncate", "empty", "garble")


def corrupt(path: Path, mode: str) -> None:
    data = path.read_bytes()
    if mode == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif mode == "empty":
        path.write_bytes(b"")
    else:  # the head, where every format keeps its header or first token
        junk = bytes(np.random.default_rng(len(data)).integers(0, 256, 48, dtype=np.uint8)) + b"\x00{\xff"
        path.write_bytes(junk[: max(8, len(data) // 2)] + data[len(junk) :])


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """One real pipeline run (run R, its SAEs, its activation cache), a copy R2, an original-format run
    O (dense .pt layers) and paired embeddings .npy files."""
    root = tmp_path_factory.mktemp("corruption")
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        build_open_clip(root)
        args = ["--model", "ClipVision", "--clip_model_name", str(root / "tiny-open-clip"), "--layers", "-1"]
        args += ["--dataset", "shapes:12", "--data_root", str(root / "data"), "--cache_dir", str(root / "cache")]
        args += ["--features_dir", str(root / "f"), "--device", "cpu", "--quiet", "--k", "2"]
        args += ["--expansion_factor", "2", "--epochs", "1", "--runname", "R", "--seeds", "0", "1"]
        assert train_image.main(args) == 0
    shutil.copytree(root / "f" / "R", root / "f" / "R2")
    (root / "f" / "O").mkdir()
    rng = np.random.default_rng(0)
    for name in ("layer00.pt", "layer-1.pt"):
        x = rng.gamma(2.0, 1.0, (12, 16)) * (rng.random((12, 16)) < 0.4)
        torch.save(torch.from_numpy(x).half(), root / "f" / "O" / name)
    shutil.copytree(root / "f" / "O", root / "f" / "O2")
    np.save(root / "img.npy", rng.normal(size=(12, 32)).astype(np.float32))
    np.save(root / "txt.npy", rng.normal(size=(12, 32)).astype(np.float32))
    return root


def entry_points(root: Path) -> dict[str, tuple[list[str], list[tuple[str, Callable, list[str]]]]]:
    """{what: (files under root, [(name, main, argv)])}: the files of one kind and the commands that read them."""
    f = str(root / "f")
    sae_a, sae_b = root / "f" / "R" / "saes" / "layer02", root / "f" / "R" / "saes" / "layer02_seed1"
    common = ["--features_dir", f, "--no-progress"]
    compare_runs = [
        ("wmppc", wmppc.main, ["--source", "R", "--target", "R2", "--device", "cpu", "--no-save", *common]),
        ("sharedness", comp_sharedness.main, ["--source", "R", "--min_group", "R2", "--max_group", "O", *common]),
        ("overlap", analyze.main, ["overlap", "--run_a", "R", "--run_b", "R2", "--k", "3", *common]),
        (
            "stability --run",
            analyze.main,
            ["stability", "--sae_a", str(sae_a), "--sae_b", str(sae_b), "--run", "R", *common, "--device", "cpu"],
        ),
        ("show", show.main, ["--run", "R", "--features_dir", f, "--out", str(root / "out" / "show")]),
    ]
    original_overlap = ["overlap", "--run_a", "O", "--run_b", "O2", "--k", "3", *common]
    run_files = ["run.json", "layer02/meta.json", "layer02/indptr.npy", "layer02/indices.npy", "layer02/values.npy"]
    embeddings = ["--image_embeddings", str(root / "img.npy"), "--text_embeddings", str(root / "txt.npy")]
    sae_readers = [
        ("stability", analyze.main, ["stability", "--sae_a", str(sae_a), "--sae_b", str(sae_b), "--device", "cpu"]),
        ("bridge", analyze.main, ["bridge", "--sae", str(sae_a), *embeddings, "--device", "cpu", "--no-progress"]),
    ]
    original = [
        ("wmppc", wmppc.main, ["--source", "O", "--target", "O2", "--device", "cpu", "--no-save", *common]),
        ("overlap", analyze.main, original_overlap),
        ("overlap layer 0", analyze.main, [*original_overlap, "--layer_a", "0", "--layer_b", "0"]),
    ]
    activations = ["--activations", str(root / "img.npy")]
    npy_readers = [
        sae_readers[1],
        ("stability --activations", analyze.main, [*sae_readers[0][2], *activations, "--no-progress"]),
    ]
    return {
        "run": ([f"f/R/{n}" for n in run_files], compare_runs),
        "sae": (["f/R/saes/layer02/cfg.json", "f/R/saes/layer02/sae.safetensors"], sae_readers),
        "original layer 0": (["f/O/layer00.pt"], [original[0], original[2]]),
        "original deepest layer": (["f/O/layer-1.pt"], original[:2]),
        "npy": (["img.npy"], npy_readers),
    }


def _cache_readers(cache_dir: Path) -> list[tuple[str, Callable[[], object]]]:
    key = next(p for p in cache_dir.iterdir() if (p / "meta.json").exists())

    def read_all() -> None:
        c = open_cache(key)
        _ = (c.row_ids, c.pooled(2), c.token_shards(2), c.token_row(2), c.token_pos(2))

    return [("open_cache + readers", read_all)]


def _error_of(main: Callable, argv: list[str], case: tuple) -> str:
    """The InputError message of main(argv) (stdout and stderr swallowed); fails naming `case` otherwise."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main(argv)
    except InputError as e:
        return str(e)
    pytest.fail(f"no error for {case}")


def test_every_corrupt_file_is_one_line_naming_it(world):
    root = world
    checked = 0
    for what, (files, commands) in entry_points(root).items():
        for rel in files:
            path = root / rel
            good = path.read_bytes()
            for mode in MODES:
                corrupt(path, mode)
                before = tree(root)
                for name, main, argv in commands:
                    message = _error_of(main, argv, (what, rel, mode, name))
                    assert "\n" not in message, (what, rel, mode, name, message)
                    assert path.name in message or path.parent.name in message, (what, rel, mode, name, message)
                    assert tree(root) == before, (what, rel, mode, name)
                    checked += 1
                path.write_bytes(good)
    cache = next(p for p in (root / "cache").iterdir() if (p / "meta.json").exists())
    for path in sorted(p for p in cache.rglob("*") if p.is_file() and p.suffix in (".npy", ".json")):
        good = path.read_bytes()
        for mode in MODES:
            corrupt(path, mode)
            before = tree(root)
            for name, read in _cache_readers(root / "cache"):
                message = _error_of(lambda _, read=read: read(), [], (path, mode, name))
                assert "\n" not in message and path.name in message, (path, mode, name, message)
                assert tree(root) == before
                checked += 1
        path.write_bytes(good)
    assert checked > 100


def test_exit_status_and_stderr_of_a_corrupt_file(world):
    values = world / "f" / "R" / "layer02" / "values.npy"
    good = values.read_bytes()
    try:
        corrupt(values, "truncate")
        cmd = [sys.executable, str(REPO / "wmppc.py"), "--source", "R", "--target", "R2", "--no-save"]
        cmd += ["--features_dir", str(world / "f"), "--no-progress", "--device", "cpu"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        values.write_bytes(good)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: {values}: ")
