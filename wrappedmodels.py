"""Encoders whose residual stream is hooked: one adapter per `--model`, the flags that pick them.

Usage (what train_image.py / train_text.py do):

    parser = argparse.ArgumentParser(); add_model_args(parser, "image")
    args = parser.parse_args()
    spec = spec_from_args(args)                 # ModelSpec: which model, nothing loaded yet
    layers = spec.info().resolve_layers(args.layers)   # reads the config only (no weights)
    adapter = spec.load()                       # weights on the GPU when there is one
    batch = adapter.preprocess(items)           # items: list of PIL images or list of str
    out = adapter.forward(batch, layers, token=args.token)
    out.hidden[l]   # [B, T, d] residual stream after block l (before any final norm / pooling)
    out.mask        # [B, T] bool, True on real (non-padding) tokens
    out.train_mask_of(l)  # [B, T] bool, the tokens an SAE trains on (real ones; SiglipText: + the last position)
    out.pooled[l]   # [B, d] the recorded position (--token)
    adapter.embed(batch)  # [B, d_embed] float32: the joint image-text embedding (CLIP, SigLIP families)

Each adapter registers forward hooks on the transformer blocks, keeps the block output (`output[0]`
when a block returns a tuple) and stops the forward after the deepest requested block by raising a
private exception from that block's hook: deeper blocks, final norms and heads never run.

Families (the `--model` values) and the recorded position of `--token pooled`:

    ClipVision     open_clip visual tower       CLS (position 0); CLIP ResNets (RN50, ...): see below
    SigLIP2Vision  transformers SigLIP/SigLIP2  mean of the patch tokens (there is no CLS)
    ViT            transformers ViTModel        CLS
    DinoV2         transformers Dinov2Model     CLS
    ClipText       open_clip text tower         EOT token (argmax of the token ids)
    SiglipText     transformers SigLIP text     last position (the model's own pooling)
    Bert           transformers BertModel       [CLS]
    Deberta        transformers DebertaModel    [CLS]

CLIP ResNet towers (open_clip `RN50`, `RN101`, ... : ModifiedResNet) are hooked after each residual
stage and at the attention pool: 5 "blocks" = [layer1, layer2, layer3, layer4, attnpool]. A stage output
[B, C, H, W] is presented as H*W spatial tokens [B, H*W, C] (row-major positions: an SAE trains on every
spatial position, like patches); the attnpool output [B, D] is one token [B, 1, D]. The widths differ
per block (RN50: 256, 512, 1024, 2048, then embed_dim 1024): `ModelInfo.widths` / `Adapter.widths` hold
them and `d_of(layer)` returns one (`d_model` is the last block's). `--token pooled` records the mean over
the spatial positions for a stage and the attnpool output itself for the attention pool (the mean of
its single token); `first`/`last` are the top-left/bottom-right positions. Since the token counts differ
per block, `EncoderOutput.masks` holds one mask per layer.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sae.cli import InputError

IMAGE, TEXT = "image", "text"
TOKEN_CHOICES = ("pooled", "first", "last", "mean", "eot")
TOKEN_HELP = (
    "position recorded per row: pooled = the model's own (CLS for ClipVision/ViT/DinoV2, EOT for "
    "ClipText, mean of patches for SigLIP2Vision, last position for SiglipText, [CLS] for Bert/Deberta); "
    "first = position 0 (the original code); last = last real token; mean = mean of real tokens "
    "(images: patch tokens only, CLS excluded); eot = end-of-text token (text models only)")

DINO_ALIASES = {
    "dinov2_vits14": "facebook/dinov2-small",
    "dinov2_vitb14": "facebook/dinov2-base",
    "dinov2_vitl14": "facebook/dinov2-large",
    "dinov2_vitg14": "facebook/dinov2-giant",
}
SIGLIP_TEXT_LENGTH = 64  # SigLIP / SigLIP2 text towers were trained on 64 tokens, padding='max_length'


class _StopForward(Exception):
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
                f"valid indices are 0..{n_blocks - 1} (or -{n_blocks}..-1 from the end)")
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
    blocks: Sequence[nn.Module]
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
            raise InputError(f"--model {self.model} has no joint image-text embedding (only ClipVision, ClipText, "
                             f"SigLIP2Vision and SiglipText have one)")
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
                    raise _StopForward

            return hook

        handles = [self.blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
        batch = self._on_device(batch)
        use_amp = self.autocast and self.device.type == "cuda"
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                try:
                    self.run(self.module, batch)
                except _StopForward:
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


# --------------------------------------------------------------------------------------------------
# Preprocessing callables (picklable: they run in DataLoader workers)


def _to_rgb(img: Any) -> Any:
    return img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img


class TorchvisionImages:
    """open_clip style: a per-image transform PIL -> [3, H, W], stacked into pixel_values [B, 3, H, W]."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, images: list) -> dict[str, Tensor]:
        return {"pixel_values": torch.stack([self.transform(_to_rgb(im)) for im in images])}


