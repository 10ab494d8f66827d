"""A static HTML feature browser (no server: open index.html from disk), and the comparison files it reads.

Pages, in the preview folder show.py writes (sae/viz/previews.py):

    index.html              one table row per shown feature: grid thumbnail (hover: full size), concept
                            names (where the run has a names file, sae/analysis/naming.py), support, firing
                            frequency, mean activation (over the rows where it fires), max, mass S,
                            comparative sharedness Delta (where a sharedness result exists), the
                            best-matching feature in each compared run ("L1 #142 ρ=0.166": target layer,
                            feature, correlation), the top row's caption.
                            Click a header to sort (numbers: descending first; click again to flip);
                            type in the box to filter rows by text (feature index, names, captions, run
                            names). The URL hash keeps the state: index.html#sort=freq:desc&filter=red
    features/f{i:05d}.html  the names with their cosines, the grid, the top rows with activations and
                            captions, a histogram of the feature's activations (inline SVG), and a table
                            of its matches in other runs, linked to their pages

Everything is inline (CSS, JS, SVG); images are relative links to the grid JPEGs. Each preview folder
also writes `links.js` (its run, layer and shown features): a match into another run is a link when
that run's page exists at build time, and otherwise becomes one in the viewer once the other run's
previews are written beside this folder (the page loads `../<run>/links.js`), whatever the build order.

It reads the comparison results saved beside the run (format and reader: sae/analysis/comparison_files.py).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae.analysis.comparison_files import Comparisons, MatchColumn, load_comparisons
from sae.util.atomic import read_json

if TYPE_CHECKING:
    from sae.viz.previews import FeaturePreview, ShowResult

# ------------------------------------------------------------------------------------------------
# HTML

THUMB = 120  # px: index thumbnails; hovering one shows the grid at its full size

CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
table{border-collapse:collapse;font-size:13px}
th,td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right;vertical-align:middle}
td.t,th.t{text-align:left;max-width:32em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
td.names{max-width:16em}
th{background:#f3f3f3;position:sticky;top:0;z-index:1;cursor:pointer;user-select:none}
th small{display:block;font-weight:normal;color:#555}
th[aria-sort=ascending]::after{content:" \\25B2"} th[aria-sort=descending]::after{content:" \\25BC"}
tr:hover td{background:#fafaf0} img.thumb{max-width:THUMBpx;max-height:THUMBpx;display:block}
.tablewrap{overflow:auto;max-width:100%;max-height:calc(100vh - 2em);border:1px solid #ddd}
#features{width:100%} #features td.t{max-width:none;min-width:12em;white-space:normal}
#features td.names{white-space:normal;min-width:8em} #features td.m{white-space:normal;min-width:5.5em}
@media (max-width:1100px){#features{font-size:12px} #features th,#features td{padding:2px 4px}}
#zoom{position:fixed;pointer-events:none;border:1px solid #888;background:#fff;box-shadow:0 2px 8px #0004;z-index:5}
#filter{font-size:15px;padding:4px;width:24em} .muted{color:#888} .sel{font-weight:bold}
nav a{margin-right:1em} .stats td:first-child{text-align:left;color:#555}
table.matches td,table.names td,table.matches th,table.names th{text-align:left}
td.m{white-space:nowrap}
details{margin:.5em 0} summary{cursor:pointer}
""".replace("THUMB", str(THUMB))

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
  // hovering a thumbnail shows its grid at full size beside the pointer
  const zoom = document.getElementById('zoom');
  table.addEventListener('mousemove', e => {
    const t = e.target.closest && e.target.closest('img.thumb');
    if (!t) { zoom.hidden = true; return; }
    if (zoom.getAttribute('src') !== t.getAttribute('src')) zoom.src = t.src;
    zoom.hidden = false;
    const w = zoom.offsetWidth || 300, h = zoom.offsetHeight || 300;
    zoom.style.left = Math.min(e.clientX + 24, innerWidth - w - 8) + 'px';
    zoom.style.top = Math.max(8, Math.min(e.clientY - h / 2, innerHeight - h - 8)) + 'px';
  });
  table.addEventListener('mouseleave', () => { zoom.hidden = true; });
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


