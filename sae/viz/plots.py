"""Comparison pictures readable at a glance: comparative sharedness Delta against the feature mass S.

`plot_sharedness(result, path)` saves `sharedness_figure(result)`, one point per feature of the source
layer of a `sae.analysis.compare.SharednessResult` (duck-typed: source, layer, min_group, max_group, weight [d],
delta [d], rho_min_group [d], rho_max_group [d], selected [n_top], top):

    x = S_i (the feature's summed activation; log scale when it spans more than two decades)
    y = Delta_i = S_i (rho_iG^2 - rho_iH^2)
    colour = Delta_i / S_i = rho_iG^2 - rho_iH^2 as Delta uses it (colour bar, diverging around 0: red =
             shared more with G, blue = with H)
    the selected top features: black rings; the `label_top` strongest labelled with their index, each
    label placed at the first of a few offsets around its point where it overlaps no other label
    (labels that fit nowhere are left out)

Dead features (S = 0) are left out and counted in the legend's title. When a few features have a |Delta|
far beyond the rest (over SYMLOG_RATIO times the larger of the selected features' |Delta| and the 90th
percentile of |Delta|), the y axis is symlog, linear within that reference, so the bulk stays readable.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sae.util.errors import InputError

if TYPE_CHECKING:
    from sae.analysis.compare import SharednessResult

DPI = 150
DIFF = r"$\rho_G^2-\rho_H^2$"
# label offsets in points around a point, tried in order
SYMLOG_RATIO = 20
OFFSETS = [(5, 5), (5, -11), (-8, 6), (-8, -12), (9, -3), (-13, -3), (0, 12), (0, -17)]


def _place_labels(fig: Any, ax: Any, points: list[tuple[int, float, float]]) -> list[Any]:
    """Annotate (index, x, y) points in order, each at the first offset where its text overlaps no
    earlier label and stays inside the axes; the annotations placed."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed, boxes = [], []
    for i, x, y in points:
        for dx, dy in OFFSETS:
            ann = ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7, color="black")
            box = ann.get_window_extent(renderer).expanded(1.1, 1.15)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in boxes):
                placed.append(ann)
                boxes.append(box)
                break
            ann.remove()
    return placed


def symlog_threshold(delta: np.ndarray, selected: np.ndarray) -> float | None:
    """The linear range of a symlog Delta axis, or None when a linear axis is readable (module docstring)."""
    if not len(delta):
        return None
    ref = max(float(np.abs(selected).max()) if len(selected) else 0.0, float(np.quantile(np.abs(delta), 0.9)))
    if ref <= 0 or float(np.abs(delta).max()) <= SYMLOG_RATIO * ref:
        return None
    return ref


def sharedness_figure(result: SharednessResult, *, label_top: int = 8) -> Any:
    """The Delta-against-S scatter of a comparative sharedness result, as a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.lines import Line2D

    s = np.asarray(result.weight, dtype=np.float64)
    delta = np.asarray(result.delta, dtype=np.float64)
    selected = np.asarray(result.selected, dtype=np.int64)
    live = s > 0
    # the colour is Delta / S: rho_G^2 - rho_H^2 exactly as Delta uses it (sae/analysis/compare.py clips negative rho)
    diff = np.divide(delta, s, out=np.zeros_like(delta), where=live)
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    lim = max(float(np.abs(diff[live]).max()) if live.any() else 1.0, 1e-6)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
    cmap = matplotlib.colormaps["coolwarm"]
    sc = ax.scatter(s[live], delta[live], c=diff[live], cmap=cmap, norm=norm, s=12, alpha=0.85, linewidths=0)
    sel = selected[live[selected]]
    ax.scatter(s[sel], delta[sel], s=70, facecolors="none", edgecolors="black", linewidths=1.2)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    if live.any() and s[live].max() > 100 * s[live].min():
        ax.set_xscale("log")
    ax.set_xlabel("S = summed activation of the feature (mass)")
    ax.set_ylabel(r"$\Delta = S\,(\rho_G^2-\rho_H^2)$")
    linthresh = symlog_threshold(delta[live], delta[sel])
    if linthresh is not None:
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.set_ylabel(r"$\Delta = S\,(\rho_G^2-\rho_H^2)$" + f" (symlog, linear within ±{linthresh:.3g})")
    ax.set_title(
        f"Comparative sharedness of {result.source} (layer {result.layer})\n"
        f"G (min) = {', '.join(result.min_group)}   H (max) = {', '.join(result.max_group)}",
        fontsize=10,
    )
    cb = fig.colorbar(sc, ax=ax)
    cb.set_label(DIFF)

    def dot(value: float, text: str) -> Line2D:  # a legend marker in the colour map's colour for `value`
        return Line2D(
            [], [], linestyle="", marker="o", markersize=5, markeredgewidth=0, color=cmap(norm(value)), label=text
        )

    handles = [
        dot(0.8 * lim, r"shared more with G ($\rho_G^2>\rho_H^2$)"),
        dot(-0.8 * lim, r"shared more with H ($\rho_G^2<\rho_H^2$)"),
        Line2D(
            [],
            [],
            linestyle="",
            marker="o",
            markersize=8,
            markerfacecolor="none",
            color="black",
            label=f"selected: top {len(selected)} by Δ ({result.top:g} of {len(s)})",
        ),
    ]
    ax.legend(
        handles=handles,
        loc="best",
        fontsize=8,
        title_fontsize=8,
        title=f"{int(live.sum())} features ({int((~live).sum())} dead not shown)",
    )
    fig.tight_layout()
    _place_labels(fig, ax, [(int(i), float(s[i]), float(delta[i])) for i in sel[:label_top]])
    return fig


def plot_sharedness(result: SharednessResult, path: str | Path, *, label_top: int = 8) -> None:
    """Save the Delta-against-S scatter of a comparative sharedness result (format from `path`'s suffix)."""
    import matplotlib.pyplot as plt

    fig = sharedness_figure(result, label_top=label_top)
    try:
        fig.savefig(path, dpi=DPI)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot write plot {path}: {e}") from None
    finally:
        plt.close(fig)