class HFImages:
    """A transformers image processor: PIL list -> pixel_values [B, 3, H, W] (and NaFlex extras)."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, images: list) -> dict[str, Tensor]:
        out = self.processor(images=[_to_rgb(im) for im in images], return_tensors="pt")
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


# --------------------------------------------------------------------------------------------------
# Loading helpers: one-line errors for models that are not available


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:120]}{'...' if len(text) > 120 else ''}"


def _unavailable(kind: str, name: str, e: BaseException) -> InputError:
    where = "local directory" if os.path.isdir(name) else "name"
    return InputError(
        f"cannot load {kind} {where} '{name}' ({_short(e)}); a hub name must be in the local cache when the "
        f"hub is unreachable or HF_HUB_OFFLINE=1 - download it once, or give a local directory")


def _local_fingerprint(path: str) -> str | None:
    """Hash of (file, size, mtime) under a local model directory; None for hub names."""
    if not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _find_blocks(model: nn.Module, n_blocks: int, paths: Sequence[str]) -> nn.ModuleList:
    for path in paths:
        mod: Any = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList) and len(mod) == n_blocks:
            return mod
    raise RuntimeError(f"{type(model).__name__}: no block list of length {n_blocks} at {list(paths)}")


def _eval(module: nn.Module, device: torch.device) -> nn.Module:
    return module.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# open_clip: ClipVision / ClipText


def open_clip_name(name: str) -> str:
    """The open_clip identifier: local directories become 'local-dir:', builtin names use '-'."""
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    if os.path.isdir(name):
        return "local-dir:" + os.path.abspath(name)
    return name.replace("/", "-")


def _open_clip_pretrained(name: str, pretrained: str | None) -> str | None:
    """`pretrained` only applies to builtin names (hub and local directories carry their weights)."""
    return None if open_clip_name(name).startswith(("hf-hub:", "local-dir:")) else pretrained


def _open_clip_config(name: str) -> dict:
    import open_clip

    oc = open_clip_name(name)
    try:
        cfg = open_clip.get_model_config(oc)
    except Exception as e:
        raise _unavailable("open_clip model", name, e) from e
    if cfg is None:
        raise InputError(f"unknown open_clip model '{name}' (see open_clip.list_models(); hub models are "
                         f"'hf-hub:org/repo'; a local directory needs open_clip_config.json)")
    return cfg


def _open_clip_info(modality: str) -> Callable[[str, str | None], ModelInfo]:
    def info(name: str, _pretrained: str | None) -> ModelInfo:
        cfg = _open_clip_config(name)
        tower = cfg.get("vision_cfg" if modality == IMAGE else "text_cfg", {})
        if modality == IMAGE and "timm_model_name" in tower:
            raise InputError(f"open_clip model '{name}' has a timm image tower: only ViT towers and CLIP "
                             f"ResNets (RN50, ...) are supported")
        if modality == IMAGE and isinstance(tower.get("layers"), (list, tuple)):  # ModifiedResNet
            widths = _resnet_widths(int(tower.get("width", 64)), int(cfg["embed_dim"]))
            return ModelInfo(n_blocks=len(widths), d_model=widths[-1], widths=widths)
        if modality == TEXT and "hf_model_name" in tower:
            raise InputError(f"open_clip model '{name}' has a Hugging Face text tower: not supported by ClipText")
        return ModelInfo(n_blocks=int(tower.get("layers", 12)), d_model=int(tower.get("width", 512)))

    return info


def _load_open_clip(name: str, pretrained: str | None, device: torch.device) -> tuple[nn.Module, Callable]:
    import open_clip

    oc = open_clip_name(name)
    tag = _open_clip_pretrained(name, pretrained)
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)  # open_clip logs the failure before raising it; we report it once
    try:
        model, preprocess = open_clip.create_model_from_pretrained(oc, pretrained=tag, device="cpu")
    except Exception as e:
        what = f"open_clip model '{name}'" + (f" with pretrained='{tag}'" if tag else "")
        raise InputError(
            f"cannot load {what} ({_short(e)}); weights must be in the local cache when the hub is "
            f"unreachable or HF_HUB_OFFLINE=1 - download them once, or give a local directory holding "
            f"open_clip_config.json and the weights") from e
    finally:
        logging.disable(previous)
    return model, preprocess


def _resnet_widths(width: int, embed_dim: int) -> list[int]:
    """Output widths of a CLIP ModifiedResNet's [layer1..layer4, attnpool] (Bottleneck expansion 4)."""
    return [width * 4 * 2**i for i in range(4)] + [embed_dim]


