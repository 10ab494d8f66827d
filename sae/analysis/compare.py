"""Compare runs through their SAE features: wMPPC and (generalized) comparative sharedness.

Runs A and B hold SAE features for the same N rows; A_a is layer a of A, [N, d_A]. With exact Pearson
correlations (see sae/analysis/correlation.py):

    rho_i(a->b) = max_j corr(A_a[:, i], B_b[:, j])            best match of feature i of A_a in B_b
    S_i         = sum_n A_a[n, i]                              the feature's summed activation
    wMPPC(a->b) = sum_i S_i rho_i(a->b) / sum_i S_i            one cell of the per-layer matrix
    MPPC(a->b)  = mean_i rho_i(a->b)                           the unweighted score
    All layers  : rho_i(a->*) = max_b rho_i(a->b); wMPPC_a = sum_i S_i rho_i(a->*) / sum_i S_i;
                  wMPPC(A->B) = sum_a d_a wMPPC_a / sum_a d_a
    Last layer  : wMPPC(A_deepest -> B_deepest)

    Generalized comparative sharedness of feature i of M against groups G and H:
    Delta_i = S_i ((rho_iG^+)^2 - (rho_iH^+)^2),  rho^+ = max(rho, 0),
    rho_iG = min_{g in G} rho_i(M->g),  rho_iH = max_{h in H} rho_i(M->h)

Each (run, layer) is read from disk once per call (memory-mapped; the original format's sparse layers through their
csr-v1 copy, its dense ones as they are).
Dead features (constant over the rows up to float32 round-off) get rho = 0.
Every result names the feature definition of each run (`record_codes`: `sae` codes or `ungated`
relu(pre), see sae.data.features.RECORD_CODES) and warns when the compared runs differ.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse

from sae.analysis.correlation import (
    DEAD_RANGE,
    LayerData,
    NonFiniteError,
    NumpyEngine,
    PreparedLayer,
    column_stats,
    make_engine,
)
from sae.data.features import FORMAT, RECORD_CODES, FeatureRun, SparseCodes
from sae.util import distributed
from sae.util.errors import InputError

# the float64 layouts (CSR/CSC) of target layers kept for the next source layer, in bytes; beyond it they are
# rebuilt from the memory-mapped data each time, so memory does not grow with the number of target layers
KEEP_BYTES = 2 << 30


def codes_of(runs: Sequence[FeatureRun]) -> dict[str, str]:
    """Run name -> its feature definition (a key of RECORD_CODES)."""
    return {r.name: r.record_codes for r in runs}


def codes_lines(codes: dict[str, str]) -> list[str]:
    """One line naming each run's feature definition, plus a warning line when they differ."""
    lines = ["features: " + ", ".join(f"{run} = {c}" for run, c in codes.items())]
    if len(set(codes.values())) > 1:
        lines.append(codes_warning(codes))
    return lines


def codes_warning(codes: dict[str, str]) -> str:
    kinds = {c: RECORD_CODES.get(c, c) for c in sorted(set(codes.values()))}
    return (
        "warning: the compared runs record different features ("
        + "; ".join(f"{c}: {d}" for c, d in kinds.items())
        + "); rerun with the same --record_codes to compare like with like"
    )


# an original-format layer is converted to csr-v1 (8 bytes per non-zero) when that takes at most this fraction
# of its dense size: then the copy is smaller and its sparse statistics are faster
CONVERT_DENSITY = 0.5


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, leave=False)


# ------------------------------------------------------------------------------------------------
# Loading and checking layers


def _data_of(run: FeatureRun) -> tuple[str, str, str] | None:
    """(dataset name, split, fingerprint) from run.json; None when the run does not record it."""
    ds = run.info.get("dataset")
    if not isinstance(ds, dict) or not ds.get("fingerprint"):
        return None
    return str(ds.get("name")), str(ds.get("split")), str(ds["fingerprint"])


def check_same_data(runs: Sequence[FeatureRun], allow_different_data: bool = False) -> str | None:
    """InputError when two runs record (in run.json) different datasets (name, split or fingerprint:
    equal row ids 0..N-1 do not make the same rows); with `allow_different_data` the difference is
    returned as one line for the result instead. None when the data agree (or are not recorded)."""
    known = [(run, d) for run in runs if (d := _data_of(run)) is not None]
    for run, d in known[1:]:
        ref, d_ref = known[0]
        if d[2] != d_ref[2] or d[1] != d_ref[1]:
            what = (
                f"runs '{ref.name}' ({d_ref[0]}, split {d_ref[1]}, fingerprint {d_ref[2]}) and '{run.name}' "
                f"({d[0]}, split {d[1]}, fingerprint {d[2]}) were recorded on different data"
            )
            if not allow_different_data:
                raise InputError(f"{what}; compare runs of the same data, or pass --allow_different_data")
            return what
    return None


