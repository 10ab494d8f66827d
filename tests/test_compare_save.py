"""wmppc.py and comp_sharedness.py save their best matches for the feature browser, and draw their plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

import comp_sharedness
import wmppc
from sae.analysis.comparison_files import load_comparisons
from sae.data.features import open_run
from tests.test_compare import ref_corr, sharedness_runs, sparse_matrix, write_original, write_run

CPU = ["--no-progress", "--device", "cpu"]


def ref_best(x: np.ndarray, targets: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 numpy: best (feature, layer, rho) of every column of x over all target layers."""
    layers = sorted(targets)
    corr = [ref_corr(x, targets[b]) for b in layers]
    rhos = np.stack([c.max(1) for c in corr])
    ib = rhos.argmax(0)
    feature = np.array([corr[k][i].argmax() for i, k in enumerate(ib)])
    return feature, np.asarray(layers)[ib], rhos.max(0)


def test_wmppc_saves_best_matches_and_plots(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = {0: sparse_matrix(rng, 120, 16), 4: sparse_matrix(rng, 120, 16)}
    a[4][:, 15] = 0  # a dead feature: no match
    b = {1: sparse_matrix(rng, 120, 12), 2: sparse_matrix(rng, 120, 12)}
    b[2][:, :6] = a[4][:, :6]
    write_run(tmp_path, "A", a)
    write_run(tmp_path, "B", b)
    base = ["--source", "A", "--target", "B", "--features_dir", str(tmp_path), *CPU]
    assert wmppc.main([*base, "--json", "--plot", str(tmp_path / "m.png")]) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert "comparison results saved in" in err and "wmppc__B.json" in err
    assert (tmp_path / "m.png").stat().st_size > 1000
    assert json.loads((tmp_path / "A" / "comparisons" / "wmppc__B.json").read_text()) == printed
    for layer, x in a.items():
        comps = load_comparisons(tmp_path / "A", "A", layer)
        [col] = comps.matches
        assert (col.target, col.target_layers, col.method, col.full) == ("B", [1, 2], "wmppc", True)
        feature, where, rho = ref_best(x, b)
        live = [i for i in range(16) if x[:, i].any()]
        assert sorted(col.matches) == live
        for i in live:
            lay, j, r = col.matches[i]
            assert (lay, j) == (where[i], feature[i])
            assert r == pytest.approx(rho[i], abs=1e-6)
    assert col.matches[0][:2] == (2, 0) and col.matches[0][2] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "A" / "comparisons" / "L04__B__wmppc.json").read_text())
    assert saved["feature"][15] == -1 and saved["n_samples"] == 120
    # autoscaled plot, and --no-save writes nothing
    (tmp_path / "A" / "comparisons" / "wmppc__B.json").unlink()
    assert wmppc.main([*base, "--no-save", "--plot", str(tmp_path / "auto.png"), "--plot_autoscale"]) == 0
    assert "comparison results" not in capsys.readouterr().err
    assert (tmp_path / "auto.png").stat().st_size > 1000
    assert not (tmp_path / "A" / "comparisons" / "wmppc__B.json").exists()


def test_wmppc_says_why_original_runs_are_not_saved(tmp_path, capsys):
    rng = np.random.default_rng(1)
    write_original(tmp_path, "orig", {l: sparse_matrix(rng, 40, 6) for l in (0, -1)})
    assert wmppc.main(["--source", "orig", "--target", "orig", "--features_dir", str(tmp_path), *CPU]) == 0
    err = capsys.readouterr().err
    assert "not saved" in err and "run.json" in err
    assert not (tmp_path / "orig" / "comparisons").exists()


def test_sharedness_saves_best_matches_and_plots(tmp_path, capsys):
    m = sharedness_runs(tmp_path, np.random.default_rng(2), n=400, d=50)
    assert (
        comp_sharedness.main(
            [
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
                "--json",
                "--plot",
                str(tmp_path / "delta.png"),
                *CPU,
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "comparison results saved in" in err
    assert (tmp_path / "delta.png").stat().st_size > 1000
    assert json.loads((tmp_path / "M" / "comparisons" / "sharedness_L11.json").read_text()) == json.loads(out)
    comps = load_comparisons(tmp_path / "M", "M", 11)
    assert not comps.ignored and len(comps.deltas) == 1
    assert [c.target for c in comps.matches] == ["G1", "G2", "H1", "H2"]
    for col in comps.matches:
        assert (col.target_layers, col.method, col.full) == ([11], "comp_sharedness", True)
        y = open_run(tmp_path, col.target).load(11).to_dense()
        corr = ref_corr(m, y)
        live = [i for i in range(m.shape[1]) if m[:, i].any()]
        assert sorted(col.matches) == live
        for i in live:
            lay, j, r = col.matches[i]
            assert (lay, j) == (11, corr[i].argmax())
            assert r == pytest.approx(corr[i].max(), abs=1e-6)
