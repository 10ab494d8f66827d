"""Top-k row overlap between the features of two runs on the same rows (the CLIP RN50-vs-ViT report).

Definitions (docs/analyses.md §3; Zhu & Graves, §3.4). Runs A and B hold SAE codes for the same N rows
in the same order, F_A [N, M_A] and F_B [N, M_B].

    T_A(f)     = the rows of the k largest F_A[:, f], among rows where F_A[n, f] > 0 (ties: lower row
                 first); |T_A(f)| < k when the feature fires on fewer than k rows
    O(f, g)    = |T_A(f) & T_B(g)| / k                        (denominator "k", the default)
               = |T_A(f) & T_B(g)| / min(|T_A(f)|, |T_B(g)|)  (denominator "min", an option)
    live       = |T(f)| >= min_rows (default k: features firing on fewer than k rows are left out)
    I_A        = the [M_A, N] 0/1 indicator of the T_A sets, I_B likewise; all counts at once:
                 |T_A(f) & T_B(g)| = (I_A I_B^T)[f, g]   (a sparse product; k non-zeros per row)
    best_A(f)  = max_g O(f, g) over live g;  mean best overlap A->B = mean of best_A over live f,
                 and B->A likewise
    null       = the same means with B's rows relabelled by a random permutation of 0..N-1 (K draws,
                 mean and std), and the 95th / 99th percentiles of the null's per-feature best_A
    pairings   = argmax: each live f with best_A(f) > 0 and its argmax g (many-to-one);
                 mutual: argmax pairs that are also the argmax of g in the other direction;
                 hungarian: the one-to-one matching maximising sum O(f, g) (pairs with O > 0)

The Hungarian matching is exact: the overlap graph (an edge per non-zero O entry) is split into its
connected components, and each component's dense [rows, cols] block goes to
`scipy.optimize.linear_sum_assignment`; zero entries of a block add nothing to the sum, so dropping
the matched zeros leaves the optimum over matchings of non-zero entries. Memory: one float64 block of
the largest component.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse
from tqdm.auto import tqdm

from sae.analysis.compare import check_same_rows as check_declared_rows
from sae.data.features import FeatureRun, SparseCodes
from sae.util.errors import InputError

METHODS = ("argmax", "mutual", "hungarian")
DENOMINATORS = ("k", "min")
MAX_DENSE_BLOCK = 1 << 28  # entries of the largest dense block of the hungarian pairing (2 GiB of float64)


# ------------------------------------------------------------------------------------------------
# Top-k rows per feature


@dataclass
class TopKSets:
    """Each feature's top-k rows: rows [d, k] int64 (best first, -1 padding), values [d, k]."""

    rows: np.ndarray
    values: np.ndarray
    n_rows: int

    @property
    def k(self) -> int:
        return self.rows.shape[1]

    @property
    def sizes(self) -> np.ndarray:
        """|T(f)| [d]."""
        return (self.rows >= 0).sum(1)

    def indicator(self, perm: np.ndarray | None = None) -> scipy.sparse.csr_matrix:
        """The 0/1 matrix [d, N] of the sets; `perm` [N] relabels row n as perm[n]."""
        d = self.rows.shape[0]
        keep = self.rows >= 0
        cols = self.rows[keep]
        if perm is not None:
            cols = perm[cols]
        indptr = np.zeros(d + 1, dtype=np.int64)
        np.cumsum(keep.sum(1), out=indptr[1:])
        return scipy.sparse.csr_matrix((np.ones(len(cols)), cols, indptr), shape=(d, self.n_rows))