def check_same_rows(runs: Sequence[FeatureRun], allow_different_data: bool = False) -> str | None:
    """InputError unless the runs declare (in run.json) the same data (`check_same_data`), the same number
    of rows and the same row ids in the same order; checked before any layer is read. Returns
    `check_same_data`'s line when different data are allowed."""
    different = check_same_data(runs, allow_different_data)
    declared = [(run, _declared_rows(run)) for run in runs]
    declared = [(run, n) for run, n in declared if n is not None]
    for run, n in declared[1:]:
        ref, n_ref = declared[0]
        if n != n_ref:
            raise InputError(
                f"runs '{ref.name}' (N={n_ref}) and '{run.name}' (N={n}) have different "
                "numbers of rows; compare runs recorded on the same data"
            )
    with_ids = [run for run in runs if run.row_ids is not None]
    for run in with_ids[1:]:
        ref = with_ids[0]
        a, b = np.asarray(ref.row_ids), np.asarray(run.row_ids)
        if len(a) != len(b):
            raise InputError(
                f"runs '{ref.name}' (N={len(a)}) and '{run.name}' (N={len(b)}) have different numbers of rows"
            )
        diff = np.flatnonzero(a != b)
        if len(diff):
            raise InputError(
                f"runs '{ref.name}' and '{run.name}' hold different rows: row_ids "
                f"differ first at row {diff[0]} ({a[diff[0]]} vs {b[diff[0]]})"
            )
    return different


class LayerLoader:
    """Reads (run, layer) pairs, checks them, and prepares them for an engine.

    Every layer of every run must have the same number of rows; runs that both list `row_ids` in
    run.json must list the same ids in the same order. Values must be finite. A layer of the original
    repo's format (a dense [N, d_sae] tensor in a .pt file) is read through its csr-v1 copy when sparse, else
    memory-mapped and kept dense, not copied into RAM: the correlations read it by row chunks.
    """

    def __init__(self, engine: NumpyEngine, dead_range: float = DEAD_RANGE, keep_bytes: int = KEEP_BYTES):
        self.engine = engine
        self.dead_range = dead_range
        self.keep_bytes = keep_bytes  # layouts of target layers kept between source layers, at most this much
        self.n_rows: int | None = None
        self._first: tuple[str, int] = ("", 0)
        self.reads: list[tuple[str, int]] = []  # every layer read, in order (tests check "once")

    def load(self, run: FeatureRun, layer: int) -> PreparedLayer:
        """Read one layer (once: the caller keeps what it needs), check it, and prepare it."""
        where = f"run '{run.name}' layer {layer}"
        data = _read_layer(run, layer, where)
        self.reads.append((str(run.path), layer))
        n_rows = data.n_rows if isinstance(data, SparseCodes) else data.shape[0]
        if n_rows < 2:
            raise InputError(f"{where} has {n_rows} row(s); correlations need at least 2")
        if self.n_rows is None:
            self.n_rows, self._first = n_rows, (run.name, layer)
        elif n_rows != self.n_rows:
            (name, first) = self._first
            raise InputError(
                f"runs '{name}' (N={self.n_rows}, layer {first}) and '{run.name}' "
                f"(N={n_rows}, layer {layer}) have different numbers of rows; "
                "compare runs recorded on the same data"
            )
        try:
            stats = column_stats(data, self.dead_range)
        except NonFiniteError as e:
            raise InputError(f"{where} holds {e.count} non-finite values (NaN or inf, e.g. fp16 overflow)") from None
        return self.engine.prepare(data, stats)


def _read_layer(run: FeatureRun, layer: int, where: str) -> LayerData:
    """This toolkit's CSR codes (memory-mapped), or an original-format layer: its csr-v1 copy (made once, see
    `FeatureRun.load`) when it is sparse enough (CONVERT_DENSITY), else the dense tensor memory-mapped as a
    numpy array (fp16 kept as fp16)."""
    if run.format == FORMAT:
        return run.load(layer)
    from sae.data.features import convert_layer, read_sidecar
    from sae.data.ptfile import density, load_dense

    path = run.layer_path(layer)
    if (codes := read_sidecar(path)) is not None:
        return codes
    dense = load_dense(path)
    if dense.dtype != np.float64 and density(dense) * 8 < CONVERT_DENSITY * dense.dtype.itemsize:
        return convert_layer(path, layer)  # the values are checked with the column statistics
    return dense


def _release(targets: list[PreparedLayer], ib: int, keep_bytes: int) -> None:
    """Drop target ib's float64 layouts if the targets' layouts together exceed `keep_bytes` (they are rebuilt
    from the memory-mapped data for the next source layer)."""
    if sum(_cache_bytes(t) for t in targets) > keep_bytes:
        targets[ib].cache.clear()