LINKS_FILE = "links.js"
# turns <span class="xm"> match labels into links when the matched run's links.js lists the feature
LINKS_JS = r"""
(function(){
  const pages = window.SC_PAGES || {}, up = document.body.dataset.up || '../';
  document.querySelectorAll('span.xm').forEach(s => {
    const r = pages[s.dataset.run];
    if (!r || r.layer !== +s.dataset.layer || !r.features.includes(+s.dataset.f)) return;
    const a = document.createElement('a');
    a.href = up + s.dataset.run + '/features/f' + String(s.dataset.f).padStart(5, '0') + '.html';
    a.textContent = s.textContent;
    s.replaceWith(a);
  });
})();
"""


def _link_scripts(comps: Comparisons, depth: int) -> str:
    """<script> tags loading each matched run's links.js (a missing one is skipped), then LINKS_JS."""
    up = "../" * (depth + 1)
    runs = sorted({c.target for c in comps.matches})
    if not runs:
        return ""
    tags = "".join(f'<script src="{_e(up + run)}/{LINKS_FILE}"></script>' for run in runs)
    return f'{tags}<script>document.body.dataset.up="{up}";{LINKS_JS}</script>\n'


def _page(title: str, body: str, script: str = "", links: str = "") -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
        + links
        + (f"<script>{script}</script>\n" if script else "")
        + "</body></html>\n"
    )


