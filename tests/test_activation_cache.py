"""Extraction into the on-disk activation cache: contents equal the adapters' own outputs, shards are
row-aligned across layers, a second run reuses the cache without the model, a killed run resumes,
unreadable images stop the run or are dropped and recorded, and the real MiniLM runs end to end."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import time

import numpy as np
import pytest
import torch

import wrappedmodels as wm
from sae.data.cache import CacheConfig, cache_key, extract_activations, open_cache
from sae.data.datasets import DataConfig, load_pairs, make_shapes_dataset, pairs_from_config
from sae.encoders.tiny import minilm_dir
from sae.util.cli import add_dataclass_args, dataclass_from_args
from sae.util.errors import InputError

MINILM = minilm_dir()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTImageProcessor, ViTModel

    root = tmp_path_factory.mktemp("cache")
    torch.manual_seed(0)
    vit = root / "vit"
    ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=48,
        )
    ).save_pretrained(vit)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit)
    bert = root / "bert"
    BertModel(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=48,
            max_position_embeddings=64,
        )
    ).save_pretrained(bert)
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(bert)
    shapes = make_shapes_dataset(root / "shapes", n=24, seed=1)
    return {
        "root": root,
        "vit": wm.ModelSpec("ViT", str(vit)),
        "bert": wm.ModelSpec("Bert", str(bert)),
        "shapes": shapes,
    }


def _cfg(path, **kw):
    return CacheConfig(cache_dir=str(path), num_workers=0, extract_batch_size=kw.pop("bs", 5), **kw)


def _direct(adapter, pairs, modality, layers, token="pooled"):
    """Reference: the adapter on every row, tokens of the mask in row order."""
    items = [pairs.read(n, modality) for n in range(len(pairs))]
    out = adapter.forward(adapter.preprocess(items), layers, token=token)
    toks = {layer: out.hidden[layer][out.mask] for layer in layers}
    rows = torch.arange(len(items)).repeat_interleave(out.mask.sum(1))
    return toks, {layer: out.pooled[layer] for layer in layers}, rows, out.mask.nonzero()[:, 1]


@pytest.mark.parametrize("modality", ["image", "text"])
def test_cache_equals_adapter_outputs(setup, tmp_path, modality):
    spec = setup["vit" if modality == "image" else "bert"]
    pairs = load_pairs(str(setup["shapes"]), max_samples=13)
    adapter = spec.load("cpu")
    cache = extract_activations(
        spec, pairs, [0, -1], _cfg(tmp_path, cache_dtype="float32"), adapter=adapter, shard_tokens=37, progress=False
    )
    assert cache.path == tmp_path / cache.meta["key"] and cache.layers == [0, 2]
    assert cache.meta["token_rule"] == "first" and cache.d_model == 32 and cache.n_rows == 13
    toks, pooled, rows, pos = _direct(adapter, pairs, modality, [0, 2])
    assert cache.n_tokens == len(rows) and cache.row_ids.tolist() == list(range(13))
    sizes = [s.shape[0] for s in cache.token_shards(0)]
    assert sizes == [s.shape[0] for s in cache.token_shards(2)] == cache.meta["layouts"][0]["shard_sizes"]
    assert cache.layouts == [[0, 2]] and cache.meta["token_files"] == "shared" and len(sizes) > 2
    # shards close after the batch (5 rows) that brings them to 37 tokens: no row straddles two shards
    assert all(s >= 37 for s in sizes[:-1]) and sum(cache.meta["shard_rows"]) == 13
    ends = np.cumsum(sizes)[:-1]
    assert all(cache.token_row()[e] != cache.token_row()[e - 1] for e in ends)
    for layer in (0, 2):
        stored = np.concatenate(cache.token_shards(layer))
        np.testing.assert_allclose(stored, toks[layer].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cache.pooled(layer), pooled[layer].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.token_row(), rows.numpy())
    np.testing.assert_array_equal(cache.token_pos(), pos.numpy())
    s1 = cache.shard_slices()[1]
    np.testing.assert_array_equal(cache.token_row()[s1], rows.numpy()[s1])
    if modality == "text":  # variable lengths: padding is not stored
        assert len(set(np.bincount(cache.token_row()).tolist())) > 1
    else:
        assert np.bincount(cache.token_row()).tolist() == [17] * 13
    assert not list(tmp_path.glob(".*.partial"))
    assert not list(cache.path.glob("token_row-*")) and not list(cache.path.glob("layer*/pooled.work.npy"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes(setup, tmp_path, dtype):
    pairs = load_pairs(str(setup["shapes"]), max_samples=6)
    adapter = setup["bert"].load("cpu")
    cache = extract_activations(
        setup["bert"], pairs, [1], _cfg(tmp_path, cache_dtype=dtype), adapter=adapter, token="mean", progress=False
    )
    shard = cache.token_shards(1)[0]
    assert shard.dtype == (np.float16 if dtype == "float16" else np.uint16)
    toks, pooled, _, _ = _direct(adapter, pairs, "text", [1], token="mean")
    torch.testing.assert_close(cache.to_tensor(shard), toks[1], rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(cache.to_tensor(cache.pooled(1)), pooled[1], rtol=1e-2, atol=2e-2)


def test_reuse_without_loading_the_model(setup, tmp_path, monkeypatch):
    spec, pairs = setup["vit"], load_pairs(str(setup["shapes"]), max_samples=8)
    first = extract_activations(spec, pairs, [0, 1, 2], _cfg(tmp_path), device="cpu", progress=False)

    def unloadable(*_a, **_k):
        raise AssertionError("the model must not be loaded for a cached run")

    monkeypatch.setattr(wm.ModelSpec, "load", unloadable)
    again = extract_activations(spec, pairs, [0, -2, -1], _cfg(tmp_path), progress=False)
    assert again.path == first.path
    subset = extract_activations(spec, pairs, [-1], _cfg(tmp_path), progress=False)  # a subset of layers
    assert subset.path == first.path and subset.pooled(2).shape == (8, 32)
    with pytest.raises(AssertionError, match="must not be loaded"):  # anything else (here: other rows) needs the model
        extract_activations(spec, load_pairs(str(setup["shapes"]), max_samples=9), [-1], _cfg(tmp_path), progress=False)
    with pytest.raises(InputError, match=r"layer 5 is not in .*layers: 0, 1, 2"):
        first.pooled(5)


class _Killer:
    """Wraps adapter.forward: raises KeyboardInterrupt at the given call, counts calls."""

    def __init__(self, adapter, kill_at=None):
        self.adapter, self.kill_at, self.calls = adapter, kill_at, 0
        self.forward = adapter.forward
        adapter.forward = self

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt
        return self.forward(*a, **k)


def test_killed_run_resumes(setup, tmp_path):
    spec, pairs = setup["bert"], load_pairs(str(setup["shapes"]))
    cfg = _cfg(tmp_path / "a", cache_dtype="float32", bs=3)
    ref = extract_activations(
        spec,
        pairs,
        [0, 2],
        _cfg(tmp_path / "ref", cache_dtype="float32", bs=3),
        device="cpu",
        shard_tokens=31,
        progress=False,
    )
    adapter = spec.load("cpu")
    killer = _Killer(adapter, kill_at=5)
    with pytest.raises(KeyboardInterrupt, match="^$"):  # raised by _Killer
        extract_activations(spec, pairs, [0, 2], cfg, adapter=adapter, shard_tokens=31, progress=False)
    partial = next((tmp_path / "a").glob(".*.partial"))
    assert not (tmp_path / "a" / partial.name[1 : -len(".partial")]).exists()
    with pytest.raises(InputError, match="not a finished activation cache"):
        open_cache(partial)
    progress = json.loads((partial / "progress.json").read_text())
    assert progress["shards_done"] > 0 and progress["restart"] == sum(progress["shard_rows"])
    assert progress["restart"] % 3 == 0 and progress["restart"] <= 12  # shards close at batch ends
    killer.kill_at, killer.calls = 2, 0  # killed again while resuming
    with pytest.raises(KeyboardInterrupt, match="^$"):  # raised by _Killer
        extract_activations(spec, pairs, [0, 2], cfg, adapter=adapter, shard_tokens=31, progress=False)
    assert json.loads((partial / "progress.json").read_text())["restart"] >= progress["restart"]
    killer.kill_at, killer.calls = None, 0
    done = extract_activations(spec, pairs, [0, 2], cfg, adapter=adapter, shard_tokens=31, progress=False)
    assert 0 < killer.calls < 8  # resumed: 24 rows / 3 per batch = 8 batches for a full run
    assert done.meta["layouts"] == ref.meta["layouts"] and done.meta["shard_rows"] == ref.meta["shard_rows"]
    for layer in (0, 2):  # bitwise: the same batches through the same forward
        np.testing.assert_array_equal(np.concatenate(done.token_shards(layer)), np.concatenate(ref.token_shards(layer)))
        np.testing.assert_array_equal(done.pooled(layer), ref.pooled(layer))
    np.testing.assert_array_equal(done.token_row(), ref.token_row())
    assert not partial.exists()


def test_unreadable_image_stops_or_is_dropped(setup, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in setup["shapes"].iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "000003.png").write_bytes(b"\x89PNG broken")
    pairs = load_pairs(str(bad), max_samples=10)
    with pytest.raises(InputError, match=r"row 3: unreadable image"):
        extract_activations(setup["vit"], pairs, [-1], _cfg(tmp_path / "c"), device="cpu", progress=False)
    img = extract_activations(
        setup["vit"], pairs, [-1], _cfg(tmp_path / "c"), device="cpu", skip_bad=True, progress=False
    )
    kept = [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert img.row_ids.tolist() == kept and img.meta["bad_rows"] == [3] and img.n_rows == 9
    assert img.pooled(2).shape == (9, 32) and img.n_tokens == 9 * 17
    # the text run restricted to the rows the image run kept: row n is the same pair again
    cfg = DataConfig(dataset=str(bad), row_ids_from=str(img.path))
    text_pairs = pairs_from_config(cfg)
    txt = extract_activations(setup["bert"], text_pairs, [-1], _cfg(tmp_path / "c"), device="cpu", progress=False)
    assert txt.row_ids.tolist() == kept
    assert text_pairs.texts()[3] == load_pairs(str(bad)).texts()[4]


def test_minilm_end_to_end_from_flags(tmp_path):
    """The real pretrained MiniLM (a BERT shipped as files) as --model Bert --bert_model_name <dir>."""
    from transformers import AutoTokenizer, BertModel

    p = argparse.ArgumentParser()
    wm.add_model_args(p, "text")
    add_dataclass_args(p, DataConfig)
    add_dataclass_args(p, CacheConfig)
    args = p.parse_args(
        [
            "--model",
            "Bert",
            "--bert_model_name",
            str(MINILM),
            "--layers",
            "0",
            "-1",
            "--dataset",
            "shapes:20",
            "--data_root",
            str(tmp_path / "data"),
            "--max_samples",
            "16",
            "--cache_dir",
            str(tmp_path / "cache"),
            "--num_workers",
            "1",
            "--extract_batch_size",
            "8",
        ]
    )
    spec = wm.spec_from_args(args)
    pairs = pairs_from_config(dataclass_from_args(DataConfig, args))
    cache = extract_activations(
        spec, pairs, args.layers, dataclass_from_args(CacheConfig, args), token=args.token, device="cpu", progress=False
    )
    assert cache.layers == [0, 5] and cache.d_model == 384 and cache.n_rows == 16
    tok = AutoTokenizer.from_pretrained(MINILM)
    enc = tok(pairs.texts(), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hs = BertModel.from_pretrained(MINILM).eval()(**enc, output_hidden_states=True).hidden_states
    assert cache.n_tokens == int(enc["attention_mask"].sum())
    np.testing.assert_allclose(cache.to_tensor(cache.pooled(5)).numpy(), hs[6][:, 0].numpy(), atol=2e-2, rtol=1e-2)
    real = hs[1][enc["attention_mask"].bool()]
    np.testing.assert_allclose(
        cache.to_tensor(np.concatenate(cache.token_shards(0))).numpy(), real.numpy(), atol=2e-2, rtol=1e-2
    )
    assert cache.path.parent == tmp_path / "cache" and cache.path.name == cache_key(cache.meta["material"])


def test_float16_overflow_is_an_error(setup, tmp_path):
    adapter = setup["bert"].load("cpu")
    forward = adapter.forward

    def huge(*a, **k):
        out = forward(*a, **k)
        out.hidden = {layer: h * 1e6 for layer, h in out.hidden.items()}
        return out

    adapter.forward = huge
    with pytest.raises(InputError, match=r"layer 2, row 0: activations overflow float16.*bfloat16"):
        extract_activations(
            setup["bert"],
            load_pairs(str(setup["shapes"]), max_samples=4),
            [-1],
            _cfg(tmp_path),
            adapter=adapter,
            progress=False,
        )


# ------------------------------------------------------------- layers of different widths and token counts


@pytest.fixture(scope="module")
def resnet(setup):
    from sae.encoders.tiny import build_open_clip_resnet

    with contextlib.redirect_stderr(io.StringIO()):
        return wm.ModelSpec("ClipVision", str(build_open_clip_resnet(setup["root"])))


def test_clip_resnet_layers_keep_their_own_layout(setup, resnet, tmp_path):
    """Stage 1 (8x8 = 64 tokens of width 32), stage 3 (2x2 tokens of width 128) and the attention pool
    (1 token of width 16) in one cache: per-layer widths, token rows and shard sizes; row-aligned shards;
    killed and resumed, bit for bit the same."""
    pairs = load_pairs(str(setup["shapes"]), max_samples=11)
    adapter = resnet.load("cpu")
    cfg = _cfg(tmp_path / "a", cache_dtype="float32", bs=2)
    ref = extract_activations(resnet, pairs, [0, 2, -1], cfg, adapter=adapter, shard_tokens=150, progress=False)
    assert ref.layers == [0, 2, 4] and [ref.d_of(l) for l in ref.layers] == [32, 128, 16]
    assert ref.layouts == [[0], [2], [4]] and ref.meta["token_files"] == "per_layer"
    assert [ref.n_tokens_of(l) for l in ref.layers] == [11 * 64, 11 * 4, 11]
    with pytest.raises(InputError, match="different widths"):
        _ = ref.d_model
    with pytest.raises(InputError, match="different token layouts"):
        ref.token_row()
    # shards close after the batch (2 rows = 128 stage-1 tokens) that brings stage 1 to 150 tokens
    assert ref.meta["shard_rows"] == [4, 4, 3]
    assert [s.shape[0] for s in ref.token_shards(0)] == [256, 256, 192]
    assert [s.shape[0] for s in ref.token_shards(4)] == [4, 4, 3]
    items = [pairs.read(n, "image") for n in range(11)]
    out = adapter.forward(adapter.preprocess(items), [0, 2, 4])
    for layer, T in ((0, 64), (2, 4), (4, 1)):
        np.testing.assert_allclose(
            np.concatenate(ref.token_shards(layer)), out.hidden[layer].reshape(11 * T, -1), rtol=1e-5, atol=1e-6
        )  # batches of 2 rows against one of 11
        np.testing.assert_array_equal(ref.token_row(layer), np.repeat(np.arange(11), T))
        np.testing.assert_array_equal(ref.token_pos(layer), np.tile(np.arange(T), 11))
        np.testing.assert_allclose(ref.pooled(layer), out.pooled[layer].numpy(), rtol=1e-6, atol=1e-6)
    # killed after the 3rd batch (one shard closed), then resumed
    killer = _Killer(adapter, kill_at=4)
    cfg_b = _cfg(tmp_path / "b", cache_dtype="float32", bs=2)
    with pytest.raises(KeyboardInterrupt, match="^$"):  # raised by _Killer
        extract_activations(resnet, pairs, [0, 2, -1], cfg_b, adapter=adapter, shard_tokens=150, progress=False)
    killer.kill_at, killer.calls = None, 0
    done = extract_activations(resnet, pairs, [0, 2, -1], cfg_b, adapter=adapter, shard_tokens=150, progress=False)
    assert killer.calls == 4  # rows 4..10 at 2 per batch
    assert done.meta["layouts"] == ref.meta["layouts"] and done.meta["shard_rows"] == ref.meta["shard_rows"]
    for layer in ref.layers:
        for a, b in zip(done.token_shards(layer), ref.token_shards(layer)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(done.token_row(layer), ref.token_row(layer))
        np.testing.assert_array_equal(done.pooled(layer), ref.pooled(layer))


def test_siglip_text_trains_on_its_pooled_position(tmp_path):
    """SiglipText attends to every position and pools the last one (usually padding): its training tokens
    are the real tokens plus that position, so the recorded vector is one of them."""
    from sae.encoders.tiny import build_siglip

    with contextlib.redirect_stderr(io.StringIO()):
        spec = wm.ModelSpec("SiglipText", str(build_siglip(tmp_path)))
    pairs = load_pairs("shapes:9", data_root=str(tmp_path / "data"))
    cache = extract_activations(
        spec, pairs, [-1], _cfg(tmp_path / "c", cache_dtype="float32"), device="cpu", progress=False
    )
    assert cache.meta["token_rule"] == "final" and cache.meta["train_tokens"].startswith("real tokens + final")
    enc = spec.load("cpu").preprocess(pairs.texts())
    real = enc["attention_mask"].sum(1).numpy()
    assert (real < 16).all()  # 16 positions, every caption shorter: position 15 is padding
    assert np.bincount(cache.token_row()).tolist() == (real + 1).tolist()
    last = np.flatnonzero(np.diff(np.append(cache.token_row(), 9)))  # each row's last stored token
    assert (cache.token_pos()[last] == 15).all()
    np.testing.assert_array_equal(np.concatenate(cache.token_shards(2))[last], cache.pooled(2))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nan_in_encoder_output_is_an_error(setup, tmp_path, dtype):
    adapter = setup["bert"].load("cpu")
    forward = adapter.forward

    def broken(*a, **k):
        out = forward(*a, **k)
        h = out.hidden[2].clone()
        h[1, 0, 3] = float("nan")  # row 1 of the first batch, its [CLS] token
        out.hidden[2] = h
        return out

    adapter.forward = broken
    with pytest.raises(InputError, match=r"layer 2, row 1: the encoder output holds NaN or inf"):
        extract_activations(
            setup["bert"],
            load_pairs(str(setup["shapes"]), max_samples=4),
            [-1],
            _cfg(tmp_path, cache_dtype=dtype),
            adapter=adapter,
            progress=False,
        )


def test_leftovers_of_dead_processes_are_removed(setup, tmp_path):
    """Temporaries of dead processes untouched for 10 minutes go; those of live processes, or touched
    recently (maybe a live process of another host), stay; an unfinished extraction of a dead process is
    removed when it closed no shard, kept (resumable) otherwise."""
    exited = subprocess.Popen(["true"])
    exited.wait()
    dead = exited.pid
    root = tmp_path / "cache"
    root.mkdir()
    (root / f".meta.json.tmp-{dead}").write_text("x")
    (root / f".meta.json.tmp-{os.getpid()}").write_text("x")
    for name, shards in (("empty", 0), ("started", 2), ("recent", 0)):
        p = root / f".Bert-{name}.partial"
        (p / "layer00").mkdir(parents=True)
        (p / "layer00" / f".pooled.npy.tmp-{dead}").write_text("x")
        (p / "config.json").write_text(json.dumps({"material": {"format": "actcache-v2"}}))
        (p / "progress.json").write_text(json.dumps({"shards_done": shards}))
    (root / ".Old-v1.partial").mkdir()
    (root / ".Old-v1.partial" / "config.json").write_text(
        json.dumps({"material": {"format": "actcache-v1"}, "shards_done": 3})
    )
    (root / f".recent.json.tmp-{dead}").write_text("x")
    an_hour_ago = time.time() - 3600
    for p in root.rglob("*"):
        if "recent" not in str(p.relative_to(root)):
            os.utime(p, (an_hour_ago, an_hour_ago))
    extract_activations(
        setup["bert"], load_pairs(str(setup["shapes"]), max_samples=3), [-1], _cfg(root), device="cpu", progress=False
    )
    left = {p.relative_to(root).as_posix() for p in root.rglob("*") if ".partial" in str(p) or "tmp-" in p.name}
    recent = {
        ".Bert-recent.partial",
        ".Bert-recent.partial/config.json",
        ".Bert-recent.partial/layer00",
        ".Bert-recent.partial/progress.json",
        f".Bert-recent.partial/layer00/.pooled.npy.tmp-{dead}",
        f".recent.json.tmp-{dead}",
    }
    assert (
        left
        == {
            f".meta.json.tmp-{os.getpid()}",
            ".Bert-started.partial",
            ".Bert-started.partial/config.json",
            ".Bert-started.partial/layer00",
            ".Bert-started.partial/progress.json",
        }
        | recent
    )