def _cache_bytes(layer: PreparedLayer) -> int:
    """Bytes of the arrays a prepared layer keeps in its cache (CSR, CSC, padded rows, device copies)."""
    total = 0
    stack = list(layer.cache.values())
    while stack:
        v = stack.pop()
        if isinstance(v, (tuple, list)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, np.ndarray):
            total += v.nbytes
        elif hasattr(v, "element_size"):  # torch tensor
            total += v.element_size() * v.numel()
        elif isinstance(v, scipy.sparse.csr_matrix | scipy.sparse.csc_matrix):
            total += v.data.nbytes + v.indices.nbytes + v.indptr.nbytes
    return total


def _declared_rows(run: FeatureRun) -> int | None:
    """N from run.json (n_rows, else the length of row_ids), None when the run does not say."""
    if run.info.get("n_rows") is not None:
        return int(run.info["n_rows"])
    return len(run.row_ids) if run.row_ids is not None else None


def _select_layers(run: FeatureRun, wanted: Sequence[int] | None) -> list[int]:
    """The requested layers in the run's order (shallowest first), or all of them."""
    if not wanted:
        return run.layers
    missing = [l for l in wanted if l not in run.layers]
    if missing:
        raise InputError(f"run '{run.name}' has no layer {missing[0]}; it has {run.layers}")
    return [l for l in run.layers if l in set(wanted)]


def _scale(n_rows: int, original_scaling: bool) -> float:
    """1, or (N-1)/N to reproduce the original code (unbiased std, product divided by N)."""
    return (n_rows - 1) / n_rows if original_scaling else 1.0


def weighted_mean(rho: np.ndarray, weights: np.ndarray, where: str = "layer") -> float:
    """sum_i w_i rho_i / sum_i w_i; an InputError when the weights sum to zero (no activation)."""
    total = float(np.sum(weights))
    if total == 0.0:
        raise InputError(f"{where} has no activation mass (every feature sums to 0); wMPPC is undefined")
    return float(np.dot(weights, rho) / total)


# ------------------------------------------------------------------------------------------------
# wMPPC


@dataclass
class NullBaseline:
    """wMPPC of the source against row-permuted targets: the score expected with no shared concept."""

    k: int
    seed: int
    all_layers: list[float]
    last_layer: list[float]

    @staticmethod
    def _std(v: list[float]) -> float:
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "seed": self.seed,
            "all_layers_mean": float(np.mean(self.all_layers)),
            "all_layers_std": self._std(self.all_layers),
            "last_layer_mean": float(np.mean(self.last_layer)),
            "last_layer_std": self._std(self.last_layer),
            "all_layers": self.all_layers,
            "last_layer": self.last_layer,
        }


@dataclass
class WMPPCResult:
    """wMPPC and MPPC of a source run against a target run (directional: A->B != B->A)."""

    source: str
    target: str
    source_layers: list[int]
    target_layers: list[int]
    n_samples: int
    matrix: np.ndarray  # [L_A, L_B] wMPPC(a->b)
    mppc_matrix: np.ndarray  # [L_A, L_B] MPPC(a->b)
    layer_scores: np.ndarray  # [L_A] wMPPC_a against every target layer
    layer_mppc: np.ndarray  # [L_A] MPPC_a against every target layer
    source_features: list[int]  # d_a of each source layer
    dead_source_features: list[int]  # per source layer
    dead_target_features: list[int]  # per target layer
    original_scaling: bool = False
    codes: dict[str, str] = field(default_factory=dict)  # run name -> record_codes
    rho_all_layers: list[np.ndarray] = field(default_factory=list, repr=False)  # [L_A] of [d_a]
    null: NullBaseline | None = None
    # the best match over every target layer of each source feature ([L_A] of [d_a]; rho: rho_all_layers)
    best_feature: list[np.ndarray] = field(default_factory=list, repr=False)  # target feature, -1 for dead
    best_layer: list[np.ndarray] = field(default_factory=list, repr=False)  # target layer holding it
    different_data: str | None = None  # set when compared with --allow_different_data

    @property
    def all_layers(self) -> float:
        return float(np.dot(self.source_features, self.layer_scores) / np.sum(self.source_features))

    @property
    def mppc_all_layers(self) -> float:
        return float(np.dot(self.source_features, self.layer_mppc) / np.sum(self.source_features))

    @property
    def last_layer(self) -> float:
        return float(self.matrix[-1, -1])

    @property
    def mppc_last_layer(self) -> float:
        return float(self.mppc_matrix[-1, -1])

    def to_json(self) -> dict[str, Any]:
        out = {
            "source": self.source,
            "target": self.target,
            "all_layers": self.all_layers,
            "last_layer": self.last_layer,
            "source_layers": self.source_layers,
            "target_layers": self.target_layers,
            "matrix": self.matrix.tolist(),
            "mppc_all_layers": self.mppc_all_layers,
            "mppc_last_layer": self.mppc_last_layer,
            "n_samples": self.n_samples,
            "dead_source_features": self.dead_source_features,
            "dead_target_features": self.dead_target_features,
            "source_features": self.source_features,
            "layer_scores": self.layer_scores.tolist(),
            "mppc_matrix": self.mppc_matrix.tolist(),
            "original_scaling": self.original_scaling,
            "record_codes": self.codes,
        }
        if self.null is not None:
            out["null"] = self.null.to_json()
        if self.different_data:
            out["allow_different_data"] = self.different_data
        return out


