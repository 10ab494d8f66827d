"""The paper repo's `wrappedmodels.py`: the encoders whose layers are hooked, behind `--model`.

A thin facade over sae.encoders (adapter engine, preprocessors, open_clip / transformers loaders,
registry); see sae/encoders/__init__.py for the usage and the recorded position of each family.
"""

from sae.data.cache import TOKEN_CHOICES
from sae.encoders.adapter import IMAGE, TEXT, Adapter, EncoderOutput, ModelInfo, pool_tokens, resolve_layers
from sae.encoders.hf import DINO_ALIASES
from sae.encoders.registry import FAMILIES, NAME_FLAGS, Family, ModelSpec, add_model_args, spec_from_args
from sae.util.device import resolve_device

__all__ = [
    "DINO_ALIASES",
    "FAMILIES",
    "IMAGE",
    "TEXT",
    "NAME_FLAGS",
    "TOKEN_CHOICES",
    "Adapter",
    "EncoderOutput",
    "Family",
    "ModelInfo",
    "ModelSpec",
    "add_model_args",
    "pool_tokens",
    "resolve_device",
    "resolve_layers",
    "spec_from_args",
]
