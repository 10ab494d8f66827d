"""transformers towers: SigLIP/SigLIP2 (vision and text), ViT, DINOv2, BERT, DeBERTa."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sae.encoders.adapter import IMAGE, TEXT, Adapter, ModelInfo, all_tokens, eval_frozen, find_blocks
from sae.encoders.loading import unavailable
from sae.encoders.preprocess import HFImages, HFTokens
from sae.util.errors import InputError

DINO_ALIASES = {
    "dinov2_vits14": "facebook/dinov2-small",
    "dinov2_vitb14": "facebook/dinov2-base",
    "dinov2_vitl14": "facebook/dinov2-large",
    "dinov2_vitg14": "facebook/dinov2-giant",
}
SIGLIP_TEXT_LENGTH = 64  # SigLIP / SigLIP2 text towers were trained on 64 tokens, padding='max_length'


# --------------------------------------------------------------------------------------------------
# transformers families


def _hf_config(name: str, kind: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except Exception as e:
        raise unavailable(kind, name, e) from e


def siglip_sub_config(name: str, modality: str) -> Any:
    cfg = _hf_config(name, "SigLIP model")
    sub = getattr(cfg, "vision_config" if modality == IMAGE else "text_config", None)
    if sub is not None and cfg.model_type in ("siglip", "siglip2"):
        return cfg.model_type, sub
    tower = "vision_model" if modality == IMAGE else "text_model"
    if cfg.model_type in (f"siglip_{tower}", f"siglip2_{tower}"):
        return cfg.model_type.split("_")[0], cfg
    raise InputError(f"'{name}' is not a SigLIP/SigLIP2 checkpoint (model_type '{cfg.model_type}')")


def hf_info(kind: str, sub: Callable[[str], Any] | None = None) -> Callable[[str, str | None], ModelInfo]:
    def info(name: str, _pretrained: str | None) -> ModelInfo:
        cfg = sub(name) if sub else _hf_config(hf_name(name), kind)
        return ModelInfo(n_blocks=int(cfg.num_hidden_layers), d_model=int(cfg.hidden_size))

    return info


def hf_name(name: str) -> str:
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
        raise unavailable(kind, name, e) from e
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


def load_siglip_vision(name: str, _pretrained: str | None, device: torch.device) -> Adapter:
    from transformers import AutoImageProcessor, Siglip2VisionModel, SiglipVisionModel

    family, cfg = siglip_sub_config(name, IMAGE)
    cls = Siglip2VisionModel if family == "siglip2" else SiglipVisionModel
    model = _from_pretrained(cls, name, "SigLIP2 vision model")
    processor = _from_pretrained(AutoImageProcessor, name, "SigLIP2 image processor")
    blocks = find_blocks(model, cfg.num_hidden_layers, ["encoder.layers", "vision_model.encoder.layers"])
    naflex = family == "siglip2"
    head = getattr(cfg, "vision_use_head", True) is not False
    return Adapter(
        model="SigLIP2Vision",
        name=name,
        modality=IMAGE,
        n_blocks=len(blocks),
        d_model=cfg.hidden_size,
        module=eval_frozen(model, device),
        blocks=blocks,
        preprocess=HFImages(processor),
        run=_run_pixels,
        real_mask=_pixel_attention_mask if naflex else all_tokens,
        pooled_rule="mean",
        device=device,
        encode=_siglip_pooled(_run_pixels) if head else None,
        d_embed=int(cfg.hidden_size) if head else None,
    )


def load_siglip_text(name: str, _pretrained: str | None, device: torch.device) -> Adapter:
    from transformers import AutoTokenizer, Siglip2TextModel, SiglipTextModel

    family, cfg = siglip_sub_config(name, TEXT)
    cls = Siglip2TextModel if family == "siglip2" else SiglipTextModel
    model = _from_pretrained(cls, name, "SigLIP2 text model")
    tokenizer = _from_pretrained(AutoTokenizer, name, "SigLIP2 tokenizer")
    length = min(SIGLIP_TEXT_LENGTH, int(cfg.max_position_embeddings))
    blocks = find_blocks(model, cfg.num_hidden_layers, ["encoder.layers", "text_model.encoder.layers"])
    return Adapter(
        model="SiglipText",
        name=name,
        modality=TEXT,
        n_blocks=len(blocks),
        d_model=cfg.hidden_size,
        module=eval_frozen(model, device),
        blocks=blocks,
        preprocess=HFTokens(tokenizer, padding="max_length", truncation=True, max_length=length),
        run=_run_ids_only,
        real_mask=_attention_mask,
        pooled_rule="final",
        device=device,
        train_final=True,
        encode=_siglip_pooled(_run_ids_only),
        d_embed=int(getattr(cfg, "projection_size", None) or cfg.hidden_size),
    )


def _pixel_adapter(
    model_name: str,
    name: str,
    cfg: Any,
    model: nn.Module,
    processor: Any,
    blocks: nn.ModuleList | Sequence[nn.Module],
    device: torch.device,
    n_prefix: int,
) -> Adapter:
    """A CLS-first vision transformer fed `pixel_values` (ViT, DINOv2): every token is real, CLS recorded."""
    return Adapter(
        model=model_name,
        name=name,
        modality=IMAGE,
        n_blocks=len(blocks),
        d_model=cfg.hidden_size,
        module=eval_frozen(model, device),
        blocks=blocks,
        preprocess=HFImages(processor),
        run=_run_pixels,
        real_mask=all_tokens,
        pooled_rule="first",
        device=device,
        n_prefix=n_prefix,
    )


def load_vit(name: str, _pretrained: str | None, device: torch.device) -> Adapter:
    from transformers import AutoImageProcessor, ViTModel

    cfg = _hf_config(name, "ViT model")
    model = _from_pretrained(ViTModel, name, "ViT model", add_pooling_layer=False)
    processor = _from_pretrained(AutoImageProcessor, name, "ViT image processor")
    blocks = find_blocks(model, cfg.num_hidden_layers, ["layers", "encoder.layer", "encoder.layers"])
    return _pixel_adapter("ViT", name, cfg, model, processor, blocks, device, n_prefix=1)


def load_dino(name: str, _pretrained: str | None, device: torch.device) -> Adapter:
    from transformers import AutoImageProcessor, AutoModel

    hf = hf_name(name)
    kind = "DINOv2 model" + (f" (--dino_model_name {name})" if hf != name else "")
    cfg = _hf_config(hf, kind)
    model = _from_pretrained(AutoModel, hf, kind)
    processor = _from_pretrained(AutoImageProcessor, hf, f"{kind} image processor")
    blocks = find_blocks(model, cfg.num_hidden_layers, ["encoder.layer", "encoder.layers", "layers"])
    n_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)  # CLS and the register tokens
    return _pixel_adapter("DinoV2", name, cfg, model, processor, blocks, device, n_prefix=n_prefix)


def _text_max_length(tokenizer: Any, cfg: Any) -> int:
    limit = int(getattr(cfg, "max_position_embeddings", 512) or 512)
    tok_max = getattr(tokenizer, "model_max_length", limit) or limit
    return int(min(limit, tok_max if tok_max < 1_000_000 else limit))


def load_encoder(model_name: str, kind: str) -> Callable[[str, str | None, torch.device], Adapter]:
    def load(name: str, _pretrained: str | None, device: torch.device) -> Adapter:
        from transformers import AutoModel, AutoTokenizer

        cfg = _hf_config(name, kind)
        model = _from_pretrained(AutoModel, name, kind)
        tokenizer = _from_pretrained(AutoTokenizer, name, f"{kind} tokenizer")
        blocks = find_blocks(model, cfg.num_hidden_layers, ["encoder.layer", "encoder.layers", "layers"])
        return Adapter(
            model=model_name,
            name=name,
            modality=TEXT,
            n_blocks=len(blocks),
            d_model=cfg.hidden_size,
            module=eval_frozen(model, device),
            blocks=blocks,
            preprocess=HFTokens(tokenizer, padding=True, truncation=True, max_length=_text_max_length(tokenizer, cfg)),
            run=_run_text,
            real_mask=_attention_mask,
            pooled_rule="first",
            device=device,
        )

    return load