def topk_rows(codes: SparseCodes, k: int, *, chunk_rows: int = 1 << 16, progress: bool = False) -> TopKSets:
    """The top-k rows of every feature of codes [N, d] (values > 0 only), streamed over row chunks:
    memory is one chunk plus d * k candidates (the codes may be memory-mapped)."""
    if k < 1:
        raise InputError(f"--k must be at least 1 (got {k})")
    d = codes.d_sae
    c_col = np.empty(0, np.int64)
    c_val = np.empty(0, np.float32)
    c_row = np.empty(0, np.int64)
    for start in tqdm(range(0, codes.n_rows, chunk_rows), desc="top-k rows", disable=not progress, leave=False):
        stop = min(codes.n_rows, start + chunk_rows)
        part = codes.rows(start, stop)
        val = np.asarray(part.values, dtype=np.float32)
        col = np.asarray(part.indices, dtype=np.int64)
        row = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(np.asarray(part.indptr)))
        pos = val > 0
        col = np.concatenate([c_col, col[pos]])
        val = np.concatenate([c_val, val[pos]])
        row = np.concatenate([c_row, row[pos]])
        order = np.lexsort((row, -val, col))
        col, val, row = col[order], val[order], row[order]
        starts = np.flatnonzero(np.r_[True, col[1:] != col[:-1]]) if len(col) else np.empty(0, np.int64)
        rank = np.arange(len(col)) - np.repeat(starts, np.diff(np.r_[starts, len(col)]))
        keep = rank < k
        c_col, c_val, c_row = col[keep], val[keep], row[keep]
    rows = np.full((d, k), -1, dtype=np.int64)
    values = np.zeros((d, k), dtype=np.float32)
    if len(c_col):
        starts = np.flatnonzero(np.r_[True, c_col[1:] != c_col[:-1]])
        rank = np.arange(len(c_col)) - np.repeat(starts, np.diff(np.r_[starts, len(c_col)]))
        rows[c_col, rank] = c_row
        values[c_col, rank] = c_val
    return TopKSets(rows, values, codes.n_rows)


# ------------------------------------------------------------------------------------------------
# Overlap matrix, best matches, pairings


def overlap_matrix(
    a: TopKSets, b: TopKSets, perm_b: np.ndarray | None = None, denominator: str = "k"
) -> scipy.sparse.csr_matrix:
    """O [M_A, M_B] (sparse, float64): |T_A(f) & T_B(g)| / k, or / min(|T_A(f)|, |T_B(g)|) with
    denominator "min"."""
    if a.n_rows != b.n_rows:
        raise InputError(f"the runs cover different rows: {a.n_rows} vs {b.n_rows}")
    if denominator not in DENOMINATORS:
        raise InputError(f"--denominator must be one of {', '.join(DENOMINATORS)} (got {denominator!r})")
    if a.k != b.k:
        raise InputError(f"top-k sets of different sizes: {a.k} vs {b.k}")
    counts = (a.indicator() @ b.indicator(perm_b).T).tocsr()
    counts.eliminate_zeros()
    counts.sort_indices()
    if denominator == "k":
        denom = np.full(len(counts.data), float(a.k))
    else:
        r = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
        denom = np.minimum(a.sizes[r], b.sizes[counts.indices]).astype(np.float64)
    return scipy.sparse.csr_matrix((counts.data / denom, counts.indices, counts.indptr), shape=counts.shape)


