"""The comparison files: what wmppc.py and comp_sharedness.py save beside a run, and their reader.

Comparison results live next to the run, in `<features_dir>/<run>/comparisons/*.json`. Read (files for
another source layer are skipped quietly; files for another source run, or not recognised, are listed
as ignored on the index page):

1. best matches, one file per (source layer, target run, method); `save_best_matches` writes it, as
   `comparisons/L{source_layer:02d}__{target}__{method}.json` (wmppc.py: the best over every target
   layer; comp_sharedness.py: over its compared layers, by default the target's last):

       {"format": "best-matches-v1", "method": "wmppc" | "comp_sharedness" | ...,
        "source": "<run>", "source_layer": 11, "target": "<other run>", "target_layers": [11],
        "n_samples": 5000,
        "feature": [d_source ints],    best-matching feature of the target, -1 for none (dead)
        "layer":   [d_source ints],    target layer holding it
        "rho":     [d_source floats]}  its Pearson correlation

2. the JSON that `comp_sharedness.py --json` prints (also saved as `comparisons/sharedness_L{layer:02d}.json`):
   its `features` list gives Delta and the best match in every G and H run, for the selected features.

3. wmppc.py's full result, `comparisons/wmppc__{target}.json`: its run-level scores (all layers, last
   layer) are shown above the table.

One index column per (target run, target layers): the best match over the same layers is the same
whatever the method, so such files merge into one column (a full best-matches file beats the selected
features of a sharedness file); a target compared over different layers (wMPPC over all, sharedness
over the last) gets one column each, labelled with the method and the layers. Matches link to the other
run's feature page when that run's previews sit beside this one (`<out>/../<target>/`, with the same
layer in its show.json); otherwise they are plain text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sae.data.features import FeatureRun
from sae.util.atomic import read_json, write_json

MATCH_FORMAT = "best-matches-v1"
COMPARISONS = "comparisons"


def comparison_path(run_dir: str | Path, source_layer: int, target: str, method: str) -> Path:
    """Where `save_best_matches` writes: <run_dir>/comparisons/L{layer:02d}__{target}__{method}.json."""
    return Path(run_dir) / COMPARISONS / f"L{source_layer:02d}__{target}__{method}.json"


def save_best_matches(
    run_dir: str | Path,
    *,
    source: str,
    source_layer: int,
    target: str,
    target_layers: Sequence[int],
    feature: np.ndarray,
    layer: np.ndarray | int,
    rho: np.ndarray,
    method: str,
    n_samples: int | None = None,
) -> Path:
    """Write the best match of every source feature in `target` (arrays [d_source]) for the browser.

    feature: int [d] best target feature (-1 for none); layer: int [d] (or one int) target layer of
    that feature; rho: float [d] its correlation. Written atomically; returns the path.
    """
    feature = np.asarray(feature, dtype=np.int64)
    rho = np.asarray(rho, dtype=np.float64)
    layer = np.broadcast_to(np.asarray(layer, dtype=np.int64), feature.shape)
    if not (feature.shape == rho.shape == layer.shape and feature.ndim == 1):
        raise ValueError(f"feature {feature.shape}, layer {layer.shape} and rho {rho.shape} must be the same [d]")
    path = comparison_path(run_dir, source_layer, target, method)
    write_json(
        path,
        {
            "format": MATCH_FORMAT,
            "method": method,
            "source": source,
            "source_layer": int(source_layer),
            "target": target,
            "target_layers": [int(b) for b in target_layers],
            "n_samples": n_samples,
            "feature": feature.tolist(),
            "layer": layer.tolist(),
            "rho": [None if not np.isfinite(r) else round(float(r), 6) for r in rho],
        },
    )
    return path


METHOD_NAMES = {"wmppc": "wMPPC", "comp_sharedness": "sharedness"}


@dataclass
class MatchColumn:
    """Best matches of the source features in one target run, over `target_layers`:
    {source feature: (target layer, target feature, rho)}."""

    target: str
    target_layers: list[int]
    method: str
    matches: dict[int, tuple[int, int, float]]
    full: bool  # every source feature covered (a best-matches file), not just selected ones
    origin: str  # file name
    key: str = ""  # data-key of the index column
    methods: list[str] = field(default_factory=list)  # every method whose file gave these matches
    origins: list[str] = field(default_factory=list)  # and those files
    layers_text: str = ""  # "all layers (0, 1, 2)" or "L2"

    @property
    def compared(self) -> str:
        """'<methods> · <layers>', e.g. 'sharedness + wMPPC · L4'."""
        return " + ".join(METHOD_NAMES.get(m, m) for m in self.methods) + f" · {self.layers_text}"

    @property
    def label(self) -> str:
        """'<target> · <methods> · <layers>'."""
        return f"{self.target} · {self.compared}"


@dataclass
class DeltaColumn:
    """Comparative sharedness Delta of the selected features of one comp_sharedness result."""

    min_group: list[str]
    max_group: list[str]
    delta: dict[int, float]
    origin: str
    label: str = ""
    key: str = ""


@dataclass
class WmppcScore:
    """The run-level scores of a full wMPPC result (`comparisons/wmppc__<target>.json`)."""

    target: str
    all_layers: float
    last_layer: float
    origin: str


@dataclass
class Comparisons:
    matches: list[MatchColumn] = field(default_factory=list)
    deltas: list[DeltaColumn] = field(default_factory=list)
    scores: list[WmppcScore] = field(default_factory=list)
    read: list[str] = field(default_factory=list)  # files used (for the shown layer)
    ignored: list[str] = field(default_factory=list)  # "file: why", only for files not recognised

    @property
    def any(self) -> bool:
        return bool(self.matches or self.deltas or self.scores)


def _key(prefix: str, name: str) -> str:
    return prefix + re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _is_wmppc_result(obj: dict[str, Any]) -> bool:
    """The full result wmppc.py saves as comparisons/wmppc__<target>.json (`WMPPCResult.to_json()`)."""
    return all(k in obj for k in ("target", "matrix", "all_layers", "last_layer", "source_layers"))


def _is_sharedness_result(obj: dict[str, Any]) -> bool:
    """comp_sharedness.py --json output, also saved as comparisons/sharedness_L{layer:02d}.json."""
    return all(k in obj for k in ("features", "min_group", "max_group"))


def _run_layers(features_dir: Path, run: str) -> list[int] | None:
    """The layers recorded for `run` beside the source run, None when it is not there."""
    path = features_dir / run
    try:
        return FeatureRun(path).layers if path.is_dir() else None
    except (OSError, ValueError):
        return None


def _layers_text(layers: list[int], run_layers: list[int] | None) -> str:
    if not layers:
        return "layers ?"
    listed = ", ".join(map(str, layers))
    if len(layers) > 1:
        return f"all layers ({listed})" if run_layers is not None and layers == run_layers else f"layers {listed}"
    return f"L{layers[0]}" + (" (last)" if run_layers and layers[0] == run_layers[-1] and len(run_layers) > 1 else "")


def _read_best_matches(obj: dict[str, Any], name: str, out: Comparisons) -> None:
    rows = zip(obj["feature"], obj["layer"], obj["rho"])
    m = {
        i: (int(b), int(j), float(r)) for i, (j, b, r) in enumerate(rows) if j is not None and j >= 0 and r is not None
    }
    layers = list(obj.get("target_layers") or [])
    out.matches.append(MatchColumn(obj["target"], layers, obj.get("method", "?"), m, True, name))


def _read_wmppc(obj: dict[str, Any], name: str, out: Comparisons) -> None:
    """Run-level scores only; the per-feature matches are in the L..__wmppc best-matches files."""
    out.scores.append(WmppcScore(str(obj["target"]), float(obj["all_layers"]), float(obj["last_layer"]), name))


def _read_sharedness(obj: dict[str, Any], name: str, out: Comparisons) -> None:
    """Delta of the selected features, and their best match in every G and H run."""
    feats = obj["features"]
    delta = {int(f["index"]): float(f["delta"]) for f in feats}
    out.deltas.append(DeltaColumn(list(obj["min_group"]), list(obj["max_group"]), delta, name))
    per_run: dict[str, dict[int, tuple[int, int, float]]] = {}
    for f in feats:
        for target, b in (f.get("best_match") or {}).items():
            if b.get("feature", -1) >= 0:
                per_run.setdefault(target, {})[int(f["index"])] = (int(b["layer"]), int(b["feature"]), float(b["rho"]))
    layers = obj.get("compared_layers") or {}
    for target in [*obj["min_group"], *obj["max_group"]]:
        lay = layers.get(target)
        cols = per_run.get(target, {})
        out.matches.append(
            MatchColumn(target, lay if isinstance(lay, list) else [], "comp_sharedness", cols, False, name)
        )


def _reader(obj: dict[str, Any], layer: int) -> Callable[[dict[str, Any], str, Comparisons], None] | None:
    """The reader of a recognised file when it concerns source `layer`; `_skip` for another layer; None when
    the file is not a comparison result of this toolkit."""
    if obj.get("format") == MATCH_FORMAT:
        return _read_best_matches if int(obj.get("source_layer", layer)) == layer else _skip
    if _is_wmppc_result(obj):
        return _read_wmppc if layer in obj.get("source_layers", []) else _skip
    if _is_sharedness_result(obj):
        return _read_sharedness if obj.get("layer") is None or int(obj["layer"]) == layer else _skip
    return None


def _skip(obj: dict[str, Any], name: str, out: Comparisons) -> None:
    """A file of this toolkit for another source layer: skipped quietly."""


def _merge_columns(matches: list[MatchColumn], features_dir: Path) -> list[MatchColumn]:
    """One column per (target, layers): the best match over the same layers is the same whatever the method,
    so such columns merge; a full best-matches file beats the selected features of a sharedness file."""
    groups: dict[tuple[str, tuple[int, ...]], list[MatchColumn]] = {}
    for col in matches:
        groups.setdefault((col.target, tuple(col.target_layers)), []).append(col)
    merged = []
    for cols in groups.values():
        best = max(cols, key=lambda c: (c.full, len(c.matches)))
        best.methods = sorted({c.method for c in cols}, key=lambda m: (m != best.method, m))
        best.origins = [best.origin, *sorted({c.origin for c in cols} - {best.origin})]
        merged.append(best)
    merged.sort(key=lambda c: (c.target, -len(c.target_layers), c.target_layers))
    per_target = [c.target for c in merged]
    for c in merged:
        c.layers_text = _layers_text(c.target_layers, _run_layers(features_dir, c.target))
        c.key = (
            _key("rho_", c.target)
            if per_target.count(c.target) == 1
            else _key("rho_", f"{c.target}_{'+'.join(c.methods)}_L{'-'.join(map(str, c.target_layers))}")
        )
    return merged


def load_comparisons(run_dir: str | Path, run: str, layer: int) -> Comparisons:
    """Read <run_dir>/comparisons/*.json for source `run` at `layer` (see the module docstring).

    Files of this toolkit for another source layer are skipped quietly; files it does not recognise, or
    written for another source run, are listed in `ignored`.
    """
    out = Comparisons()
    folder = Path(run_dir) / COMPARISONS
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            obj = read_json(path)
        except (OSError, ValueError) as e:
            out.ignored.append(f"{path.name}: unreadable ({type(e).__name__})")
            continue
        if not isinstance(obj, dict):
            out.ignored.append(f"{path.name}: not a JSON object")
            continue
        if obj.get("source") not in (None, run):
            out.ignored.append(f"{path.name}: source is '{obj.get('source')}', not '{run}'")
            continue
        reader = _reader(obj, layer)
        if reader is None:
            out.ignored.append(
                f"{path.name}: not a comparison result of this toolkit ({MATCH_FORMAT}, "
                "wmppc.py or comp_sharedness.py output)"
            )
        elif reader is not _skip:
            reader(obj, path.name, out)
            out.read.append(path.name)
    out.matches = _merge_columns(out.matches, Path(run_dir).parent)
    for n, d in enumerate(out.deltas):
        d.label = "Δ" if len(out.deltas) == 1 else f"Δ{n + 1}"
        d.key = "delta" if len(out.deltas) == 1 else f"delta{n + 1}"
    return out
