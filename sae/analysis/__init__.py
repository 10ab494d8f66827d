"""What the recorded features say: correlations, wMPPC and sharedness, overlap, stability, the Bridge
Score, concept names, VLM embeddings, and the comparison files they save.

Imports sae.util, sae.nn, sae.data and sae.encoders.
"""