def _write(path: Path, text: str) -> None:
    """Write through a temporary name and rename (pages are cheap to redo: no fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def feature_page_name(index: int) -> str:
    return f"f{index:05d}.html"


def histogram_svg(hist: dict[str, Any], width: int = 640, height: int = 260) -> str:
    """Inline SVG bar chart of hist {lo, hi, counts, zeros}: the non-zero activations, from the feature's
    smallest to its largest, one bar per non-empty bin; axes with ticks and labels."""
    counts = hist["counts"]
    lo, hi = float(hist["lo"]), float(hist["hi"])
    top = max(max(counts, default=0), 1)
    left, right, above, below = 56, 16, 12, 46
    plot_w, plot_h = width - left - right, height - above - below
    base = above + plot_h
    bw = plot_w / max(len(counts), 1)
    step = (hi - lo) / max(len(counts), 1)
    bars = "".join(
        f'<rect x="{left + k * bw:.1f}" y="{base - c / top * plot_h:.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{c / top * plot_h:.1f}" fill="#4a78c2"><title>{_num(lo + k * step)} to '
        f"{_num(lo + (k + 1) * step)}: {c} rows</title></rect>"
        for k, c in enumerate(counts)
        if c
    )
    ticks = []
    for t in range(5):  # x: 5 ticks from lo to hi
        x = left + t * plot_w / 4
        ticks.append(
            f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}" stroke="#333"/>'
            f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle" font-size="11">'
            f"{_num(lo + t * (hi - lo) / 4)}</text>"
        )
    for v in sorted({0, (top + 1) // 2, top}):  # y: 0, half, max count
        y = base - v / top * plot_h
        ticks.append(
            f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#333"/>'
            f'<text x="{left - 7}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{v}</text>'
        )
    axis = (
        f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#333"/>'
        f'<line x1="{left}" y1="{above}" x2="{left}" y2="{base}" stroke="#333"/>'
        + "".join(ticks)
        + f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle" font-size="12">'
        f"activation (rows where the feature fires)</text>"
        f'<text x="14" y="{above + plot_h / 2}" font-size="12" transform="rotate(-90 14 {above + plot_h / 2})" '
        f'text-anchor="middle">rows</text>'
    )
    return (
        f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="histogram of activations">{axis}{bars}</svg>'
    )


def curve_svg(entries: list[dict[str, Any]], key: str, label: str, width: int = 400, height: int = 190) -> str:
    """Inline SVG line chart of entries[key] against entries["step"] (train_log.jsonl lines; nulls skipped)."""
    pts = [(float(e["step"]), float(e[key])) for e in entries if isinstance(e.get(key), (int, float))]
    if not pts:
        return ""
    left, right, above, below = 56, 12, 22, 34
    plot_w, plot_h = width - left - right, height - above - below
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(0.0, min(p[1] for p in pts)), max(p[1] for p in pts)
    sx = plot_w / max(x1 - x0, 1e-12)
    sy = plot_h / max(y1 - y0, 1e-12)
    line = " ".join(f"{left + (x - x0) * sx:.1f},{above + plot_h - (y - y0) * sy:.1f}" for x, y in pts)
    base = above + plot_h
    ticks = "".join(
        f'<text x="{left - 6}" y="{above + plot_h - (v - y0) * sy + 4:.1f}" text-anchor="end" font-size="11">'
        f"{_num(v)}</text>"
        for v in (y0, (y0 + y1) / 2, y1)
    )
    ticks += "".join(
        f'<text x="{left + (v - x0) * sx:.1f}" y="{base + 15}" text-anchor="middle" font-size="11">{int(v)}</text>'
        for v in (x0, (x0 + x1) / 2, x1)
    )
    return (
        f'<svg class="curve" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{_e(label)} during training"><text x="{left}" y="14" font-size="12">{_e(label)}</text>'
        f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#333"/>'
        f'<line x1="{left}" y1="{above}" x2="{left}" y2="{base}" stroke="#333"/>{ticks}'
        f'<text x="{left + plot_w / 2}" y="{height - 3}" text-anchor="middle" font-size="11">step</text>'
        f'<polyline fill="none" stroke="#4a78c2" stroke-width="1.5" points="{line}"/></svg>'
    )


def _training_curves(run_dir: str | Path | None, layer: int) -> str:
    """The layer's SAE training curves (its train_log.jsonl, sae/nn/trainlog.py), folded under a summary."""
    from sae.nn.trainlog import read_train_log

    if run_dir is None:
        return ""
    name = f"layer{int(layer):02d}"
    try:
        rel = (read_json(Path(run_dir) / "run.json").get("sae_dirs") or {}).get(name, f"saes/{name}")
    except (OSError, ValueError, AttributeError):
        rel = f"saes/{name}"
    entries = read_train_log(Path(run_dir) / rel)
    if not entries:
        return ""
    charts = "".join(
        curve_svg(entries, key, label)
        for key, label in (("loss", "loss"), ("fvu", "FVU (batch)"), ("l0", "L0"), ("dead_fraction", "dead fraction"))
    )
    return (
        f"<details><summary>Training curves of this layer's SAE ({len(entries)} points, last step "
        f"{entries[-1]['step']}; {_e(rel)}/train_log.jsonl)</summary><div>{charts}</div></details>"
    )


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

    def anchor(self, run: str, layer: int, feature: int, label: str, depth: int) -> str:
        """A link when the page exists now, else a span that LINKS_JS makes a link once it does."""
        href = self.page(run, layer, feature, depth)
        if href:
            return f'<a href="{_e(href)}">{_e(label)}</a>'
        return f'<span class="xm" data-run="{_e(run)}" data-layer="{layer}" data-f="{feature}">{_e(label)}</span>'


def match_text(layer: int, feature: int, rho: float) -> str:
    """'L1 #142 ρ=0.166': the target layer, the feature and its correlation."""
    return f"L{layer} #{feature} ρ={rho:.3f}"


def _match_cell(col: MatchColumn, i: int, links: _Links, depth: int) -> tuple[str, str]:
    """(data-v, inner html) of a match cell."""
    if i not in col.matches:
        return "", '<span class="muted">–</span>'
    b, j, r = col.matches[i]
    label = match_text(b, j, r)
    return f"{r:.6f}", links.anchor(col.target, b, j, label, depth)


def _names_text(names: list[Any] | None, k: int = 3) -> str:
    return ", ".join(str(w) for w, _ in (names or [])[:k])


