"""Every encoder family through the same adapters users run, on tiny random-weight checkpoints saved to
local directories: hooked tensors equal the library's own hidden states, the recorded positions and
padding masks are right, and blocks deeper than requested are never run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import wrappedmodels as wm
from sae.encoders.tiny import (
    SPECIAL_IDS,
    TINY_TEXT,
    build_dino,
    build_open_clip,
    build_open_clip_resnet,
    build_siglip,
    build_vit,
    minilm_dir,
)
from sae.util.errors import InputError

MINILM = minilm_dir()
CAPTIONS = ["a small red circle in the top left", "a large blue square", "green"]


def _index(out: wm.EncoderOutput) -> torch.Tensor:
    """The recorded token positions [B] of a token rule (not a mean)."""
    assert out.pooled_index is not None, "a token rule records positions"
    return out.pooled_index


def _images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    arrs = [(torch.rand(40 + 8 * i, 48, 3, generator=g) * 255).to(torch.uint8).numpy() for i in range(3)]
    return [Image.fromarray(a) for a in arrs] + [Image.new("L", (50, 50), 90)]  # one grayscale


def _save_tokenizer(path: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(MINILM).save_pretrained(path)


# ------------------------------------------------------------------------------------ tiny checkpoints


def build_siglip2_naflex(root: Path) -> Path:
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model

    cfg = Siglip2Config(
        text_config=dict(TINY_TEXT, max_position_embeddings=16, projection_size=32, **SPECIAL_IDS),
        vision_config=dict(
            num_patches=16,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=48,
        ),
    )
    d = root / "tiny-siglip2-naflex"
    torch.manual_seed(0)
    Siglip2Model(cfg).save_pretrained(d)
    Siglip2ImageProcessor(patch_size=8, max_num_patches=20).save_pretrained(d)
    _save_tokenizer(d)
    return d


def build_bert(root: Path) -> Path:
    from transformers import BertConfig, BertModel

    d = root / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(**TINY_TEXT, max_position_embeddings=64)).save_pretrained(d)
    _save_tokenizer(d)
    return d


def build_deberta(root: Path) -> Path:
    from transformers import DebertaConfig, DebertaModel

    d = root / "tiny-deberta"
    torch.manual_seed(0)
    cfg = DebertaConfig(
        **TINY_TEXT,
        max_position_embeddings=64,
        relative_attention=True,
        pos_att_type=["c2p", "p2c"],
        max_relative_positions=-1,
    )
    DebertaModel(cfg).save_pretrained(d)
    _save_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "open_clip": build_open_clip(root),
        "siglip": build_siglip(root),
        "siglip2": build_siglip2_naflex(root),
        "vit": build_vit(root),
        "dino": build_dino(root),
        "bert": build_bert(root),
        "deberta": build_deberta(root),
    }


# ----------------------------------------------------------------------- library reference hidden states


def ref_open_clip_vision(d, batch, layers):
    import open_clip

    m: Any = open_clip.create_model("local-dir:" + str(d)).eval()  # an open_clip CLIP (typed nn.Module)
    out = m.visual.forward_intermediates(
        batch["pixel_values"], indices=layers, output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
    )
    return {
        layer: torch.cat([p, x], 1)
        for layer, p, x in zip(layers, out["image_intermediates_prefix"], out["image_intermediates"])
    }


def ref_open_clip_text(d, batch, layers):
    import open_clip

    m: Any = open_clip.create_model("local-dir:" + str(d)).eval()  # an open_clip CLIP (typed nn.Module)
    out = m.forward_intermediates(text=batch["input_ids"], text_indices=layers, intermediates_only=True)
    return dict(zip(layers, out["text_intermediates"]))


def _hf_ref(load, call):
    def ref(d, batch, layers):
        with torch.no_grad():
            hs = call(load(d), batch).hidden_states
        return {layer: hs[layer + 1] for layer in layers}

    return ref


def _siglip_model(d):
    from transformers import AutoModel

    return AutoModel.from_pretrained(d).eval()


CASES = {
    # family: (checkpoint, reference hidden states)
    "ClipVision": ("open_clip", ref_open_clip_vision),
    "ClipText": ("open_clip", ref_open_clip_text),
    "SigLIP2Vision": (
        "siglip",
        _hf_ref(_siglip_model, lambda m, b: m.vision_model(b["pixel_values"], output_hidden_states=True)),
    ),
    "SiglipText": (
        "siglip",
        _hf_ref(_siglip_model, lambda m, b: m.text_model(b["input_ids"], output_hidden_states=True)),
    ),
    "ViT": (
        "vit",
        _hf_ref(
            lambda d: __import__("transformers").ViTForImageClassification.from_pretrained(d).eval(),
            lambda m, b: m.vit(b["pixel_values"], output_hidden_states=True),
        ),
    ),
    "DinoV2": (
        "dino",
        _hf_ref(
            lambda d: __import__("transformers").Dinov2Model.from_pretrained(d).eval(),
            lambda m, b: m(b["pixel_values"], output_hidden_states=True),
        ),
    ),
    "Bert": (
        "bert",
        _hf_ref(
            lambda d: __import__("transformers").BertModel.from_pretrained(d).eval(),
            lambda m, b: m(**b, output_hidden_states=True),
        ),
    ),
    "Deberta": (
        "deberta",
        _hf_ref(
            lambda d: __import__("transformers").DebertaModel.from_pretrained(d).eval(),
            lambda m, b: m(**b, output_hidden_states=True),
        ),
    ),
}


def _items(modality: str) -> list:
    return _images() if modality == wm.IMAGE else CAPTIONS


def _calls(blocks) -> list[int]:
    counts = [0] * len(blocks)
    for i, b in enumerate(blocks):
        b.register_forward_hook(lambda *_a, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("family", list(CASES))
def test_hooks_equal_library_hidden_states(tiny, family):
    ckpt, reference = CASES[family]
    spec = wm.ModelSpec(family, str(tiny[ckpt]))
    info = spec.info()
    assert (info.n_blocks, info.d_model) == (3, 32)
    adapter = spec.load("cpu")
    assert adapter.modality == spec.modality and adapter.n_blocks == 3 and adapter.d_model == 32
    batch = adapter.preprocess(_items(adapter.modality))
    calls = _calls(adapter.blocks)
    out = adapter.forward(batch, [0, -2])
    assert sorted(out.hidden) == [0, 1]
    assert calls == [1, 1, 0], "the block after the deepest requested one must not run"
    ref = reference(tiny[ckpt], batch, [0, 1])
    for layer in (0, 1):
        assert out.hidden[layer].shape == ref[layer].shape
        torch.testing.assert_close(out.hidden[layer], ref[layer], rtol=1e-4, atol=1e-5)
    B, T, _ = out.hidden[0].shape
    assert out.mask.shape == (B, T) and out.mask.dtype == torch.bool
    assert all(out.pooled[layer].shape == (B, 32) for layer in (0, 1))

    out0 = adapter.forward(batch, [0])
    assert calls == [2, 1, 0]
    torch.testing.assert_close(out0.hidden[0], out.hidden[0])


def test_pooled_positions_and_masks(tiny):
    load = lambda fam, ck: wm.ModelSpec(fam, str(tiny[ck])).load("cpu")  # noqa: E731

    # CLIP text: real tokens run up to and including EOT = argmax of the ids; pooled = EOT
    a = load("ClipText", "open_clip")
    b = a.preprocess(CAPTIONS)
    out = a.forward(b, [-1])
    eot = b["input_ids"].argmax(-1)
    assert torch.equal(_index(out), eot)
    assert torch.equal(out.mask.sum(1), eot + 1)
    h = out.hidden[2]
    torch.testing.assert_close(out.pooled[2], h[torch.arange(3), eot])
    assert torch.equal(_index(a.forward(b, [-1], token="eot")), eot)
    assert torch.equal(_index(a.forward(b, [-1], token="first")), torch.zeros(3, dtype=torch.long))

    # SigLIP text: padded to the fixed length; pooled = the last position (the model's own pooling)
    a = load("SiglipText", "siglip")
    b = a.preprocess(CAPTIONS)
    assert b["input_ids"].shape == (3, 16)
    out = a.forward(b, [-1])
    assert torch.equal(_index(out), torch.full((3,), 15))
    assert torch.equal(out.mask, b["attention_mask"].bool())
    assert not out.mask[2].all() and out.mask[:, 0].all()
    last = _index(a.forward(b, [-1], token="last"))
    assert torch.equal(last, b["attention_mask"].sum(1) - 1)
    # it trains on the real tokens plus that pooled position (the model attends to every position)
    train = out.train_mask_of(2)
    assert torch.equal(train[:, :15], out.mask[:, :15]) and train[:, 15].all() and not out.mask[:, 15].any()

    # SigLIP vision has no CLS: pooled = mean of all patch tokens
    a = load("SigLIP2Vision", "siglip")
    out = a.forward(a.preprocess(_images()), [-1])
    assert out.pooled_index is None and out.mask.all() and out.hidden[2].shape[1] == 16
    torch.testing.assert_close(out.pooled[2], out.hidden[2].mean(1))

    # SigLIP2 NaFlex: padding patches are not real tokens, the mean skips them
    a = load("SigLIP2Vision", "siglip2")
    b = a.preprocess(_images())
    out = a.forward(b, [-1])
    assert torch.equal(out.mask, b["pixel_attention_mask"].bool())
    assert not out.mask.all()
    m = out.mask.unsqueeze(-1).float()
    torch.testing.assert_close(out.pooled[2], (out.hidden[2] * m).sum(1) / m.sum(1))

    # ViT / DINOv2 / CLIP vision: CLS; 'mean' is over the patch tokens only
    for fam, ck in [("ViT", "vit"), ("DinoV2", "dino"), ("ClipVision", "open_clip")]:
        a = load(fam, ck)
        b = a.preprocess(_images())
        out = a.forward(b, [1])
        assert torch.equal(_index(out), torch.zeros(4, dtype=torch.long)) and out.mask.all()
        assert out.hidden[1].shape[1] == 17  # CLS + 4x4 patches
        torch.testing.assert_close(out.pooled[1], out.hidden[1][:, 0])
        mean = a.forward(b, [1], token="mean").pooled[1]
        torch.testing.assert_close(mean, out.hidden[1][:, 1:].mean(1))
        with pytest.raises(InputError, match="text models"):
            a.forward(b, [1], token="eot")

    # BERT / DeBERTa: [CLS]; mask = attention mask; 'eot' = [SEP]
    for fam, ck in [("Bert", "bert"), ("Deberta", "deberta")]:
        a = load(fam, ck)
        b = a.preprocess(CAPTIONS)
        out = a.forward(b, [0])
        assert torch.equal(_index(out), torch.zeros(3, dtype=torch.long))
        assert torch.equal(out.mask, b["attention_mask"].bool()) and not out.mask.all()
        assert torch.equal(out.train_mask_of(0), out.mask)
        sep = a.forward(b, [0], token="eot").pooled_index
        assert torch.equal(b["input_ids"][torch.arange(3), sep], torch.full((3,), 102))  # [SEP]


def test_resolve_layers():
    assert wm.resolve_layers([-1], 24) == [23]
    assert wm.resolve_layers([0, -1, 23, 5], 24) == [0, 5, 23]
    assert wm.resolve_layers(None, 12) == [11]
    with pytest.raises(InputError, match=r"valid indices are 0\.\.11"):
        wm.resolve_layers([12], 12)
    with pytest.raises(InputError, match="out of range"):
        wm.resolve_layers([-13], 12)


def test_flags_and_defaults():
    p = argparse.ArgumentParser()
    wm.add_model_args(p, "image")
    args = p.parse_args([])
    assert args.model == "ClipVision" and args.layers == [-1] and args.token == "pooled"
    assert args.clip_model_name == "ViT-L/14-quickgelu" and args.clip_pretrained == "openai"
    assert args.siglip2_model_name == "google/siglip2-large-patch16-384"
    assert args.vit_model_name == "google/vit-large-patch16-384" and args.dino_model_name == "dinov2_vitl14"
    assert not hasattr(args, "bert_model_name")
    with pytest.raises(SystemExit, match="^2$"):  # argparse: invalid choice
        p.parse_args(["--model", "Bert"])
    p = argparse.ArgumentParser()
    wm.add_model_args(p, "text")
    args = p.parse_args(["--model", "Deberta", "--layers", "0", "-1", "--token", "first"])
    spec = wm.spec_from_args(args)
    assert spec == wm.ModelSpec("Deberta", "microsoft/deberta-large")
    assert args.layers == [0, -1] and args.bert_model_name == "bert-large-uncased"
    assert (
        wm.spec_from_args(p.parse_args(["--clip_model_name", "hf-hub:apple/DFN2B-CLIP-ViT-L-14"])).name
        == "hf-hub:apple/DFN2B-CLIP-ViT-L-14"
    )
    # builtin open_clip configs are read offline: the L-size default tower shapes
    assert wm.ModelSpec("ClipVision").info() == wm.ModelInfo(24, 1024)
    assert wm.ModelSpec("ClipText").info() == wm.ModelInfo(12, 768)
    assert wm.ModelSpec("ClipVision", "ViT-B/32-quickgelu").info() == wm.ModelInfo(12, 768)
    assert wm.DINO_ALIASES["dinov2_vitl14"] == "facebook/dinov2-large"
    with pytest.raises(InputError, match="not one of"):
        wm.ModelSpec("Gpt2")


def test_unavailable_models_fail_in_one_line(tmp_path):
    for spec in [
        wm.ModelSpec("Bert", "no-such-org/no-such-bert"),
        wm.ModelSpec("ClipVision"),
        wm.ModelSpec("DinoV2", "dinov2_vitb14"),
        wm.ModelSpec("ClipText", "hf-hub:no-org/no-clip"),
        wm.ModelSpec("ViT", str(tmp_path)),
    ]:
        with pytest.raises(InputError, match="local directory") as e:
            spec.load("cpu")
        msg = str(e.value)
        assert "\n" not in msg and len(msg) < 600
        name = spec.resolved_name if spec.model != "DinoV2" else "facebook/dinov2-base"
        assert name in msg and ("local directory" in msg)
    rn50 = wm.ModelSpec("ClipVision", "RN50").info()  # builtin config: no download
    assert rn50 == wm.ModelInfo(5, 1024, [256, 512, 1024, 2048, 1024])
    assert [rn50.d_of(l) for l in (0, 3, -1)] == [256, 2048, 1024]
    with pytest.raises(InputError, match="unknown open_clip model"):
        wm.ModelSpec("ClipVision", "no-such-arch").info()


def test_open_clip_builtin_name_with_checkpoint_file(tiny, tmp_path):
    """A registered open_clip config name + a weights file given as --clip_pretrained."""
    import open_clip

    cfg = json.loads((tiny["open_clip"] / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "sc-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "sc-test-tiny.json")
    spec = wm.ModelSpec("ClipVision", "sc-test-tiny", str(tiny["open_clip"] / "open_clip_model.safetensors"))
    assert spec.info() == wm.ModelInfo(3, 32)
    a = spec.load("cpu")
    b = wm.ModelSpec("ClipVision", str(tiny["open_clip"])).load("cpu")
    x = a.preprocess(_images()[:2])
    torch.testing.assert_close(a.forward(x, [2]).hidden[2], b.forward(x, [2]).hidden[2])


# ------------------------------------------------------------------------------------ CLIP ResNet


def test_clip_resnet_stages_and_attnpool(tmp_path):
    spec = wm.ModelSpec("ClipVision", str(build_open_clip_resnet(tmp_path)))
    info = spec.info()
    assert info == wm.ModelInfo(5, 16, [32, 64, 128, 256, 16])
    adapter = spec.load("cpu")
    assert adapter.n_blocks == 5 and adapter.widths == [32, 64, 128, 256, 16]
    batch = adapter.preprocess(_images()[:3])
    visual: Any = adapter.module  # open_clip ModifiedResNet
    with torch.inference_mode():  # open_clip's own intermediates
        x = visual.stem(batch["pixel_values"])
        maps = []
        for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            x = stage(x)
            maps.append(x)
        final = visual.attnpool(x)
        assert torch.equal(final, visual(batch["pixel_values"]))
    calls = _calls(adapter.blocks)
    out = adapter.forward(batch, [0, 2])
    assert calls == [1, 1, 1, 0, 0], "stages after the deepest requested one must not run"
    for layer, side in ((0, 8), (2, 2)):
        h = out.hidden[layer]
        assert h.shape == (3, side * side, adapter.d_of(layer))
        torch.testing.assert_close(h, maps[layer].flatten(2).transpose(1, 2), rtol=0, atol=0)
        torch.testing.assert_close(h[:, side + 1], maps[layer][:, :, 1, 1])  # row-major positions
        assert out.mask_of(layer).shape == (3, side * side) and out.mask_of(layer).all()
        torch.testing.assert_close(out.pooled[layer], maps[layer].float().mean((2, 3)))
    assert out.mask.shape == (3, 4) and out.pooled_index is None
    out = adapter.forward(batch, [-1, 3], token="pooled")
    assert out.hidden[4].shape == (3, 1, 16) and out.hidden[3].shape == (3, 1, 256)
    torch.testing.assert_close(out.hidden[4][:, 0], final, rtol=0, atol=0)
    torch.testing.assert_close(out.pooled[4], final)
    first = adapter.forward(batch, [1], token="first")
    torch.testing.assert_close(first.pooled[1], maps[1][:, :, 0, 0])


# ------------------------------------------------------------------------------ joint-space embeddings


def test_embed_equals_library_features(tiny, tmp_path):
    """adapter.embed = open_clip encode_image / encode_text and SigLIP get_image_features /
    get_text_features (unnormalised, float32); families without a joint space refuse in one line."""
    import open_clip
    from transformers import AutoModel

    images, rn = _images(), build_open_clip_resnet(tmp_path)
    for ckpt in (tiny["open_clip"], rn):
        clip: Any = open_clip.create_model("local-dir:" + str(ckpt)).eval()  # an open_clip CLIP (typed nn.Module)
        vision = wm.ModelSpec("ClipVision", str(ckpt)).load("cpu")
        assert vision.d_embed == 16 and not hasattr(vision.module, "token_embedding"), "image tower only"
        b = vision.preprocess(images)
        got = vision.embed(b)
        assert got.dtype == torch.float32 and got.shape == (4, 16) and not torch.is_inference(b["pixel_values"])
        with torch.no_grad():
            torch.testing.assert_close(got, clip.encode_image(b["pixel_values"]), rtol=1e-5, atol=1e-6)
        assert got.norm(dim=1).sub(1).abs().max() > 1e-2, "not L2-normalised"
    text = wm.ModelSpec("ClipText", str(tiny["open_clip"])).load("cpu")
    assert text.d_embed == 16 and text.module.visual is None, "text tower only"
    b = text.preprocess(CAPTIONS)
    clip = open_clip.create_model("local-dir:" + str(tiny["open_clip"])).eval()
    with torch.no_grad():
        torch.testing.assert_close(text.embed(b), clip.encode_text(b["input_ids"]), rtol=1e-5, atol=1e-6)

    siglip = AutoModel.from_pretrained(tiny["siglip"]).eval()
    vision = wm.ModelSpec("SigLIP2Vision", str(tiny["siglip"])).load("cpu")
    text = wm.ModelSpec("SiglipText", str(tiny["siglip"])).load("cpu")
    assert (vision.d_embed, text.d_embed) == (32, 32)
    bi, bt = vision.preprocess(images), text.preprocess(CAPTIONS)
    with torch.no_grad():
        ref_i = siglip.get_image_features(**bi).pooler_output
        ref_t = siglip.get_text_features(input_ids=bt["input_ids"]).pooler_output
    torch.testing.assert_close(vision.embed(bi), ref_i, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text.embed(bt), ref_t, rtol=1e-5, atol=1e-6)
    assert text.embed(bt).shape == (3, 32)

    naflex = wm.ModelSpec("SigLIP2Vision", str(tiny["siglip2"])).load("cpu")
    b = naflex.preprocess(images)
    with torch.no_grad():
        ref = AutoModel.from_pretrained(tiny["siglip2"]).eval().get_image_features(**b).pooler_output
    torch.testing.assert_close(naflex.embed(b), ref, rtol=1e-5, atol=1e-6)

    for fam, ck in [("ViT", "vit"), ("DinoV2", "dino"), ("Bert", "bert"), ("Deberta", "deberta")]:
        a = wm.ModelSpec(fam, str(tiny[ck])).load("cpu")
        assert a.d_embed is None
        with pytest.raises(InputError, match="no joint image-text embedding") as e:
            a.embed(a.preprocess(_items(a.modality)[:2]))
        assert "\n" not in str(e.value)