def wmppc(
    source: FeatureRun,
    target: FeatureRun,
    *,
    source_layers: Sequence[int] | None = None,
    target_layers: Sequence[int] | None = None,
    engine: NumpyEngine | None = None,
    original_scaling: bool = False,
    null: int = 0,
    seed: int = 0,
    progress: bool = False,
    loader: LayerLoader | None = None,
    allow_different_data: bool = False,
) -> WMPPCResult:
    """wMPPC(source -> target) over the chosen layers (all by default), plus a row-permutation null.

    Every target layer is read once and kept prepared; each source layer is read once and compared
    with all of them. With `null=K`, each source layer is also compared with the targets under K
    seeded random row permutations (applied to the source rows, which is equivalent).
    """
    if null < 0:
        raise InputError(f"--null must be >= 0, not {null}")
    engine = engine or make_engine()
    loader = loader or LayerLoader(engine)
    different = check_same_rows([source, target], allow_different_data)
    src_layers = _select_layers(source, source_layers)
    tgt_layers = _select_layers(target, target_layers)
    perms: list[np.ndarray] = []
    bar = _progress(len(src_layers) * len(tgt_layers) * (1 + null), f"wMPPC {source.name}->{target.name}", progress)
    with bar:
        targets = [loader.load(target, b) for b in tgt_layers]
        n = loader.n_rows
        assert n is not None
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(n) for _ in range(null)]
        scale = _scale(n, original_scaling)
        same_run = source.path.resolve() == target.path.resolve()
        L_A, L_B = len(src_layers), len(tgt_layers)
        matrix, mppc_matrix = np.zeros((L_A, L_B)), np.zeros((L_A, L_B))
        layer_scores, layer_mppc = np.zeros(L_A), np.zeros(L_A)
        null_scores = np.zeros((null, L_A))
        null_last = np.zeros(null)
        d_src, dead_src, rho_all, feat_all, layer_all = [], [], [], [], []
        mine = {}  # this rank's source layers' results (all of them on one process)
        for ia, a in enumerate(src_layers):
            if ia % distributed.world_size() != distributed.rank():  # torchrun: source layers split over ranks
                continue
            src = targets[tgt_layers.index(a)] if same_run and a in tgt_layers else loader.load(source, a)
            weights = src.stats.sums
            where = f"run '{source.name}' layer {a}"
            rhos = np.zeros((L_B, src.d))
            bests = np.zeros((L_B, src.d), dtype=np.int64)
            for ib, tgt in enumerate(targets):
                m = engine.best_match(src, tgt)
                rhos[ib], bests[ib] = m.rho * scale, m.best
                matrix[ia, ib] = weighted_mean(rhos[ib], weights, where)
                mppc_matrix[ia, ib] = float(rhos[ib].mean())
                _release(targets, ib, loader.keep_bytes)
                bar.update()
            best = rhos.max(axis=0)
            layer_scores[ia] = weighted_mean(best, weights, where)
            layer_mppc[ia] = float(best.mean())
            ib_best = rhos.argmax(axis=0)  # first (shallowest) target layer among ties
            mine[ia] = {
                "d": src.d,
                "dead": src.stats.n_dead,
                "rho": best,
                "feature": bests[ib_best, np.arange(src.d)],  # -1 for dead: best_match gives -1 in every layer
                "layer": np.asarray(tgt_layers, dtype=np.int64)[ib_best],
            }
            for ip, perm in enumerate(perms):
                shuffled = src.permuted(perm)
                null_rhos = np.stack([engine.best_match(shuffled, tgt).rho * scale for tgt in targets])
                bar.update(L_B)
                null_scores[ip, ia] = weighted_mean(null_rhos.max(axis=0), weights, where)
                if ia == L_A - 1:
                    null_last[ip] = weighted_mean(null_rhos[-1], weights, where)
            mine[ia].update(row=matrix[ia], mppc_row=mppc_matrix[ia], score=layer_scores[ia], mppc=layer_mppc[ia])
            mine[ia].update(null=null_scores[:, ia], null_last=null_last if ia == L_A - 1 else None)
            del src
        for part in distributed.all_gather_object(mine):  # every rank gets every source layer's results
            for ia, r in part.items():
                matrix[ia], mppc_matrix[ia], layer_scores[ia], layer_mppc[ia] = (
                    r["row"],
                    r["mppc_row"],
                    r["score"],
                    r["mppc"],
                )
                null_scores[:, ia] = r["null"]
                if r["null_last"] is not None:
                    null_last[:] = r["null_last"]
                mine[ia] = r
        for ia in range(L_A):
            r = mine[ia]
            d_src.append(r["d"])
            dead_src.append(r["dead"])
            rho_all.append(r["rho"])
            feat_all.append(r["feature"])
            layer_all.append(r["layer"])
    result = WMPPCResult(
        source=source.name,
        target=target.name,
        source_layers=src_layers,
        target_layers=tgt_layers,
        n_samples=n,
        matrix=matrix,
        mppc_matrix=mppc_matrix,
        layer_scores=layer_scores,
        layer_mppc=layer_mppc,
        source_features=d_src,
        dead_source_features=dead_src,
        dead_target_features=[t.stats.n_dead for t in targets],
        original_scaling=original_scaling,
        codes=codes_of([source, target]),
        rho_all_layers=rho_all,
        best_feature=feat_all,
        best_layer=layer_all,
        different_data=different,
    )
    if null:
        result.null = NullBaseline(
            null, seed, [float(np.dot(d_src, s) / np.sum(d_src)) for s in null_scores], null_last.tolist()
        )
    return result


