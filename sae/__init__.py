"""share-concepts: sparse autoencoders on encoder activations, and the concepts encoders share."""

__version__ = "0.1.0"
