"""share-concepts: sparse autoencoders on encoder activations, and the concepts encoders share.

Public API (imported lazily, so `import sae` stays cheap):

    from sae import SparseAutoencoder, SAEConfig, load_sae, train_saes
    from sae import TrainConfig, SAESpec, ActivationSource, save_sae

See docs/api.md for an example.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sae.util.provenance import __version__

_LAZY = {
    "SparseAutoencoder": "sae.nn.model",
    "SAEConfig": "sae.nn.config",
    "TrainConfig": "sae.nn.config",
    "load_sae": "sae.nn.checkpoint",
    "save_sae": "sae.nn.checkpoint",
    "train_saes": "sae.nn.trainer",
    "SAESpec": "sae.nn.trainer",
    "ActivationSource": "sae.nn.sources",
}

__all__ = [
    "__version__",
    "SparseAutoencoder",
    "SAEConfig",
    "TrainConfig",
    "load_sae",
    "save_sae",
    "train_saes",
    "SAESpec",
    "ActivationSource",
]

if TYPE_CHECKING:
    from sae.nn.checkpoint import load_sae, save_sae
    from sae.nn.config import SAEConfig, TrainConfig
    from sae.nn.model import SparseAutoencoder
    from sae.nn.sources import ActivationSource
    from sae.nn.trainer import SAESpec, train_saes


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sae' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