def write_browser(
    result: ShowResult, run_dir: str | Path | None = None, comparisons: Comparisons | None = None
) -> Path:
    """Write index.html and features/f{i:05d}.html into result.out; returns the index path."""
    out, man, previews = result.out, result.manifest, result.previews
    run, layer = man["run"], man["layer"]
    comps = comparisons or (load_comparisons(run_dir, run, layer) if run_dir else Comparisons())
    links = _Links(out)
    shown = {"layer": int(layer), "features": [p.index for p in previews]}
    _write(out / LINKS_FILE, f"(window.SC_PAGES = window.SC_PAGES || {{}})[{json.dumps(run)}] = {json.dumps(shown)};\n")
    _write_index(out, man, previews, comps, links, _training_curves(run_dir, layer))
    order = [p.index for p in previews]
    for n, p in enumerate(previews):
        prev_i = order[n - 1] if n > 0 else None
        next_i = order[n + 1] if n + 1 < len(order) else None
        _write(out / "features" / feature_page_name(p.index), _feature_page(man, p, comps, links, prev_i, next_i))
    return out / "index.html"


def _header(man: dict[str, Any]) -> str:
    ds = man.get("dataset") or {}
    return (
        f"run <b>{_e(man['run'])}</b> · layer {man['layer']} · {_e(man['modality'])} · "
        f"{man['n_rows']} rows of {_e(ds.get('name', '?'))} ({_e(ds.get('split', '?'))}) · "
        f"d_sae {man['d_sae']}"
    )


def _comparisons_note(comps: Comparisons) -> str:
    """wMPPC scores in one line, then the files read (and those not recognised) folded away."""
    if not comps.any and not comps.ignored:
        return '<p class="muted">No comparison results next to this run (see docs/show.md).</p>'
    parts = []
    if comps.scores:
        parts.append(
            "<p>wMPPC of this run against "
            + "; ".join(
                f"<b>{_e(s.target)}</b>: all layers {s.all_layers:.3f}, last layer {s.last_layer:.3f}"
                for s in sorted(comps.scores, key=lambda s: s.target)
            )
            + "</p>"
        )
    items = "".join(f"<li><code>{_e(f)}</code></li>" for f in comps.read)
    items += "".join(f'<li class="muted">ignored {_e(x)}</li>' for x in comps.ignored)
    n_ign = f", {len(comps.ignored)} ignored" if comps.ignored else ""
    parts.append(
        f'<details class="comps"><summary>Comparison results: {len(comps.read)} files read from '
        f"<code>comparisons/</code>{n_ign}</summary><ul>{items}</ul></details>"
    )
    return "".join(parts)


