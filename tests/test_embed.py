"""Final projected embeddings of both towers (analyze.py embed), then joint -> bridge on them, and names
with a vocabulary embedded by the text tower (--vlm), on tiny random-weight towers and shapes data."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any, cast

import numpy as np
import pytest
import torch

import analyze
import wrappedmodels as wm
from sae.analysis.embed import open_embeddings
from sae.analysis.naming import feature_directions, name_features
from sae.data.datasets import load_pairs, make_shapes_dataset
from sae.encoders.tiny import build_open_clip, build_siglip
from sae.nn.checkpoint import load_sae
from sae.util.errors import InputError

N = 24
WORDS = [
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "circle",
    "square",
    "triangle",
    "small",
    "large",
    "top left",
    "bottom right",
    "center",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    with contextlib.redirect_stderr(io.StringIO()):
        clip = build_open_clip(root)
    data = make_shapes_dataset(root / "shapes", n=N, seed=2)
    return {"root": root, "clip": clip, "data": data}


def embed_args(setup, out, *extra):
    return [
        "embed",
        "--vlm",
        "clip",
        "--clip_model_name",
        str(setup["clip"]),
        "--dataset",
        str(setup["data"]),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
        "--batch_size",
        "7",
        *extra,
    ]


def open_clip_reference(setup):
    """The same pairs through open_clip directly: encode_image / encode_text."""
    import open_clip

    name = "local-dir:" + str(setup["clip"])
    with contextlib.redirect_stderr(io.StringIO()):
        model, _, preprocess = cast(Any, open_clip.create_model_and_transforms(name))  # untyped in open_clip
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    pairs = load_pairs(str(setup["data"]))
    images = torch.stack([preprocess(pairs.image(n)) for n in range(len(pairs))])
    with torch.no_grad():
        return (
            model.encode_image(images).numpy(),
            model.encode_text(tokenizer(cast("list[str]", pairs.texts()))).numpy(),  # every caption is present
            model.encode_text(tokenizer(WORDS)).numpy(),
        )


def test_embed_then_joint_then_bridge_identity(setup, tmp_path, capsys):
    E = tmp_path / "E"
    assert analyze.main(embed_args(setup, E, "--json")) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["n_rows"] == N and js["d"] == 16 and not js["reused"]
    assert sorted(p.name for p in E.iterdir()) == ["image.npy", "meta.json", "row_ids.npy", "text.npy"]
    emb = open_embeddings(E)
    ref_img, ref_txt, _ = open_clip_reference(setup)
    np.testing.assert_allclose(emb.image, ref_img, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(emb.text, ref_txt, rtol=1e-4, atol=1e-5)
    assert emb.row_ids.tolist() == list(range(N)) and emb.meta["vlm"] == "clip" and emb.image.dtype == np.float32
    # the same flags again: reused; other settings into the same folder: refused
    assert analyze.main(embed_args(setup, E, "--json")) == 0
    assert json.loads(capsys.readouterr().out)["reused"]
    with pytest.raises(InputError, match="--overwrite"):
        analyze.main(embed_args(setup, E, "--normalize"))
    assert analyze.main(embed_args(setup, tmp_path / "En", "--normalize", "--max_samples", "10")) == 0
    capsys.readouterr()
    np.testing.assert_allclose(np.linalg.norm(open_embeddings(tmp_path / "En").image, axis=1), 1, atol=1e-6)

    # joint on the folder, then bridge on it: the bias-free identity sum(B) = mean <z_img D, z_txt D>
    common = ["--embeddings", str(E), "--no-progress", "--json", "--top", "3"]
    assert (
        analyze.main(
            [
                "joint",
                *common,
                "--out",
                str(tmp_path / "J"),
                "--d_sae",
                "32",
                "--k",
                "2",
                "--epochs",
                "2",
                "--batch_size",
                "16",
                "--lr",
                "1e-2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert json.loads((tmp_path / "J" / "joint.json").read_text())["source"]["embeddings"] == str(E)
    assert analyze.main(["bridge", "--sae", str(tmp_path / "J"), *common, "--device", "cpu"]) == 0
    js = json.loads(capsys.readouterr().out)
    sae = load_sae(tmp_path / "J")
    assert json.loads((tmp_path / "J" / "joint.json").read_text())["normalized"]  # the default: unit-norm rows
    unit = [
        np.asarray(x, np.float64) / np.linalg.norm(np.asarray(x, np.float64), axis=1, keepdims=True)
        for x in (emb.image, emb.text)
    ]
    img, txt = (x.astype(np.float32) for x in unit)  # the SAE reads float32 rows
    with torch.no_grad():
        zi = sae.encode(torch.from_numpy(img)).double().numpy()
        zt = sae.encode(torch.from_numpy(txt)).double().numpy()
    D = sae.W_dec.detach().double().numpy()
    expected = float(np.mean(np.sum((zi @ D) * (zt @ D), axis=1)))
    assert js["n_image"] == js["n_text"] == N
    assert js["alignment"]["sum_B"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert js["bridge"]["sum_B"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # errors: both sources, a folder that is not an embeddings folder
    with pytest.raises(InputError, match="not both"):
        analyze.main(
            ["bridge", "--sae", str(tmp_path / "J"), "--embeddings", str(E), "--image_embeddings", str(E / "image.npy")]
        )
    with pytest.raises(InputError, match="not an embeddings folder"):
        analyze.main(["bridge", "--sae", str(tmp_path / "J"), "--embeddings", str(tmp_path)])
    with pytest.raises(InputError, match="--embeddings"):
        analyze.main(["bridge", "--sae", str(tmp_path / "J")])


def test_names_with_a_vocabulary_embedded_by_the_text_tower(setup, tmp_path, capsys, monkeypatch):
    from sae.nn.checkpoint import save_sae
    from sae.nn.config import SAEConfig
    from sae.nn.model import SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=24, k=2, seed=0))
    save_sae(sae, tmp_path / "S")
    (tmp_path / "words.txt").write_text("\n".join(WORDS) + "\n")
    args = [
        "names",
        "--sae",
        str(tmp_path / "S"),
        "--vlm",
        "clip",
        "--clip_model_name",
        str(setup["clip"]),
        "--vocab",
        str(tmp_path / "words.txt"),
        "--vocab_cache",
        str(tmp_path / "cache"),
        "--top",
        "3",
        "--device",
        "cpu",
        "--no-progress",
        "--json",
    ]
    assert analyze.main(args) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["cached"] is False and js["n_words"] == len(WORDS)
    cached = np.load(js["vocab_cache"])
    _, _, ref_words = open_clip_reference(setup)
    np.testing.assert_allclose(cached, ref_words, rtol=1e-4, atol=1e-5)
    ref = name_features(feature_directions(load_sae(tmp_path / "S")), ref_words, WORDS, 3, device="cpu")
    assert [[w for w, _ in v] for v in js["names"].values()] == [[w for w, _ in ref.names(f)] for f in range(24)]
    # a second call reads the cache: the model is not loaded
    monkeypatch.setattr(wm.ModelSpec, "load", lambda *a, **k: pytest.fail("the model was loaded again"))
    assert analyze.main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["cached"] is True and again["names"] == js["names"]
    # a damaged cache file (truncated) is computed again, not an error
    monkeypatch.undo()
    with open(js["vocab_cache"], "r+b") as f:
        f.truncate(100)
    assert analyze.main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["cached"] is False and again["names"] == js["names"]
    with pytest.raises(InputError, match="--vlm"):
        analyze.main(["names", "--sae", str(tmp_path / "S")])
    with pytest.raises(InputError, match="--vlm"):
        analyze.main(args + ["--vocab_embeddings", js["vocab_cache"]])


def test_embed_siglip(setup, tmp_path, capsys):
    """--vlm siglip2 goes through the transformers towers: get_image_features / get_text_features (the
    text tower on input_ids alone, as SigLIP was trained)."""
    from transformers import SiglipModel

    with contextlib.redirect_stderr(io.StringIO()):
        d = build_siglip(tmp_path)
    assert (
        analyze.main(
            [
                "embed",
                "--vlm",
                "siglip2",
                "--siglip2_model_name",
                str(d),
                "--dataset",
                str(setup["data"]),
                "--max_samples",
                "9",
                "--out",
                str(tmp_path / "E"),
                "--device",
                "cpu",
                "--no-progress",
                "--batch_size",
                "4",
            ]
        )
        == 0
    )
    assert "9 pairs x 32 dimensions" in capsys.readouterr().out
    emb = open_embeddings(tmp_path / "E")
    model = SiglipModel.from_pretrained(d).eval()
    img_adapter = wm.ModelSpec("SigLIP2Vision", str(d)).load("cpu")
    txt_adapter = wm.ModelSpec("SiglipText", str(d)).load("cpu")
    pairs = load_pairs(str(setup["data"]), max_samples=9)
    with torch.no_grad():
        inputs: dict[str, Any] = img_adapter.preprocess([pairs.image(n) for n in range(9)])
        ref_img = model.get_image_features(**inputs)
        ref_txt = model.get_text_features(input_ids=txt_adapter.preprocess(pairs.texts())["input_ids"])
    tensor = lambda out: getattr(out, "pooler_output", out).numpy()  # noqa: E731  (transformers 5: an output object)
    np.testing.assert_allclose(emb.image, tensor(ref_img), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(emb.text, tensor(ref_txt), rtol=1e-4, atol=1e-5)
