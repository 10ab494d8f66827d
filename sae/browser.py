"""A static HTML feature browser (no server: open index.html from disk), and the comparison files it reads.

Pages, in the preview folder show.py writes (sae/previews.py):

    index.html              one table row per shown feature: grid thumbnail, support, firing frequency,
                            mean activation (over the rows where it fires), max, mass S, comparative
                            sharedness Delta (where a sharedness file exists), the best-matching feature
                            in each compared run with its correlation, the top row's caption.
                            Click a header to sort (numbers: descending first; click again to flip);
                            type in the box to filter rows by text (feature index, captions, run names).
                            The URL hash keeps the state: index.html#sort=freq:desc&filter=red
    features/f{i:05d}.html  the grid, the top rows with activations and captions, a histogram of the
                            feature's activations (inline SVG), and links to its matches in other runs

Everything is inline (CSS, JS, SVG); images are relative links to the grid JPEGs.

Comparison results live next to the run, in `<features_dir>/<run>/comparisons/*.json`. Two layouts are
read (files with another `source`, or another source layer than the one shown, are ignored):

1. best matches, one file per (source layer, target run); `save_best_matches` writes it, as
   `comparisons/L{source_layer:02d}__{target}__{method}.json`:

       {"format": "best-matches-v1", "method": "wmppc" | "comp_sharedness" | ...,
        "source": "<run>", "source_layer": 11, "target": "<other run>", "target_layers": [11],
        "n_samples": 5000,
        "feature": [d_source ints],    best-matching feature of the target, -1 for none (dead)
        "layer":   [d_source ints],    target layer holding it
        "rho":     [d_source floats]}  its Pearson correlation

2. the JSON that `comp_sharedness.py --json` prints, saved as is (e.g. `comparisons/sharedness.json`):
   its `features` list gives Delta and the best match in every G and H run, for the selected features.

When both give a match for the same target and layers, the full best-matches file wins. Matches link to
the other run's feature page when that run's previews sit beside this one (`<out>/../<target>/`, with
the same layer in its show.json); otherwise they are plain text.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sae.atomic import read_json, write_json

if TYPE_CHECKING:
    from sae.previews import FeaturePreview, ShowResult

MATCH_FORMAT = "best-matches-v1"
COMPARISONS = "comparisons"


# ------------------------------------------------------------------------------------------------
# Comparison files


def comparison_path(run_dir: str | Path, source_layer: int, target: str, method: str) -> Path:
    """Where `save_best_matches` writes: <run_dir>/comparisons/L{layer:02d}__{target}__{method}.json."""
    return Path(run_dir) / COMPARISONS / f"L{source_layer:02d}__{target}__{method}.json"


def save_best_matches(run_dir: str | Path, *, source: str, source_layer: int, target: str,
                      target_layers: Sequence[int], feature: np.ndarray, layer: np.ndarray | int,
                      rho: np.ndarray, method: str, n_samples: int | None = None) -> Path:
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
    write_json(path, {
        "format": MATCH_FORMAT, "method": method, "source": source, "source_layer": int(source_layer),
        "target": target, "target_layers": [int(b) for b in target_layers], "n_samples": n_samples,
        "feature": feature.tolist(), "layer": layer.tolist(),
        "rho": [None if not np.isfinite(r) else round(float(r), 6) for r in rho],
    })
    return path


@dataclass
class MatchColumn:
    """Best matches of the source features in one target run: {source feature: (layer, feature, rho)}."""

    target: str
    target_layers: list[int]
    method: str
    matches: dict[int, tuple[int, int, float]]
    full: bool  # every source feature covered (a best-matches file), not just selected ones
    origin: str  # file name
    label: str = ""
    key: str = ""


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
class Comparisons:
    matches: list[MatchColumn] = field(default_factory=list)
    deltas: list[DeltaColumn] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # "file: why"


def _key(prefix: str, name: str) -> str:
    return prefix + re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def load_comparisons(run_dir: str | Path, run: str, layer: int) -> Comparisons:
    """Read <run_dir>/comparisons/*.json for source `run` at `layer` (see the module docstring)."""
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
        if obj.get("format") == MATCH_FORMAT:
            if int(obj.get("source_layer", layer)) != layer:
                continue
            rows = zip(obj["feature"], obj["layer"], obj["rho"])
            m = {i: (int(b), int(j), float(r)) for i, (j, b, r) in enumerate(rows) if j is not None and j >= 0
                 and r is not None}
            out.matches.append(MatchColumn(obj["target"], list(obj.get("target_layers") or []),
                                           obj.get("method", "?"), m, True, path.name))
        elif "features" in obj and "min_group" in obj and "max_group" in obj:  # comp_sharedness --json
            if obj.get("layer") is not None and int(obj["layer"]) != layer:
                continue
            feats = obj["features"]
            out.deltas.append(DeltaColumn(list(obj["min_group"]), list(obj["max_group"]),
                                          {int(f["index"]): float(f["delta"]) for f in feats}, path.name))
            per_run: dict[str, dict[int, tuple[int, int, float]]] = {}
            for f in feats:
                for target, b in (f.get("best_match") or {}).items():
                    if b.get("feature", -1) >= 0:
                        per_run.setdefault(target, {})[int(f["index"])] = (int(b["layer"]), int(b["feature"]),
                                                                          float(b["rho"]))
            layers = obj.get("compared_layers") or {}
            for target in [*obj["min_group"], *obj["max_group"]]:
                lay = layers.get(target)
                out.matches.append(MatchColumn(target, lay if isinstance(lay, list) else [], "comp_sharedness",
                                               per_run.get(target, {}), False, path.name))
        else:
            out.ignored.append(f"{path.name}: neither a {MATCH_FORMAT} file nor comp_sharedness --json output")
    # one column per (target, layers): a full best-matches file beats the selected features of a sharedness file
    best: dict[tuple[str, tuple[int, ...]], MatchColumn] = {}
    for col in out.matches:
        k = (col.target, tuple(col.target_layers))
        if k not in best or (col.full, len(col.matches)) > (best[k].full, len(best[k].matches)):
            best[k] = col
    out.matches = sorted(best.values(), key=lambda c: (c.target, c.target_layers))
    targets = [c.target for c in out.matches]
    for c in out.matches:
        where = f" L{','.join(map(str, c.target_layers))}" if targets.count(c.target) > 1 else ""
        c.label = f"{c.target}{where}"
        c.key = _key("rho_", c.label)
    for n, d in enumerate(out.deltas):
        d.label = "Δ" if len(out.deltas) == 1 else f"Δ{n + 1}"
        d.key = "delta" if len(out.deltas) == 1 else f"delta{n + 1}"
    return out


# ------------------------------------------------------------------------------------------------
# HTML


CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
table{border-collapse:collapse;font-size:13px}
th,td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right;vertical-align:middle}
td.t,th.t{text-align:left;max-width:32em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
th{background:#f3f3f3;position:sticky;top:0;cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"} th[aria-sort=descending]::after{content:" \\25BC"}
tr:hover td{background:#fafaf0} img.thumb{width:60px;height:60px;display:block}
#filter{font-size:15px;padding:4px;width:24em} .muted{color:#888} .sel{font-weight:bold}
nav a{margin-right:1em} .stats td:first-child{text-align:left;color:#555}
"""

INDEX_JS = r"""
(function(){
  const table = document.getElementById('features');
  const body = table.tBodies[0];
  const heads = Array.from(table.tHead.rows[0].cells);
  const input = document.getElementById('filter');
  function val(row, i, type){
    const v = row.cells[i].dataset.v;
    if (v === undefined || v === '') return null;
    return type === 'num' ? parseFloat(v) : v.toLowerCase();
  }
  function sortBy(th){
    const i = th.cellIndex, type = th.dataset.type;
    const first = (type === 'num' && th.dataset.key !== 'index') ? 'desc' : 'asc';
    const dir = th.dataset.dir ? (th.dataset.dir === 'asc' ? 'desc' : 'asc') : first;
    heads.forEach(h => { if (h !== th) { delete h.dataset.dir; h.removeAttribute('aria-sort'); } });
    th.dataset.dir = dir;
    th.setAttribute('aria-sort', dir === 'asc' ? 'ascending' : 'descending');
    const sign = dir === 'asc' ? 1 : -1;
    const rows = Array.from(body.rows);
    rows.sort((a, b) => {
      const x = val(a, i, type), y = val(b, i, type);
      const tie = a.dataset.index - b.dataset.index;
      if (x === null || y === null) return x === y ? tie : (x === null ? 1 : -1);  // blanks last
      return x < y ? -sign : (x > y ? sign : tie);
    });
    const frag = document.createDocumentFragment();
    rows.forEach(r => frag.appendChild(r));
    body.appendChild(frag);
    table.dataset.sort = th.dataset.key + ':' + dir;
    saveHash();
  }
  function applyFilter(){
    const q = input.value.trim().toLowerCase();
    let n = 0;
    for (const r of body.rows) { const show = !q || r.dataset.text.includes(q); r.hidden = !show; if (show) n++; }
    document.getElementById('count').textContent = n + ' of ' + body.rows.length + ' features shown';
  }
  function saveHash(){
    const parts = [];
    if (table.dataset.sort) parts.push('sort=' + table.dataset.sort);
    if (input.value) parts.push('filter=' + encodeURIComponent(input.value));
    try { history.replaceState(null, '', parts.length ? '#' + parts.join('&') : location.pathname); } catch (e) {}
  }
  heads.forEach(th => { if (th.dataset.key) th.addEventListener('click', () => sortBy(th)); });
  input.addEventListener('input', () => { applyFilter(); saveHash(); });
  const h = new URLSearchParams(location.hash.slice(1));
  if (h.get('filter') !== null) input.value = h.get('filter');
  applyFilter();
  const s = h.get('sort');
  if (s) {
    const [key, dir] = s.split(':');
    const th = heads.find(x => x.dataset.key === key);
    if (th) { th.click(); if (dir && th.dataset.dir !== dir) th.click(); }
  }
  document.body.dataset.ready = '1';
})();
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: float) -> str:
    """Compact display of a statistic."""
    if x == 0:
        return "0"
    a = abs(x)
    return f"{x:.3g}" if a < 1e-3 or a >= 1e5 else (f"{x:.4f}" if a < 1 else f"{x:.4g}" if a < 1e3 else f"{x:.0f}")


def _page(title: str, body: str, script: str = "") -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            + (f"<script>{script}</script>\n" if script else "") + "</body></html>\n")


def _write(path: Path, text: str) -> None:
    """Write through a temporary name and rename (pages are cheap to redo: no fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def feature_page_name(index: int) -> str:
    return f"f{index:05d}.html"


def histogram_svg(hist: dict[str, Any], width: int = 420, height: int = 140) -> str:
    """Inline SVG bar chart of hist {lo, hi, counts, zeros} (non-zero activations only)."""
    counts = hist["counts"]
    top = max(max(counts, default=0), 1)
    left, bottom, plot_w, plot_h = 44, 28, width - 54, height - 40
    bw = plot_w / max(len(counts), 1)
    bars = "".join(
        f'<rect x="{left + k * bw:.1f}" y="{10 + plot_h - c / top * plot_h:.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{c / top * plot_h:.1f}" fill="#4a78c2"><title>{c} rows</title></rect>'
        for k, c in enumerate(counts) if c)
    axis = (f'<line x1="{left}" y1="{10 + plot_h}" x2="{left + plot_w}" y2="{10 + plot_h}" stroke="#333"/>'
            f'<line x1="{left}" y1="10" x2="{left}" y2="{10 + plot_h}" stroke="#333"/>'
            f'<text x="{left - 4}" y="16" text-anchor="end" font-size="10">{top}</text>'
            f'<text x="{left - 4}" y="{10 + plot_h}" text-anchor="end" font-size="10">0</text>'
            f'<text x="{left}" y="{height - 14}" font-size="10">{_num(hist["lo"])}</text>'
            f'<text x="{left + plot_w}" y="{height - 14}" text-anchor="end" font-size="10">{_num(hist["hi"])}</text>'
            f'<text x="{left + plot_w / 2}" y="{height - 2}" text-anchor="middle" font-size="11">activation</text>'
            f'<text x="10" y="{10 + plot_h / 2}" font-size="11" transform="rotate(-90 10 {10 + plot_h / 2})" '
            f'text-anchor="middle">rows</text>')
    return (f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="histogram of activations">{axis}{bars}</svg>')


class _Links:
    """Relative links to other runs' feature pages, when their previews sit beside this folder."""

    def __init__(self, out: Path):
        self.root = out.resolve().parent
        self._layers: dict[str, int | None] = {}

    def _layer(self, run: str) -> int | None:
        if run not in self._layers:
            try:
                info = read_json(self.root / run / "show.json")
                self._layers[run] = int(info["layer"]) if info.get("run") == run else None
            except (OSError, ValueError, KeyError, TypeError):
                self._layers[run] = None
        return self._layers[run]

    def page(self, run: str, layer: int, feature: int, depth: int) -> str | None:
        """Link from a page `depth` folders below the preview folder (0: index.html, 1: features/)."""
        if self._layer(run) != layer:
            return None
        if not (self.root / run / "features" / feature_page_name(feature)).exists():
            return None
        return "../" * (depth + 1) + f"{run}/features/{feature_page_name(feature)}"


def _match_cell(col: MatchColumn, i: int, links: _Links, depth: int) -> tuple[str, str]:
    """(data-v, inner html) of a match cell."""
    if i not in col.matches:
        return "", '<span class="muted">–</span>'
    b, j, r = col.matches[i]
    label = f"#{j} ρ={r:.3f}"
    href = links.page(col.target, b, j, depth)
    inner = f'<a href="{_e(href)}">{_e(label)}</a>' if href else _e(label)
    return f"{r:.6f}", inner


def write_browser(result: ShowResult, run_dir: str | Path | None = None,
                  comparisons: Comparisons | None = None) -> Path:
    """Write index.html and features/f{i:05d}.html into result.out; returns the index path."""
    out, man, previews = result.out, result.manifest, result.previews
    run, layer = man["run"], man["layer"]
    comps = comparisons or (load_comparisons(run_dir, run, layer) if run_dir else Comparisons())
    links = _Links(out)
    _write_index(out, man, previews, comps, links)
    order = [p.index for p in previews]
    for n, p in enumerate(previews):
        prev_i = order[n - 1] if n > 0 else None
        next_i = order[n + 1] if n + 1 < len(order) else None
        _write(out / "features" / feature_page_name(p.index), _feature_page(man, p, comps, links, prev_i, next_i))
    return out / "index.html"


def _header(man: dict[str, Any]) -> str:
    ds = man.get("dataset") or {}
    return (f'run <b>{_e(man["run"])}</b> · layer {man["layer"]} · {_e(man["modality"])} · '
            f'{man["n_rows"]} rows of {_e(ds.get("name", "?"))} ({_e(ds.get("split", "?"))}) · '
            f'd_sae {man["d_sae"]}')


def _write_index(out: Path, man: dict[str, Any], previews: list[FeaturePreview], comps: Comparisons,
                 links: _Links) -> None:
    heads = [("index", "num", "feature", ""), ("", "", "top rows", ""),
             ("support", "num", "support", "rows where the feature fires"),
             ("freq", "num", "freq", "firing frequency: support / rows"),
             ("mean", "num", "mean act", "mean activation over the rows where it fires"),
             ("max", "num", "max act", "largest activation"),
             ("mass", "num", "mass S", "sum of the activations over all rows")]
    for d in comps.deltas:
        heads.append((d.key, "num", d.label, f"comparative sharedness Delta, G = {' '.join(d.min_group)}, "
                                              f"H = {' '.join(d.max_group)} ({d.origin}); blank: not selected"))
    for c in comps.matches:
        heads.append((c.key, "num", f"best in {c.label}", f"best-matching feature of {c.target} (layers "
                                                           f"{c.target_layers or '?'}) and its correlation, "
                                                           f"from {c.origin}"))
    heads.append(("caption", "txt", "top caption", "caption of the top row"))
    th = "".join(f'<th data-key="{_e(k)}" data-type="{t}" title="{_e(tip)}"'
                 + (' class="t"' if t == "txt" else "") + f">{_e(label)}</th>" if k else f"<th>{_e(label)}</th>"
                 for k, t, label, tip in heads)
    body_rows = []
    for p in previews:
        page = f"features/{feature_page_name(p.index)}"
        cells = [f'<td data-v="{p.index}"><a href="{page}">{p.index}</a></td>',
                 f'<td><a href="{page}"><img class="thumb" loading="lazy" src="{_e(p.grid)}" alt="feature {p.index}">'
                 f"</a></td>",
                 f'<td data-v="{p.support}">{p.support}</td>',
                 f'<td data-v="{p.freq:.9g}">{p.freq:.2%}</td>' if p.freq >= 1e-4 else
                 f'<td data-v="{p.freq:.9g}">{p.freq:.2e}</td>',
                 f'<td data-v="{p.mean:.9g}">{_num(p.mean)}</td>',
                 f'<td data-v="{p.max:.9g}">{_num(p.max)}</td>',
                 f'<td data-v="{p.mass:.9g}">{_num(p.mass)}</td>']
        words = [str(p.index)]
        for d in comps.deltas:
            v = d.delta.get(p.index)
            cells.append(f'<td data-v="{v:.9g}" class="sel">{_num(v)}</td>' if v is not None else '<td data-v=""></td>')
        for c in comps.matches:
            v, inner = _match_cell(c, p.index, links, 0)
            cells.append(f'<td data-v="{v}">{inner}</td>')
            if p.index in c.matches:
                words.append(c.target)
        cap = next((c for c in (p.captions or []) if c), "")
        cells.append(f'<td class="t" data-v="{_e(cap)}" title="{_e(cap)}">{_e(cap)}</td>')
        words += [c for c in (p.captions or []) if c]
        text = " ".join(words).lower()
        body_rows.append(f'<tr data-index="{p.index}" data-text="{_e(text)}">{"".join(cells)}</tr>')
    notes = "".join(f'<li class="muted">ignored {_e(x)}</li>' for x in comps.ignored)
    comp_note = (f"<p>Comparisons from <code>comparisons/</code>: "
                 f"{_e(', '.join(sorted({c.origin for c in comps.matches} | {d.origin for d in comps.deltas})))}</p>"
                 if comps.matches or comps.deltas else
                 '<p class="muted">No comparison results next to this run (see docs/show.md).</p>')
    body = (f"<h1>Features of {_e(man['run'])}</h1><p>{_header(man)}</p>{comp_note}"
            + (f"<ul>{notes}</ul>" if notes else "")
            + '<p><input id="filter" type="search" placeholder="filter: feature index, caption words, run names" '
              'autofocus> <span id="count"></span></p>'
            + f'<table id="features"><thead><tr>{th}</tr></thead><tbody>\n'
            + "\n".join(body_rows) + "\n</tbody></table>")
    _write(out / "index.html", _page(f"{man['run']} layer {man['layer']}: features", body, INDEX_JS))


def _feature_page(man: dict[str, Any], p: FeaturePreview, comps: Comparisons, links: _Links,
                  prev_i: int | None, next_i: int | None) -> str:
    nav = ['<a href="../index.html">index</a>']
    if prev_i is not None:
        nav.append(f'<a href="{feature_page_name(prev_i)}">← feature {prev_i}</a>')
    if next_i is not None:
        nav.append(f'<a href="{feature_page_name(next_i)}">feature {next_i} →</a>')
    stats = [("support", f"{p.support} rows ({p.freq:.3%})"), ("mean activation (when firing)", _num(p.mean)),
             ("max activation", _num(p.max)), ("mass S (sum over rows)", _num(p.mass))]
    for d in comps.deltas:
        if p.index in d.delta:
            stats.append((f"{d.label} (G = {' '.join(d.min_group)}, H = {' '.join(d.max_group)})",
                          _num(d.delta[p.index])))
    stats_html = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in stats)
    has_caps = p.captions is not None
    rows = "".join(
        f"<tr><td>{r + 1}</td><td>{rid}</td><td>{_num(a)}</td>"
        + (f'<td class="t" style="white-space:normal">{_e(p.captions[r] or "")}</td>' if has_caps else "")
        + "</tr>" for r, (rid, a) in enumerate(zip(p.row_ids, p.acts)))
    rows_head = "<tr><th>rank</th><th>dataset row</th><th>activation</th>" + (
        '<th class="t">caption</th>' if has_caps else "") + "</tr>"
    match_items = []
    for c in comps.matches:
        if p.index in c.matches:
            b, j, r = c.matches[p.index]
            href = links.page(c.target, b, j, 1)
            label = f"feature {j} (layer {b}), ρ = {r:.3f}"
            link = f'<a href="{_e(href)}">{_e(label)}</a>' if href else _e(label)
            match_items.append(f"<li>{_e(c.label)}: {link} <span class='muted'>({_e(c.origin)})</span></li>")
    matches = (f"<ul class='matches'>{''.join(match_items)}</ul>" if match_items
               else "<p class='muted'>No comparison results for this feature.</p>")
    caps_link = (f' · <a href="../{_e(p.captions_file)}">captions (.txt)</a>' if p.captions_file else "")
    zeros = p.hist["zeros"]
    body = (f"<nav>{' '.join(nav)}</nav><h1>Feature {p.index}</h1><p>{_header(man)}</p>"
            f'<table class="stats">{stats_html}</table>'
            f'<h2>Top {len(p.acts)} rows</h2><p><img class="grid" src="../{_e(p.grid)}" alt="top rows of feature '
            f'{p.index}"></p><p class="muted">best row top left, then row by row{caps_link}</p>'
            f'<table class="rows">{rows_head}{rows}</table>'
            f"<h2>Activations</h2>{histogram_svg(p.hist)}"
            f'<p class="muted">{p.support} rows where it fires; {zeros} rows at 0 not shown</p>'
            f"<h2>Matches in other runs</h2>{matches}")
    return _page(f"{man['run']} feature {p.index}", body)