def format_wmppc(result: WMPPCResult) -> str:
    """The original's two lines (only the second contains `All Layers :`), MPPC, the null baseline, then the
    per-layer matrix (rows: source layers, columns: target)."""
    lines = [
        f"wMPPC : {result.source} -> {result.target}",
        f"All Layers : {result.all_layers:.6f} | Last layer : {result.last_layer:.6f}",
        f"MPPC (unweighted): all layers {result.mppc_all_layers:.6f} | last layer {result.mppc_last_layer:.6f}",
    ]
    if result.null is not None:
        nj = result.null.to_json()
        lines.append(
            f"Null wMPPC ({result.null.k} row permutations of the target): "
            f"all layers {nj['all_layers_mean']:.6f} +- {nj['all_layers_std']:.6f} | "
            f"last layer {nj['last_layer_mean']:.6f} +- {nj['last_layer_std']:.6f}"
        )
    lines.append(
        f"N = {result.n_samples} rows; dead source features per layer: {result.dead_source_features}"
        + (" (correlations scaled by (N-1)/N as in the original)" if result.original_scaling else "")
    )
    lines += codes_lines(result.codes)
    if result.different_data:
        lines.append(f"WARNING --allow_different_data: {result.different_data}")
    lines.append("")
    lines.append(f"wMPPC per layer pair (rows: {result.source} layers, columns: {result.target} layers)")
    width = 8
    lines.append("src\\tgt " + "".join(f"{b:>{width}}" for b in result.target_layers) + f"{'all':>{width}}")
    for ia, a in enumerate(result.source_layers):
        cells = "".join(f"{v:>{width}.4f}" for v in result.matrix[ia])
        lines.append(f"{a:>7} " + cells + f"{result.layer_scores[ia]:>{width}.4f}")
    return "\n".join(lines)


def plot_matrix(result: WMPPCResult, path: str | Path, *, vmin: float | None = 0.0, vmax: float | None = 1.0) -> None:
    """Save the per-layer wMPPC matrix as a heatmap (PNG or any format matplotlib infers from `path`).

    The colour scale is fixed to [vmin, vmax] = [0, 1] by default so heatmaps of different pairs compare;
    vmin = vmax = None fits it to this matrix.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L_A, L_B = result.matrix.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * L_B + 2), max(3.5, 0.45 * L_A + 1.5)))
    im = ax.imshow(result.matrix, cmap="viridis", aspect="auto", origin="upper", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(L_B), [str(b) for b in result.target_layers])
    ax.set_yticks(range(L_A), [str(a) for a in result.source_layers])
    ax.set_xlabel(f"{result.target} layer")
    ax.set_ylabel(f"{result.source} layer")
    ax.set_title(
        f"wMPPC {result.source} -> {result.target}\n"
        f"all layers {result.all_layers:.3f}, last layer {result.last_layer:.3f}"
    )
    if L_A * L_B <= 144:
        lo, hi = im.get_clim()
        for ia in range(L_A):
            for ib in range(L_B):
                v = result.matrix[ia, ib]
                color = "k" if hi > lo and v > (lo + hi) / 2 else "w"
                ax.text(ib, ia, f"{v:.2f}", ha="center", va="center", fontsize=8, color=color)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("wMPPC")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=150)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot write plot {path}: {e}") from None
    finally:
        plt.close(fig)


def _comparisons_dir(run: FeatureRun) -> tuple[Path | None, str]:
    """The run's comparisons/ folder, or None and why results cannot be saved there."""
    from sae.analysis.comparison_files import COMPARISONS

    if run.format != FORMAT or not (run.path / "run.json").exists():
        return None, (
            f"run '{run.name}' is in the {run.format} format (no run.json); "
            "comparison results are saved only next to runs recorded by this toolkit"
        )
    return run.path / COMPARISONS, ""


