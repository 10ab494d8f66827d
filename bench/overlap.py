"""Top-k overlap: the sparse indicator product against a naive loop, per-component vs dense Hungarian.

    uv run python bench/overlap.py [--rows 50000] [--features 4096] [--k 9] [--naive_features 32]

Synthetic runs A and B over the same rows (TopK codes, 32 active features per row, half of B's features
copies of A's). Times:
  - top-k sets of both runs (streamed over row chunks);
  - all |T_A(f) & T_B(g)| at once as I_A I_B^T (sparse), against the naive loop over pairs with
    Python set intersections, timed on the first `--naive_features` features of A and extrapolated;
  - the one-to-one pairing: `max_weight_matching` (linear_sum_assignment on each connected component of
    the non-zero overlaps) against linear_sum_assignment on the whole dense O.
The overlaps of both methods are checked to be equal, and the two matchings to have the same total.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae.analysis.overlap import max_weight_matching, overlap_matrix, topk_rows  # noqa: E402
from sae.data.features import SparseCodes  # noqa: E402


def synthetic_runs(rng: np.random.Generator, n: int, d: int, active: int) -> tuple[SparseCodes, SparseCodes]:
    """TopK-like codes of two runs [n, d] (`active` per row); B's first d/2 feature columns are A's."""
    bias_a = np.linspace(0, 3, d)[rng.permutation(d)]
    bias_b = np.linspace(0, 3, d)[rng.permutation(d)]
    parts_a, parts_b = [], []
    for start in range(0, n, 4096):
        m = min(4096, n - start)
        la = rng.standard_normal((m, d), dtype=np.float32) - bias_a
        lb = rng.standard_normal((m, d), dtype=np.float32) - bias_b
        lb[:, : d // 2] = la[:, : d // 2]
        for logits, parts in ((la, parts_a), (lb, parts_b)):
            idx = np.argpartition(-logits, active, axis=1)[:, :active]
            parts.append((np.take_along_axis(logits, idx, 1) + 10, idx))
    cat = lambda parts: SparseCodes.from_topk(np.vstack([v for v, _ in parts]), np.vstack([i for _, i in parts]), d)  # noqa: E731
    return cat(parts_a), cat(parts_b)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    p.add_argument("--rows", type=int, default=50000)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--k", type=int, default=9)
    p.add_argument("--active", type=int, default=32)
    p.add_argument("--naive_features", type=int, default=32)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    n, d = a.rows, a.features
    A, B = synthetic_runs(rng, n, d, a.active)
    print(f"{n} rows, {d} features per run, {a.active} active per row, k = {a.k}")

    t = time.perf_counter()
    ta, tb = topk_rows(A, a.k), topk_rows(B, a.k)
    t_topk = time.perf_counter() - t
    t = time.perf_counter()
    O = overlap_matrix(ta, tb)
    t_sparse = time.perf_counter() - t
    print(f"top-k sets of both runs: {t_topk:.2f} s")
    print(f"sparse indicator product, all {d}x{d} pairs: {t_sparse:.3f} s ({O.nnz} non-zero overlaps)")

    m = min(a.naive_features, d)
    sets_a = [set(r[r >= 0].tolist()) for r in ta.rows[:m]]
    sets_b = [set(r[r >= 0].tolist()) for r in tb.rows]
    t = time.perf_counter()
    counts = np.zeros((m, d))
    for f in range(m):
        for g in range(d):
            if sets_a[f] and sets_b[g]:
                counts[f, g] = len(sets_a[f] & sets_b[g]) / a.k
    t_naive = (time.perf_counter() - t) * d / m
    assert np.array_equal(counts, O[:m].toarray()), "naive and sparse overlaps differ"
    print(
        f"naive loop over pairs (set intersections): {t_naive:.1f} s extrapolated from {m} features "
        f"-> {t_naive / t_sparse:.0f}x slower; the values agree"
    )

    t = time.perf_counter()
    r, c = max_weight_matching(O)
    t_hs = time.perf_counter() - t
    dense = O.toarray()
    t = time.perf_counter()
    r2, c2 = linear_sum_assignment(dense, maximize=True)
    t_hd = time.perf_counter() - t
    s1, s2 = dense[r, c].sum(), dense[r2, c2].sum()
    assert abs(s1 - s2) < 1e-6 * max(1.0, s2), (s1, s2)
    print(
        f"one-to-one pairing: per-component matching {t_hs:.2f} s, dense Hungarian on all of O {t_hd:.2f} s "
        f"-> {t_hd / t_hs:.1f}x (same total overlap {s1:.3f}; {int((dense[r, c] > 0).sum())} pairs)"
    )


if __name__ == "__main__":
    main()