def _spatial_tokens(h: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H*W, C] (row-major positions); [B, D] -> [B, 1, D]."""
    if h.ndim == 4:
        return h.flatten(2).transpose(1, 2)
    if h.ndim == 2:
        return h.unsqueeze(1)
    return h


def _open_clip_vision_tower(visual: nn.Module, name: str) -> tuple[Sequence[nn.Module], bool, int, str]:
    """(blocks, seq_first, n_prefix, pooled_rule) of an open_clip image tower.

    ViT: the residual blocks, CLS first. CLIP ResNet (ModifiedResNet): [layer1..layer4, attnpool], no
    prefix token, pooled = mean over the spatial positions (the attnpool output for the attention pool).
    """
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, ModifiedResNet):
        if visual.attnpool is None:
            raise InputError(f"open_clip model '{name}' has a ResNet tower without attention pool")
        return [visual.layer1, visual.layer2, visual.layer3, visual.layer4, visual.attnpool], False, 0, "mean"
    if not isinstance(visual, VisionTransformer):
        raise InputError(f"open_clip model '{name}' has a {type(visual).__name__} image tower: only ViT "
                         f"towers and CLIP ResNets (RN50, ...) are supported")
    transformer = visual.transformer
    rule = "mean" if getattr(visual, "pool_type", "tok") == "avg" else "first"
    return transformer.resblocks, not getattr(transformer, "batch_first", True), 1, rule


def _run_visual(module: nn.Module, batch: dict[str, Tensor]) -> Any:
    """The open_clip image tower; its output is encode_image's (final norm + projection / attnpool)."""
    return module(batch["pixel_values"])


def _all_tokens(batch: dict[str, Tensor], T: int) -> Tensor:
    B = next(v for v in batch.values() if isinstance(v, Tensor)).shape[0]
    device = next(v for v in batch.values() if isinstance(v, Tensor)).device
    return torch.ones(B, T, dtype=torch.bool, device=device)


def _clip_text_mask(batch: dict[str, Tensor], T: int) -> Tensor:
    """Tokens up to and including EOT, the largest id of each row (open_clip's argmax pooling)."""
    ids = batch["input_ids"]
    eot = ids.argmax(dim=-1)
    return torch.arange(T, device=ids.device).unsqueeze(0) <= eot.unsqueeze(1)


def _load_clip_vision(name: str, pretrained: str | None, device: torch.device) -> Adapter:
    info = _open_clip_info(IMAGE)(name, pretrained)
    model, preprocess = _load_open_clip(name, pretrained, device)
    visual = model.visual
    blocks, seq_first, n_prefix, rule = _open_clip_vision_tower(visual, name)
    del model
    resnet = info.widths is not None
    return Adapter(
        model="ClipVision", name=name, modality=IMAGE, n_blocks=len(blocks), d_model=info.d_model,
        module=_eval(visual, device), blocks=blocks, preprocess=TorchvisionImages(preprocess),
        run=_run_visual, real_mask=_all_tokens, pooled_rule=rule, device=device,
        n_prefix=n_prefix, seq_first=seq_first, widths=info.widths,
        to_tokens=_spatial_tokens if resnet else None, encode=_run_visual,
        d_embed=int(_open_clip_config(name)["embed_dim"]))