def save_wmppc(result: WMPPCResult, source: FeatureRun) -> tuple[list[Path], str]:
    """Save, in the source run's comparisons/ folder, for the feature browser (sae/analysis/comparison_files.py):

    L{a:02d}__{target}__wmppc.json   per source layer a, every feature's best match over all target layers
                                     (best-matches-v1: target feature, -1 for dead; its layer; rho)
    wmppc__{target}.json             the full result (`result.to_json()`)

    Returns the paths written and, when nothing could be written, why.
    """
    from sae.analysis.comparison_files import save_best_matches
    from sae.util.atomic import write_json

    folder, why = _comparisons_dir(source)
    if folder is None:
        return [], why
    paths = []
    for ia, a in enumerate(result.source_layers):
        paths.append(
            save_best_matches(
                source.path,
                source=result.source,
                source_layer=a,
                target=result.target,
                target_layers=result.target_layers,
                feature=result.best_feature[ia],
                layer=result.best_layer[ia],
                rho=result.rho_all_layers[ia],
                method="wmppc",
                n_samples=result.n_samples,
            )
        )
    full = folder / f"wmppc__{result.target}.json"
    write_json(full, result.to_json())
    return [*paths, full], ""


def save_and_say(save: Callable[[Any, FeatureRun], tuple[list[Path], str]], result: Any, source: FeatureRun) -> str:
    """`saved_message` of `save(result, source)`; a folder that cannot be written (read-only, full) is a
    warning line, printed after the result, not an error."""
    try:
        return saved_message(*save(result, source))
    except OSError as e:
        return f"warning: comparison results not saved: {e.filename or source.path}: {e.strerror or e}"


def saved_message(paths: Sequence[Path], why: str) -> str:
    """One line: where comparison results were saved, or why not."""
    if not paths:
        return f"comparison results not saved: {why}"
    return f"comparison results saved in {paths[0].parent} ({len(paths)} files: {', '.join(p.name for p in paths)})"


# ------------------------------------------------------------------------------------------------
# Comparative sharedness


@dataclass
class ModelMatch:
    """Best match of each source feature in one compared run (over its chosen layers)."""

    run: str
    layers: list[int]
    rho: np.ndarray  # float64 [d]
    feature: np.ndarray  # int64 [d]; -1 for dead source features
    layer: np.ndarray  # int64 [d]; the layer holding that feature


@dataclass
class SharednessResult:
    """Delta_i = S_i ((rho_iG^+)^2 - (rho_iH^+)^2) for every feature i of the source layer, and the top ones."""

    source: str
    layer: int
    n_samples: int
    min_group: list[str]
    max_group: list[str]
    weight: np.ndarray  # S [d]
    rho_min_group: np.ndarray  # [d] min over G
    rho_max_group: np.ndarray  # [d] max over H
    delta: np.ndarray  # [d]
    matches: dict[str, ModelMatch]
    selected: np.ndarray  # feature indices, Delta descending
    top: float
    dead_features: int
    original_scaling: bool = False
    codes: dict[str, str] = field(default_factory=dict)  # run name -> record_codes
    different_data: str | None = None  # set when compared with --allow_different_data

    def feature_rows(self) -> list[dict[str, Any]]:
        rows = []
        for i in self.selected:
            i = int(i)
            rows.append(
                {
                    "index": i,
                    "delta": float(self.delta[i]),
                    "weight": float(self.weight[i]),
                    "rho_min_group": float(self.rho_min_group[i]),
                    "rho_max_group": float(self.rho_max_group[i]),
                    "best_match": {
                        run: {"layer": int(m.layer[i]), "feature": int(m.feature[i]), "rho": float(m.rho[i])}
                        for run, m in self.matches.items()
                    },
                }
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "layer": self.layer,
            "n_samples": self.n_samples,
            "min_group": self.min_group,
            "max_group": self.max_group,
            "compared_layers": {run: m.layers for run, m in self.matches.items()},
            "top": self.top,
            "n_features": len(self.delta),
            "n_selected": len(self.selected),
            "dead_features": self.dead_features,
            "original_scaling": self.original_scaling,
            "record_codes": self.codes,
            **({"allow_different_data": self.different_data} if self.different_data else {}),
            "features": self.feature_rows(),
        }


