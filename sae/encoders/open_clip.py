"""open_clip towers: ClipVision (ViTs and CLIP ResNets) and ClipText."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from sae.encoders.adapter import IMAGE, TEXT, Adapter, ModelInfo, all_tokens, eval_frozen
from sae.encoders.loading import short_error, unavailable
from sae.encoders.preprocess import OpenClipTokens, TorchvisionImages
from sae.util.errors import InputError

# --------------------------------------------------------------------------------------------------
# open_clip: ClipVision / ClipText


def open_clip_name(name: str) -> str:
    """The open_clip identifier: local directories become 'local-dir:', builtin names use '-'."""
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    if os.path.isdir(name):
        return "local-dir:" + os.path.abspath(name)
    return name.replace("/", "-")


def open_clip_pretrained(name: str, pretrained: str | None) -> str | None:
    """`pretrained` only applies to builtin names (hub and local directories carry their weights)."""
    return None if open_clip_name(name).startswith(("hf-hub:", "local-dir:")) else pretrained


def _open_clip_config(name: str) -> dict:
    import open_clip

    oc = open_clip_name(name)
    try:
        cfg = open_clip.get_model_config(oc)
    except Exception as e:
        raise unavailable("open_clip model", name, e) from e
    if cfg is None:
        raise InputError(
            f"unknown open_clip model '{name}' (see open_clip.list_models(); hub models are "
            f"'hf-hub:org/repo'; a local directory needs open_clip_config.json)"
        )
    return cfg


def open_clip_info(modality: str) -> Callable[[str, str | None], ModelInfo]:
    def info(name: str, _pretrained: str | None) -> ModelInfo:
        cfg = _open_clip_config(name)
        tower = cfg.get("vision_cfg" if modality == IMAGE else "text_cfg", {})
        if modality == IMAGE and "timm_model_name" in tower:
            raise InputError(
                f"open_clip model '{name}' has a timm image tower: only ViT towers and CLIP "
                f"ResNets (RN50, ...) are supported"
            )
        if modality == IMAGE and isinstance(tower.get("layers"), (list, tuple)):  # ModifiedResNet
            widths = _resnet_widths(int(tower.get("width", 64)), int(cfg["embed_dim"]))
            return ModelInfo(n_blocks=len(widths), d_model=widths[-1], widths=widths)
        if modality == TEXT and "hf_model_name" in tower:
            raise InputError(f"open_clip model '{name}' has a Hugging Face text tower: not supported by ClipText")
        return ModelInfo(n_blocks=int(tower.get("layers", 12)), d_model=int(tower.get("width", 512)))

    return info


def _load_open_clip(name: str, pretrained: str | None, device: torch.device) -> tuple[Any, Callable]:
    """(open_clip CLIP or CustomTextCLIP, its image transform); open_clip leaves the return untyped."""
    import open_clip

    oc = open_clip_name(name)
    tag = open_clip_pretrained(name, pretrained)
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)  # open_clip logs the failure before raising it; we report it once
    try:
        model, preprocess = cast(
            "tuple[Any, Callable]", open_clip.create_model_from_pretrained(oc, pretrained=tag, device="cpu")
        )
    except Exception as e:
        what = f"open_clip model '{name}'" + (f" with pretrained='{tag}'" if tag else "")
        raise InputError(
            f"cannot load {what} ({short_error(e)}); weights must be in the local cache when the hub is "
            f"unreachable or HF_HUB_OFFLINE=1 - download them once, or give a local directory holding "
            f"open_clip_config.json and the weights"
        ) from e
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


def _open_clip_vision_tower(visual: nn.Module, name: str) -> tuple[nn.ModuleList | Sequence[nn.Module], bool, int, str]:
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
        raise InputError(
            f"open_clip model '{name}' has a {type(visual).__name__} image tower: only ViT "
            f"towers and CLIP ResNets (RN50, ...) are supported"
        )
    transformer = visual.transformer
    rule = "mean" if getattr(visual, "pool_type", "tok") == "avg" else "first"
    return transformer.resblocks, not getattr(transformer, "batch_first", True), 1, rule


def _run_visual(module: nn.Module, batch: dict[str, Tensor]) -> Any:
    """The open_clip image tower; its output is encode_image's (final norm + projection / attnpool)."""
    return module(batch["pixel_values"])


def _clip_text_mask(batch: dict[str, Tensor], T: int) -> Tensor:
    """Tokens up to and including EOT, the largest id of each row (open_clip's argmax pooling)."""
    ids = batch["input_ids"]
    eot = ids.argmax(dim=-1)
    return torch.arange(T, device=ids.device).unsqueeze(0) <= eot.unsqueeze(1)


def load_clip_vision(name: str, pretrained: str | None, device: torch.device) -> Adapter:
    info = open_clip_info(IMAGE)(name, pretrained)
    model, preprocess = _load_open_clip(name, pretrained, device)
    visual = model.visual
    blocks, seq_first, n_prefix, rule = _open_clip_vision_tower(visual, name)
    del model
    resnet = info.widths is not None
    return Adapter(
        model="ClipVision",
        name=name,
        modality=IMAGE,
        n_blocks=len(blocks),
        d_model=info.d_model,
        module=eval_frozen(visual, device),
        blocks=blocks,
        preprocess=TorchvisionImages(preprocess),
        run=_run_visual,
        real_mask=all_tokens,
        pooled_rule=rule,
        device=device,
        n_prefix=n_prefix,
        seq_first=seq_first,
        widths=info.widths,
        to_tokens=_spatial_tokens if resnet else None,
        encode=_run_visual,
        d_embed=int(_open_clip_config(name)["embed_dim"]),
    )


def _run_clip_text(module: Any, batch: dict[str, Tensor]) -> Any:
    """open_clip encode_text (`module`: an open_clip CLIP or CustomTextCLIP), unnormalised: final norm, EOT
    pooling and text projection."""
    return module.encode_text(batch["input_ids"])


def load_clip_text(name: str, pretrained: str | None, device: torch.device) -> Adapter:
    import open_clip

    info = open_clip_info(TEXT)(name, pretrained)
    model, _ = _load_open_clip(name, pretrained, device)
    if hasattr(model, "transformer") and hasattr(model, "token_embedding"):  # open_clip CLIP
        transformer, pool_type = model.transformer, getattr(model, "text_pool_type", "argmax")
    elif hasattr(getattr(model, "text", None), "transformer"):  # CustomTextCLIP with a TextTransformer
        transformer, pool_type = model.text.transformer, getattr(model.text, "pool_type", "argmax")
    else:
        raise InputError(f"open_clip model '{name}' has no transformer text tower supported by ClipText")
    if pool_type != "argmax":
        raise InputError(
            f"open_clip model '{name}' pools its text with '{pool_type}': ClipText supports "
            f"CLIP-style towers (EOT = argmax of the token ids) only"
        )
    model.visual = None  # encode_text does not use it; free the memory (the text tower, ln_final and the
    # text projection stay)
    tokenizer = open_clip.get_tokenizer(open_clip_name(name))
    return Adapter(
        model="ClipText",
        name=name,
        modality=TEXT,
        n_blocks=len(transformer.resblocks),
        d_model=info.d_model,
        module=eval_frozen(model, device),
        blocks=transformer.resblocks,
        preprocess=OpenClipTokens(tokenizer),
        run=_run_clip_text,
        real_mask=_clip_text_mask,
        pooled_rule="last",
        device=device,
        seq_first=not getattr(transformer, "batch_first", True),
        encode=_run_clip_text,
        d_embed=int(_open_clip_config(name)["embed_dim"]),
    )
