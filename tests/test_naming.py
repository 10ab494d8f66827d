"""Concept names: the vocabulary file, embedding it, naming features by cosine, the names file, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import one_thread

import analyze
from sae.analysis.naming import (
    DEFAULT_VOCAB,
    embed_vocab,
    feature_directions,
    load_names,
    load_vocab,
    name_features,
    names_path,
)
from sae.data.features import SparseCodes, write_layer, write_run_info
from sae.nn.checkpoint import save_sae
from sae.nn.config import SAEConfig, TrainConfig
from sae.nn.model import SparseAutoencoder
from sae.nn.sources import ActivationSource
from sae.nn.synthetic import planted_activations
from sae.nn.trainer import SAESpec, train_saes
from sae.util.errors import InputError


def test_load_vocab_and_the_default_list(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("# heading\ndog\n\n  red car  \ndog\ncat\n")
    assert load_vocab(f) == ["dog", "red car", "cat"]
    words = load_vocab(DEFAULT_VOCAB)
    assert len(words) >= 2000 and len(set(words)) == len(words)
    assert {"dog", "red", "wood", "beach", "running", "bicycle"} <= set(words)
    with pytest.raises(InputError, match="not found"):
        load_vocab(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(InputError, match="no words"):
        load_vocab(tmp_path / "empty.txt")


def test_embed_vocab_batches_any_text_tower():
    calls = []

    def tower(texts):  # a stand-in text tower: length and vowel count as a 2-d embedding
        calls.append(len(texts))
        return torch.tensor([[len(t), sum(c in "aeiou" for c in t)] for t in texts], dtype=torch.float32)

    words = [f"w{'a' * i}" for i in range(10)]
    emb = embed_vocab(words, tower, batch=4)
    assert calls == [4, 4, 2] and emb.dtype == np.float32
    np.testing.assert_array_equal(emb[:, 0], [len(w) for w in words])
    assert embed_vocab(words, lambda t: np.ones((len(t), 3)), batch=3).shape == (10, 3)
    with pytest.raises(InputError, match="returned shape"):
        embed_vocab(words, lambda t: np.ones((1, 3)), batch=4)


def test_name_features_against_float64_numpy():
    rng = np.random.default_rng(0)
    A, V = rng.standard_normal((30, 12)), rng.standard_normal((200, 12)) * rng.uniform(0.5, 3, (200, 1))
    words = [f"word{i}" for i in range(200)]
    names = name_features(A, V, words, top=4, block=7, device="cpu")
    cos = (A / np.linalg.norm(A, axis=1, keepdims=True)) @ (V / np.linalg.norm(V, axis=1, keepdims=True)).T
    ref = np.argsort(-cos, axis=1)[:, :4]
    np.testing.assert_array_equal(names.indices, ref)
    np.testing.assert_allclose(names.cosines, np.take_along_axis(cos, ref, 1), atol=1e-6)
    js = names.to_json([3])
    assert list(js) == ["3"] and js["3"][0][0] == words[ref[3, 0]]
    centred = name_features(A, V, words, top=4, center_vocab=True, device="cpu")
    Vc = V - V.mean(0)
    cos_c = (A / np.linalg.norm(A, axis=1, keepdims=True)) @ (Vc / np.linalg.norm(Vc, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(centred.indices, np.argsort(-cos_c, axis=1)[:, :4])
    with pytest.raises(InputError, match="rows must be the words"):
        name_features(A, V, words[:-1], device="cpu")
    with pytest.raises(InputError, match="width"):
        name_features(A, V[:, :5], words, device="cpu")


@pytest.fixture(scope="module")
def planted_sae(tmp_path_factory):
    data = planted_activations(n=3000, d=16, n_concepts=24, active_per_row=2, seed=1)
    out = tmp_path_factory.mktemp("naming")
    with one_thread():
        res = train_saes(
            ActivationSource({"x": [data.x]}),
            [SAESpec("sae", "x", SAEConfig(d_sae=32, k=2))],
            TrainConfig(epochs=8, batch_size=256, device="cpu"),
            out,
            progress=False,
        )
    rng = np.random.default_rng(2)
    concept_words = [f"concept{c}" for c in range(24)]
    distractors = [f"distractor{i}" for i in range(300)]
    noisy = data.dictionary + 0.1 * rng.standard_normal(data.dictionary.shape) / 4  # noise norm ~0.1
    vocab = np.vstack([noisy, rng.standard_normal((300, 16))]).astype(np.float32)
    return data, res["sae"], concept_words + distractors, vocab


def test_each_recovered_planted_concept_is_named_by_its_word(planted_sae):
    data, trained, words, vocab = planted_sae
    sae = trained.sae
    names = name_features(feature_directions(sae), vocab, words, top=3, device="cpu")
    W = sae.W_dec.detach().double().numpy()
    cos = data.dictionary @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T  # [concepts, features]
    recovered = [c for c in range(24) if cos[c].max() > 0.9]
    assert len(recovered) >= 16
    for c in recovered:
        f = int(cos[c].argmax())
        assert names.names(f)[0][0] == f"concept{c}", (c, names.names(f))
    # MSAE's "+ mean" variant: the direction is the decoded embedding of a unit code
    b = sae.b_dec.detach().double().numpy()
    np.testing.assert_allclose(feature_directions(sae, "b_dec"), (W + b) / sae.cfg.input_scale, rtol=1e-6)


def test_names_cli_writes_the_file_show_reads(planted_sae, tmp_path, capsys):
    data, trained, words, vocab = planted_sae
    (tmp_path / "words.txt").write_text("\n".join(words) + "\n")
    np.save(tmp_path / "vocab.npy", vocab)
    run = tmp_path / "features" / "myrun"
    write_layer(run, 4, SparseCodes.from_dense(np.zeros((5, 32), np.float32)))
    write_run_info(run, {"name": "myrun", "n_rows": 5, "layers": [4]})
    args = [
        "names",
        "--sae",
        str(trained.path),
        "--vocab",
        str(tmp_path / "words.txt"),
        "--vocab_embeddings",
        str(tmp_path / "vocab.npy"),
        "--features_dir",
        str(tmp_path / "features"),
        "--run",
        "myrun",
        "--top",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert analyze.main(args + ["--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    path = names_path(tmp_path / "features", "myrun", 4)
    assert path == run / "names_layer04.json" and js["written"] == [str(path)]
    on_disk = json.loads(path.read_text())
    assert on_disk == js["names"] and set(on_disk) == {str(i) for i in range(32)}
    assert all(len(v) == 2 and isinstance(v[0][0], str) and isinstance(v[0][1], float) for v in on_disk.values())
    loaded = load_names(path)
    assert loaded is not None and loaded[0] == [tuple(x) for x in on_disk["0"]]
    assert load_names(run / "names_layer99.json") is None
    assert analyze.main(args + ["--out", str(tmp_path / "n.json")]) == 0
    assert "written to" in capsys.readouterr().out and (tmp_path / "n.json").exists()
    # errors: no embeddings, rows not matching the words, a run of another width
    with pytest.raises(InputError, match="--vocab_embeddings"):
        analyze.main(["names", "--sae", str(trained.path)])
    np.save(tmp_path / "short.npy", vocab[:10])
    with pytest.raises(InputError, match="rows must be the words"):
        analyze.main(args[:6] + [str(tmp_path / "short.npy")])
    save_sae(SparseAutoencoder(SAEConfig(d_in=16, d_sae=16, k=2)), tmp_path / "small")
    with pytest.raises(InputError, match="32 features"):
        analyze.main(["names", "--sae", str(tmp_path / "small")] + args[3:])
