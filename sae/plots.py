"""Comparison pictures readable at a glance: comparative sharedness Delta against the feature mass S.

`plot_sharedness(result, path)` draws one point per feature of the source layer of a
`sae.compare.SharednessResult` (duck-typed: source, layer, min_group, max_group, weight [d], delta [d],
rho_min_group [d], rho_max_group [d], selected [n_top], top):

    x = S_i (the feature's summed activation; log scale when it spans more than two decades)
    y = Delta_i = S_i (rho_iG^2 - rho_iH^2)
    colour = rho_iG^2 - rho_iH^2 (colour bar, diverging around 0): how much better G shares the feature than H
    the selected top features: red rings, the strongest labelled with their index

Dead features (S = 0) are left out and counted in the legend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sae.cli import InputError


def plot_sharedness(result: Any, path: str | Path, *, label_top: int = 10) -> None:
    """Save the Delta-against-S scatter of a comparative sharedness result (format from `path`'s suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    s = np.asarray(result.weight, dtype=np.float64)
    delta = np.asarray(result.delta, dtype=np.float64)
    diff = np.asarray(result.rho_min_group, dtype=np.float64) ** 2 - np.asarray(result.rho_max_group,
                                                                                 dtype=np.float64) ** 2
    selected = np.asarray(result.selected, dtype=np.int64)
    live = s > 0
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    lim = max(float(np.abs(diff[live]).max()) if live.any() else 1.0, 1e-6)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
    sc = ax.scatter(s[live], delta[live], c=diff[live], cmap="coolwarm", norm=norm, s=10, alpha=0.8, linewidths=0)
    ax.scatter([], [], c="0.45", s=10, label=f"features ({int((~live).sum())} dead not shown)")  # legend entry
    sel = selected[live[selected]]
    ax.scatter(s[sel], delta[sel], s=60, facecolors="none", edgecolors="red", linewidths=1.3,
               label=f"selected: top {len(selected)} by Delta ({result.top:g} of {len(s)})")
    for i in sel[:label_top]:
        ax.annotate(str(int(i)), (s[i], delta[i]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                    color="darkred")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    if live.any() and s[live].max() > 100 * s[live].min():
        ax.set_xscale("log")
    ax.set_xlabel("S = summed activation of the feature (mass)")
    ax.set_ylabel("Δ = S (ρ_G² − ρ_H²)")
    ax.set_title(f"Comparative sharedness of {result.source} (layer {result.layer})\n"
                 f"G (min) = {', '.join(result.min_group)}   H (max) = {', '.join(result.max_group)}", fontsize=10)
    cb = fig.colorbar(sc, ax=ax)
    cb.set_label("ρ_G² − ρ_H²")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot write plot {path}: {e}") from None
    finally:
        plt.close(fig)
