"""share-concepts: sparse autoencoders on encoder activations, and the concepts encoders share."""

from sae.util.provenance import __version__

__all__ = ["__version__"]