def _write_index(
    out: Path,
    man: dict[str, Any],
    previews: list[FeaturePreview],
    comps: Comparisons,
    links: _Links,
    curves: str = "",
) -> None:
    has_names = any(p.names for p in previews)
    # (data-key, type, label, small second line, tooltip)
    heads = [("index", "num", "feature", "", ""), ("", "", "top rows", "", "hover: full size")]
    if has_names:
        heads.append(
            (
                "names",
                "txt",
                "names",
                "",
                (
                    "concept names: the vocabulary words nearest the feature's "
                    "decoder direction (sae/analysis/naming.py), best first"
                ),
            )
        )
    heads += [
        ("support", "num", "support", "", "rows where the feature fires"),
        ("freq", "num", "freq", "", "firing frequency: support / rows"),
        ("mean", "num", "mean act", "", "mean activation over the rows where it fires"),
        ("max", "num", "max act", "", "largest activation"),
        ("mass", "num", "mass S", "", "sum of the activations over all rows"),
    ]
    for d in comps.deltas:
        heads.append(
            (
                d.key,
                "num",
                d.label,
                "sharedness",
                (
                    f"comparative sharedness Delta, G = {' '.join(d.min_group)}"
                    f", H = {' '.join(d.max_group)} ({d.origin}); blank: not selected"
                ),
            )
        )
    for c in comps.matches:
        heads.append(
            (
                c.key,
                "num",
                f"best in {c.target}",
                c.compared,
                (
                    f"best-matching feature of {c.target} over its layers {c.target_layers or '?'}: target layer, "
                    f"feature and correlation; from {', '.join(c.origins)}"
                ),
            )
        )
    heads.append(("caption", "txt", "top caption", "", "caption of the top row"))
    th = "".join(
        (
            f'<th data-key="{_e(k)}" data-type="{t}" title="{_e(tip)}"' + (' class="t"' if t == "txt" else "") + ">"
            if k
            else f'<th title="{_e(tip)}">'
        )
        + _e(label)
        + (f"<small>{_e(sub)}</small>" if sub else "")
        + "</th>"
        for k, t, label, sub, tip in heads
    )
    body_rows = []
    for p in previews:
        page = f"features/{feature_page_name(p.index)}"
        cells = [
            f'<td data-v="{p.index}"><a href="{page}">{p.index}</a></td>',
            (
                f'<td><a href="{page}"><img class="thumb" loading="lazy" src="{_e(p.grid)}" '
                f'alt="feature {p.index}"></a></td>'
            ),
        ]
        words = [str(p.index)]
        if has_names:
            names = _names_text(p.names)
            tip = ", ".join(f"{w} ({c:.3f})" for w, c in (p.names or []))
            cells.append(f'<td class="t names" data-v="{_e(names)}" title="{_e(tip)}">{_e(names)}</td>')
            words += [str(w) for w, _ in (p.names or [])]
        cells += [
            f'<td data-v="{p.support}">{p.support}</td>',
            f'<td data-v="{p.freq:.9g}">{p.freq:.2%}</td>'
            if p.freq >= 1e-4
            else f'<td data-v="{p.freq:.9g}">{p.freq:.2e}</td>',
            f'<td data-v="{p.mean:.9g}">{_num(p.mean)}</td>',
            f'<td data-v="{p.max:.9g}">{_num(p.max)}</td>',
            f'<td data-v="{p.mass:.9g}">{_num(p.mass)}</td>',
        ]
        for d in comps.deltas:
            v = d.delta.get(p.index)
            cells.append(f'<td data-v="{v:.9g}" class="sel">{_num(v)}</td>' if v is not None else '<td data-v=""></td>')
        for c in comps.matches:
            v, inner = _match_cell(c, p.index, links, 0)
            cells.append(f'<td class="m" data-v="{v}">{inner}</td>')
            if p.index in c.matches:
                words.append(c.target)
        cap = next((c for c in (p.captions or []) if c), "")
        cells.append(f'<td class="t" data-v="{_e(cap)}" title="{_e(cap)}">{_e(cap)}</td>')
        words += [c for c in (p.captions or []) if c]
        text = " ".join(words).lower()
        body_rows.append(f'<tr data-index="{p.index}" data-text="{_e(text)}">{"".join(cells)}</tr>')
    body = (
        f"<h1>Features of {_e(man['run'])}</h1><p>{_header(man)}</p>{_comparisons_note(comps)}{curves}"
        + '<p><input id="filter" type="search" placeholder="filter: feature index, '
        + ("names, " if has_names else "")
        + 'caption words, run names" autofocus> <span id="count"></span></p>'
        + f'<div class="tablewrap"><table id="features"><thead><tr>{th}</tr></thead><tbody>\n'
        + "\n".join(body_rows)
        + "\n</tbody></table></div>"
        + '<img id="zoom" hidden alt="">'
    )
    title = f"{man['run']} layer {man['layer']}: features"
    _write(out / "index.html", _page(title, body, INDEX_JS, _link_scripts(comps, 0)))


