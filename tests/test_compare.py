"""wMPPC, comparative sharedness and their exact sparse correlations, against float64 numpy references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sae.analysis.compare import LayerLoader, comparative_sharedness, wmppc
from sae.analysis.correlation import DEAD_RANGE, Budget, NumpyEngine, TorchEngine, column_stats
from sae.data.features import SparseCodes, open_run, write_layer, write_run_info
from sae.util.errors import InputError

# ------------------------------------------------------------------------------------------------
# helpers: data, runs on disk, float64 references


def sparse_matrix(rng, n: int, d: int, density: float = 0.08) -> np.ndarray:
    """Non-negative [n, d] float32 with a per-feature density around `density`."""
    dens = rng.uniform(0.3, 1.7, d) * density
    x = rng.gamma(2.0, 1.0, (n, d)).astype(np.float32)
    x[rng.random((n, d)) > dens] = 0
    return x


def write_run(root: Path, name: str, layers: dict[int, np.ndarray], row_ids=None) -> Path:
    n = next(iter(layers.values())).shape[0]
    for layer, x in layers.items():
        write_layer(root / name, layer, SparseCodes.from_dense(x))
    write_run_info(
        root / name,
        {
            "name": name,
            "n_rows": n,
            "layers": sorted(layers),
            "row_ids": list(range(n)) if row_ids is None else list(row_ids),
        },
    )
    return root / name


def write_original(root: Path, name: str, layers: dict[int, np.ndarray]) -> Path:
    """The original repo's format: dense fp16 `layerNN.pt` / `layer-1.pt` tensors."""
    (root / name).mkdir(parents=True)
    for layer, x in layers.items():
        torch.save(torch.from_numpy(x).half(), root / name / f"layer{layer:02d}.pt")
    return root / name


def ref_dead(x: np.ndarray) -> np.ndarray:
    """The dead rule, literally: max - min <= 2^-20 max |x| over the rows."""
    x = x.astype(np.float64)
    return x.max(0) - x.min(0) <= 2.0**-20 * np.abs(x).max(0)


def ref_corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact Pearson [d_x, d_y] in float64, two-pass; a dead column correlates 0."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    sx, sy = np.sqrt((xc**2).sum(0)), np.sqrt((yc**2).sum(0))
    dead_x, dead_y = ref_dead(x), ref_dead(y)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (xc.T @ yc) / np.outer(sx, sy)
    c[dead_x] = 0
    c[:, dead_y] = 0
    return c


def ref_wmppc(a_layers: list[np.ndarray], b_layers: list[np.ndarray]) -> dict:
    """The issue's definitions, literally."""
    matrix = np.zeros((len(a_layers), len(b_layers)))
    mppc = np.zeros_like(matrix)
    per_layer, per_layer_mppc = [], []
    for ia, x in enumerate(a_layers):
        s = x.astype(np.float64).sum(0)
        rhos = [ref_corr(x, y).max(1) for y in b_layers]
        for ib, r in enumerate(rhos):
            matrix[ia, ib] = (s * r).sum() / s.sum()
            mppc[ia, ib] = r.mean()
        best = np.max(rhos, axis=0)
        per_layer.append((s * best).sum() / s.sum())
        per_layer_mppc.append(best.mean())
    d = np.array([x.shape[1] for x in a_layers])
    return {
        "matrix": matrix,
        "mppc_matrix": mppc,
        "all": (d * per_layer).sum() / d.sum(),
        "mppc_all": (d * per_layer_mppc).sum() / d.sum(),
        "last": matrix[-1, -1],
    }