def _parse_target_layer(spec: str | int) -> str | int:
    if isinstance(spec, int) or spec in ("last", "all"):
        return spec
    try:
        return int(spec)
    except ValueError:
        raise InputError(f"--target_layer must be 'last', 'all' or a layer index, not '{spec}'") from None


def _compared_layers(run: FeatureRun, spec: str | int) -> list[int]:
    if spec == "last":
        return [run.layers[-1]]
    if spec == "all":
        return run.layers
    return _select_layers(run, [int(spec)])


def comparative_sharedness(
    source: FeatureRun,
    min_group: Sequence[FeatureRun],
    max_group: Sequence[FeatureRun],
    *,
    layer: int | None = None,
    target_layer: str | int = "last",
    top: float = 0.01,
    engine: NumpyEngine | None = None,
    original_scaling: bool = False,
    progress: bool = False,
    loader: LayerLoader | None = None,
    allow_different_data: bool = False,
) -> SharednessResult:
    """Generalized comparative sharedness of the source's features (deepest layer by default).

    rho_i(M->g) is the best match of feature i in run g's deepest layer (`target_layer`: 'last', an
    index, or 'all' for the best over every layer). rho_G is the minimum over the min group (shared
    with every model of G), rho_H the maximum over the max group (shared with some model of H), and
    Delta = S ((rho_G^+)^2 - (rho_H^+)^2) (`sharedness_delta`); the raw rho_G and rho_H are kept.
    The top `top` fraction of features by Delta (at least one) is selected among the live ones only.
    """
    if not min_group:
        raise InputError("the min group is empty: give at least one run to --min_group (G)")
    if not max_group:
        raise InputError("the max group is empty: give at least one run to --max_group (H)")
    both = {r.name for r in min_group} & {r.name for r in max_group}
    if both:
        raise InputError(f"run '{sorted(both)[0]}' is in both --min_group and --max_group")
    if not 0 < top <= 1:
        raise InputError(f"--top is a fraction of the features in (0, 1], not {top}")
    spec = _parse_target_layer(target_layer)
    engine = engine or make_engine()
    loader = loader or LayerLoader(engine)
    runs = {r.name: r for r in [*min_group, *max_group]}
    different = check_same_rows([source, *runs.values()], allow_different_data)
    src_layer = _select_layers(source, [layer])[0] if layer is not None else source.layers[-1]
    plan = {name: _compared_layers(run, spec) for name, run in runs.items()}
    bar = _progress(sum(len(v) for v in plan.values()), f"sharedness {source.name}", progress)
    with bar:
        src = loader.load(source, src_layer)
        scale = _scale(src.n_rows, original_scaling)
        jobs = [(name, b) for name, layers in plan.items() for b in layers]
        done: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        for i, (name, b) in enumerate(jobs):
            if i % distributed.world_size() != distributed.rank():  # torchrun: the pairs split over ranks
                continue
            same = runs[name].path.resolve() == source.path.resolve() and b == src_layer
            m = engine.best_match(src, src if same else loader.load(runs[name], b))
            done[(name, b)] = (m.rho * scale, m.best)
            bar.update()
        for part in distributed.all_gather_object(done):
            done.update(part)
        matches: dict[str, ModelMatch] = {}
        for name, layers in plan.items():
            rho = np.full(src.d, -np.inf)
            feature = np.full(src.d, -1, dtype=np.int64)
            where = np.full(src.d, layers[0], dtype=np.int64)
            for b in layers:
                r, best = done[(name, b)]
                better = r > rho
                rho[better], feature[better], where[better] = r[better], best[better], b
            matches[name] = ModelMatch(name, layers, rho, feature, where)
    weight = src.stats.sums
    rho_g = np.min([matches[r.name].rho for r in min_group], axis=0)
    rho_h = np.max([matches[r.name].rho for r in max_group], axis=0)
    delta = sharedness_delta(weight, rho_g, rho_h)
    n_top = max(1, int(math.floor(top * src.d + 1e-9)))
    live = np.flatnonzero(~src.stats.dead)  # a dead feature (Delta = 0) never makes the list
    order = live[np.lexsort((live, -delta[live]))][:n_top]
    return SharednessResult(
        source=source.name,
        layer=src_layer,
        n_samples=src.n_rows,
        min_group=[r.name for r in min_group],
        max_group=[r.name for r in max_group],
        weight=weight,
        rho_min_group=rho_g,
        rho_max_group=rho_h,
        delta=delta,
        matches=matches,
        selected=order,
        top=top,
        dead_features=src.stats.n_dead,
        original_scaling=original_scaling,
        codes=codes_of([source, *runs.values()]),
        different_data=different,
    )


