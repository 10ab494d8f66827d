"""Top-k row overlap: top-k sets, the sparse indicator product, pairings, the null, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
from scipy.optimize import linear_sum_assignment

import analyze
from sae.analysis.overlap import best_matches, max_weight_matching, overlap_analysis, overlap_matrix, topk_rows
from sae.data.features import SparseCodes, write_layer, write_run_info
from sae.util.errors import InputError

REPO = Path(__file__).resolve().parent.parent


def random_codes(rng, n, d, density=0.05):
    dense = rng.random((n, d)).astype(np.float32) * (rng.random((n, d)) < density)
    return dense


def naive_topk(dense, k):
    """Python reference: for each column, rows with value > 0 by value descending, then row ascending."""
    out = []
    for f in range(dense.shape[1]):
        rows = [r for r in range(dense.shape[0]) if dense[r, f] > 0]
        rows.sort(key=lambda r: (-dense[r, f], r))
        out.append(rows[:k])
    return out


def test_topk_rows_streamed_equals_the_naive_sort():
    rng = np.random.default_rng(0)
    dense = random_codes(rng, 200, 25, 0.08)
    dense[rng.random(dense.shape) < 0.03] = 0.5  # ties
    dense[:, 3] = 0  # dead
    dense[:2, 4], dense[2:, 4] = 1.0, 0  # fires on 2 rows only
    ref = naive_topk(dense, 6)
    sets = topk_rows(SparseCodes.from_dense(dense), 6, chunk_rows=17)
    for f in range(25):
        assert [r for r in sets.rows[f] if r >= 0] == ref[f]
    assert sets.sizes[3] == 0 and sets.sizes[4] == 2


@pytest.mark.parametrize("denominator", ["k", "min"])
def test_overlap_matrix_equals_set_intersections_in_float64(denominator):
    rng = np.random.default_rng(1)
    a, b = random_codes(rng, 150, 20, 0.06), random_codes(rng, 150, 15, 0.06)
    a[:, 0] = b[:, 0]  # identical features -> overlap 1
    b[:3, 1], b[3:, 1] = 1.0, 0  # a feature with fewer than k rows
    a[:, 2] = b[:, 1]  # ... and its copy: 3/k with denominator k, 1 with min
    k = 5
    ta, tb = naive_topk(a, k), naive_topk(b, k)
    ref = np.zeros((20, 15))
    for f in range(20):
        for g in range(15):
            if ta[f] and tb[g]:
                d = k if denominator == "k" else min(len(ta[f]), len(tb[g]))
                ref[f, g] = len(set(ta[f]) & set(tb[g])) / d
    O = overlap_matrix(
        topk_rows(SparseCodes.from_dense(a), k), topk_rows(SparseCodes.from_dense(b), k), denominator=denominator
    )
    np.testing.assert_allclose(O.toarray(), ref, rtol=0, atol=1e-15)
    assert O[0, 0] == 1.0
    assert O[2, 1] == (3 / 5 if denominator == "k" else 1.0)
    best, arg = best_matches(O)
    np.testing.assert_allclose(best, ref.max(1))
    for f in range(20):
        assert arg[f] == (np.argmax(ref[f]) if ref[f].max() > 0 else -1)


def test_sparse_max_weight_matching_equals_dense_hungarian():
    rng = np.random.default_rng(2)
    for m, n in [(30, 30), (40, 25), (20, 35), (8, 8)]:
        for trial in range(6):
            if trial % 2:  # overlap-like values: integer counts / k, many ties
                O = rng.integers(0, 10, (m, n)) * (rng.random((m, n)) < 0.15) / 9
            else:
                O = np.round(rng.random((m, n)), 2) * (rng.random((m, n)) < 0.1)
            rows, cols = max_weight_matching(scipy.sparse.csr_matrix(O))
            assert len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
            assert (O[rows, cols] > 0).all() and (np.diff(rows) > 0).all()
            r, c = linear_sum_assignment(O, maximize=True)
            assert O[rows, cols].sum() == pytest.approx(O[r, c].sum(), abs=1e-12)


HANG_CASE = [
    [0, 0, 0, 0, 0, 4, 0, 0],
    [0, 0, 3, 7, 0, 0, 0, 0],
    [6, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 9, 0, 0, 0, 2],
    [9, 1, 0, 0, 0, 8, 5, 0],
    [4, 0, 0, 0, 0, 3, 0, 8],
    [0, 0, 3, 0, 0, 0, 0, 0],
    [1, 0, 0, 0, 0, 5, 0, 0],
]


def test_max_weight_matching_terminates_on_the_case_that_hung_lapjvsp():
    """Regression: scipy's min_weight_full_bipartite_matching with -O and 1e-9 dummy edges never
    returned on this matrix. Run in a subprocess so that a hang fails the test instead of blocking."""
    code = (
        "import numpy as np, scipy.sparse, json; from sae.analysis.overlap import max_weight_matching; "
        f"r, c = max_weight_matching(scipy.sparse.csr_matrix(np.array({HANG_CASE}) / 9)); "
        "print(json.dumps([r.tolist(), c.tolist()]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows, cols = json.loads(proc.stdout)
    C = np.array(HANG_CASE)
    r, c = linear_sum_assignment(C, maximize=True)
    assert C[rows, cols].sum() == C[r, c].sum() == 36
    assert len(set(cols)) == len(cols) and (C[rows, cols] > 0).all()


def test_max_weight_matching_edge_cases():
    empty = max_weight_matching(scipy.sparse.csr_matrix((5, 4)))
    assert len(empty[0]) == len(empty[1]) == 0
    # two components, one of them a star: one pair from the star, the best one
    O = np.zeros((6, 6))
    O[0, 0] = O[1, 0] = 0.2
    O[2, 0] = 0.9
    O[4, 5], O[5, 4] = 0.5, 0.4
    rows, cols = max_weight_matching(O)
    assert list(zip(rows.tolist(), cols.tolist())) == [(2, 0), (4, 5), (5, 4)]
    with pytest.raises(InputError, match="dense 3 x 1 block"):
        max_weight_matching(O, max_block=2)


def planted_runs(n=2000, d_a=40, d_b=30, shared=15, seed=3):
    """B's first `shared` features are A's features perm[:shared] (same activations on the same rows),
    the rest of B is independent."""
    rng = np.random.default_rng(seed)
    a = random_codes(rng, n, d_a, 0.03)
    b = random_codes(rng, n, d_b, 0.03)
    perm = rng.permutation(d_a)[:shared]
    b[:, :shared] = a[:, perm]
    return a, b, perm


def test_planted_shared_features_are_paired_with_overlap_one_and_the_null_is_near_zero():
    a, b, perm = planted_runs()
    res = overlap_analysis(SparseCodes.from_dense(a), SparseCodes.from_dense(b), k=9, null=5, seed=0)
    truth = {(int(f), g) for g, f in enumerate(perm)}
    for method in ("argmax", "mutual", "hungarian"):
        p = res.pairs[method]
        pairs = {(int(x), int(y)) for x, y, o in zip(p.a, p.b, p.overlap) if o == 1.0}
        assert truth <= pairs, method
        assert pairs == truth, method  # nothing else reaches overlap 1 by chance
    js = res.to_json(top=20)
    assert js["null"]["mean_best_overlap_a_to_b"] < 0.15
    assert js["null"]["mean_best_overlap_b_to_a"] < 0.15
    assert js["mean_best_overlap_b_to_a"] > 15 / 30  # half of B is A
    assert js["pairings"]["hungarian"]["n_above_null_p99"] >= 15
    assert [(p["a"], p["b"]) for p in js["pairings"]["hungarian"]["top"][:15]] == sorted(truth)
    # independent runs match the null
    rng = np.random.default_rng(9)
    ind = overlap_analysis(
        SparseCodes.from_dense(a), SparseCodes.from_dense(random_codes(rng, 2000, 30, 0.03)), k=9, null=3
    )
    assert abs(ind.mean_best_a - ind.null_a.mean()) < 0.05


def test_short_features_are_left_out_by_default_and_counted_over_k_when_kept():
    """A feature firing on fewer than k rows: not live by default (min_rows = k); with --min_rows 1 its
    overlap with an exact copy is |T|/k under the default denominator, 1 under 'min'."""
    a, b, perm = planted_runs()
    a[:, 0], b[:, 20] = 0, 0
    a[:3, 0] = b[:3, 20] = [3.0, 2.0, 1.0]  # A's feature 0 and B's feature 20 fire on the same 3 rows
    A, B = SparseCodes.from_dense(a), SparseCodes.from_dense(b)
    default = overlap_analysis(A, B, k=9, null=2)
    assert not default.live_a[0] and not default.live_b[20] and default.extra["min_rows"] == 9
    assert 0 not in default.pairs["hungarian"].a.tolist()
    kept = overlap_analysis(A, B, k=9, null=2, min_rows=1)
    assert kept.live_a[0] and kept.best_a[0] == pytest.approx(3 / 9) and kept.arg_a[0] == 20
    loose = overlap_analysis(A, B, k=9, null=2, min_rows=1, denominator="min")
    assert loose.best_a[0] == 1.0
    only = overlap_analysis(A, B, k=9, null=0, methods=["mutual"])
    assert list(only.pairs) == ["mutual"]
    with pytest.raises(InputError, match="--pairing"):
        overlap_analysis(A, B, k=9, null=0, methods=["greedy"])


def write_run(root, name, layers, row_ids=None):
    run = root / name
    for layer, dense in layers.items():
        write_layer(run, layer, SparseCodes.from_dense(dense))
    n = next(iter(layers.values())).shape[0]
    write_run_info(run, {"name": name, "n_rows": n, "row_ids": row_ids or list(range(n)), "layers": list(layers)})


def test_overlap_cli_json_text_npz_and_errors(tmp_path, capsys):
    a, b, perm = planted_runs(n=600, d_a=20, d_b=16, shared=8)
    write_run(tmp_path, "A", {3: a[:, ::-1].copy(), 11: a})
    write_run(tmp_path, "B", {7: b})
    base = ["overlap", "--run_a", "A", "--run_b", "B", "--features_dir", str(tmp_path), "--no-progress"]
    assert analyze.main(base + ["--json", "--k", "9", "--null", "2", "--out", str(tmp_path / "o.npz")]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["layer_a"] == 11 and js["layer_b"] == 7 and js["k"] == 9
    top = {(p["a"], p["b"]) for p in js["pairings"]["mutual"]["top"] if p["overlap"] == 1.0}
    assert top == {(int(f), g) for g, f in enumerate(perm)}
    z = np.load(tmp_path / "o.npz")
    assert z["best_a"].shape == (20,) and len(z["hungarian_a"]) == len(z["hungarian_b"])
    assert analyze.main(base + ["--layer_a", "3", "--pairing", "mutual"]) == 0
    out = capsys.readouterr().out
    assert "mean best overlap" in out and "top mutual pairs" in out and "hungarian" not in out
    assert (
        analyze.main(base + ["--json", "--pairing", "hungarian", "argmax", "--denominator", "min", "--min_rows", "1"])
        == 0
    )
    js = json.loads(capsys.readouterr().out)
    assert list(js["pairings"]) == ["argmax", "hungarian"] and js["denominator"] == "min" and js["min_rows"] == 1
    write_run(tmp_path, "C", {7: b[:500]})
    with pytest.raises(InputError, match="600 rows"):
        analyze.main(["overlap", "--run_a", "A", "--run_b", "C", "--features_dir", str(tmp_path)])
    write_run(tmp_path, "D", {7: b}, row_ids=list(range(1, 601)))
    with pytest.raises(InputError, match="row_ids"):
        analyze.main(["overlap", "--run_a", "A", "--run_b", "D", "--features_dir", str(tmp_path)])
    with pytest.raises(InputError, match="no run 'E'"):
        analyze.main(["overlap", "--run_a", "A", "--run_b", "E", "--features_dir", str(tmp_path)])
    with pytest.raises(InputError, match="no layer 5"):
        analyze.main(base + ["--layer_a", "5"])


def test_overlap_text_report_when_no_feature_is_live(tmp_path, capsys):
    """Every feature fires on fewer than k rows: the means are NaN, and the text report prints them."""
    dense = np.zeros((20, 5), np.float32)
    dense[0] = 1.0
    write_run(tmp_path, "A", {0: dense})
    write_run(tmp_path, "B", {0: dense})
    assert (
        analyze.main(
            ["overlap", "--run_a", "A", "--run_b", "B", "--features_dir", str(tmp_path), "--no-progress", "--null", "0"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "live features (>= 9 rows) A 0/5, B 0/5" in out and "mean best overlap A->B nan, B->A nan" in out
    assert (
        analyze.main(
            [
                "overlap",
                "--run_a",
                "A",
                "--run_b",
                "B",
                "--features_dir",
                str(tmp_path),
                "--no-progress",
                "--null",
                "0",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["mean_best_overlap_a_to_b"] is None  # strict JSON: NaN -> null