def original_rho(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The original code's all_correlations (unbiased std + 1e-10, product / N), in float64."""
    tx, ty = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(y.astype(np.float64))
    n = tx.shape[0]
    xb = (tx - tx.mean(0)) / (tx.std(0) + 1e-10)
    yb = (ty - ty.mean(0)) / (ty.std(0) + 1e-10)
    return ((xb.T @ yb) / n).max(1).values.numpy()


# tiny budgets: several blocks, super-blocks and row chunks even on small data
SMALL_DENSE = Budget(dense_acc_entries=200, dense_row_entries=300, dense_min=1)
ENGINES = {
    "numpy-sparse": lambda: NumpyEngine("sparse"),
    "numpy-sparse-ragged": lambda: NumpyEngine("sparse", Budget(block_entries=64, pair_chunk=37, pad_waste=0)),
    "numpy-sparse-padded": lambda: NumpyEngine("sparse", Budget(block_entries=64, pair_chunk=37, pad_waste=1e9)),
    "numpy-dense": lambda: NumpyEngine("dense", SMALL_DENSE, dense_dtype="float64"),
    "numpy-dense-f32": lambda: NumpyEngine("dense", SMALL_DENSE),
    "numpy-dense-f32-1chunk": lambda: NumpyEngine("dense"),
    "torch-sparse": lambda: TorchEngine("cpu", "sparse", Budget(block_entries=64, pair_chunk=37)),
    "torch-dense": lambda: TorchEngine(
        "cpu", "dense", Budget(dense_acc_entries=600, dense_row_entries=500, dense_min=1)
    ),
}
# float64 dense products; the default float32 ones find the argmax, then its correlation is redone in
# float64, so both are exact to 1e-12 (up to near-ties, which random data does not have)
exact_engine = lambda: NumpyEngine(dense_dtype="float64")  # noqa: E731
TOL = 1e-12


# ------------------------------------------------------------------------------------------------
# exact correlations


@pytest.mark.parametrize("engine", ENGINES)
def test_best_match_is_exact_including_dead_constant_and_negative(engine):
    rng = np.random.default_rng(0)
    n = 240
    x = sparse_matrix(rng, n, 37)
    y = sparse_matrix(rng, n, 29, density=0.15)
    x[:, 0] = 0  # dead (never active)
    x[:, 1] = 2.5  # dead (constant, active everywhere)
    y[:, 2] = 0  # dead target: offers correlation 0 to everyone
    y[:, 3] = 1.75  # constant target: dead too
    x[:, 4] = 0
    x[7, 4] = 3.0  # rare feature: one row
    eng = ENGINES[engine]()
    alive = np.arange(37) >= 2
    fp16 = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731
    for data in (SparseCodes.from_dense, fp16, np.asarray):  # CSR codes, then dense arrays
        m = eng.best_match(eng.prepare(data(x)), eng.prepare(data(y)))
        c = ref_corr(fp16(x), fp16(y)) if data is fp16 else ref_corr(x, y)
        expected = c.max(1)
        np.testing.assert_allclose(m.rho, expected, rtol=0, atol=TOL)
        np.testing.assert_allclose(c[alive, m.best[alive]], expected[alive], rtol=0, atol=TOL)
        assert m.rho[0] == m.rho[1] == 0 and m.best[0] == m.best[1] == -1


@pytest.mark.parametrize("engine", ENGINES)
def test_nearly_constant_features_are_exact(engine):
    """x = c + rel * u: the float64 G - s s / n formula loses (mean / sd)^2 * eps; shifted columns do not."""
    rng = np.random.default_rng(11)
    n = 20000
    xs, ys = [], []
    for rel in (1e-3, 1e-4, 1e-5, 5e-6):
        u = rng.random(n)
        xs.append(1.0 + rel * u)
        ys.append(2.0 + 2 * rel * (u + 0.3 * rng.random(n)))  # correlated with x at ~0.96
    xs.append(rng.gamma(2.0, 1.0, n) * (rng.random(n) < 0.05))  # an ordinary sparse feature
    ys.append(xs[-1] * (rng.random(n) < 0.8))
    x, y = np.stack(xs, 1).astype(np.float32), np.stack(ys, 1).astype(np.float32)
    eng = TorchEngine("cpu", "sparse") if engine == "torch-sparse" else ENGINES[engine]()  # (tiny chunks: slow)
    px, py = eng.prepare(SparseCodes.from_dense(x)), eng.prepare(SparseCodes.from_dense(y))
    assert px.stats.shifted.tolist() == [True] * 4 + [False] and not px.stats.dead.any()
    tol = 1e-9
    m = eng.best_match(px, py)
    c = ref_corr(x, y)  # float64 two-pass
    np.testing.assert_allclose(m.rho, c.max(1), rtol=0, atol=tol)
    assert m.best.tolist() == c.argmax(1).tolist() == [0, 1, 2, 3, 4]
    same = eng.best_match(px, px)  # a feature against itself: exactly 1, never above
    assert np.all(np.abs(same.rho - 1.0) <= tol) and np.all(same.rho <= 1.0)
    assert same.best.tolist() == [0, 1, 2, 3, 4]
    dense = eng.prepare(x)  # the same from a dense array
    np.testing.assert_allclose(eng.best_match(dense, eng.prepare(y)).rho, c.max(1), rtol=0, atol=tol)
    assert np.all(np.abs(eng.best_match(dense, dense).rho - 1.0) <= tol)


@pytest.mark.parametrize(
    "engine", ["numpy-sparse", "numpy-sparse-ragged", "numpy-dense", "numpy-dense-f32", "torch-sparse", "torch-dense"]
)
def test_feature_that_cooccurs_with_nothing_has_its_negative_max(engine):
    n = 30
    x = np.zeros((n, 3), dtype=np.float32)
    x[:5, 0] = [1, 2, 3, 1, 2]  # rows 0-4 only
    x[5:, 1] = np.linspace(1, 2, n - 5)
    x[::2, 2] = 1.0
    y = np.zeros((n, 4), dtype=np.float32)  # every target alive, none active on rows 0-4
    y[5:15, 0] = 1
    y[10:30, 1] = np.linspace(1, 3, 20)
    y[20:, 2] = 2
    y[6::3, 3] = 1
    eng = ENGINES[engine]()
    m = eng.best_match(eng.prepare(SparseCodes.from_dense(x)), eng.prepare(SparseCodes.from_dense(y)))
    expected = ref_corr(x, y).max(1)
    assert m.rho[0] < 0 and expected[0] < 0
    np.testing.assert_allclose(m.rho, expected, rtol=0, atol=TOL)
    assert m.best[0] == ref_corr(x, y)[0].argmax()


def test_column_stats_exact_and_dead_rule():
    rng = np.random.default_rng(1)
    n = 400
    x = sparse_matrix(rng, n, 12)
    x[:, 0] = 0
    x[:, 1] = 0.1  # constant: its float64 mean is not exactly 0.1, still dead
    x[:, 2] = 1000.0
    x[3, 2] = 1000.5  # nearly constant but real: alive
    x[:, 3] = np.float16(0.1)  # an fp16-rounded constant: dead
    x[:, 4] = np.float32(3.7) * (1 + rng.integers(0, 4, n) * 2.0**-23)  # float32 round-off noise: dead
    x[:, 5] = 1.0
    x[7, 5] = 1.0 + 1e-5  # varies on one row only (sd / rms = 5e-7): alive, and exact below
    x[:, 6] = 2.0 + 1e-4 * rng.random(n)  # nearly constant: alive, shifted
    x[:, 7] = 5.0
    x[::50, 7] = 0  # active on 98% of the rows, kappa = 50: shifted
    for data in (SparseCodes.from_dense(x), x, x.astype(np.float64)):
        st = column_stats(data)
        x64 = x.astype(np.float64)
        np.testing.assert_allclose(st.sums, x64.sum(0), rtol=1e-14)
        alive = ~st.dead  # (a dead column's css is not used)
        np.testing.assert_allclose(st.css[alive], ((x64 - x64.mean(0)) ** 2).sum(0)[alive], rtol=1e-12)
        assert st.dead.tolist() == [True, True, False, True, True] + [False] * 7
        assert st.dead.tolist() == ref_dead(x).tolist()
        assert st.shifted.tolist() == [False] * 2 + [True] + [False] * 2 + [True] * 3 + [False] * 4
        np.testing.assert_array_equal(st.center[st.shifted], x64.mean(0)[st.shifted].astype(np.float32))
        np.testing.assert_allclose(st.csums, (x64 - st.center).sum(0), rtol=1e-12)
    assert DEAD_RANGE == 2.0**-20


def test_original_scaling_reproduces_the_original_formula():
    rng = np.random.default_rng(2)
    x, y = sparse_matrix(rng, 150, 20), sparse_matrix(rng, 150, 25)
    x[:, 3] = 0
    for eng in (exact_engine(), NumpyEngine()):  # the default: float32 dense products
        m = eng.best_match(eng.prepare(SparseCodes.from_dense(x)), eng.prepare(SparseCodes.from_dense(y)))
        np.testing.assert_allclose(m.rho * 149 / 150, original_rho(x, y), rtol=0, atol=1e-9)
        # exact Pearson and the original differ by (N-1)/N, not more
        np.testing.assert_allclose(m.rho, ref_corr(x, y).max(1), atol=TOL)


# ------------------------------------------------------------------------------------------------
# wMPPC


def test_wmppc_matches_reference_and_orders_layers_by_index(tmp_path):
    rng = np.random.default_rng(3)
    n = 200
    a = {3: sparse_matrix(rng, n, 30), 20: sparse_matrix(rng, n, 30), 100: sparse_matrix(rng, n, 30)}
    b = {7: sparse_matrix(rng, n, 24), 100: sparse_matrix(rng, n, 24)}
    a[100][:, :10] = b[100][:, :10] * 2  # the deepest layers share features
    a[20][:, 5] = 0
    a[20][:, 6] = 3.0  # constant: dead, still weighted by its mass
    write_run(tmp_path, "A", a)
    write_run(tmp_path, "B", b)
    ref = ref_wmppc([a[3], a[20], a[100]], [b[7], b[100]])
    for eng in (exact_engine(), NumpyEngine()):
        res = wmppc(open_run(tmp_path, "A"), open_run(tmp_path, "B"), engine=eng)
        assert res.source_layers == [3, 20, 100] and res.target_layers == [7, 100]
        np.testing.assert_allclose(res.matrix, ref["matrix"], atol=TOL)
        np.testing.assert_allclose(res.mppc_matrix, ref["mppc_matrix"], atol=TOL)
        assert res.all_layers == pytest.approx(ref["all"], abs=TOL)
        assert res.mppc_all_layers == pytest.approx(ref["mppc_all"], abs=TOL)
        assert res.last_layer == pytest.approx(ref["last"], abs=TOL)  # layer 100 vs 100, not "layer20"
        assert res.dead_source_features == [0, 2, 0]
    j = res.to_json()
    for key in (
        "source",
        "target",
        "all_layers",
        "last_layer",
        "source_layers",
        "target_layers",
        "matrix",
        "mppc_all_layers",
        "mppc_last_layer",
        "n_samples",
        "dead_source_features",
    ):
        assert key in j
    assert j["n_samples"] == n and np.shape(j["matrix"]) == (3, 2)


def test_wmppc_reads_each_layer_once_and_engines_agree(tmp_path):
    rng = np.random.default_rng(4)
    a = {l: sparse_matrix(rng, 120, 16) for l in (0, 1, 2)}
    write_run(tmp_path, "A", a)
    results = []
    makers = (exact_engine, ENGINES["numpy-sparse"], ENGINES["torch-sparse"], ENGINES["numpy-dense"], NumpyEngine)
    for make in makers:
        loader = LayerLoader(make())
        results.append(
            wmppc(open_run(tmp_path, "A"), open_run(tmp_path, "A"), engine=loader.engine, loader=loader, null=2)
        )
        assert sorted(loader.reads) == sorted(set(loader.reads)) and len(loader.reads) == 3
    assert results[0].all_layers == 1.0  # every feature finds itself, and rho is clipped to 1
    for r in results[1:]:
        np.testing.assert_allclose(r.matrix, results[0].matrix, atol=TOL)
        assert r.null.all_layers == pytest.approx(results[0].null.all_layers, abs=TOL)


@pytest.mark.parametrize("fmt", ["toolkit", "original"])
def test_wmppc_between_two_runs_reads_each_layer_once(tmp_path, fmt):
    rng = np.random.default_rng(14)
    a = {l: sparse_matrix(rng, 120, 16).astype(np.float16).astype(np.float32) for l in (0, 1, 2)}
    b = {l: sparse_matrix(rng, 120, 12).astype(np.float16).astype(np.float32) for l in (3, 4)}
    b[4][:, :5] = a[2][:, :5]
    write = write_run if fmt == "toolkit" else write_original
    write(tmp_path, "A", a)
    write(tmp_path, "B", b)
    loader = LayerLoader(exact_engine())
    res = wmppc(open_run(tmp_path, "A"), open_run(tmp_path, "B"), engine=loader.engine, loader=loader, null=3)
    assert sorted(loader.reads) == sorted({(str(tmp_path / r), l) for r, ls in (("A", a), ("B", b)) for l in ls})
    assert len(loader.reads) == 5  # 3 source + 2 target layers, null baseline included
    ref = ref_wmppc([a[0], a[1], a[2]], [b[3], b[4]])
    np.testing.assert_allclose(res.matrix, ref["matrix"], atol=1e-12)
    assert res.all_layers == pytest.approx(ref["all"], abs=1e-12)


def concept_runs(rng, n: int, d: int, shared: np.ndarray, noise: float = 0.1):
    """A [n, d]; B [n, d] whose feature perm[j] copies (with noise) A's feature j when shared[j]."""
    a = sparse_matrix(rng, n, d, density=0.1)
    b = sparse_matrix(rng, n, d, density=0.1)
    perm = rng.permutation(d)
    for j in np.flatnonzero(shared):
        b[:, perm[j]] = a[:, j] * (1 + noise * rng.random(n)).astype(np.float32)
    return a, b


def test_wmppc_tracks_the_shared_activation_mass(tmp_path):
    rng = np.random.default_rng(5)
    n, d = 1500, 40
    scores, masses = [], []
    for k, n_shared in enumerate((0, 10, 20, 30, 40)):
        shared = np.zeros(d, bool)
        shared[rng.permutation(d)[:n_shared]] = True
        a, b = concept_runs(rng, n, d, shared)
        write_run(tmp_path, f"A{k}", {0: a})
        write_run(tmp_path, f"B{k}", {0: b})
        res = wmppc(open_run(tmp_path, f"A{k}"), open_run(tmp_path, f"B{k}"), engine=NumpyEngine(), null=3)
        mass = a.sum(0)[shared].sum() / a.sum()
        # shared features match at ~0.99, the others at chance level (the null baseline)
        assert res.null is not None
        chance = res.null.to_json()["all_layers_mean"]
        assert chance < 0.2
        assert res.all_layers == pytest.approx(0.99 * mass + chance * (1 - mass), abs=0.05)
        scores.append(res.all_layers)
        masses.append(mass)
    assert np.all(np.diff(scores) > 0)


def test_null_is_seeded(tmp_path):
    rng = np.random.default_rng(6)
    write_run(tmp_path, "A", {0: sparse_matrix(rng, 100, 10)})
    write_run(tmp_path, "B", {0: sparse_matrix(rng, 100, 10)})
    runs = open_run(tmp_path, "A"), open_run(tmp_path, "B")
    r1, r2 = (wmppc(*runs, engine=NumpyEngine(), null=3, seed=9) for _ in range(2))
    r3 = wmppc(*runs, engine=NumpyEngine(), null=3, seed=10)
    assert r1.null is not None and r2.null is not None and r3.null is not None
    assert r1.null.all_layers == r2.null.all_layers != r3.null.all_layers
    assert r1.matrix[0, 0] == r3.matrix[0, 0]


def test_original_format_reads_like_the_toolkit_format(tmp_path):
    rng = np.random.default_rng(7)
    n = 150
    layers = {l: sparse_matrix(rng, n, 20).astype(np.float16).astype(np.float32) for l in (0, 5, -1)}
    other = {l: sparse_matrix(rng, n, 18).astype(np.float16).astype(np.float32) for l in (0, 5, -1)}
    write_original(tmp_path / "orig", "A", layers)
    write_original(tmp_path / "orig", "B", other)
    ref = ref_wmppc([layers[0], layers[5], layers[-1]], [other[0], other[5], other[-1]])
    write_run(tmp_path / "csr", "A", layers)
    write_run(tmp_path / "csr", "B", other)
    null = wmppc(open_run(tmp_path / "csr", "A"), open_run(tmp_path / "csr", "B"), engine=exact_engine(), null=2).null
    assert null is not None
    for eng in (exact_engine(), NumpyEngine(), NumpyEngine("sparse"), ENGINES["torch-dense"]()):
        res = wmppc(open_run(tmp_path / "orig", "A"), open_run(tmp_path / "orig", "B"), engine=eng, null=2)
        assert res.source_layers == [0, 5, -1]  # -1 is the deepest
        np.testing.assert_allclose(res.matrix, ref["matrix"], atol=TOL)
        assert res.last_layer == pytest.approx(ref["last"], abs=TOL)
        # the null baseline permutes the rows of the dense layer like those of the CSR codes
        assert res.null is not None
        np.testing.assert_allclose(res.null.all_layers, null.all_layers, atol=TOL)
    # a sparse layer is read through its csr-v1 copy, made once beside the .pt file and memory-mapped
    layer = LayerLoader(NumpyEngine()).load(open_run(tmp_path / "orig", "A"), 5)
    assert isinstance(layer.data, SparseCodes) and isinstance(layer.data.values, np.memmap)
    assert (tmp_path / "orig" / "A" / "layer05.csr-v1" / "meta.json").exists()
    # a dense one stays a dense fp16 array, memory-mapped from the file, not copied into RAM
    write_original(tmp_path / "dense", "D", {0: np.abs(rng.standard_normal((n, 20))).astype(np.float32)})
    layer = LayerLoader(NumpyEngine()).load(open_run(tmp_path / "dense", "D"), 0)
    assert isinstance(layer.data, np.ndarray) and layer.data.dtype == np.float16
    assert not layer.data.flags.owndata and "csr" not in layer.cache
    assert not (tmp_path / "dense" / "D" / "layer00.csr-v1").exists()


# ------------------------------------------------------------------------------------------------
# comparative sharedness


def sharedness_runs(tmp_path, rng, n=1200, d=60):
    """M's features by design: 0-5 shared with G1 and G2 but not H1/H2; 6-20 shared with everyone;
    21-30 with G1 only; 31-40 with H1 only; the rest with no one."""
    m = sparse_matrix(rng, n, d, density=0.1)
    plan = {
        "G1": list(range(0, 31)),
        "G2": list(range(0, 21)),
        "H1": list(range(6, 21)) + list(range(31, 41)),
        "H2": list(range(6, 21)),
    }
    write_run(tmp_path, "M", {11: m})
    for name, feats in plan.items():
        x = sparse_matrix(rng, n, d, density=0.1)
        perm = rng.permutation(d)
        for j in feats:
            x[:, perm[j]] = m[:, j] * (1 + 0.1 * rng.random(n)).astype(np.float32)
        write_run(tmp_path, name, {3: sparse_matrix(rng, n, d), 11: x})
    return m


def test_sharedness_selects_features_shared_with_all_of_g_and_none_of_h(tmp_path):
    rng = np.random.default_rng(8)
    m = sharedness_runs(tmp_path, rng)
    run = lambda name: open_run(tmp_path, name)  # noqa: E731
    loader = LayerLoader(exact_engine())
    res = comparative_sharedness(
        run("M"), [run("G1"), run("G2")], [run("H1"), run("H2")], top=0.1, engine=loader.engine, loader=loader
    )
    assert sorted(res.selected.tolist()) == [0, 1, 2, 3, 4, 5]
    assert np.all(np.diff(res.delta[res.selected]) <= 0)
    assert len(loader.reads) == 5 and res.layer == 11
    # the pieces are what the definition says
    x = m.astype(np.float64)
    rho = {g: ref_corr(m, np.asarray(run(g).load(11).to_dense())).max(1) for g in ("G1", "G2", "H1", "H2")}
    np.testing.assert_allclose(res.rho_min_group, np.minimum(rho["G1"], rho["G2"]), atol=1e-12)
    np.testing.assert_allclose(res.rho_max_group, np.maximum(rho["H1"], rho["H2"]), atol=1e-12)
    np.testing.assert_allclose(res.delta, x.sum(0) * (res.rho_min_group**2 - res.rho_max_group**2), atol=1e-9)
    # the original code started the min at 0, which ignores G: its top features are not these
    buggy = -x.sum(0) * res.rho_max_group**2
    assert set(np.argsort(-buggy)[:6]) != set(range(6))
    feats = res.to_json()["features"]
    assert [f["index"] for f in feats] == res.selected.tolist()
    assert set(feats[0]) >= {"index", "delta", "weight", "rho_min_group", "rho_max_group"}
    assert feats[0]["best_match"]["G1"]["layer"] == 11


def test_sharedness_counts_an_anticorrelated_best_match_as_no_match(tmp_path):
    """rho_G < 0 (the best match in G anti-correlates) must not be squared into a large Delta."""
    rng = np.random.default_rng(12)
    n, d = 400, 20
    gamma = lambda shape: rng.gamma(2, 1, shape).astype(np.float32)  # noqa: E731
    g = gamma((n, d)) * (rng.random((n, d)) < 0.9)
    g[200:] = 0  # G: every feature lives on the first half of the rows
    m = gamma((n, d)) * (rng.random((n, d)) < 0.2)
    m[:, 0] = 0
    m[200:, 0] = gamma(200)  # feature 0: the second half only, anti-correlated with every G feature
    m[:, 1:10] = 0.1 * g[:, 1:10]  # features 1-9: shared with G (small mass S), not with H
    h = gamma((n, d)) * (rng.random((n, d)) < 0.5)
    h[:, 10:] = m[:, 10:]  # features 10-19: shared with H
    for name, x in (("M", m), ("G", g), ("H", h)):
        write_run(tmp_path, name, {0: x})
    run = lambda name: open_run(tmp_path, name)  # noqa: E731
    res = comparative_sharedness(run("M"), [run("G")], [run("H")], top=0.05, engine=exact_engine())
    rho_g, rho_h = ref_corr(m, g).max(1), ref_corr(m, h).max(1)
    assert rho_g[0] < -0.3 and 0 < rho_h[0] < 0.3
    np.testing.assert_allclose(res.rho_min_group, rho_g, atol=1e-12)  # the raw rhos are kept
    np.testing.assert_allclose(res.rho_max_group, rho_h, atol=1e-12)
    s = m.astype(np.float64).sum(0)
    np.testing.assert_allclose(res.delta, s * (np.maximum(rho_g, 0) ** 2 - np.maximum(rho_h, 0) ** 2), atol=1e-9)
    assert res.delta[0] == pytest.approx(-s[0] * rho_h[0] ** 2) and res.delta[0] < 0
    assert 0 not in res.selected.tolist()  # squaring rho_G would have ranked it first
    assert s[0] * (rho_g[0] ** 2 - rho_h[0] ** 2) > res.delta[res.selected].max()
    feats = res.to_json()["features"]
    assert all(f["rho_min_group"] == pytest.approx(rho_g[f["index"]], abs=1e-12) for f in feats)


def test_sharedness_layer_choices(tmp_path):
    rng = np.random.default_rng(9)
    sharedness_runs(tmp_path, rng, n=300, d=60)
    run = lambda name: open_run(tmp_path, name)  # noqa: E731
    last = comparative_sharedness(run("M"), [run("G1")], [run("H1")], engine=NumpyEngine())
    assert len(last.selected) == 1  # 1% of 60 features, at least one
    every = comparative_sharedness(run("M"), [run("G1")], [run("H1")], target_layer="all", engine=NumpyEngine())
    assert np.all(every.matches["G1"].rho >= last.matches["G1"].rho - 1e-15)
    assert every.matches["G1"].layers == [3, 11]
    three = comparative_sharedness(run("M"), [run("G1")], [run("H1")], target_layer="3", engine=NumpyEngine())
    assert set(three.matches["H1"].layer.tolist()) == {3}


# ------------------------------------------------------------------------------------------------
# errors


def test_errors(tmp_path):
    rng = np.random.default_rng(10)
    x = sparse_matrix(rng, 50, 8)
    write_run(tmp_path, "A", {0: x})
    write_run(tmp_path, "short", {0: x[:40]})
    write_run(tmp_path, "shuffled", {0: x}, row_ids=list(range(49, -1, -1)))
    bad = x.copy()
    rows, cols = np.nonzero(bad)
    bad[rows[0], cols[0]] = np.nan
    write_run(tmp_path, "nan", {0: bad})
    write_run(tmp_path, "zero", {0: np.zeros_like(x)})
    inf = x.copy()
    inf[0, 0] = 1e6  # above fp16's 65504: stored as inf, like the original's overflow
    write_original(tmp_path, "orig_inf", {-1: inf})
    write_original(tmp_path, "orig_short", {-1: x[:45]})
    run = lambda name: open_run(tmp_path, name)  # noqa: E731
    eng = NumpyEngine()
    with pytest.raises(InputError, match=r"no run 'nope' .*available: A, nan, orig_inf"):
        run("nope")
    with pytest.raises(InputError, match=r"'A' \(N=50\) and 'short' \(N=40\)"):
        wmppc(run("A"), run("short"), engine=eng)
    with pytest.raises(InputError, match=r"'orig_short' \(N=45, layer -1\) and 'A' \(N=50, layer 0\)"):
        wmppc(run("A"), run("orig_short"), engine=eng)
    with pytest.raises(InputError, match=r"different rows: row_ids differ first at row 0"):
        wmppc(run("A"), run("shuffled"), engine=eng)
    with pytest.raises(InputError, match=r"nan/layer00: values.npy holds 1 non-finite"):
        wmppc(run("A"), run("nan"), engine=eng)
    with pytest.raises(InputError, match=r"run 'orig_inf' layer -1 holds 1 non-finite"):
        wmppc(run("orig_inf"), run("A"), engine=eng)
    with pytest.raises(InputError, match=r"no activation mass"):
        wmppc(run("zero"), run("A"), engine=eng)
    with pytest.raises(InputError, match=r"has no layer 3; it has \[0\]"):
        wmppc(run("A"), run("A"), source_layers=[3], engine=eng)
    with pytest.raises(InputError, match=r"min group is empty"):
        comparative_sharedness(run("A"), [], [run("A")], engine=eng)
    with pytest.raises(InputError, match=r"max group is empty"):
        comparative_sharedness(run("A"), [run("A")], [], engine=eng)
    with pytest.raises(InputError, match=r"in both --min_group and --max_group"):
        comparative_sharedness(run("zero"), [run("A")], [run("A")], engine=eng)
    with pytest.raises(InputError, match=r"--top"):
        comparative_sharedness(run("zero"), [run("A")], [run("short")], top=2, engine=eng)
    with pytest.raises(InputError, match=r"--target_layer"):
        comparative_sharedness(run("zero"), [run("A")], [run("short")], target_layer="deep", engine=eng)


def test_target_layouts_beyond_the_budget_are_released_and_the_result_is_the_same(tmp_path):
    rng = np.random.default_rng(11)
    write_run(tmp_path, "A", {l: sparse_matrix(rng, 300, 24) for l in range(3)})
    write_run(tmp_path, "B", {l: sparse_matrix(rng, 300, 20) for l in range(4)})

    class Recording(LayerLoader):
        def load(self, run, layer):
            prepared = super().load(run, layer)
            self.prepared = [*getattr(self, "prepared", []), prepared]
            return prepared

    results = {}
    for keep in (0, 1 << 30):
        loader = Recording(NumpyEngine("sparse"), keep_bytes=keep)
        results[keep] = wmppc(open_run(tmp_path, "A"), open_run(tmp_path, "B"), loader=loader, engine=loader.engine)
        targets = loader.prepared[:4]
        # no budget: no target keeps its float64 layouts (memory does not grow with the layers); else all do
        assert all(bool(t.cache) == (keep > 0) for t in targets)
        assert len(loader.reads) == 7  # each layer still read from disk once
    np.testing.assert_array_equal(results[0].matrix, results[1 << 30].matrix)
