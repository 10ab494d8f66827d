"""Benchmark: the toolkit's wMPPC against a faithful re-implementation of the original algorithm.

    uv run bench/wmppc.py                       # N=20,000 rows, d_sae=6,144, k=32, 6 layers per run
    uv run bench/wmppc.py --n_rows 2000 --d_sae 512 --layers 3 --baseline_layers 2   # a quick look
    uv run bench/wmppc.py --dense_density 0.3   # the original's own format: dense fp16 ReLU features,
                                                # 30% non-zero, N=20,000, d_sae=2,048, 2 layers per run

1. Builds two runs A and B whose features share planted concepts, with values exactly representable in
   fp16. Default (TopK codes): in the toolkit's format (csr-v1), plus the layers the baseline needs in
   the original format (dense fp16 `layerNN.pt`). With --dense_density P: dense ReLU features with a
   fraction P of non-zeros, written only in the original format, which both methods then read (the
   toolkit memory-maps them and takes its dense path).
   With --original_format: the TopK codes, every layer written only in the original format.
2. Runs each method in its own subprocess (honest peak memory), after the imports:
   - toolkit, all L x L layer pairs;
   - toolkit, the baseline's subset of pairs;
   - baseline (`code/wmppc.py` of the original repo: dense fp32, every target layer reloaded from disk
     for each source layer, unbiased std + 1e-10, product / N) on the deepest `--baseline_layers`
     source layers x the deepest `--baseline_layers` target layers. The full L x L baseline would take
     L^2 times one pair (about 20 minutes on 2 CPU cores), so its full time is extrapolated from the
     measured subset as (subset time) x (L^2 / subset pairs); the report says which numbers are measured.
   In the original-format modes, also the whole process, timed from its start to its exit (imports, reading
   the .pt files, and for the toolkit its one conversion to csr-v1 included): `wmppc.py` as a user runs it,
   first without the csr-v1 copies (they are made), then again (they are reused), against the baseline
   worker's whole process (torch import included); measured when the baseline runs every pair.
3. Checks that both give the same numbers to 1e-5 on what both computed (the toolkit with
   original_scaling, i.e. correlations x (N-1)/N like the original), per pair and per feature, and checks
   both against an independent float64 two-pass computation on `--check_features` sampled source
   features of the subset (the toolkit to 1e-9; the original's fp32 error is printed).

Peak memory is the rise of the process's peak resident set (VmHWM) above its resident set once the
libraries are imported (the peak is reset there through /proc/self/clear_refs): importing torch alone
costs about 0.5 GB of RSS in both processes and says nothing about either algorithm; the absolute peaks
are printed too. The resident set counts the touched pages of memory-mapped files (the toolkit maps its
inputs: the csr-v1 arrays, and the original format's .pt tensors); these are the kernel's page cache,
dropped under memory pressure, so the peak private memory (RssAnon, sampled) is printed as well.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """Samples RssAnon (private memory, without the file-backed pages of memory-mapped inputs) every 5 ms
    in a thread; `peak_mb` is the largest sample."""

    def __init__(self):
        import threading

        self.peak_mb = _status_mb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, _status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak_mb, _status_mb("RssAnon"))


def _reset_peak() -> float:
    """Reset VmHWM to the current RSS (Linux); return the RSS in MB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


# ------------------------------------------------------------------------------------------------
# data


