"""`--model` values, their default names and flags, and ModelSpec: a choice of encoder, loaded on demand."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from sae.data.cache import TOKEN_CHOICES
from sae.encoders.adapter import IMAGE, TEXT, TOKEN_HELP, Adapter, ModelInfo
from sae.encoders.hf import (
    SIGLIP_TEXT_LENGTH,
    hf_info,
    hf_name,
    load_dino,
    load_encoder,
    load_siglip_text,
    load_siglip_vision,
    load_vit,
    siglip_sub_config,
)
from sae.encoders.loading import local_fingerprint
from sae.encoders.open_clip import load_clip_text, load_clip_vision, open_clip_info, open_clip_pretrained
from sae.util.device import resolve_device
from sae.util.errors import InputError

# --------------------------------------------------------------------------------------------------
# Registry and flags


# the one table of default model names (L size): {flag: (default, help)}
NAME_FLAGS = {
    "clip_model_name": (
        "ViT-L/14-quickgelu",
        "open_clip model (ClipVision/ClipText): a builtin name such as "
        "ViT-B/32-quickgelu, hf-hub:apple/DFN2B-CLIP-ViT-L-14, or a local directory",
    ),
    "siglip2_model_name": (
        "google/siglip2-large-patch16-384",
        "SigLIP/SigLIP2 checkpoint (SigLIP2Vision/SiglipText): hub id or local directory",
    ),
    "vit_model_name": ("google/vit-large-patch16-384", "ViT checkpoint: hub id or local directory"),
    "dino_model_name": (
        "dinov2_vitl14",
        "DINOv2: dinov2_vitb14 / dinov2_vitl14 (mapped to facebook/dinov2-base "
        "/ -large in transformers), a hub id or a local directory",
    ),
    "bert_model_name": ("bert-large-uncased", "BERT checkpoint: hub id or local directory"),
    "deberta_model_name": ("microsoft/deberta-large", "DeBERTa (v1) checkpoint: hub id or local directory"),
}


@dataclass(frozen=True)
class Family:
    """One `--model` value."""

    model: str
    modality: str
    name_flag: str  # the flag holding the model name, e.g. "clip_model_name" (its default: NAME_FLAGS)
    info: Callable[[str, str | None], ModelInfo]
    load: Callable[[str, str | None, torch.device], Adapter]
    pooled: str  # the position --token pooled records (docs)
    preprocess_id: str  # what the preprocessing depends on besides the model name (cache key)

    @property
    def default_name(self) -> str:
        """The L-size model of the paper's table."""
        return NAME_FLAGS[self.name_flag][0]


FAMILIES: dict[str, Family] = {
    f.model: f
    for f in [
        Family(
            "ClipVision",
            IMAGE,
            "clip_model_name",
            open_clip_info(IMAGE),
            load_clip_vision,
            "CLS",
            "open_clip val transform v1",
        ),
        Family(
            "SigLIP2Vision",
            IMAGE,
            "siglip2_model_name",
            hf_info("SigLIP2 vision model", lambda n: siglip_sub_config(n, IMAGE)[1]),
            load_siglip_vision,
            "mean of patch tokens",
            "AutoImageProcessor v1",
        ),
        Family(
            "ViT",
            IMAGE,
            "vit_model_name",
            hf_info("ViT model"),
            load_vit,
            "CLS",
            "AutoImageProcessor v1",
        ),
        Family(
            "DinoV2",
            IMAGE,
            "dino_model_name",
            hf_info("DINOv2 model"),
            load_dino,
            "CLS",
            "AutoImageProcessor v1",
        ),
        Family(
            "ClipText",
            TEXT,
            "clip_model_name",
            open_clip_info(TEXT),
            load_clip_text,
            "EOT (argmax of token ids)",
            "open_clip tokenizer v1",
        ),
        Family(
            "SiglipText",
            TEXT,
            "siglip2_model_name",
            hf_info("SigLIP2 text model", lambda n: siglip_sub_config(n, TEXT)[1]),
            load_siglip_text,
            "last position",
            f"max_length={SIGLIP_TEXT_LENGTH} padding v1",
        ),
        Family(
            "Bert",
            TEXT,
            "bert_model_name",
            hf_info("BERT model"),
            load_encoder("Bert", "BERT model"),
            "[CLS]",
            "padding=longest truncation v1",
        ),
        Family(
            "Deberta",
            TEXT,
            "deberta_model_name",
            hf_info("DeBERTa model"),
            load_encoder("Deberta", "DeBERTa model"),
            "[CLS]",
            "padding=longest truncation v1",
        ),
    ]
}


