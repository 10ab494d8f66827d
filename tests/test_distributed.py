"""Data parallelism under torchrun (2 CPU processes on gloo): the result equals one process's, each rank
reads only its share, and the distributed extraction merges into the one-process cache bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import one_thread
from safetensors.numpy import load_file

from sae.__main__ import main as sae_main
from sae.nn.sources import ActivationSource
from sae.nn.synthetic import planted_activations
from sae.util import distributed

REPO = Path(__file__).resolve().parent.parent

# runs `python -m sae ...` logging the rows of every ActivationSource.read to $READ_LOG.<rank>
DRIVER = """
import json, os, sys
import numpy as np
from sae.nn.sources import ActivationSource
reads = []
_read = ActivationSource.read
def read(self, key, rows):
    reads.append(np.asarray(rows).tolist())
    return _read(self, key, rows)
ActivationSource.read = read
from sae.__main__ import main
try:
    main(sys.argv[1:])
finally:
    with open(os.environ["READ_LOG"] + "." + os.environ.get("RANK", "0"), "w") as f:
        json.dump(reads, f)
"""


def torchrun(nproc: int, args: list[str], env: dict[str, str] | None = None, timeout: float = 120):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "0"]
    cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def test_share_splits_rows_contiguously():
    parts = [distributed.share(10, r, 3) for r in range(3)]
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 7), (7, 10)]
    assert distributed.share(5, 0, 1) == slice(0, 5)


def test_two_ranks_train_the_same_sae_as_one_process(tmp_path, monkeypatch):
    arch = "batchtopk"  # its batch-wide selection and threshold, and AuxK, are the reduced statistics
    x = planted_activations(n=96, d=8, n_concepts=24, active_per_row=2, seed=3).x.astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    flags = ["--activations", str(tmp_path / "x.npy"), "--sae", arch, "--k", "4", "--expansion_factor", "4"]
    flags += ["--epochs", "2", "--batch_size", "16", "--dead_window", "16", "--device", "cpu", "--quiet"]
    # dead_window 16: latents go dead within the run, so AuxK (its normaliser over the global batch) is exercised
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {"READ_LOG": str(tmp_path / "reads2")}
    done = torchrun(2, [str(tmp_path / "driver.py"), "train", *flags, "--out", str(tmp_path / "two")], env)
    assert done.returncode == 0, done.stderr[-3000:]

    reads1: list[list[int]] = []
    read = ActivationSource.read

    def logged(self, key, rows):
        reads1.append(np.asarray(rows).tolist())
        return read(self, key, rows)

    monkeypatch.setattr(ActivationSource, "read", logged)
    with one_thread():
        assert sae_main(["train", *flags, "--out", str(tmp_path / "one")]) == 0
    one, two = load_file(tmp_path / "one" / "sae.safetensors"), load_file(tmp_path / "two" / "sae.safetensors")
    assert set(one) == set(two)
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m2["n_rows"] == m1["n_rows"] and m2["n_dead"] == m1["n_dead"]
    assert m2["fvu"] == pytest.approx(m1["fvu"], rel=1e-4)

    # each rank read only its half of every global batch: 12 steps of 16 rows, then the evaluation's share
    r0, r1 = (json.loads((tmp_path / f"reads2.{r}").read_text()) for r in (0, 1))
    steps1 = [r for r in reads1 if len(r) == 16][:12]
    steps0, steps_1 = [r for r in r0 if len(r) == 8][:12], [r for r in r1 if len(r) == 8][:12]
    assert len(steps1) == len(steps0) == len(steps_1) == 12
    for full, a, b in zip(steps1, steps0, steps_1):
        assert a == full[:8] and b == full[8:]  # contiguous halves, disjoint
    assert sum(map(len, r0)) < sum(map(len, reads1)) and sum(map(len, r1)) < sum(map(len, reads1))


def test_one_process_world_is_trivial():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    rows = np.arange(7)
    assert distributed.share_rows(rows) is not None and len(distributed.share_rows(rows)) == 7


EXTRACT = """
import os
import sys
import wrappedmodels as wm
from sae.data.cache import CacheConfig
from sae.data.cache_parallel import extract_activations
from sae.data.datasets import load_pairs
vit, shapes, cache_dir, layers = sys.argv[1], sys.argv[2], sys.argv[3], [int(x) for x in sys.argv[4].split(",")]
cfg = CacheConfig(cache_dir=cache_dir, num_workers=0, extract_batch_size=5, cache_dtype="float32")
cache = extract_activations(wm.ModelSpec("ViT", vit), load_pairs(shapes, max_samples=23), layers, cfg,
                            shard_tokens=150, device="cpu", progress=False)
if int(os.environ.get("RANK", "0")) == 0:  # one line: both ranks printing could interleave on stdout
    print(cache.path)
"""


def test_two_ranks_extract_the_one_process_cache_bit_for_bit(tmp_path):
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from sae.data.datasets import make_shapes_dataset

    torch.manual_seed(0)
    vit = tmp_path / "vit"
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2)
    ViTModel(cfg).save_pretrained(vit)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit)
    shapes = make_shapes_dataset(tmp_path / "shapes", n=23, seed=1)
    (tmp_path / "extract.py").write_text(EXTRACT)
    args = [str(vit), str(shapes)]
    done = torchrun(2, [str(tmp_path / "extract.py"), *args, str(tmp_path / "two"), "0,2"])
    assert done.returncode == 0, done.stderr[-3000:]
    import wrappedmodels as wm
    from sae.data.cache import CacheConfig, extract_activations
    from sae.data.datasets import load_pairs

    cfg = CacheConfig(cache_dir=str(tmp_path / "one"), num_workers=0, extract_batch_size=5, cache_dtype="float32")
    with one_thread():
        ref = extract_activations(
            wm.ModelSpec("ViT", str(vit)),
            load_pairs(str(shapes), max_samples=23),
            [0, 2],
            cfg,
            shard_tokens=150,
            device="cpu",
            progress=False,
        )
    a, b = ref.path, Path(done.stdout.split()[-1])
    assert a.name == b.name and b.is_dir(), done.stdout[-2000:]  # the same key
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert len([f for f in files_a if f.name.startswith("tokens-")]) >= 2 * 3  # several shards per layer
    for f in files_a:
        if f.name != "meta.json":
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    for m in (ma, mb):
        del m["created"], m["seconds_last_session"]
    assert ma == mb
    assert not list((tmp_path / "two").glob(".*"))  # the ranks' parts are gone