def make_runs(work: Path, n: int, d: int, k: int, n_layers: int, seed: int = 0) -> None:
    """Two runs whose rows share concepts: each row holds k concepts (Zipf-like popularity) with a
    strength; every layer of every run maps concepts to its own features, replaces a layer-dependent
    fraction of them by random features, and jitters the values. Values are fp16-exact."""
    from sae.data.features import SparseCodes, write_layer, write_run_info

    rng = np.random.default_rng(seed)
    log_pop = -1.1 * np.log(np.arange(1, d + 1))[rng.permutation(d)]
    concepts = np.empty((n, k), dtype=np.int64)
    for r0 in range(0, n, 1000):
        r1 = min(r0 + 1000, n)
        keys = log_pop + rng.gumbel(size=(r1 - r0, d))
        concepts[r0:r1] = np.argpartition(-keys, k, axis=1)[:, :k]
    strength = rng.gamma(2.0, 1.0, (n, k)) + 0.05
    for run, offset in (("A", 0.0), ("B", 0.1)):
        for layer in range(n_layers):
            noise = 0.15 + 0.5 * abs(layer / max(n_layers - 1, 1) - 0.7) + offset
            idx = rng.permutation(d)[concepts]
            swap = rng.random((n, k)) < noise
            idx[swap] = rng.integers(0, d, int(swap.sum()))
            vals = strength * rng.lognormal(0.0, 0.3, (n, k))
            vals[swap] = rng.gamma(2.0, 1.0, int(swap.sum())) + 0.05
            vals = np.clip(vals, 0.01, 60000).astype(np.float16).astype(np.float32)
            order = np.argsort(idx, axis=1, kind="stable")
            idx, vals = np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)
            dup = np.zeros_like(swap)
            dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
            vals[dup] = 0  # a feature appears once per row; from_topk drops the zeros
            write_layer(work / "toolkit" / run, layer, SparseCodes.from_topk(vals, idx, d))
        write_run_info(
            work / "toolkit" / run,
            {"name": run, "n_rows": n, "row_ids": list(range(n)), "layers": list(range(n_layers)), "d_sae": d, "k": k},
        )