@dataclass(frozen=True)
class ModelSpec:
    """A choice of encoder (from the flags); nothing is loaded until `load()`."""

    model: str
    name: str | None = None  # None: the family's default (L size)
    pretrained: str | None = "openai"  # open_clip weights tag for builtin names; ignored otherwise

    def __post_init__(self) -> None:
        if self.model not in FAMILIES:
            raise InputError(f"--model {self.model!r} is not one of {', '.join(FAMILIES)}")
        if self.name is None:
            object.__setattr__(self, "name", FAMILIES[self.model].default_name)

    @property
    def resolved_name(self) -> str:
        """`name` once `__post_init__` has filled the family default (never None on a constructed spec)."""
        assert self.name is not None, "ModelSpec.__post_init__ sets name"
        return self.name

    @property
    def family(self) -> Family:
        return FAMILIES[self.model]

    @property
    def modality(self) -> str:
        return self.family.modality

    def info(self) -> ModelInfo:
        """Blocks and width from the config alone (no weights; works offline for cached configs)."""
        return _cached_info(self.model, self.name, self.pretrained)

    def load(self, device: str | torch.device | None = "auto") -> Adapter:
        """Load the weights (one-line InputError when they are not available) onto `device`."""
        return self.family.load(self.resolved_name, self.pretrained, resolve_device(device))

    def identity(self) -> dict[str, Any]:
        """What the activations depend on, for cache keys."""
        ident: dict[str, Any] = {"model": self.model, "name": self.name, "preprocess": self.family.preprocess_id}
        if self.family.name_flag == "clip_model_name":
            ident["pretrained"] = open_clip_pretrained(self.resolved_name, self.pretrained)
        local = local_fingerprint(hf_name(self.resolved_name))
        if local:
            ident["name"] = os.path.abspath(self.resolved_name)
            ident["local_files"] = local
        return ident


@cache
def _cached_info(model: str, name: str, pretrained: str | None) -> ModelInfo:
    return FAMILIES[model].info(name, pretrained)


def add_model_args(parser: argparse.ArgumentParser, modality: str | None = None, layers: bool = True) -> None:
    """The original flags: --model, --<family>_model_name (L-size defaults), plus --clip_pretrained,
    --layers and --token. `modality` ('image' / 'text' / None for both) restricts --model choices."""
    choices = [m for m, f in FAMILIES.items() if modality in (None, f.modality)]
    group = parser.add_argument_group("encoder")
    group.add_argument("--model", default=choices[0], choices=choices, help=f"encoder to hook (default: {choices[0]})")
    for flag, (default, help_text) in NAME_FLAGS.items():
        used_by = [m for m, f in FAMILIES.items() if f.name_flag == flag and m in choices]
        if used_by:
            group.add_argument(f"--{flag}", default=default, help=f"{help_text} (default: {default})")
    if any(FAMILIES[m].name_flag == "clip_model_name" for m in choices):
        group.add_argument(
            "--clip_pretrained",
            default="openai",
            help="open_clip weights tag or checkpoint file for builtin names (default: openai; "
            "ignored for hf-hub: names and local directories)",
        )
    if layers:
        group.add_argument(
            "--layers",
            type=int,
            nargs="+",
            default=[-1],
            help="block indices to hook, negatives from the end (default: -1, the last block)",
        )
        group.add_argument("--token", default="pooled", choices=TOKEN_CHOICES, help=TOKEN_HELP)


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """The ModelSpec selected by the flags of `add_model_args`."""
    family = FAMILIES.get(args.model)
    if family is None:
        raise InputError(f"--model {args.model!r} is not one of {', '.join(FAMILIES)}")
    name = getattr(args, family.name_flag, None) or family.default_name
    return ModelSpec(args.model, name, getattr(args, "clip_pretrained", "openai"))
