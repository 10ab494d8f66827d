"""The static feature browser (DOM tests that always run, one headless-Chromium test), the comparison
files it reads, and the comparative-sharedness plot."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

import show
from sae.browser import COMPARISONS, MATCH_FORMAT, load_comparisons, save_best_matches
from sae.features import open_run
from tests.test_show import D_SAE, N_DATASET, N_ROWS, TILE, WORDS, make_codes, make_dataset, write_run

# ------------------------------------------------------------------------------------------------
# a minimal DOM


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        return [n for n in self.iter() if n.tag == tag and all(n.attrs.get(k) == v for k, v in attrs.items())]

    def all_text(self) -> str:
        return "".join(c.all_text() if isinstance(c, Node) else c for c in self.children)


class DOM(HTMLParser):
    VOID = {"meta", "img", "input", "br", "hr", "link", "line", "rect"}

    def __init__(self, text: str):
        super().__init__()
        self.root = Node("#root", {}, None)
        self.cur = self.root
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, dict(attrs), self.cur))

    def handle_endtag(self, tag):
        n = self.cur
        while n is not self.root and n.tag != tag:
            n = n.parent
        if n is not self.root:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def dom(path: Path) -> Node:
    return DOM(path.read_text(encoding="utf-8")).root


def local_links(page: Path) -> list[str]:
    d = dom(page)
    return [n.attrs[a] for n in d.iter() for a in ("href", "src") if n.attrs.get(a)]


# ------------------------------------------------------------------------------------------------
# three runs on the same rows; previews of two of them side by side


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    data = make_dataset(root / "data")
    rng = np.random.default_rng(5)
    ids = rng.permutation(N_DATASET)[:N_ROWS]
    img = make_codes(rng)
    txt = make_codes(rng)
    txt[:, [20, 21, 22]] = img[:, [12, 13, 14]] * 1.5  # shared concepts
    feats = root / "feats"
    write_run(feats, "img", {7: img}, data, ids)
    write_run(feats, "txt", {7: txt}, data, ids, modality="text")
    write_run(feats, "other", {7: make_codes(rng)}, data, ids)
    prev = root / "previews"
    base = ["--features_dir", str(feats), "--size", str(TILE), "--min_support", "10", "--html", "--no-progress"]
    assert show.main(["--run", "txt", "--out", str(prev / "txt"), *base]) == 0
    # comparisons next to img: real comparative sharedness (G = txt, H = other) saved as its --json output,
    # the full best matches in txt through save_best_matches, and a hand-written file for 'other'
    from sae.compare import comparative_sharedness

    run = lambda name: open_run(feats, name)  # noqa: E731
    res = comparative_sharedness(run("img"), [run("txt")], [run("other")], top=0.25)
    comp = feats / "img" / COMPARISONS
    comp.mkdir()
    (comp / "sharedness.json").write_text(json.dumps(res.to_json()))
    m = res.matches["txt"]
    save_best_matches(feats / "img", source="img", source_layer=7, target="txt", target_layers=m.layers,
                      feature=m.feature, layer=m.layer, rho=m.rho, method="comp_sharedness", n_samples=N_ROWS)
    hand = {"format": MATCH_FORMAT, "method": "wmppc", "source": "img", "source_layer": 7, "target": "other",
            "target_layers": [7], "n_samples": N_ROWS,
            "feature": [(3 * i) % D_SAE for i in range(D_SAE)], "layer": [7] * D_SAE,
            "rho": [round(0.01 * i, 2) for i in range(D_SAE)]}
    hand["feature"][4] = -1
    (comp / "L07__other__wmppc.json").write_text(json.dumps(hand))
    (comp / "L03__other__wmppc.json").write_text(json.dumps({**hand, "source_layer": 3}))  # another layer
    (comp / "stray.json").write_text(json.dumps({"source": "someone_else", "features": []}))
    assert show.main(["--run", "img", "--out", str(prev / "img"), *base]) == 0
    return {"root": root, "prev": prev, "img": img, "txt": txt, "ids": ids, "res": res, "hand": hand}


def test_comparison_files_are_read(site):
    comps = load_comparisons(site["root"] / "feats" / "img", "img", 7)
    assert [(c.target, c.full, c.origin) for c in comps.matches] == [
        ("other", True, "L07__other__wmppc.json"), ("txt", True, "L07__txt__comp_sharedness.json")]
    other, txt = comps.matches
    assert 4 not in other.matches and other.matches[5] == (7, 15, 0.05)
    res = site["res"]
    live = np.flatnonzero(res.matches["txt"].feature >= 0)
    assert sorted(txt.matches) == live.tolist()
    assert txt.matches[12][1] == int(res.matches["txt"].feature[12]) == 20  # the planted shared concept
    [delta] = comps.deltas
    assert delta.min_group == ["txt"] and delta.max_group == ["other"]
    assert sorted(delta.delta) == sorted(res.selected.tolist())
    assert any("stray.json" in x for x in comps.ignored)
    assert load_comparisons(site["root"] / "feats" / "txt", "txt", 7).matches == []


def test_index_dom(site):
    index = site["prev"] / "img" / "index.html"
    d = dom(index)
    [table] = d.find_all("table", id="features")
    keys = [th.attrs.get("data-key") for th in table.find_all("th")]
    assert keys == ["index", None, "support", "freq", "mean", "max", "mass", "delta", "rho_other", "rho_txt",
                    "caption"]
    x, ids = site["img"], site["ids"]
    support = (x > 0).sum(0)
    shown = [j for j in range(D_SAE) if support[j] >= 10]
    rows = table.find_all("tr")[1:]
    assert [int(r.attrs["data-index"]) for r in rows] == shown
    txt_support = (site["txt"] > 0).sum(0)
    selected = set(site["res"].selected.tolist())
    for r in rows:
        j = int(r.attrs["data-index"])
        cells = r.find_all("td")
        assert len(cells) == len(keys)
        assert float(cells[2].attrs["data-v"]) == support[j]
        assert float(cells[3].attrs["data-v"]) == pytest.approx(support[j] / N_ROWS)
        assert float(cells[6].attrs["data-v"]) == pytest.approx(x[:, j].sum(), rel=1e-5)
        assert (cells[7].attrs["data-v"] != "") == (j in selected)
        # best match in txt: a link exactly when txt's previews show that feature
        best = int(site["res"].matches["txt"].feature[j])
        links = cells[9].find_all("a")
        assert cells[9].all_text().startswith(f"#{best} ρ=")
        assert bool(links) == (txt_support[best] >= 10)
        if links:
            assert links[0].attrs["href"] == f"../txt/features/f{best:05d}.html"
        top = int(ids[np.lexsort((np.arange(N_ROWS), -x[:, j]))[0]])
        assert cells[-1].attrs["data-v"].startswith(f"row {top} shows")
        assert r.attrs["data-text"].startswith(str(j))
    assert "ignored stray.json" in d.all_text()
    for link in local_links(index):  # every link resolves to a file on disk
        assert (index.parent / unquote(link.split("#")[0])).is_file(), link


def test_feature_pages(site):
    folder = site["prev"] / "img" / "features"
    pages = sorted(folder.glob("f*.html"))
    x, ids = site["img"], site["ids"]
    assert len(pages) == sum((x > 0).sum(0) >= 10)
    for page in pages:
        j = int(page.stem[1:])
        for link in local_links(page):
            assert (page.parent / unquote(link)).is_file(), (page.name, link)
        d = dom(page)
        [svg] = d.find_all("svg")
        acts = x[:, j][x[:, j] > 0]
        assert len(svg.find_all("rect")) == int((np.histogram(acts, bins=30, range=(0, acts.max()))[0] > 0).sum())
        [rows] = d.find_all("table", **{"class": "rows"})
        order = np.lexsort((np.arange(N_ROWS), -x[:, j]))[:9]
        got = [tr.find_all("td")[1].all_text() for tr in rows.find_all("tr")[1:]]
        assert got == [str(int(ids[n])) for n in order]
        assert f"row {int(ids[order[0]])} shows a" in d.all_text()  # captions of the paired rows
        items = d.find_all("ul", **{"class": "matches"})[0].find_all("li")
        assert items and items[-1].all_text().startswith("txt: feature ")
    # the text run's pages link their captions file
    page = next((site["prev"] / "txt" / "features").glob("f*.html"))
    assert any(link.endswith(".txt") for link in local_links(page))


# ------------------------------------------------------------------------------------------------
# headless Chromium: load the page, click a sort header (through the page's own hash handler), filter


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium); "
                                                "the DOM-level tests above still ran")
def test_sort_and_filter_in_headless_chromium(site, tmp_path):
    index = site["prev"] / "img" / "index.html"
    x = site["img"]
    support = (x > 0).sum(0)
    shown = [j for j in range(D_SAE) if support[j] >= 10]
    word = WORDS[3]

    def dump(fragment: str) -> Node:
        cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
               f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", index.resolve().as_uri() + fragment]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "<table" in proc.stdout, proc.stderr[-2000:]
        d = DOM(proc.stdout).root
        assert d.find_all("body")[0].attrs.get("data-ready") == "1"  # the page's script ran to the end
        return d

    # sort=freq:asc clicks the freq header twice (descending first, then ascending); filter hides rows
    d = dump(f"#sort=freq:asc&filter={word}")
    [table] = d.find_all("table", id="features")
    assert table.attrs.get("data-sort") == "freq:asc"
    [th] = [t for t in table.find_all("th") if t.attrs.get("data-key") == "freq"]
    assert th.attrs.get("aria-sort") == "ascending"
    rows = table.find_all("tr")[1:]
    order = [int(r.attrs["data-index"]) for r in rows]
    assert order == sorted(shown, key=lambda j: (support[j], j))
    visible = [int(r.attrs["data-index"]) for r in rows if "hidden" not in r.attrs]
    expected = [j for j in order if word in rows[order.index(j)].attrs["data-text"]]
    assert visible == expected and 0 < len(visible) < len(order)
    assert f"{len(visible)} of {len(order)} features shown" in d.all_text()

    # one click on the Delta header: descending, blanks (features not selected) last
    d = dump("#sort=delta")
    rows = d.find_all("table", id="features")[0].find_all("tr")[1:]
    delta = site["res"].delta
    sel = [j for j in site["res"].selected.tolist() if j in shown]
    want = sorted(sel, key=lambda j: (-delta[j], j)) + [j for j in shown if j not in sel]
    assert [int(r.attrs["data-index"]) for r in rows] == want


# ------------------------------------------------------------------------------------------------
# the comparative-sharedness picture


def test_plot_sharedness(site, tmp_path):
    import matplotlib.image as mpimg

    from sae.plots import plot_sharedness

    path = tmp_path / "sharedness.png"
    plot_sharedness(site["res"], path)
    img = mpimg.imread(path)
    assert img.shape[0] > 400 and img.shape[1] > 600
    import matplotlib

    svg = tmp_path / "sharedness.svg"
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # keep the labels as text
        plot_sharedness(site["res"], svg)
    text = svg.read_text()
    for label in ("Comparative sharedness of img (layer 7)", "G (min) = txt", "H (max) = other",
                  "summed activation", "ρ_G² − ρ_H²", "selected: top"):
        assert label in text, label