def _run_clip_text(module: nn.Module, batch: dict[str, Tensor]) -> Any:
    """open_clip encode_text, unnormalised: final norm, EOT pooling and text projection."""
    return module.encode_text(batch["input_ids"])


def _load_clip_text(name: str, pretrained: str | None, device: torch.device) -> Adapter:
    import open_clip

    info = _open_clip_info(TEXT)(name, pretrained)
    model, _ = _load_open_clip(name, pretrained, device)
    if hasattr(model, "transformer") and hasattr(model, "token_embedding"):  # open_clip CLIP
        transformer, pool_type = model.transformer, getattr(model, "text_pool_type", "argmax")
    elif hasattr(getattr(model, "text", None), "transformer"):  # CustomTextCLIP with a TextTransformer
        transformer, pool_type = model.text.transformer, getattr(model.text, "pool_type", "argmax")
    else:
        raise InputError(f"open_clip model '{name}' has no transformer text tower supported by ClipText")
    if pool_type != "argmax":
        raise InputError(f"open_clip model '{name}' pools its text with '{pool_type}': ClipText supports "
                         f"CLIP-style towers (EOT = argmax of the token ids) only")
    model.visual = None  # encode_text does not use it; free the memory (the text tower, ln_final and the
    # text projection stay)
    tokenizer = open_clip.get_tokenizer(open_clip_name(name))
    return Adapter(
        model="ClipText", name=name, modality=TEXT, n_blocks=len(transformer.resblocks),
        d_model=info.d_model, module=_eval(model, device), blocks=transformer.resblocks,
        preprocess=OpenClipTokens(tokenizer), run=_run_clip_text, real_mask=_clip_text_mask,
        pooled_rule="last", device=device, seq_first=not getattr(transformer, "batch_first", True),
        encode=_run_clip_text, d_embed=int(_open_clip_config(name)["embed_dim"]))


# --------------------------------------------------------------------------------------------------
# transformers families


