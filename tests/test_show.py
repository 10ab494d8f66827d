"""show.py: top rows per feature, grids fetched from the run's own dataset by row id, captions, errors."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import show
from sae.data.features import SparseCodes, write_layer, write_run_info
from sae.util.errors import InputError
from sae.viz.previews import (
    TOP,
    FeatureColumns,
    grid_shape,
    make_grid,
    mass_key,
    preview_stem,
    select_features,
)

REPO = Path(__file__).resolve().parent.parent
N_DATASET, N_ROWS, D_SAE, TILE = 50, 40, 24, 20
# 64 colours at least 85 apart per channel: the colour of a tile tells which dataset row it shows
PALETTE = [tuple(c) for c in itertools.product((0, 85, 170, 255), repeat=3)]
WORDS = ["apple", "boat", "cloud", "dog", "engine", "forest", "guitar", "house", "island", "jacket"]


def caption(row_id: int) -> str:
    return f"row {row_id} shows a {WORDS[row_id % len(WORDS)]}"


def make_dataset(folder: Path, n: int = N_DATASET, size: tuple[int, int] = (32, 24), captions: bool = True) -> Path:
    """An imagefolder of solid-colour images: dataset row r is PALETTE[r], its caption names r (without
    `captions`: no caption column, a 'kind' column instead)."""
    folder.mkdir(parents=True)
    lines = []
    for r in range(n):
        Image.new("RGB", size, PALETTE[r]).save(folder / f"{r:06d}.png")
        lines.append(
            json.dumps({"file_name": f"{r:06d}.png", **({"text": caption(r)} if captions else {"kind": f"k{r % 3}"})})
        )
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def make_codes(rng: np.random.Generator, n: int = N_ROWS, d: int = D_SAE) -> np.ndarray:
    """[n, d] non-negative with varied support: some features dead, some rare, some frequent."""
    density = np.linspace(0.05, 0.9, d)
    x = rng.gamma(2.0, 1.0, (n, d)).astype(np.float32)
    x[rng.random((n, d)) > density] = 0
    x[:, 0] = 0  # dead
    x[:, 1] = 0
    x[[3, 17, 30], 1] = [0.5, 2.0, 1.0]  # fires on 3 rows only
    return x


def write_run(
    root: Path, name: str, layers: dict[int, np.ndarray], dataset: Path | None, row_ids, modality: str = "image"
) -> Path:
    for layer, x in layers.items():
        write_layer(root / name, layer, SparseCodes.from_dense(x))
    n = next(iter(layers.values())).shape[0]
    info = {
        "name": name,
        "modality": modality,
        "model": "Fake",
        "model_name": "fake",
        "layers": sorted(layers),
        "token": 0,
        "n_rows": n,
        "row_ids": [int(r) for r in row_ids],
        "architecture": "topk",
        "d_sae": D_SAE,
        "k": 4,
        "sae_metrics": {},
        "format": "csr-v1",
        "provenance": {},
    }
    if dataset is not None:
        info["dataset"] = {
            "name": str(dataset),
            "split": "train",
            "image_column": "image",
            "text_column": "text",
            "max_samples": None,
        }
    write_run_info(root / name, info)
    return root / name


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 50-row dataset and an image run on 40 of its rows (shuffled), layers 3 and 7."""
    root = tmp_path_factory.mktemp("show")
    data = make_dataset(root / "data")
    rng = np.random.default_rng(0)
    row_ids = rng.permutation(N_DATASET)[:N_ROWS]
    layers = {3: make_codes(rng), 7: make_codes(rng)}
    write_run(root / "feats", "img", layers, data, row_ids)
    return {"root": root, "data": data, "row_ids": row_ids, "layers": layers}


def ref_top(x: np.ndarray, k: int = TOP) -> tuple[list[list[int]], list[list[float]]]:
    """Directly: per column, rows by activation descending (ties: lower row first), non-zero only."""
    rows, vals = [], []
    for j in range(x.shape[1]):
        order = np.lexsort((np.arange(x.shape[0]), -x[:, j]))
        order = [int(r) for r in order if x[r, j] > 0][:k]
        rows.append(order)
        vals.append([float(x[r, j]) for r in order])
    return rows, vals