def make_dense_runs(work: Path, n: int, d: int, density: float, n_layers: int, seed: int = 0) -> float:
    """Two runs of dense ReLU features in the original format (fp16 `layerNN.pt`): feature j of a layer is
    relu(a z_c(j) + sqrt(1 - a^2) e - t) over shared Gaussian concepts z, with the threshold t giving a
    fraction `density` of non-zeros and a mixing a that depends on the run and layer. Returns the density."""
    import torch
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    n_concepts = max(1, d // 4)
    z = rng.standard_normal((n, n_concepts), dtype=np.float32)
    t = float(norm.ppf(1.0 - density))
    nonzero = []
    for run, offset in (("A", 0.0), ("B", 0.1)):
        out = work / "original" / run
        out.mkdir(parents=True, exist_ok=True)
        for layer in range(n_layers):
            a = 0.95 - 0.5 * abs(layer / max(n_layers - 1, 1) - 0.7) - offset
            x = rng.standard_normal((n, d), dtype=np.float32)
            x *= np.sqrt(1.0 - a * a)
            x += a * z[:, rng.integers(0, n_concepts, d)]
            x -= t
            np.maximum(x, 0.0, out=x)
            nonzero.append(np.count_nonzero(x) / x.size)
            torch.save(torch.from_numpy(x.astype(np.float16)), out / f"layer{layer:02d}.pt")
            del x
    return float(np.mean(nonzero))


def write_original_layers(work: Path, layers: dict[str, list[int]]) -> None:
    """The baseline's input: dense fp16 [n, d] tensors `layerNN.pt`, like the original repo's."""
    import torch

    from sae.data.features import open_run

    for run, wanted in layers.items():
        src = open_run(work / "toolkit", run)
        out = work / "original" / run
        out.mkdir(parents=True, exist_ok=True)
        for layer in wanted:
            dense = torch.from_numpy(src.load(layer).to_dense(np.float16))
            torch.save(dense, out / f"layer{layer:02d}.pt")
            del dense


# ------------------------------------------------------------------------------------------------
# the two methods, each run in a worker subprocess


def baseline(work: Path, src_layers: list[int], tgt_layers: list[int]) -> dict:
    """The original wmppc.py algorithm (CEA-LIST/SAEshareConcepts code/wmppc.py), on the given layers."""
    import torch

    def all_correlations(x, y):
        n = x.shape[0]
        sigma_x = torch.std(x, dim=0) + 1e-10
        sigma_y = torch.std(y, dim=0) + 1e-10
        x_b = (x - torch.mean(x, dim=0)) / sigma_x
        del x
        del sigma_x
        y_b = (y - torch.mean(y, dim=0)) / sigma_y
        return (x_b.T @ y_b) / n

    device = "cuda" if torch.cuda.is_available() else "cpu"
    files_a = [work / "original" / "A" / f"layer{l:02d}.pt" for l in src_layers]
    files_b = [work / "original" / "B" / f"layer{l:02d}.pt" for l in tgt_layers]
    base = _reset_peak()
    anon_base, anon = _status_mb("RssAnon"), AnonPeak()
    t0 = time.perf_counter()
    matrix, per_layer, lengths, rho_all = [], [], [], []
    with torch.no_grad():
        for fa in files_a:
            t1 = torch.load(fa, map_location=device).to(torch.float32)
            sum_a = t1.sum(axis=0, dtype=torch.float32)
            rho_list, row = [], []
            for fb in files_b:
                t2 = torch.load(fb, map_location=device).to(torch.float32)
                res = all_correlations(t1, t2)
                del t2
                rho = res.max(axis=1)[0]
                rho_list.append(rho)
                row.append(((rho * sum_a).sum() / sum_a.sum()).item())
                del res
            del t1
            best = torch.vstack(rho_list).max(dim=0)[0]
            per_layer.append(((best * sum_a).sum() / sum_a.sum()).item())
            lengths.append(len(best))
            matrix.append(row)
            rho_all.append(best.cpu().numpy().astype(np.float64))
    seconds = time.perf_counter() - t0
    anon_peak = anon.stop()
    np.save(work / "baseline_rho.npy", np.stack(rho_all))
    all_layers = float(np.sum([w * c / np.sum(lengths) for w, c in zip(lengths, per_layer)]))
    return {
        "seconds": seconds,
        "rss_base_mb": base,
        "peak_mb": _status_mb("VmHWM"),
        "matrix": matrix,
        "anon_base_mb": anon_base,
        "anon_peak_mb": anon_peak,
        "all_layers": all_layers,
        "last_layer": matrix[-1][-1],
        "device": device,
    }


def toolkit(work: Path, src_layers: list[int] | None, tgt_layers: list[int] | None, tag: str, fmt: str) -> dict:
    from sae.analysis.compare import wmppc
    from sae.analysis.correlation import make_engine
    from sae.data.features import open_run

    engine = make_engine("auto")
    base = _reset_peak()
    anon_base, anon = _status_mb("RssAnon"), AnonPeak()
    t0 = time.perf_counter()
    res = wmppc(
        open_run(work / fmt, "A"),
        open_run(work / fmt, "B"),
        source_layers=src_layers,
        target_layers=tgt_layers,
        engine=engine,
        original_scaling=True,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    anon_peak = anon.stop()
    np.save(work / f"toolkit_{tag}_rho.npy", np.stack(res.rho_all_layers))
    return {
        "seconds": seconds,
        "rss_base_mb": base,
        "peak_mb": _status_mb("VmHWM"),
        "anon_base_mb": anon_base,
        "anon_peak_mb": anon_peak,
        "matrix": res.matrix.tolist(),
        "all_layers": res.all_layers,
        "last_layer": res.last_layer,
        "device": engine.device,
        "source_layers": res.source_layers,
        "target_layers": res.target_layers,
        "dead_source_features": res.dead_source_features,
    }


def exact_rho(work: Path, src_layer: int, tgt_layers: list[int], features: np.ndarray) -> np.ndarray:
    """Independent float64 two-pass reference: max over the target layers and features of corr(A_i, B_j)
    for the sampled source features i (from the original-format files), times (N-1)/N like the original."""
    import torch

    load = lambda run, l: torch.load(work / "original" / run / f"layer{l:02d}.pt").numpy()  # noqa: E731
    x = load("A", src_layer)[:, features].astype(np.float64)
    n = x.shape[0]
    xc = x - x.mean(0)
    sx = np.sqrt((xc**2).sum(0))
    best = np.full(len(features), -np.inf)
    for l in tgt_layers:
        y = load("B", l)
        chunks = [slice(r, r + 2048) for r in range(0, n, 2048)]
        my = sum(y[c].astype(np.float64).sum(0) for c in chunks) / n
        cross, sy2 = np.zeros((len(features), y.shape[1])), np.zeros(y.shape[1])
        for c in chunks:
            yc = y[c].astype(np.float64) - my
            cross += xc[c].T @ yc
            sy2 += (yc**2).sum(0)
        constant = y.max(0) == y.min(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = cross / np.outer(sx, np.sqrt(sy2))
        corr[:, constant] = 0.0
        best = np.maximum(best, corr.max(1))
    return best * (n - 1) / n


# runs a script (argv[1:]) and reports on stderr at exit the process's peak resident set (VmHWM, kB) and its peak
# private memory (RssAnon sampled every 5 ms, kB: without the pages of memory-mapped files)
_WRAP = """
import atexit, runpy, sys, threading
def status(key):
    return int([l for l in open('/proc/self/status') if l.startswith(key)][0].split()[1])
anon = [status('RssAnon')]
def sample():
    while True:
        anon[0] = max(anon[0], status('RssAnon'))
        threading.Event().wait(0.005)
threading.Thread(target=sample, daemon=True).start()
def peak():
    anon[0] = max(anon[0], status('RssAnon'))
    sys.stderr.write('PEAK ' + str(status('VmHWM')) + ' ' + str(anon[0]) + chr(10))
atexit.register(peak)
sys.argv = sys.argv[1:]
sys.path.insert(0, REPO)
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def _child(args: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak resident MB, peak private MB) of a whole child process running the script args[0]."""
    t = time.perf_counter()
    code = _WRAP.replace("REPO", repr(str(REPO)))
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        sys.exit(f"{args[:2]} failed:\n{done.stderr}")
    peak = [line.split()[1:] for line in done.stderr.splitlines() if line.startswith("PEAK ")][-1]
    return seconds, int(peak[0]) / 1024, int(peak[1]) / 1024


READ_NEW = "from sae.data.features import open_run\nc = open_run({!r}, 'A').load({})\nprint(float(c.values.sum()))\n"
READ_OLD = (
    "import torch\nfrom sae.data.features import SparseCodes\nt = torch.load({!r}, weights_only=True)\n"
    "c = SparseCodes.from_dense(t.float().numpy())\nprint(float(c.values.sum()))\n"
)


def whole_process(work: Path, sub: str, baseline_too: bool) -> tuple[float, float, float]:
    """Wall seconds of whole processes: wmppc.py without its csr-v1 copies, wmppc.py again, and the baseline
    worker (nan unless baseline_too). Also prints the peak memory of one layer read by FeatureRun.load (the
    reader of show/overlap/stability/names) against the whole-tensor read it replaces."""
    for old in (work / "original").glob("*/*.csr-v1"):
        shutil.rmtree(old)
    layer = sorted((work / "original" / "A").glob("layer*.pt"))[-1]
    (work / "read_old.py").write_text(READ_OLD.format(str(layer)))
    (work / "read_new.py").write_text(READ_NEW.format(str(work / "original"), int(layer.stem[5:])))
    t_old, m_old, a_old = _child([str(work / "read_old.py")])
    t_new, m_new, a_new = _child([str(work / "read_new.py")])
    size = layer.stat().st_size / 2**20
    print(
        f"one layer ({layer.name}, {size:.0f} MB) read as codes, whole process, converting it: FeatureRun.load "
        f"{t_new:.2f} s, peak RSS {m_new:.0f} MB, private {a_new:.0f} MB; torch.load + from_dense (before) "
        f"{t_old:.2f} s, {m_old:.0f} MB, private {a_old:.0f} MB (private memory ratio {a_new / a_old:.2f}; "
        "RSS counts the pages of the memory-mapped file)"
    )
    for old in (work / "original").glob("*/*.csr-v1"):
        shutil.rmtree(old)
    cmd = [str(REPO / "wmppc.py"), "--features_dir", str(work / "original"), "--source", "A"]
    cmd += ["--target", "B", "--original_scaling", "--no-save", "--no-progress", "--json"]
    (cold, m_cold, a_cold), (warm, m_warm, a_warm) = _child(cmd), _child(cmd)
    print(
        f"wmppc.py whole process, peak RSS / private: {m_cold:.0f} / {a_cold:.0f} MB converting, "
        f"{m_warm:.0f} / {a_warm:.0f} MB reusing the copies"
    )
    base = float("nan")
    if baseline_too:
        t = time.perf_counter()
        run_worker(["--worker", "baseline", sub, sub, "original", "--workdir", str(work)])
        base = time.perf_counter() - t
    return cold, warm, base


def run_worker(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"worker {args[:2]} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    p.add_argument("--n_rows", type=int, default=20_000)
    p.add_argument("--d_sae", type=int, default=None, help="default 6144 (TopK codes), 2048 (--dense_density)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument(
        "--dense_density",
        type=float,
        default=0.0,
        help="> 0: dense ReLU features in the original format with this fraction of non-zeros",
    )
    p.add_argument(
        "--original_format",
        action="store_true",
        help="TopK codes written only in the original format (dense fp16 layerNN.pt), read by both methods",
    )
    p.add_argument("--layers", type=int, default=None, help="layers per run (default 6; 2 with --dense_density)")
    p.add_argument(
        "--baseline_layers",
        type=int,
        default=2,
        help="the baseline runs the deepest B source layers x the deepest B target layers",
    )
    p.add_argument(
        "--check_features",
        type=int,
        default=32,
        help="source features checked against an independent float64 computation",
    )
    p.add_argument("--workdir", default=None, help="where to build the runs (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--worker", nargs=4, metavar=("KIND", "SRC", "TGT", "FMT"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        kind, src, tgt, fmt = args.worker
        layers = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
        parse = lambda s: None if s == "all" else layers(s)  # noqa: E731
        work = Path(args.workdir)
        out = (
            baseline(work, layers(src), layers(tgt))
            if kind == "baseline"
            else toolkit(work, parse(src), parse(tgt), kind, fmt)
        )
        print(json.dumps(out))
        return

    dense = args.dense_density > 0
    d = args.d_sae or (2048 if dense else 6144)
    L = args.layers or (2 if dense else 6)
    B = min(args.baseline_layers, L)
    fmt = "original" if dense or args.original_format else "toolkit"
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_wmppc_"))
    work.mkdir(parents=True, exist_ok=True)
    subset = list(range(L - B, L))
    sub = ",".join(map(str, subset))
    what = (
        f"dense fp16 ReLU features (original format), density {args.dense_density:g}"
        if dense
        else f"TopK codes k={args.k} ({'original' if args.original_format else 'toolkit'} format)"
    )
    print(f"# wMPPC benchmark: N={args.n_rows} rows, d_sae={d}, {what}, {L} layers per run, cpu cores={os.cpu_count()}")
    try:
        t = time.perf_counter()
        if dense:
            measured = make_dense_runs(work, args.n_rows, d, args.dense_density, L)
            print(f"data: built in {time.perf_counter() - t:.1f} s under {work}; measured density {measured:.3f}")
        else:
            make_runs(work, args.n_rows, d, args.k, L)
            written = list(range(L)) if args.original_format else subset
            write_original_layers(work, {"A": written, "B": written})
            print(f"data: built in {time.perf_counter() - t:.1f} s under {work}")

        whole = whole_process(work, sub, B == L) if fmt == "original" else None
        full = run_worker(["--worker", "full", "all", "all", fmt, "--workdir", str(work)])
        part = full if B == L else run_worker(["--worker", "subset", sub, sub, fmt, "--workdir", str(work)])
        if B == L:
            shutil.copy(work / "toolkit_full_rho.npy", work / "toolkit_subset_rho.npy")
        base = run_worker(["--worker", "baseline", sub, sub, fmt, "--workdir", str(work)])
        rng = np.random.default_rng(1)
        checked = np.sort(rng.choice(d, min(args.check_features, d), replace=False))
        exact = exact_rho(work, subset[-1], subset, checked)
    except BaseException:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        raise

    pairs_full, pairs_sub = L * L, B * B
    print(f"device: toolkit {full['device']}, baseline {base['device']}")
    print(
        f"toolkit  all {L}x{L} pairs  (measured):     {full['seconds']:8.2f} s   "
        f"All Layers {full['all_layers']:.6f} | Last layer {full['last_layer']:.6f}"
    )
    if B < L:
        print(f"toolkit  {B}x{B} subset {subset} (measured): {part['seconds']:8.2f} s")
    print(
        f"baseline {B}x{B} subset {subset} (measured): {base['seconds']:8.2f} s   "
        f"({base['seconds'] / pairs_sub:.2f} s per pair)   "
        f"All Layers {base['all_layers']:.6f} | Last layer {base['last_layer']:.6f}"
    )
    print(f"speed-up, same {pairs_sub} pairs, both measured:            {base['seconds'] / part['seconds']:7.1f}x")
    if B < L:
        est = base["seconds"] * pairs_full / pairs_sub
        print(f"baseline all {L}x{L} pairs  (extrapolated = measured x {pairs_full}/{pairs_sub}): {est:8.2f} s")
        print(
            f"speed-up, all {pairs_full} pairs (baseline extrapolated):      {est / full['seconds']:7.1f}x  "
            f"(target >= 20x)"
        )

    if whole is not None:
        cold, warm, base_whole = whole
        print(
            f"whole process: wmppc.py {cold:.2f} s (converting to csr-v1, kept beside the .pt files), "
            f"{warm:.2f} s (reusing that copy); baseline {base_whole:.2f} s"
            + ("" if B == L else " (its subset only: use --baseline_layers = --layers for the ratio)")
        )
        if B == L:
            print(
                f"speed-up, whole process, all {pairs_full} pairs, both measured: {base_whole / cold:7.1f}x first run, "
                f"{base_whole / warm:7.1f}x with the copy  (target >= 20x)"
            )

    inc = lambda r: r["peak_mb"] - r["rss_base_mb"]  # noqa: E731
    print(
        f"peak memory above imports: toolkit all pairs {inc(full):7.1f} MB, toolkit subset {inc(part):7.1f} MB, "
        f"baseline {inc(base):7.1f} MB"
    )
    print(
        f"peak RSS (absolute):       toolkit all pairs {full['peak_mb']:7.1f} MB, toolkit subset "
        f"{part['peak_mb']:7.1f} MB, baseline {base['peak_mb']:7.1f} MB"
    )
    print(
        f"memory ratio toolkit(all pairs)/baseline, above imports: {inc(full) / inc(base):.3f}"
        f"{'' if dense else '  (target <= 0.1)'}; absolute: {full['peak_mb'] / base['peak_mb']:.3f}"
    )
    anon = lambda r: r["anon_peak_mb"] - r["anon_base_mb"]  # noqa: E731
    print(
        f"private memory (RssAnon, sampled every 5 ms) above imports, i.e. without the page cache of "
        f"memory-mapped inputs: toolkit all pairs {anon(full):7.1f} MB, baseline {anon(base):7.1f} MB "
        f"(ratio {anon(full) / anon(base):.3f})"
    )

    # equality, on what both computed
    m_full = np.array(full["matrix"])[np.ix_(subset, subset)]
    m_part, m_base = np.array(part["matrix"]), np.array(base["matrix"])
    rho_part = np.load(work / "toolkit_subset_rho.npy")
    rho_base = np.load(work / "baseline_rho.npy")
    diffs = {
        "per-pair wMPPC (subset of the full run)": np.abs(m_full - m_base).max(),
        "per-pair wMPPC (subset run)": np.abs(m_part - m_base).max(),
        "All Layers over the subset": abs(part["all_layers"] - base["all_layers"]),
        "Last layer": abs(full["last_layer"] - base["last_layer"]),
        "per-feature rho over the subset": np.abs(rho_part - rho_base).max(),
    }
    ok = all(v <= 1e-5 for v in diffs.values())
    for name, v in diffs.items():
        print(f"max |toolkit - baseline| {name:42s} {v:.2e}")
    err_tk = np.abs(rho_part[-1][checked] - exact).max()
    err_base = np.abs(rho_base[-1][checked] - exact).max()
    print(
        f"max |method - float64 reference|, {len(checked)} features of layer {subset[-1]}: "
        f"toolkit {err_tk:.2e}, baseline {err_base:.2e}"
    )
    ok = ok and err_tk <= 1e-9
    print(
        f"equal to 1e-5: {'yes' if ok else 'NO'}  (toolkit with original_scaling: correlations x (N-1)/N; "
        "toolkit exact to 1e-9)"
    )
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
