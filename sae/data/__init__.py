"""Data on disk: captioned datasets, the activation cache, recorded SAE features (csr-v1).

Imports sae.util only.
"""