def tile_rows(img: Image.Image, size: int = TILE) -> list[int | None]:
    """The dataset row shown in each cell, row-major (None for a white, empty cell), by nearest colour
    at the cell's centre (the activation label sits in the bottom-left corner)."""
    a = np.asarray(img.convert("RGB")).astype(int)
    cols, n_rows = img.width // size, img.height // size
    out = []
    for t in range(cols * n_rows):
        y, x = (t // cols) * size + size // 2, (t % cols) * size + size // 2
        c = a[y, x]
        if (c > 245).all() and (255, 255, 255) not in PALETTE[:N_DATASET]:
            out.append(None)
            continue
        d = ((np.array(PALETTE[:N_DATASET]) - c) ** 2).sum(1)
        out.append(int(np.argmin(d)))
    return out


def run_show(world, out: Path, *extra: str) -> int:
    return show.main(
        [
            "--run",
            "img",
            "--features_dir",
            str(world["root"] / "feats"),
            "--out",
            str(out),
            "--size",
            str(TILE),
            "--no-progress",
            *extra,
        ]
    )


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_top_rows_and_stats_match_numpy(ties):
    rng = np.random.default_rng(1)
    x = make_codes(rng, n=300, d=40)
    if ties:
        x = np.ceil(x)  # many equal activations: lower rows first
    cols = FeatureColumns.from_codes(SparseCodes.from_dense(x))
    rows, vals = cols.top(TOP)
    ref_rows, ref_vals = ref_top(x)
    for j in range(x.shape[1]):
        k = len(ref_rows[j])
        assert rows[j, :k].tolist() == ref_rows[j] and (rows[j, k:] == -1).all()
        np.testing.assert_array_equal(vals[j, :k], ref_vals[j])
    support = (x > 0).sum(0)
    np.testing.assert_array_equal(cols.support, support)
    np.testing.assert_allclose(cols.mass, x.astype(np.float64).sum(0), rtol=1e-6)
    np.testing.assert_allclose(cols.freq, support / 300)
    np.testing.assert_allclose(cols.mean_active, x.sum(0) / np.maximum(support, 1), rtol=1e-5)
    np.testing.assert_array_equal(cols.max, x.max(0))
    h = cols.histogram(5)
    acts = x[:, 5][x[:, 5] > 0]
    assert sum(h["counts"]) == support[5] and h["zeros"] == 300 - support[5]
    assert (h["lo"], h["hi"]) == (acts.min(), acts.max())  # from the smallest to the largest activation
    assert h["counts"] == np.histogram(acts, bins=30, range=(acts.min(), acts.max()))[0].tolist()
    assert select_features(cols, 16)[0] == [j for j in range(40) if support[j] >= 16]
    assert select_features(cols, 0)[0] == [j for j in range(40) if support[j] > 0]


def test_top_rows_of_empty_codes():
    cols = FeatureColumns.from_codes(SparseCodes.from_dense(np.zeros((5, 3), np.float32)))
    rows, vals = cols.top(4)
    assert (rows == -1).all() and (vals == 0).all() and select_features(cols, 1)[0] == []


def test_grid_layout():
    tiles = [Image.new("RGB", (10, 5), PALETTE[t + 1]) for t in range(7)] + [None]
    g = make_grid(tiles, size=10)
    assert g.size == (30, 30)
    a = np.asarray(g)
    assert tuple(a[2 + 2, 5]) == PALETTE[1] and tuple(a[0, 5]) == (255, 255, 255)  # centred, white margin
    assert tuple(a[10 + 5, 10 + 5]) == PALETTE[5]
    assert tuple(a[20 + 5, 10 + 2]) == (200, 200, 200)  # unreadable: grey
    assert tuple(a[25, 25]) == (255, 255, 255)  # missing: white


def test_file_names_sort_by_mass_for_any_finite_mass():
    assert preview_stem(12, 1234.5678) == "massp403_1.234568_feat00012"
    assert (mass_key(654.171), mass_key(-654.171), mass_key(0.0)) == ("p402_6.541710", "n597_3.458289", "o000_0.000000")
    rng = np.random.default_rng(3)
    values = [
        0.0,
        -0.0,
        5e-324,
        -5e-324,
        1e-300,
        0.5,
        1.0,
        9.9999996,
        10.0,
        999.9999,
        1e9,
        1e9 + 1,
        2.5e9,
        1e12,
        1.7976931348623157e308,
        -1.7976931348623157e308,
        -1e9,
        -2.5e9,
        -1.0,
        -0.5,
        -1e-7,
        99.0,
        1000.0,
        5.5,
    ]
    values += (rng.standard_normal(300) * 10.0 ** rng.integers(-12, 15, 300)).tolist()
    keys = [mass_key(v) for v in values]
    assert {len(k) for k in keys} == {13}  # fixed width: `ls` in any locale compares them field by field
    by_key = sorted(range(len(values)), key=lambda n: keys[n])
    for a, b in itertools.pairwise(by_key):  # text order is numeric order (equal keys: equal to 7 digits)
        assert values[a] <= values[b] or keys[a] == keys[b], (values[a], values[b], keys[a], keys[b])
    for v, k in zip(values, keys):  # and the key reads back as the number, to 7 significant digits
        if k[0] == "p":
            assert float(f"{k[5:]}e{int(k[1:4]) - 400}") == pytest.approx(v, rel=1e-6)
    names = sorted(preview_stem(i, v) for i, v in enumerate([3.0, -2.0, 2e9, 7.5, -1e10, 0.0]))
    assert [int(n[-5:]) for n in names] == [4, 1, 5, 0, 3, 2]
    with pytest.raises(ValueError, match="mass must be finite"):
        mass_key(float("nan"))


def test_image_run_grids(world, tmp_path):
    out = tmp_path / "prev"
    assert run_show(world, out, "--min_support", "5") == 0
    x, ids = world["layers"][7], world["row_ids"]  # default layer: the deepest
    support = (x > 0).sum(0)
    ref_rows, ref_vals = ref_top(x)
    expected = [j for j in range(D_SAE) if support[j] >= 5]
    grids = sorted(out.glob("*.jpg"))
    assert len(grids) == len(expected)
    feats = json.loads((out / "features.json").read_text())
    assert feats["layer"] == 7 and [f["index"] for f in feats["features"]] == expected
    for f in feats["features"]:
        j = f["index"]
        assert f["grid"] == preview_stem(j, float(x[:, j].astype(np.float64).sum())) + ".jpg"
        assert f["positions"] == ref_rows[j] and f["row_ids"] == [int(ids[r]) for r in ref_rows[j]]
        np.testing.assert_allclose(f["acts"], ref_vals[j])
        img = Image.open(out / f["grid"])
        cols, n_rows = grid_shape(len(f["row_ids"]))
        assert img.size == (cols * TILE, n_rows * TILE)  # sized to the rows it has
        assert tile_rows(img)[: len(ref_rows[j])] == f["row_ids"]  # each tile is the right dataset row
    assert not list(out.glob("*.txt"))  # image runs: grids only
    assert json.loads((out / "show.json").read_text())["run"] == "img"
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    serial = tmp_path / "serial"  # no worker threads: the same files
    assert run_show(world, serial, "--min_support", "5", "--workers", "0") == 0
    assert json.loads((serial / "features.json").read_text())["features"] == feats["features"]
    assert all((serial / g.name).read_bytes() == g.read_bytes() for g in grids)


def test_default_min_support_features_flag_and_rerun(world, tmp_path, capsys):
    out = tmp_path / "prev"
    assert run_show(world, out, "--layer", "3") == 0
    x = world["layers"][3]
    support = (x > 0).sum(0)
    feats = json.loads((out / "features.json").read_text())["features"]
    assert [f["index"] for f in feats] == [j for j in range(D_SAE) if support[j] >= 16]
    assert "0 already there" in capsys.readouterr().out
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.jpg")}
    assert run_show(world, out, "--layer", "3") == 0  # a rerun skips finished grids
    assert f"0 grids written, {len(mtimes)} already there" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.jpg")} == mtimes
    with pytest.raises(InputError, match="holds the previews of run 'img' layer 3"):
        run_show(world, out)  # layer 7 into layer 3's folder
    assert run_show(world, out, "--layer", "3", "--size", "12") == 0  # another size: every grid redone
    assert f"{len(mtimes)} grids written, 0 already there" in capsys.readouterr().out
    assert {Image.open(p).size for p in out.glob("*.jpg")} == {(36, 36)}

    few = tmp_path / "few"
    assert run_show(world, few, "--layer", "3", "--features", "1", "0", "2", "1") == 0
    feats = json.loads((few / "features.json").read_text())["features"]
    assert [f["index"] for f in feats] == [1, 2]  # min_support not applied, order kept, dead 0 skipped
    assert "feature 0 never fires" in capsys.readouterr().err
    cells = tile_rows(Image.open(few / feats[0]["grid"]))
    ids = world["row_ids"]
    assert cells == [int(ids[17]), int(ids[30]), int(ids[3])]  # 3 rows: a 3x1 grid, no blank cells
    with pytest.raises(InputError, match="--features 24 is out of range"):
        run_show(world, tmp_path / "bad", "--features", "24")


def test_text_run_captions_and_paired_images(world, tmp_path):
    root = tmp_path / "feats"
    x, ids = world["layers"][7], world["row_ids"]
    write_run(root, "txt", {7: x}, world["data"], ids, modality="text")
    out = tmp_path / "prev"
    assert (
        show.main(
            [
                "--run",
                "txt",
                "--features_dir",
                str(root),
                "--out",
                str(out),
                "--size",
                str(TILE),
                "--min_support",
                "20",
                "--no-progress",
            ]
        )
        == 0
    )
    ref_rows, ref_vals = ref_top(x)
    expected = [j for j in range(D_SAE) if (x[:, j] > 0).sum() >= 20]
    txts = sorted(out.glob("*.txt"))
    assert len(txts) == len(expected) == len(list(out.glob("*.jpg"))) and expected
    for j in expected:
        stem = preview_stem(j, float(x[:, j].astype(np.float64).sum()))
        lines = (out / f"{stem}.txt").read_text().splitlines()
        assert lines[0].startswith("#") and len(lines) == 1 + TOP
        for r, line in enumerate(lines[1:]):
            rank, act, row_id, cap = line.split("\t")
            want = int(ids[ref_rows[j][r]])
            assert (int(rank), int(row_id), cap) == (r + 1, want, caption(want))
            assert float(act) == pytest.approx(ref_vals[j][r], rel=1e-5)
        assert tile_rows(Image.open(out / f"{stem}.jpg")) == [int(ids[n]) for n in ref_rows[j]]


def test_runs_without_images(world, tmp_path):
    import datasets

    x = world["layers"][7]
    root = tmp_path / "feats"
    write_run(root, "nodata", {7: x}, None, world["row_ids"])
    with pytest.raises(InputError, match=r"run 'nodata' has no images to show: its run.json names no dataset"):
        show.main(["--run", "nodata", "--features_dir", str(root), "--out", str(tmp_path / "p1"), "--no-progress"])
    texts = datasets.Dataset.from_dict({"text": [caption(r) for r in range(N_DATASET)]})
    texts.save_to_disk(str(tmp_path / "textonly"))
    write_run(root, "textonly", {7: x}, tmp_path / "textonly", world["row_ids"], modality="text")
    with pytest.raises(InputError, match=r"run 'textonly' has no images to show: .*no column 'image'"):
        show.main(["--run", "textonly", "--features_dir", str(root), "--out", str(tmp_path / "p2"), "--no-progress"])
    # the script: one line on stderr, exit status 2
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "show.py"),
            "--run",
            "nodata",
            "--features_dir",
            str(root),
            "--out",
            str(tmp_path / "p3"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: run 'nodata' has no images to show: its run.json names no dataset; pass --dataset (a dataset "
        "name or folder; the original repo used --dataset coco)"
    ]
    with pytest.raises(InputError, match="no run 'missing'"):
        show.main(["--run", "missing", "--features_dir", str(root)])


def test_original_format_run_with_dataset_flag(world, tmp_path):
    import torch

    x = world["layers"][7][:, :]
    (tmp_path / "feats" / "orig").mkdir(parents=True)
    torch.save(torch.from_numpy(x).half(), tmp_path / "feats" / "orig" / "layer-1.pt")
    base = [
        "--run",
        "orig",
        "--features_dir",
        str(tmp_path / "feats"),
        "--out",
        str(tmp_path / "p"),
        "--size",
        str(TILE),
        "--features",
        "5",
        "--no-progress",
    ]
    with pytest.raises(InputError, match="it has no run.json"):
        show.main(base)
    assert show.main([*base, "--dataset", str(world["data"])]) == 0
    f = json.loads((tmp_path / "p" / "features.json").read_text())["features"][0]
    ref_rows, _ = ref_top(x.astype(np.float16).astype(np.float32))
    assert f["row_ids"] == ref_rows[5]  # no row_ids: run row n is dataset row n
    assert tile_rows(Image.open(tmp_path / "p" / f["grid"]))[: len(ref_rows[5])] == ref_rows[5]


def test_rerun_with_another_selection_removes_the_files_no_longer_shown(world, tmp_path, capsys):
    out = tmp_path / "prev"
    x = world["layers"][3]
    support = (x > 0).sum(0)
    many = [j for j in range(D_SAE) if support[j] >= 5]
    assert run_show(world, out, "--layer", "3", "--min_support", "5", "--html") == 0
    mine = ["notes.txt", "mass_of_notes.jpg", "features/my.html", "features/f1.html"]  # not named like ours
    for name in mine:
        (out / name).write_text("mine")
    old_style = out / "mass000000012.345_feat00003.jpg"  # a grid named by an earlier version of show.py
    old_style.write_bytes(b"jpeg")
    capsys.readouterr()

    few = [many[2], many[0]]
    assert run_show(world, out, "--layer", "3", "--features", *map(str, few), "--html") == 0
    assert "files of features no longer shown removed" in capsys.readouterr().out

    def stem(j: int) -> str:
        return preview_stem(j, float(x[:, j].astype(np.float64).sum()))

    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {
        "show.json",
        "features.json",
        "index.html",
        "links.js",
        *mine,
        *(f"{stem(j)}.jpg" for j in few),
        *(f"features/f{j:05d}.html" for j in few),
    }
    from tests.test_browser import dom

    rows = dom(out / "index.html").find_all("table", id="features")[0].find_all("tr")[1:]
    assert [int(r.attr("data-index")) for r in rows] == few

    # without --html: the browser written before is kept in step with the grids
    assert run_show(world, out, "--layer", "3", "--min_support", "5") == 0
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {
        "show.json",
        "features.json",
        "index.html",
        "links.js",
        *mine,
        *(f"{stem(j)}.jpg" for j in many),
        *(f"features/f{j:05d}.html" for j in many),
    }
    rows = dom(out / "index.html").find_all("table", id="features")[0].find_all("tr")[1:]
    assert [int(r.attr("data-index")) for r in rows] == many


def test_captions_are_optional_for_image_runs_only(world, tmp_path):
    data = make_dataset(tmp_path / "nocap", size=(16, 16), captions=False)
    root = tmp_path / "feats"
    x, ids = world["layers"][7], world["row_ids"]
    write_run(root, "img", {7: x}, data, ids)
    out = tmp_path / "prev"
    base = ["--features_dir", str(root), "--size", str(TILE), "--min_support", "20", "--no-progress"]
    assert show.main(["--run", "img", "--out", str(out), "--html", *base]) == 0
    feats = json.loads((out / "features.json").read_text())
    assert feats["captions"] is False and feats["features"]
    ref_rows, _ = ref_top(x)
    for f in feats["features"]:
        assert f["captions"] is None
        assert tile_rows(Image.open(out / f["grid"])) == [int(ids[n]) for n in ref_rows[f["index"]]]
    page = (out / "features" / f"f{feats['features'][0]['index']:05d}.html").read_text()
    assert "<th>activation</th></tr>" in page and "caption</th>" not in page

    write_run(root, "txt", {7: x}, data, ids, modality="text")
    with pytest.raises(
        InputError,
        match=r"^run 'txt' has no captions to show: its dataset '.*nocap' has no caption "
        r"column 'text' \(columns: image, kind\); pass --text_column$",
    ):
        show.main(["--run", "txt", "--out", str(tmp_path / "p2"), *base])
    with pytest.raises(InputError, match=r"has no caption column 'caption'"):  # asked for: it must exist
        show.main(["--run", "img", "--out", str(tmp_path / "p3"), "--text_column", "caption", *base])