def sharedness_delta(weight: np.ndarray, rho_g: np.ndarray, rho_h: np.ndarray) -> np.ndarray:
    """Delta = S ((rho_G^+)^2 - (rho_H^+)^2) [d] with rho^+ = max(rho, 0): a best match that anti-correlates
    is no match (squaring a negative rho_G would reward it)."""
    return weight * (np.maximum(rho_g, 0.0) ** 2 - np.maximum(rho_h, 0.0) ** 2)


def _table_columns(result: SharednessResult) -> list[str]:
    return ["rank", "index", "delta", "S", "rho_G", "rho_H", *[f"best:{run}" for run in result.matches]]


def _table_rows(result: SharednessResult) -> list[list[str]]:
    show_layer = any(len(m.layers) > 1 for m in result.matches.values())
    rows = []
    for rank, feat in enumerate(result.feature_rows(), 1):
        best = []
        for b in feat["best_match"].values():
            where = f"L{b['layer']}:" if show_layer else ""
            best.append(f"{where}{b['feature']} ({b['rho']:.3f})")
        rows.append(
            [
                str(rank),
                str(feat["index"]),
                f"{feat['delta']:.6g}",
                f"{feat['weight']:.6g}",
                f"{feat['rho_min_group']:.4f}",
                f"{feat['rho_max_group']:.4f}",
                *best,
            ]
        )
    return rows


def format_sharedness(result: SharednessResult) -> str:
    """A header, then one line per selected feature: index, Delta, S, rho_G, rho_H, best matches."""
    head = (
        f"Comparative sharedness of {result.source} (layer {result.layer}, N={result.n_samples}): "
        f"G = {' '.join(result.min_group)} (min), H = {' '.join(result.max_group)} (max)\n"
        f"top {len(result.selected)} of {len(result.delta)} features by Delta = S (rho_G+^2 - rho_H+^2), "
        f"rho+ = max(rho, 0); {result.dead_features} dead; best match shown as feature (rho) in each run's layer "
        + ", ".join(f"{run}:{m.layers if len(m.layers) > 1 else m.layers[0]}" for run, m in result.matches.items())
    )
    head += "\n" + "\n".join(codes_lines(result.codes))
    if result.different_data:
        head += f"\nWARNING --allow_different_data: {result.different_data}"
    cols = _table_columns(result)
    rows = _table_rows(result)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(v.rjust(w) for v, w in zip(r, widths))  # noqa: E731
    return "\n".join([head, "", fmt(cols), *(fmt(r) for r in rows)])


def write_sharedness_csv(result: SharednessResult, path: str | Path) -> None:
    """One row per selected feature, Delta descending: the table's values plus layer of each match."""
    header = ["rank", "index", "delta", "weight", "rho_min_group", "rho_max_group"]
    for run in result.matches:
        header += [f"best_feature_{run}", f"best_layer_{run}", f"rho_{run}"]
    try:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for rank, feat in enumerate(result.feature_rows(), 1):
                row = [
                    rank,
                    feat["index"],
                    repr(feat["delta"]),
                    repr(feat["weight"]),
                    repr(feat["rho_min_group"]),
                    repr(feat["rho_max_group"]),
                ]
                for b in feat["best_match"].values():
                    row += [b["feature"], b["layer"], repr(b["rho"])]
                w.writerow(row)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e}") from None


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2)


def save_sharedness(result: SharednessResult, source: FeatureRun) -> tuple[list[Path], str]:
    """Save, in the source run's comparisons/ folder, for the feature browser (sae/analysis/comparison_files.py):

    L{layer:02d}__{run}__comp_sharedness.json   per compared run (G and H), the best match of every feature
                                                of the source layer (best-matches-v1)
    sharedness_L{layer:02d}.json                the full result (`result.to_json()`: Delta of the selected)

    Returns the paths written and, when nothing could be written, why.
    """
    from sae.analysis.comparison_files import save_best_matches
    from sae.util.atomic import write_json

    folder, why = _comparisons_dir(source)
    if folder is None:
        return [], why
    paths = []
    for name, m in result.matches.items():
        paths.append(
            save_best_matches(
                source.path,
                source=result.source,
                source_layer=result.layer,
                target=name,
                target_layers=m.layers,
                feature=m.feature,
                layer=m.layer,
                rho=m.rho,
                method="comp_sharedness",
                n_samples=result.n_samples,
            )
        )
    full = folder / f"sharedness_L{result.layer:02d}.json"
    write_json(full, result.to_json())
    return [*paths, full], ""
