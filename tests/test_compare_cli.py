"""The wmppc.py and comp_sharedness.py scripts: flags, outputs, one-line errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import comp_sharedness
import wmppc
from sae.util.errors import InputError
from tests.test_compare import ref_wmppc, sharedness_runs, sparse_matrix, write_original, write_run

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    a = {0: sparse_matrix(rng, 120, 16), 4: sparse_matrix(rng, 120, 16)}
    b = {1: sparse_matrix(rng, 120, 12), 2: sparse_matrix(rng, 120, 12)}
    b[2][:, :6] = a[4][:, :6]
    write_run(tmp_path, "A", a)
    write_run(tmp_path, "B", b)
    return tmp_path, a, b


def test_wmppc_text_json_plot_null(runs, capsys):
    root, a, b = runs
    base = ["--source", "A", "--target", "B", "--features_dir", str(root), "--no-progress", "--device", "cpu"]
    ref = ref_wmppc([a[0], a[4]], [b[1], b[2]])
    for extra in ([], ["--null", "2"]):
        assert wmppc.main([*base, *extra]) == 0
        out = capsys.readouterr().out
        # a grep for "All Layers :" finds the original's line and nothing else (MPPC, null baseline)
        assert [l for l in out.splitlines() if "All Layers :" in l] == [
            f"All Layers : {ref['all']:.6f} | Last layer : {ref['last']:.6f}"
        ]
        assert f"MPPC (unweighted): all layers {ref['mppc_all']:.6f} | last layer" in out
        assert "src\\tgt" in out
    assert "Null wMPPC (2 row permutations of the target): all layers" in out
    assert wmppc.main([*base, "--json", "--plot", str(root / "m.png"), "--null", "2"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["source"] == "A" and j["target"] == "B" and j["source_layers"] == [0, 4]
    assert j["all_layers"] == pytest.approx(ref["all"], abs=1e-12)
    assert j["last_layer"] == pytest.approx(ref["last"], abs=1e-12)
    np.testing.assert_allclose(j["matrix"], ref["matrix"], atol=1e-12)
    assert j["mppc_all_layers"] == pytest.approx(ref["mppc_all"], abs=1e-12)
    assert j["n_samples"] == 120 and j["dead_source_features"] == [0, 0]
    assert set(j["null"]) >= {"all_layers_mean", "all_layers_std", "last_layer_mean", "last_layer_std"}
    assert (root / "m.png").stat().st_size > 1000
    assert wmppc.main([*base, "--json", "--original_scaling"]) == 0
    scaled = json.loads(capsys.readouterr().out)
    assert scaled["last_layer"] == pytest.approx(ref["last"] * 119 / 120, abs=1e-12)


def test_wmppc_reads_the_original_format(tmp_path, capsys):
    rng = np.random.default_rng(1)
    layers = {l: sparse_matrix(rng, 80, 10).astype(np.float16).astype(np.float32) for l in (0, 1, -1)}
    write_original(tmp_path, "orig", layers)
    assert (
        wmppc.main(
            [
                "--source",
                "orig",
                "--target",
                "orig",
                "--features_dir",
                str(tmp_path),
                "--json",
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    j = json.loads(capsys.readouterr().out)
    assert j["source_layers"] == [0, 1, -1] and j["last_layer"] == pytest.approx(1.0)


def test_sharedness_table_json_csv(tmp_path, capsys):
    sharedness_runs(tmp_path, np.random.default_rng(2), n=800)
    base = [
        "--source",
        "M",
        "--min_group",
        "G1",
        "G2",
        "--max_group",
        "H1",
        "H2",
        "--features_dir",
        str(tmp_path),
        "--top",
        "0.1",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert comp_sharedness.main([*base, "--csv", str(tmp_path / "top.csv")]) == 0
    out = capsys.readouterr().out
    assert "rho_G" in out and "best:G1" in out and len(out.strip().splitlines()) == 5 + 6
    with open(tmp_path / "top.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["index"]) for r in rows) == [0, 1, 2, 3, 4, 5]
    assert comp_sharedness.main([*base, "--json"]) == 0
    feats = json.loads(capsys.readouterr().out)["features"]
    assert sorted(f["index"] for f in feats) == [0, 1, 2, 3, 4, 5]
    assert [f["delta"] for f in feats] == sorted((f["delta"] for f in feats), reverse=True)


def test_cli_errors(runs):
    root = str(runs[0])
    rng = np.random.default_rng(3)
    write_run(runs[0], "short", {0: sparse_matrix(rng, 100, 8)})
    write_original(runs[0], "orig_short", {-1: sparse_matrix(rng, 90, 8)})
    with pytest.raises(InputError, match=r"^runs 'A' \(N=120\) and 'short' \(N=100\) have different numbers"):
        wmppc.main(["--source", "A", "--target", "short", "--features_dir", root, "--device", "cpu"])
    with pytest.raises(InputError, match=r"^runs 'orig_short' \(N=90, layer -1\) and 'A' \(N=120, layer 0\)"):
        wmppc.main(["--source", "A", "--target", "orig_short", "--features_dir", root, "--device", "cpu"])
    with pytest.raises(InputError, match=r"'A' \(N=120\) and 'short' \(N=100\)"):
        comp_sharedness.main(
            ["--source", "A", "--min_group", "B", "--max_group", "short", "--features_dir", root, "--device", "cpu"]
        )
    with pytest.raises(InputError, match="available: A, B"):
        wmppc.main(["--source", "A", "--target", "C", "--features_dir", root, "--device", "cpu"])
    with pytest.raises(InputError, match="--source and --target"):
        wmppc.main(["--source", "A", "--features_dir", root])
    with pytest.raises(InputError, match="min group is empty"):
        comp_sharedness.main(
            ["--source", "A", "--min_group", "--max_group", "B", "--features_dir", root, "--device", "cpu"]
        )
    with pytest.raises(InputError, match="max group is empty"):
        comp_sharedness.main(["--source", "A", "--min_group", "B", "--features_dir", root, "--device", "cpu"])


def test_scripts_as_subprocesses(runs):
    root = str(runs[0])
    done = subprocess.run(
        [
            sys.executable,
            "wmppc.py",
            "--source",
            "A",
            "--target",
            "B",
            "--features_dir",
            root,
            "--json",
            "--no-progress",
            "--device",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["target_layers"] == [1, 2]
    done = subprocess.run(
        [
            sys.executable,
            "comp_sharedness.py",
            "--source",
            "A",
            "--min_group",
            "B",
            "--max_group",
            "nope",
            "--features_dir",
            root,
            "--device",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: no run 'nope' in {root} (available: A, B)"]
    write_run(runs[0], "short", {0: sparse_matrix(np.random.default_rng(4), 100, 8)})
    done = subprocess.run(
        [sys.executable, "wmppc.py", "--source", "A", "--target", "short", "--features_dir", root, "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: runs 'A' (N=120) and 'short' (N=100) have different numbers of rows; "
        "compare runs recorded on the same data"
    ]


def test_wmppc_on_a_cpu_machine_never_imports_torch(runs):
    """--device auto without a GPU device file runs on numpy and leaves torch (~600 MB resident) unloaded."""
    from sae.analysis.correlation import GPU_DEVICE_FILES

    if any(Path(f).exists() for f in GPU_DEVICE_FILES):
        pytest.skip("this machine has a GPU device file: auto may use CUDA through torch")
    code = (
        "import sys, wmppc; wmppc.main(sys.argv[1:]); "
        "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--source",
            "A",
            "--target",
            "B",
            "--features_dir",
            str(runs[0]),
            "--json",
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["target_layers"] == [1, 2]
    assert done.stderr.strip().splitlines()[-1] == "no torch"