def best_matches(O: scipy.sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per row of O: (best overlap [M], its column [M], -1 where the row is empty; ties: lowest column)."""
    O = O.tocsr()
    best = np.zeros(O.shape[0])
    arg = np.full(O.shape[0], -1, dtype=np.int64)
    if O.nnz:
        r = np.repeat(np.arange(O.shape[0]), np.diff(O.indptr))
        order = np.lexsort((O.indices, -O.data, r))
        first = order[np.r_[True, r[order][1:] != r[order][:-1]]]
        best[r[first]] = O.data[first]
        arg[r[first]] = O.indices[first]
    return best, arg


def max_weight_matching(
    O: scipy.sparse.csr_matrix | np.ndarray, max_block: int = MAX_DENSE_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """The one-to-one matching of rows and columns of O [m, n] (entries >= 0) maximising the sum of
    the matched entries, as pairs with O > 0: (rows, cols), sorted by row. Exact (module docstring):
    `linear_sum_assignment` on the dense block of each connected component of the non-zero entries.
    InputError when a component's block would exceed `max_block` entries."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse.csgraph import connected_components

    coo = scipy.sparse.coo_matrix(O)
    if coo.nnz and coo.data.min() < 0:
        raise InputError("max_weight_matching needs non-negative entries")
    pos = coo.data > 0
    r, c, w = coo.row[pos].astype(np.int64), coo.col[pos].astype(np.int64), coo.data[pos].astype(np.float64)
    m, n = coo.shape
    if len(w) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    # bipartite graph on m + n vertices: row i is vertex i, column j is vertex m + j
    graph = scipy.sparse.coo_matrix((np.ones(len(w)), (r, m + c)), shape=(m + n, m + n))
    _, label = connected_components(graph, directed=False)
    comp = label[r]  # component of each edge
    order = np.argsort(comp, kind="stable")
    r, c, w, comp = r[order], c[order], w[order], comp[order]
    bounds = np.flatnonzero(np.r_[True, comp[1:] != comp[:-1], True])
    out_r, out_c = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows, ri = np.unique(r[lo:hi], return_inverse=True)
        cols, ci = np.unique(c[lo:hi], return_inverse=True)
        if len(rows) * len(cols) > max_block:
            raise InputError(
                f"the one-to-one (hungarian) pairing needs a dense {len(rows)} x {len(cols)} block "
                f"({len(rows) * len(cols) * 8 / 2**30:.1f} GiB); use --pairing argmax mutual"
            )
        block = np.zeros((len(rows), len(cols)))
        block[ri, ci] = w[lo:hi]
        br, bc = linear_sum_assignment(block, maximize=True)
        keep = block[br, bc] > 0
        out_r.append(rows[br[keep]])
        out_c.append(cols[bc[keep]])
    rows, cols = np.concatenate(out_r), np.concatenate(out_c)
    order = np.argsort(rows, kind="stable")
    return rows[order], cols[order]


@dataclass
class Pairing:
    """Pairs (a [P], b [P]) with their overlap [P] and shared-row count [P]."""

    method: str
    a: np.ndarray
    b: np.ndarray
    overlap: np.ndarray

    def top(self, n: int) -> list[dict[str, Any]]:
        order = np.lexsort((self.a, -self.overlap))[:n]
        return [{"a": int(self.a[i]), "b": int(self.b[i]), "overlap": float(self.overlap[i])} for i in order]


def restrict(O: scipy.sparse.csr_matrix, live_a: np.ndarray, live_b: np.ndarray) -> scipy.sparse.csr_matrix:
    """O with the rows of non-live A features and the columns of non-live B features emptied."""
    O = (scipy.sparse.diags(live_a.astype(float)) @ O @ scipy.sparse.diags(live_b.astype(float))).tocsr()
    O.eliminate_zeros()
    O.sort_indices()
    return O


def pairings(
    O: scipy.sparse.csr_matrix, live_a: np.ndarray, live_b: np.ndarray, methods: Sequence[str] = METHODS
) -> dict[str, Pairing]:
    """The pairings `methods` (some of METHODS) of live features (module docstring)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"--pairing must be among {', '.join(METHODS)} (got {', '.join(unknown)})")
    O = restrict(O, live_a, live_b)
    out: dict[str, Pairing] = {}
    if "argmax" in methods or "mutual" in methods:
        best_a, arg_a = best_matches(O)
        f = np.flatnonzero(arg_a >= 0)
        if "argmax" in methods:
            out["argmax"] = Pairing("argmax", f, arg_a[f], best_a[f])
        if "mutual" in methods:
            _, arg_b = best_matches(O.T.tocsr())
            mutual = f[arg_b[arg_a[f]] == f]
            out["mutual"] = Pairing("mutual", mutual, arg_a[mutual], best_a[mutual])
    if "hungarian" in methods:
        r, c = max_weight_matching(O)
        out["hungarian"] = Pairing("hungarian", r, c, np.asarray(O[r, c]).ravel() if len(r) else np.empty(0))
    return {m: out[m] for m in METHODS if m in out}


# ------------------------------------------------------------------------------------------------
# The analysis


@dataclass
class OverlapResult:
    k: int
    n_rows: int
    sizes_a: np.ndarray  # [M_A] |T_A(f)|
    sizes_b: np.ndarray
    live_a: np.ndarray  # bool [M_A]
    live_b: np.ndarray
    best_a: np.ndarray  # [M_A] best overlap A->B (0 for dead)
    best_b: np.ndarray  # [M_B] best overlap B->A
    arg_a: np.ndarray  # [M_A] argmax in B, -1 if none
    arg_b: np.ndarray
    pairs: dict[str, Pairing]
    null_a: np.ndarray  # [K] mean best overlap A->B per permutation
    null_b: np.ndarray  # [K]
    null_best_a: np.ndarray  # pooled per-feature best_A under the null (live features, all K draws)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_best_a(self) -> float:
        return float(self.best_a[self.live_a].mean()) if self.live_a.any() else float("nan")

    @property
    def mean_best_b(self) -> float:
        return float(self.best_b[self.live_b].mean()) if self.live_b.any() else float("nan")

    def thresholds(self) -> dict[str, float]:
        if len(self.null_best_a) == 0:
            return {}
        return {"p95": float(np.quantile(self.null_best_a, 0.95)), "p99": float(np.quantile(self.null_best_a, 0.99))}

    def to_json(self, top: int = 20) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.extra,
            "k": self.k,
            "n_rows": self.n_rows,
            "d_a": len(self.sizes_a),
            "d_b": len(self.sizes_b),
            "n_live_a": int(self.live_a.sum()),
            "n_live_b": int(self.live_b.sum()),
            "n_short_a": int(((self.sizes_a > 0) & (self.sizes_a < self.k)).sum()),
            "n_short_b": int(((self.sizes_b > 0) & (self.sizes_b < self.k)).sum()),
            "mean_best_overlap_a_to_b": self.mean_best_a,
            "mean_best_overlap_b_to_a": self.mean_best_b,
        }
        thr = self.thresholds()
        if len(self.null_a):
            out["null"] = {
                "permutations": len(self.null_a),
                "mean_best_overlap_a_to_b": float(self.null_a.mean()),
                "std_a_to_b": float(self.null_a.std()),
                "mean_best_overlap_b_to_a": float(self.null_b.mean()),
                "std_b_to_a": float(self.null_b.std()),
                **thr,
            }
        edges = np.linspace(0, 1, 11)
        out["pairings"] = {}
        for name, p in self.pairs.items():
            entry: dict[str, Any] = {
                "n_pairs": int(len(p.a)),
                "mean_overlap": float(p.overlap.mean()) if len(p.a) else float("nan"),
                "histogram_percent": {
                    "edges": (100 * edges).tolist(),
                    "count": np.histogram(p.overlap, bins=edges)[0].tolist(),
                },
                "top": p.top(top),
            }
            for key, t in thr.items():
                entry[f"n_above_null_{key}"] = int((p.overlap > t).sum())
            out["pairings"][name] = entry
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """For `--out FILE.npz`."""
        out = {
            "best_a": self.best_a,
            "arg_a": self.arg_a,
            "best_b": self.best_b,
            "arg_b": self.arg_b,
            "sizes_a": self.sizes_a,
            "sizes_b": self.sizes_b,
        }
        for name, p in self.pairs.items():
            out[f"{name}_a"], out[f"{name}_b"], out[f"{name}_overlap"] = p.a, p.b, p.overlap
        return out


def overlap_analysis(
    codes_a: SparseCodes,
    codes_b: SparseCodes,
    *,
    k: int = 9,
    null: int = 5,
    seed: int = 0,
    min_rows: int | None = None,
    denominator: str = "k",
    methods: Sequence[str] = METHODS,
    progress: bool = False,
) -> OverlapResult:
    """Top-k overlap of every feature of A with every feature of B (module docstring); `min_rows`
    None means k; `methods`: the pairings to compute."""
    if codes_a.n_rows != codes_b.n_rows:
        raise InputError(
            f"the runs have different numbers of rows ({codes_a.n_rows} vs {codes_b.n_rows}); "
            "top-k overlap needs the same rows in the same order"
        )
    if not 1 <= k <= codes_a.n_rows:
        raise InputError(f"--k must be between 1 and the number of rows, {codes_a.n_rows} (got {k})")
    min_rows = k if min_rows is None else min_rows
    if not 1 <= min_rows <= k:
        raise InputError(f"--min_rows must be between 1 and k = {k} (got {min_rows})")
    a = topk_rows(codes_a, k, progress=progress)
    b = topk_rows(codes_b, k, progress=progress)
    live_a, live_b = a.sizes >= min_rows, b.sizes >= min_rows
    O = restrict(overlap_matrix(a, b, denominator=denominator), live_a, live_b)
    prs = pairings(O, live_a, live_b, methods)
    best_a, arg_a = best_matches(O)
    best_b, arg_b = best_matches(O.T.tocsr())
    rng = np.random.default_rng(seed)
    null_a, null_b, pooled = [], [], []
    for _ in tqdm(range(null), desc="null permutations", disable=not progress, leave=False):
        On = restrict(overlap_matrix(a, b, rng.permutation(a.n_rows), denominator), live_a, live_b)
        ba, _ = best_matches(On)
        bb, _ = best_matches(On.T.tocsr())
        null_a.append(ba[live_a].mean() if live_a.any() else np.nan)
        null_b.append(bb[live_b].mean() if live_b.any() else np.nan)
        pooled.append(ba[live_a])
    res = OverlapResult(
        k,
        a.n_rows,
        a.sizes,
        b.sizes,
        live_a,
        live_b,
        best_a,
        best_b,
        arg_a,
        arg_b,
        prs,
        np.asarray(null_a),
        np.asarray(null_b),
        np.concatenate(pooled) if pooled else np.empty(0),
    )
    res.extra.update(denominator=denominator, min_rows=min_rows)
    return res


def load_layer(run: FeatureRun, layer: int | None) -> tuple[int, SparseCodes]:
    """(layer, codes) of a run; `layer` None means its deepest layer."""
    chosen = run.layers[-1] if layer is None else layer
    return chosen, run.load(chosen)


def check_same_rows(
    run_a: FeatureRun, run_b: FeatureRun, n_a: int, n_b: int, allow_different_data: bool = False
) -> str | None:
    """InputError unless both runs cover the same rows in the same order: n_a, n_b the rows of the layers
    read, then what run.json declares (`sae.analysis.compare.check_same_rows`, whose line on different
    data, allowed, it returns)."""
    if n_a != n_b:
        raise InputError(
            f"run '{run_a.name}' has {n_a} rows, run '{run_b.name}' {n_b}: top-k overlap "
            "needs features recorded on the same rows"
        )
    return check_declared_rows([run_a, run_b], allow_different_data)


def format_overlap(js: dict[str, Any], top: int = 10) -> str:
    """A short text version of `OverlapResult.to_json()`: the means, the null, and the top pairs of
    each pairing computed."""
    denom = "k" if js.get("denominator", "k") == "k" else "min(|T_A|, |T_B|)"
    lines = [
        f"k = {js['k']} rows per feature, {js['n_rows']} rows, overlap = |T_A & T_B| / {denom}; live features "
        f"(>= {js.get('min_rows', js['k'])} rows) A {js['n_live_a']}/{js['d_a']}, B {js['n_live_b']}/{js['d_b']}",
        f"mean best overlap A->B {js['mean_best_overlap_a_to_b']:.4f}, B->A {js['mean_best_overlap_b_to_a']:.4f}",
    ]
    if "null" in js:
        n = js["null"]
        lines.append(
            f"null ({n['permutations']} row permutations): A->B {n['mean_best_overlap_a_to_b']:.4f} "
            f"+- {n['std_a_to_b']:.4f}, B->A {n['mean_best_overlap_b_to_a']:.4f} +- {n['std_b_to_a']:.4f}; "
            f"per-feature p95 {n['p95']:.3f}, p99 {n['p99']:.3f}"
        )
    if js.get("allow_different_data"):
        lines.append(f"WARNING --allow_different_data: {js['allow_different_data']}")
    for name, p in js["pairings"].items():
        extra = f", {p['n_above_null_p99']} above the null's p99" if "n_above_null_p99" in p else ""
        lines.append(f"{name}: {p['n_pairs']} pairs, mean overlap {p['mean_overlap']:.4f}{extra}")
    for name, p in js["pairings"].items():
        lines.append(f"top {name} pairs (a, b, overlap %):")
        for q in p["top"][:top]:
            lines.append(f"  {q['a']:>7} {q['b']:>7} {100 * q['overlap']:6.1f}")
    return "\n".join(lines)