def _hf_config(name: str, kind: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except Exception as e:
        raise _unavailable(kind, name, e) from e


def _siglip_sub_config(name: str, modality: str) -> Any:
    cfg = _hf_config(name, "SigLIP model")
    sub = getattr(cfg, "vision_config" if modality == IMAGE else "text_config", None)
    if sub is not None and cfg.model_type in ("siglip", "siglip2"):
        return cfg.model_type, sub
    tower = "vision_model" if modality == IMAGE else "text_model"
    if cfg.model_type in (f"siglip_{tower}", f"siglip2_{tower}"):
        return cfg.model_type.split("_")[0], cfg
    raise InputError(f"'{name}' is not a SigLIP/SigLIP2 checkpoint (model_type '{cfg.model_type}')")


def _hf_info(kind: str, sub: Callable[[str], Any] | None = None) -> Callable[[str, str | None], ModelInfo]:
    def info(name: str, _pretrained: str | None) -> ModelInfo:
        cfg = sub(name) if sub else _hf_config(_hf_name(name), kind)
        return ModelInfo(n_blocks=int(cfg.num_hidden_layers), d_model=int(cfg.hidden_size))

    return info


def _hf_name(name: str) -> str:
    return DINO_ALIASES.get(name, name)


def _from_pretrained(cls: Any, name: str, kind: str, **kwargs: Any) -> Any:
    """cls.from_pretrained, quiet (loading one tower of a two-tower checkpoint reports every unused
    weight), with a one-line InputError when it cannot be loaded."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return cls.from_pretrained(name, **kwargs)
    except Exception as e:
        raise _unavailable(kind, name, e) from e
    finally:
        hf_logging.set_verbosity(verbosity)


def _run_pixels(module: nn.Module, batch: dict[str, Tensor]) -> Any:
    return module(**batch)


def _run_ids_only(module: nn.Module, batch: dict[str, Tensor]) -> Any:
    """SigLIP text towers were trained without an attention mask (padding is attended to)."""
    return module(input_ids=batch["input_ids"])


def _siglip_pooled(run: Callable[[nn.Module, dict[str, Tensor]], Any]) -> Callable[[nn.Module, dict], Tensor]:
    """get_image_features / get_text_features of a SigLIP tower: its pooler_output (the attention-pooling
    head of the vision tower; final norm, last position and head of the text tower)."""

    def encode(module: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return run(module, batch).pooler_output

    return encode


def _run_text(module: nn.Module, batch: dict[str, Tensor]) -> Any:
    return module(**batch)


def _attention_mask(batch: dict[str, Tensor], T: int) -> Tensor:
    return batch["attention_mask"][:, :T].bool()


def _pixel_attention_mask(batch: dict[str, Tensor], T: int) -> Tensor:
    return batch["pixel_attention_mask"][:, :T].bool()


def _load_siglip_vision(name: str, _pretrained: str | None, device: torch.device) -> Adapter:
    from transformers import AutoImageProcessor, Siglip2VisionModel, SiglipVisionModel

    family, cfg = _siglip_sub_config(name, IMAGE)
    cls = Siglip2VisionModel if family == "siglip2" else SiglipVisionModel
    model = _from_pretrained(cls, name, "SigLIP2 vision model")
    processor = _from_pretrained(AutoImageProcessor, name, "SigLIP2 image processor")
    blocks = _find_blocks(model, cfg.num_hidden_layers, ["encoder.layers", "vision_model.encoder.layers"])
    naflex = family == "siglip2"
    head = getattr(cfg, "vision_use_head", True) is not False
    return Adapter(
        model="SigLIP2Vision", name=name, modality=IMAGE, n_blocks=len(blocks), d_model=cfg.hidden_size,
        module=_eval(model, device), blocks=blocks, preprocess=HFImages(processor), run=_run_pixels,
        real_mask=_pixel_attention_mask if naflex else _all_tokens, pooled_rule="mean", device=device,
        encode=_siglip_pooled(_run_pixels) if head else None, d_embed=int(cfg.hidden_size) if head else None)


def _load_siglip_text(name: str, _pretrained: str | None, device: torch.device) -> Adapter:
    from transformers import AutoTokenizer, Siglip2TextModel, SiglipTextModel

    family, cfg = _siglip_sub_config(name, TEXT)
    cls = Siglip2TextModel if family == "siglip2" else SiglipTextModel
    model = _from_pretrained(cls, name, "SigLIP2 text model")
    tokenizer = _from_pretrained(AutoTokenizer, name, "SigLIP2 tokenizer")
    length = min(SIGLIP_TEXT_LENGTH, int(cfg.max_position_embeddings))
    blocks = _find_blocks(model, cfg.num_hidden_layers, ["encoder.layers", "text_model.encoder.layers"])
    return Adapter(
        model="SiglipText", name=name, modality=TEXT, n_blocks=len(blocks), d_model=cfg.hidden_size,
        module=_eval(model, device), blocks=blocks,
        preprocess=HFTokens(tokenizer, padding="max_length", truncation=True, max_length=length),
        run=_run_ids_only, real_mask=_attention_mask, pooled_rule="final", device=device, train_final=True,
        encode=_siglip_pooled(_run_ids_only), d_embed=int(getattr(cfg, "projection_size", None) or cfg.hidden_size))


def _load_vit(name: str, _pretrained: str | None, device: torch.device) -> Adapter:
    from transformers import AutoImageProcessor, ViTModel

    cfg = _hf_config(name, "ViT model")
    model = _from_pretrained(ViTModel, name, "ViT model", add_pooling_layer=False)
    processor = _from_pretrained(AutoImageProcessor, name, "ViT image processor")
    blocks = _find_blocks(model, cfg.num_hidden_layers, ["layers", "encoder.layer", "encoder.layers"])
    return Adapter(
        model="ViT", name=name, modality=IMAGE, n_blocks=len(blocks), d_model=cfg.hidden_size,
        module=_eval(model, device), blocks=blocks, preprocess=HFImages(processor), run=_run_pixels,
        real_mask=_all_tokens, pooled_rule="first", device=device, n_prefix=1)


def _load_dino(name: str, _pretrained: str | None, device: torch.device) -> Adapter:
    from transformers import AutoImageProcessor, AutoModel

    hf = _hf_name(name)
    kind = "DINOv2 model" + (f" (--dino_model_name {name})" if hf != name else "")
    cfg = _hf_config(hf, kind)
    model = _from_pretrained(AutoModel, hf, kind)
    processor = _from_pretrained(AutoImageProcessor, hf, f"{kind} image processor")
    blocks = _find_blocks(model, cfg.num_hidden_layers, ["encoder.layer", "encoder.layers", "layers"])
    n_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
    return Adapter(
        model="DinoV2", name=name, modality=IMAGE, n_blocks=len(blocks), d_model=cfg.hidden_size,
        module=_eval(model, device), blocks=blocks, preprocess=HFImages(processor), run=_run_pixels,
        real_mask=_all_tokens, pooled_rule="first", device=device, n_prefix=n_prefix)


def _text_max_length(tokenizer: Any, cfg: Any) -> int:
    limit = int(getattr(cfg, "max_position_embeddings", 512) or 512)
    tok_max = getattr(tokenizer, "model_max_length", limit) or limit
    return int(min(limit, tok_max if tok_max < 1_000_000 else limit))


def _load_encoder(model_name: str, kind: str) -> Callable[[str, str | None, torch.device], Adapter]:
    def load(name: str, _pretrained: str | None, device: torch.device) -> Adapter:
        from transformers import AutoModel, AutoTokenizer

        cfg = _hf_config(name, kind)
        model = _from_pretrained(AutoModel, name, kind)
        tokenizer = _from_pretrained(AutoTokenizer, name, f"{kind} tokenizer")
        blocks = _find_blocks(model, cfg.num_hidden_layers, ["encoder.layer", "encoder.layers", "layers"])
        return Adapter(
            model=model_name, name=name, modality=TEXT, n_blocks=len(blocks), d_model=cfg.hidden_size,
            module=_eval(model, device), blocks=blocks,
            preprocess=HFTokens(tokenizer, padding=True, truncation=True,
                                max_length=_text_max_length(tokenizer, cfg)),
            run=_run_text, real_mask=_attention_mask, pooled_rule="first", device=device)

    return load


# --------------------------------------------------------------------------------------------------
# Registry and flags


@dataclass(frozen=True)
class Family:
    """One `--model` value."""

    model: str
    modality: str
    name_flag: str  # the flag holding the model name, e.g. "clip_model_name"
    default_name: str
    info: Callable[[str, str | None], ModelInfo]
    load: Callable[[str, str | None, torch.device], Adapter]
    pooled: str  # the position --token pooled records (docs)
    preprocess_id: str  # what the preprocessing depends on besides the model name (cache key)


FAMILIES: dict[str, Family] = {f.model: f for f in [
    Family("ClipVision", IMAGE, "clip_model_name", "ViT-L/14-quickgelu", _open_clip_info(IMAGE),
           _load_clip_vision, "CLS", "open_clip val transform v1"),
    Family("SigLIP2Vision", IMAGE, "siglip2_model_name", "google/siglip2-large-patch16-384",
           _hf_info("SigLIP2 vision model", lambda n: _siglip_sub_config(n, IMAGE)[1]),
           _load_siglip_vision, "mean of patch tokens", "AutoImageProcessor v1"),
    Family("ViT", IMAGE, "vit_model_name", "google/vit-large-patch16-384", _hf_info("ViT model"),
           _load_vit, "CLS", "AutoImageProcessor v1"),
    Family("DinoV2", IMAGE, "dino_model_name", "dinov2_vitl14", _hf_info("DINOv2 model"),
           _load_dino, "CLS", "AutoImageProcessor v1"),
    Family("ClipText", TEXT, "clip_model_name", "ViT-L/14-quickgelu", _open_clip_info(TEXT),
           _load_clip_text, "EOT (argmax of token ids)", "open_clip tokenizer v1"),
    Family("SiglipText", TEXT, "siglip2_model_name", "google/siglip2-large-patch16-384",
           _hf_info("SigLIP2 text model", lambda n: _siglip_sub_config(n, TEXT)[1]),
           _load_siglip_text, "last position", f"max_length={SIGLIP_TEXT_LENGTH} padding v1"),
    Family("Bert", TEXT, "bert_model_name", "bert-large-uncased", _hf_info("BERT model"),
           _load_encoder("Bert", "BERT model"), "[CLS]", "padding=longest truncation v1"),
    Family("Deberta", TEXT, "deberta_model_name", "microsoft/deberta-large", _hf_info("DeBERTa model"),
           _load_encoder("Deberta", "DeBERTa model"), "[CLS]", "padding=longest truncation v1"),
]}
NAME_FLAGS = {
    "clip_model_name": ("ViT-L/14-quickgelu", "open_clip model (ClipVision/ClipText): a builtin name such as "
                        "ViT-B/32-quickgelu, hf-hub:apple/DFN2B-CLIP-ViT-L-14, or a local directory"),
    "siglip2_model_name": ("google/siglip2-large-patch16-384", "SigLIP/SigLIP2 checkpoint (SigLIP2Vision/"
                           "SiglipText): hub id or local directory"),
    "vit_model_name": ("google/vit-large-patch16-384", "ViT checkpoint: hub id or local directory"),
    "dino_model_name": ("dinov2_vitl14", "DINOv2: dinov2_vitb14 / dinov2_vitl14 (mapped to facebook/dinov2-base "
                        "/ -large in transformers), a hub id or a local directory"),
    "bert_model_name": ("bert-large-uncased", "BERT checkpoint: hub id or local directory"),
    "deberta_model_name": ("microsoft/deberta-large", "DeBERTa (v1) checkpoint: hub id or local directory"),
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto'/None -> cuda when present, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} asked for, but no CUDA device is available")
    return torch.device(device)


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
        return self.family.load(self.name, self.pretrained, resolve_device(device))

    def identity(self) -> dict[str, Any]:
        """What the activations depend on, for cache keys."""
        ident: dict[str, Any] = {"model": self.model, "name": self.name,
                                 "preprocess": self.family.preprocess_id}
        if self.family.name_flag == "clip_model_name":
            ident["pretrained"] = _open_clip_pretrained(self.name, self.pretrained)
        local = _local_fingerprint(_hf_name(self.name))
        if local:
            ident["name"] = os.path.abspath(self.name)
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
    group.add_argument("--model", default=choices[0], choices=choices,
                       help=f"encoder to hook (default: {choices[0]})")
    for flag, (default, help_text) in NAME_FLAGS.items():
        used_by = [m for m, f in FAMILIES.items() if f.name_flag == flag and m in choices]
        if used_by:
            group.add_argument(f"--{flag}", default=default, help=f"{help_text} (default: {default})")
    if any(FAMILIES[m].name_flag == "clip_model_name" for m in choices):
        group.add_argument("--clip_pretrained", default="openai",
                           help="open_clip weights tag or checkpoint file for builtin names (default: openai; "
                                "ignored for hf-hub: names and local directories)")
    if layers:
        group.add_argument("--layers", type=int, nargs="+", default=[-1],
                           help="block indices to hook, negatives from the end (default: -1, the last block)")
        group.add_argument("--token", default="pooled", choices=TOKEN_CHOICES, help=TOKEN_HELP)


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """The ModelSpec selected by the flags of `add_model_args`."""
    family = FAMILIES.get(args.model)
    if family is None:
        raise InputError(f"--model {args.model!r} is not one of {', '.join(FAMILIES)}")
    name = getattr(args, family.name_flag, None) or family.default_name
    return ModelSpec(args.model, name, getattr(args, "clip_pretrained", "openai"))


__all__ = [
    "Adapter", "EncoderOutput", "FAMILIES", "Family", "ModelInfo", "ModelSpec", "TOKEN_CHOICES",
    "add_model_args", "pool_tokens", "resolve_device", "resolve_layers", "spec_from_args",
]
