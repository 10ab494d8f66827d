"""Paired rows, the generated shapes dataset, unreadable images, row-id restriction."""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import numpy as np
import pytest
from PIL import Image

from sae.data.datasets import (
    COCO,
    COLOURS,
    BadRow,
    DataConfig,
    load_pairs,
    make_shapes_dataset,
    pairs_from_config,
    read_row_ids,
    shapes_dataset,
)
from sae.util.cli import add_dataclass_args, dataclass_from_args
from sae.util.errors import InputError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n=40, seed=3)


def _digest(d):
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        if p.name != "shapes.json":
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_shapes_dataset_is_deterministic_and_fast(tmp_path):
    t = time.perf_counter()
    a = make_shapes_dataset(tmp_path / "a", n=200, seed=7)
    assert time.perf_counter() - t < 2.0
    b = make_shapes_dataset(tmp_path / "b", n=200, seed=7)
    c = make_shapes_dataset(tmp_path / "c", n=200, seed=8)
    assert _digest(a) == _digest(b) != _digest(c)
    rows = [json.loads(x) for x in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and len(list(a.glob("*.png"))) == 200
    for r in rows[:20]:
        for attr in ("shape", "colour", "size"):
            assert r[attr] in r["text"]
        assert r["position"] in r["text"] and r["text"].startswith("a ")
        img = Image.open(a / r["file_name"]).convert("RGB")
        pixels = np.asarray(img).reshape(-1, 3)
        assert (pixels == COLOURS[r["colour"]]).all(1).sum() > 20  # the named colour is drawn
    assert len({r["text"] for r in rows}) > 30  # varied captions
    mtime = (a / "metadata.jsonl").stat().st_mtime_ns
    make_shapes_dataset(tmp_path / "a", n=200, seed=7)  # same parameters: kept as is
    assert (a / "metadata.jsonl").stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob(".*tmp*"))


def test_pairs_from_imagefolder(shapes):
    meta = [json.loads(x) for x in (shapes / "metadata.jsonl").read_text().splitlines()]
    pairs = load_pairs(str(shapes))
    assert len(pairs) == 40 and pairs.row_ids.dtype == np.int64
    assert pairs.texts() == [m["text"] for m in meta]
    img = pairs.image(5)
    assert img.mode == "RGB" and img.size == (64, 64)
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(shapes / meta[5]["file_name"]).convert("RGB")))
    # image n and text n are the same pair, for a max_samples prefix and for explicit row ids
    few = load_pairs(str(shapes), max_samples=7)
    assert few.row_ids.tolist() == list(range(7)) and few.texts() == pairs.texts()[:7]
    sub = load_pairs(str(shapes), row_ids=[9, 2, 30])
    assert sub.texts() == [meta[i]["text"] for i in (9, 2, 30)]
    assert np.array_equal(np.asarray(sub.image(0)), np.asarray(pairs.image(9)))
    ds = sub.torch_dataset("text", start=1)
    assert len(ds) == 2 and ds[0] == (1, meta[2]["text"])
    assert pairs.identity("image") != pairs.identity("text") != sub.identity("text")
    assert pairs.identity("image") == load_pairs(str(shapes)).identity("image")
    with pytest.raises(InputError, match="out of range"):
        load_pairs(str(shapes), row_ids=[40])


def test_unreadable_image_names_the_row(shapes, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in shapes.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "000004.png").write_bytes(b"not a png")
    pairs = load_pairs(str(bad))
    with pytest.raises(InputError, match=r"row 4: unreadable image .*--skip_bad"):
        pairs.image(4)
    item = pairs.torch_dataset("image")[4][1]
    assert isinstance(item, BadRow) and item.row_id == 4
    assert not isinstance(pairs.torch_dataset("image")[3][1], BadRow)


def test_flags_and_errors(shapes, tmp_path):
    p = argparse.ArgumentParser()
    add_dataclass_args(p, DataConfig)
    cfg = dataclass_from_args(DataConfig, p.parse_args([]))
    assert cfg.dataset == COCO and cfg.split == "train" and cfg.image_column == "image"
    assert cfg.text_column == "text" and cfg.max_samples is None and cfg.skip_bad is False
    cfg = dataclass_from_args(DataConfig, p.parse_args(["--dataset", str(shapes), "--max_samples", "5"]))
    assert len(pairs_from_config(cfg)) == 5
    (tmp_path / "meta.json").write_text(json.dumps({"row_ids": [3, 1]}))
    cfg.row_ids_from = str(tmp_path)
    assert pairs_from_config(cfg).row_ids.tolist() == [3, 1]
    np.save(tmp_path / "ids.npy", np.array([2, 0]))
    assert read_row_ids(tmp_path / "ids.npy").tolist() == [2, 0]
    with pytest.raises(InputError, match="no column 'caption'"):
        load_pairs(str(shapes), text_column="caption")
    with pytest.raises(InputError, match="no-such-org/no-such-dataset") as e:
        load_pairs("no-such-org/no-such-dataset")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="shapes:N"):
        shapes_dataset("shapes:x", tmp_path)
    assert shapes_dataset("shapes:12:1", tmp_path).name == "shapes-12-seed1"
    assert len(load_pairs("shapes:12:1", data_root=tmp_path)) == 12
