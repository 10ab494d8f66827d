"""Planted ground truth: activations built from a known sparse dictionary of concepts.

x_n = sum_c a_nc * D_c + offset + noise_n, with D [n_concepts, d] unit-norm rows, each row using
`active_per_row` concepts with coefficients a_nc ~ U(0.5, 1.5) or log-normal (others 0). An SAE that learned the
concepts has, for every planted D_c, a decoder row with cosine close to 1 (`recovery`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PlantedData:
    x: np.ndarray  # float32 [n, d]
    dictionary: np.ndarray  # float32 [n_concepts, d], unit-norm rows
    coefficients: np.ndarray  # float32 [n, n_concepts], sparse and non-negative


def planted_activations(
    n: int = 20000,
    d: int = 64,
    n_concepts: int = 128,
    active_per_row: int = 4,
    noise: float = 0.05,
    offset: float = 1.0,
    seed: int = 0,
    coefficients: str = "uniform",
) -> PlantedData:
    """Generate planted data; `noise` is the per-row noise norm, `offset` the norm of a shared mean.
    `coefficients`: "uniform" U(0.5, 1.5), or "heavy", log-normal exp(N(0, 1)) (median 1, heavy right tail)."""
    if coefficients not in ("uniform", "heavy"):
        raise ValueError(f"coefficients must be 'uniform' or 'heavy' (got {coefficients!r})")
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((n_concepts, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    chosen = np.argsort(rng.random((n, n_concepts)), axis=1)[:, :active_per_row]
    if coefficients == "uniform":
        values = rng.uniform(0.5, 1.5, (n, active_per_row))
    else:
        values = np.exp(rng.standard_normal((n, active_per_row)))
    coefs = np.zeros((n, n_concepts))
    np.put_along_axis(coefs, chosen, values, axis=1)
    shared = rng.standard_normal(d)
    x = coefs @ dictionary + offset * shared / np.linalg.norm(shared)
    x += rng.standard_normal((n, d)) * noise / np.sqrt(d)
    return PlantedData(x.astype(np.float32), dictionary.astype(np.float32), coefs.astype(np.float32))


def recovery(dictionary: np.ndarray, W_dec: np.ndarray) -> float:
    """Mean over planted atoms [n_concepts, d] of the max cosine with a decoder row [d_sae, d]."""
    D = dictionary / np.linalg.norm(dictionary, axis=1, keepdims=True)
    W = W_dec / np.maximum(np.linalg.norm(W_dec, axis=1, keepdims=True), 1e-12)
    return float((D.astype(np.float64) @ W.astype(np.float64).T).max(1).mean())