def _matches_table(p: FeaturePreview, comps: Comparisons, links: _Links) -> str:
    """One row per compared run and set of layers: where the feature's best match is, and its correlation."""
    if not any(p.index in c.matches for c in comps.matches):
        return "<p class='muted'>No comparison results for this feature.</p>"
    rows = []
    for c in comps.matches:
        if p.index in c.matches:
            b, j, r = c.matches[p.index]
            match = links.anchor(c.target, b, j, f"layer {b}, feature {j}", 1)
            rho = f"{r:.3f}"
        else:
            match, rho = '<span class="muted">–</span>', ""
        rows.append(
            f"<tr><td>{_e(c.target)}</td><td>{_e(c.compared)}</td><td>{match}</td>"
            f'<td>{rho}</td><td class="muted">{_e(", ".join(c.origins))}</td></tr>'
        )
    return (
        "<table class='matches'><tr><th>run</th><th>compared (method · layers)</th><th>best match</th>"
        f"<th>ρ</th><th>from</th></tr>{''.join(rows)}</table>"
    )


def _feature_page(
    man: dict[str, Any], p: FeaturePreview, comps: Comparisons, links: _Links, prev_i: int | None, next_i: int | None
) -> str:
    nav = ['<a href="../index.html">index</a>']
    if prev_i is not None:
        nav.append(f'<a href="{feature_page_name(prev_i)}">← feature {prev_i}</a>')
    if next_i is not None:
        nav.append(f'<a href="{feature_page_name(next_i)}">feature {next_i} →</a>')
    stats = [
        ("support", f"{p.support} rows ({p.freq:.3%})"),
        ("mean activation (when firing)", _num(p.mean)),
        ("max activation", _num(p.max)),
        ("mass S (sum over rows)", _num(p.mass)),
    ]
    for d in comps.deltas:
        if p.index in d.delta:
            stats.append(
                (f"{d.label} (G = {' '.join(d.min_group)}, H = {' '.join(d.max_group)})", _num(d.delta[p.index]))
            )
    stats_html = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in stats)
    names = ""
    if p.names:
        names = (
            "<h2>Concept names</h2><table class='names'><tr><th>name</th><th>cosine</th></tr>"
            + "".join(f"<tr><td>{_e(w)}</td><td>{c:.3f}</td></tr>" for w, c in p.names)
            + "</table><p class='muted'>vocabulary words nearest the feature's decoder direction "
            "(sae/analysis/naming.py)</p>"
        )
    has_caps = p.captions is not None
    rows = "".join(
        f"<tr><td>{r + 1}</td><td>{rid}</td><td>{_num(a)}</td>"
        + (f'<td class="t" style="white-space:normal">{_e(p.captions[r] or "")}</td>' if p.captions is not None else "")
        + "</tr>"
        for r, (rid, a) in enumerate(zip(p.row_ids, p.acts))
    )
    rows_head = (
        "<tr><th>rank</th><th>dataset row</th><th>activation</th>"
        + ('<th class="t">caption</th>' if has_caps else "")
        + "</tr>"
    )
    caps_link = f' · <a href="../{_e(p.captions_file)}">captions (.txt)</a>' if p.captions_file else ""
    zeros = p.hist["zeros"]
    title = f"Feature {p.index}" + (f": {_names_text(p.names)}" if p.names else "")
    body = (
        f"<nav>{' '.join(nav)}</nav><h1>{_e(title)}</h1><p>{_header(man)}</p>"
        f'<table class="stats">{stats_html}</table>{names}'
        f'<h2>Top {len(p.acts)} rows</h2><p><img class="grid" src="../{_e(p.grid)}" alt="top rows of feature '
        f'{p.index}"></p><p class="muted">best row top left, then row by row{caps_link}</p>'
        f'<table class="rows">{rows_head}{rows}</table>'
        f"<h2>Activations</h2>{histogram_svg(p.hist)}"
        f'<p class="muted">{p.support} rows where it fires, in {len(p.hist["counts"])} equal bins from its '
        f"smallest to its largest activation; {zeros} rows at 0 not shown</p>"
        f"<h2>Matches in other runs</h2>{_matches_table(p, comps, links)}"
    )
    return _page(f"{man['run']} feature {p.index}", body, links=_link_scripts(comps, 1))
