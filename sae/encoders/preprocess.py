"""Preprocessing callables: raw items (PIL images or str) -> a batch dict of CPU tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# Preprocessing callables (picklable: they run in DataLoader workers)


def to_rgb(img: Any) -> Any:
    return img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img


class TorchvisionImages:
    """open_clip style: a per-image transform PIL -> [3, H, W], stacked into pixel_values [B, 3, H, W]."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, images: list) -> dict[str, Tensor]:
        return {"pixel_values": torch.stack([self.transform(to_rgb(im)) for im in images])}


class HFImages:
    """A transformers image processor: PIL list -> pixel_values [B, 3, H, W] (and NaFlex extras)."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, images: list) -> dict[str, Tensor]:
        out = self.processor(images=[to_rgb(im) for im in images], return_tensors="pt")
        return {k: v for k, v in out.items() if isinstance(v, Tensor)}


class OpenClipTokens:
    """open_clip tokenizer: list[str] -> input_ids [B, context_length] (77), zero padded after EOT."""

    def __init__(self, tokenizer: Callable):
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        return {"input_ids": self.tokenizer(list(texts)).long()}


class HFTokens:
    """A transformers tokenizer with fixed padding/truncation -> input_ids, attention_mask [B, T]."""

    def __init__(self, tokenizer: Any, **kwargs: Any):
        self.tokenizer = tokenizer
        self.kwargs = kwargs

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        out = self.tokenizer(list(texts), return_tensors="pt", return_attention_mask=True, **self.kwargs)
        return {k: v for k, v in out.items() if isinstance(v, Tensor)}
