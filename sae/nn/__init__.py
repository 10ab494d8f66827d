"""Sparse autoencoders: configs, the model, metrics, activation sources, the trainer, checkpoints.

Imports sae.util only.
"""
