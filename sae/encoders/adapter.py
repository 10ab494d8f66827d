"""The adapter engine: one dataclass per loaded tower, hooks on its blocks, the recorded position.

One loader per family (open_clip.py, hf.py) fills in an `Adapter`; registry.py maps `--model` to them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sae.data.cache import TOKEN_CHOICES
from sae.util.errors import InputError

IMAGE, TEXT = "image", "text"
TOKEN_HELP = (
    "position recorded per row: pooled = the model's own (CLS for ClipVision/ViT/DinoV2, EOT for "
    "ClipText, mean of patches for SigLIP2Vision, last position for SiglipText, [CLS] for Bert/Deberta); "
    "first = position 0 (the original code); last = last real token; mean = mean of real tokens "
    "(images: patch tokens only, CLS excluded); eot = end-of-text token (text models only)"
)


class StopForward(Exception):
    """Raised by the hook of the deepest requested block to skip the rest of the forward."""


# --------------------------------------------------------------------------------------------------
# What a forward returns, and the recorded position


@dataclass
class EncoderOutput:
    """Hooked activations of one batch.

    hidden: {layer: [B, T, d]} residual stream after each requested block (model dtype/autocast dtype)
    mask: [B, T] bool, True on real tokens (all image tokens; text tokens that are not padding), for the
        deepest requested layer
    pooled: {layer: [B, d]} the vector at the recorded position (`--token`)
    pooled_index: [B] long position of the recorded token, or None when it is a mean
    masks: {layer: [B, T_layer]} the mask of each layer (T and d differ per layer for CLIP ResNets; for
        the other families every layer has `mask`)
    train_masks: {layer: [B, T_layer]} the tokens an SAE trains on when they are not the real tokens
        (SiglipText: the real tokens plus the final position, the model's own pooled position); None: `masks`
    """

    hidden: dict[int, Tensor]
    mask: Tensor
    pooled: dict[int, Tensor]
    pooled_index: Tensor | None
    masks: dict[int, Tensor]
    train_masks: dict[int, Tensor] | None = None

    def mask_of(self, layer: int) -> Tensor:
        """[B, T_layer] bool: the real tokens of `layer`."""
        return self.masks[layer]

    def train_mask_of(self, layer: int) -> Tensor:
        """[B, T_layer] bool: the tokens stored for SAE training at `layer`."""
        return self.train_masks[layer] if self.train_masks is not None else self.mask_of(layer)


def pool_tokens(hidden: Tensor, mask: Tensor, rule: str, n_prefix: int = 0) -> tuple[Tensor, Tensor | None]:
    """Vectors [B, d] at one position per row, and that position [B] (None for 'mean').

    rule: 'first' (position 0), 'final' (position T-1, whatever it holds), 'last' (last real token),
    'mean' (mean over real tokens from position n_prefix on, i.e. CLS/register tokens excluded).
    hidden: [B, T, d]; mask: [B, T] bool.
    """
    B, T, _ = hidden.shape
    rows = torch.arange(B, device=hidden.device)
    if rule == "first":
        index = torch.zeros(B, dtype=torch.long, device=hidden.device)
    elif rule == "final":
        index = torch.full((B,), T - 1, dtype=torch.long, device=hidden.device)
    elif rule == "last":
        pos = torch.arange(T, device=hidden.device).expand(B, T)
        index = torch.where(mask, pos, -1).max(dim=1).values.clamp(min=0)
    elif rule == "mean":
        m = mask.clone()
        m[:, :n_prefix] = False
        w = m.to(torch.float32).unsqueeze(-1)
        mean = (hidden.float() * w).sum(1) / w.sum(1).clamp(min=1)
        return mean, None
    else:
        raise ValueError(f"unknown pooling rule {rule!r}")
    return hidden[rows, index], index


# --------------------------------------------------------------------------------------------------
# The adapter: one dataclass, filled in by one loader per family


@dataclass
class ModelInfo:
    """What the config says, without loading weights."""

    n_blocks: int
    d_model: int
    widths: Sequence[int] | None = None  # width of each block when they differ (CLIP ResNets)

    def resolve_layers(self, layers: Sequence[int] | None) -> list[int]:
        return resolve_layers(layers, self.n_blocks)

    def d_of(self, layer: int) -> int:
        """Width of the output of block `layer` (negatives count from the end)."""
        return _width(self.widths, self.d_model, layer, self.n_blocks)


def _width(widths: Sequence[int] | None, d_model: int, layer: int, n_blocks: int) -> int:
    if widths is None:
        return int(d_model)
    return int(widths[resolve_layers([layer], n_blocks)[0]])


def resolve_layers(layers: Sequence[int] | None, n_blocks: int) -> list[int]:
    """Block indices, negatives counted from the end (-1 = last), sorted and deduplicated.

    None or [] means the last block. An index outside [-n_blocks, n_blocks) is an InputError.
    """
    if not layers:
        layers = [-1]
    out = set()
    for layer in layers:
        if not -n_blocks <= int(layer) < n_blocks:
            raise InputError(
                f"--layers {layer} is out of range: this model has {n_blocks} blocks, "
                f"valid indices are 0..{n_blocks - 1} (or -{n_blocks}..-1 from the end)"
            )
        out.add(int(layer) % n_blocks)
    return sorted(out)


@dataclass
class Adapter:
    """A loaded encoder tower with hooks on its blocks.

    preprocess: list of raw items (PIL images or str) -> batch dict of CPU tensors. It is a picklable
        callable, usable as (part of) a DataLoader collate_fn in worker processes.
    run: calls the tower on a batch already on the device (hooks capture the blocks).
    real_mask: (batch, T) -> [B, T] bool mask of real tokens.
    pooled_rule: rule of `pool_tokens` used by --token pooled.
    n_prefix: number of CLS/register tokens at the start of an image sequence (0 for text and SigLIP).
    seq_first: the blocks see [T, B, d] (old open_clip); hooked tensors are transposed to [B, T, d].
    widths: width of each block's output when they differ (CLIP ResNets); d_model is the last one's.
    to_tokens: turns a hooked block output into [B, T, d] (CLIP ResNets: feature maps [B, C, H, W] to
        [B, H*W, C], the attnpool output [B, D] to [B, 1, D]); None: it already is (after seq_first).
    train_final: the final position is stored for SAE training even when it is padding (SiglipText: the
        model attends to all positions and pools the last one, so the recorded vector is a trained token).
    encode: (module, batch on the device) -> [B, d_embed] the final projected embedding in the joint
        image-text space (see `embed`); None for families without one (ViT, DinoV2, Bert, Deberta).
    d_embed: width of that embedding, None without one.
    """

    model: str
    name: str
    modality: str
    n_blocks: int
    d_model: int
    module: nn.Module
    blocks: nn.ModuleList | Sequence[nn.Module]
    preprocess: Callable[[list], dict[str, Tensor]]
    run: Callable[[nn.Module, dict[str, Tensor]], Any]
    real_mask: Callable[[dict[str, Tensor], int], Tensor]
    pooled_rule: str
    device: torch.device
    n_prefix: int = 0
    seq_first: bool = False
    autocast: bool = True
    widths: Sequence[int] | None = None
    to_tokens: Callable[[Tensor], Tensor] | None = None
    train_final: bool = False
    encode: Callable[[nn.Module, dict[str, Tensor]], Tensor] | None = None
    d_embed: int | None = None

    def resolve_layers(self, layers: Sequence[int] | None) -> list[int]:
        return resolve_layers(layers, self.n_blocks)

    def d_of(self, layer: int) -> int:
        """Width of the output of block `layer` (negatives count from the end)."""
        return _width(self.widths, self.d_model, layer, self.n_blocks)

    def _on_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """[B, d_embed] float32: the model's final embedding in its joint image-text space, not L2-normalised.

        ClipVision / ClipText: open_clip encode_image / encode_text (final norm and projection; the
        attnpool output for CLIP ResNets); SigLIP2Vision / SiglipText: get_image_features /
        get_text_features (the pooled output with the heads). Full forward (no hooks), under
        inference_mode, bf16 autocast on CUDA as `forward`. batch: `preprocess(items)`.
        """
        if self.encode is None:
            raise InputError(
                f"--model {self.model} has no joint image-text embedding (only ClipVision, ClipText, "
                f"SigLIP2Vision and SiglipText have one)"
            )
        batch = self._on_device(batch)
        use_amp = self.autocast and self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            out = self.encode(self.module, batch)
        return out.float()

    def token_rule(self, token: str) -> str:
        """The `pool_tokens` rule of a --token choice for this model."""
        if token == "pooled":
            return self.pooled_rule
        if token == "eot":
            if self.modality != TEXT:
                raise InputError(f"--token eot applies to text models, not to {self.model}")
            return "last"  # the mask ends at EOT/[SEP]/</s>: the last real token is the end-of-text token
        if token in ("first", "last", "mean"):
            return token
        raise InputError(f"--token {token!r} is not one of {', '.join(TOKEN_CHOICES)}")

    def forward(self, batch: dict[str, Tensor], layers: Sequence[int], token: str = "pooled") -> EncoderOutput:
        """Run the tower up to the deepest of `layers` under inference_mode (bf16 autocast on CUDA)."""
        layers = self.resolve_layers(layers)
        rule = self.token_rule(token)
        deepest = max(layers)
        captured: dict[int, Tensor] = {}

        def make_hook(layer: int) -> Callable:
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                h = output[0] if isinstance(output, (tuple, list)) else output
                h = h.transpose(0, 1) if self.seq_first else h
                captured[layer] = self.to_tokens(h) if self.to_tokens is not None else h
                if layer == deepest:
                    raise StopForward

            return hook

        handles = [self.blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
        batch = self._on_device(batch)
        use_amp = self.autocast and self.device.type == "cuda"
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                try:
                    self.run(self.module, batch)
                except StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        missing = [layer for layer in layers if layer not in captured]
        if missing:
            raise RuntimeError(f"{self.model}: blocks {missing} were not run by the forward")
        with torch.inference_mode():
            masks: dict[int, Tensor] = {}
            for T in {captured[layer].shape[1] for layer in layers}:
                m = self.real_mask(batch, T).to(torch.bool)
                masks.update({layer: m for layer in layers if captured[layer].shape[1] == T})
            pooled, index = {}, None
            for layer in layers:
                pooled[layer], index = pool_tokens(captured[layer], masks[layer], rule, self.n_prefix)
            train_masks = None
            if self.train_final:
                train_masks = {layer: m.clone() for layer, m in masks.items()}
                for m in train_masks.values():
                    m[:, -1] = True
        return EncoderOutput(captured, masks[deepest], pooled, index, masks, train_masks)


def find_blocks(model: nn.Module, n_blocks: int, paths: Sequence[str]) -> nn.ModuleList:
    for path in paths:
        mod: Any = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList) and len(mod) == n_blocks:
            return mod
    raise RuntimeError(f"{type(model).__name__}: no block list of length {n_blocks} at {list(paths)}")


def eval_frozen(module: nn.Module, device: torch.device) -> nn.Module:
    return module.to(device).eval().requires_grad_(False)


def all_tokens(batch: dict[str, Tensor], T: int) -> Tensor:
    """Every position is a real token (images): [B, T] True."""
    B = next(v for v in batch.values() if isinstance(v, Tensor)).shape[0]
    device = next(v for v in batch.values() if isinstance(v, Tensor)).device
    return torch.ones(B, T, dtype=torch.bool, device=device)
