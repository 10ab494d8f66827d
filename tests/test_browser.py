"""The static feature browser (DOM tests that always run, one headless-Chromium test that clicks like a
user), the comparison files it reads, concept names, and the comparative-sharedness plot."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast
from urllib.parse import unquote

import numpy as np
import pytest

import show
from sae.analysis.comparison_files import COMPARISONS, MATCH_FORMAT, load_comparisons, save_best_matches
from sae.analysis.naming import names_path, write_names
from sae.data.features import open_run
from sae.viz.browser import LINKS_FILE, THUMB, match_text
from sae.viz.previews import grid_shape, make_grid
from tests.test_show import D_SAE, N_DATASET, N_ROWS, TILE, WORDS, make_codes, make_dataset, write_run

if TYPE_CHECKING:
    from sae.analysis.compare import SharednessResult

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

    def attr(self, name: str) -> str:
        """The value of attribute `name`, which the element must give with a value."""
        value = self.attrs[name]
        assert value is not None, f"<{self.tag} {name}> has no value"
        return value

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        return [n for n in self.iter() if n.tag == tag and all(n.attrs.get(k) == v for k, v in attrs.items())]

    def all_text(self) -> str:
        return "".join(c.all_text() if isinstance(c, Node) else c for c in self.children)


class DOM(HTMLParser):
    VOID = {"meta", "img", "input", "br", "hr", "link", "line", "rect"}

    def __init__(self, text: str):
        super().__init__()
        self.root = Node("#root", {}, None)
        self.cur: Node = self.root
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
        while n.parent is not None and n.tag != tag:  # the root alone has no parent
            n = n.parent
        if n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def dom(path: Path) -> Node:
    return DOM(path.read_text(encoding="utf-8")).root


def local_links(page: Path) -> list[str]:
    """Links and sources of a page, less the other runs' links.js (loaded when there, skipped when not)."""
    d = dom(page)
    links = [v for n in d.iter() for a in ("href", "src") if (v := n.attrs.get(a))]
    return [x for x in links if not x.endswith("/" + LINKS_FILE)]


def has_class(node: Node | None, name: str) -> bool:
    return node is not None and name in (node.attrs.get("class") or "").split()


# ------------------------------------------------------------------------------------------------
# three runs on the same rows; previews of two of them side by side; real comparison results


def concept_names(j: int) -> list[list]:
    """The names planted for feature j of img (none for j % 4 == 3)."""
    return [
        [f"{WORDS[j % len(WORDS)]}ish", round(0.5 - 0.01 * j, 6)],
        ["zebra", 0.2],
        [f"word{j}", 0.1],
        ["tail", 0.05],
    ]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from sae.analysis.compare import comparative_sharedness, save_sharedness, save_wmppc, wmppc

    root = tmp_path_factory.mktemp("browser")
    data = make_dataset(root / "data")
    rng = np.random.default_rng(5)
    ids = rng.permutation(N_DATASET)[:N_ROWS]
    img, txt, txt3 = make_codes(rng), make_codes(rng), make_codes(rng)
    txt[:, [20, 21, 22]] = img[:, [12, 13, 14]] * 1.5  # shared concepts in txt's last layer
    txt3[:, 5] = img[:, 16] * 2.0  # and one in its layer 3 only
    feats = root / "feats"
    write_run(feats, "img", {7: img}, data, ids)
    write_run(feats, "txt", {3: txt3, 7: txt}, data, ids, modality="text")
    write_run(feats, "other", {7: make_codes(rng)}, data, ids)
    write_names(names_path(feats, "img", 7), {str(j): concept_names(j) for j in range(D_SAE) if j % 4 != 3})
    prev = root / "previews"
    base = ["--features_dir", str(feats), "--size", str(TILE), "--min_support", "10", "--html", "--no-progress"]
    assert show.main(["--run", "txt", "--out", str(prev / "txt"), *base]) == 0
    # what wmppc.py and comp_sharedness.py save next to img: wMPPC against txt over all its layers (3, 7),
    # comparative sharedness G = txt, H = other over their last layers
    run = lambda name: open_run(feats, name)  # noqa: E731
    w = wmppc(run("img"), run("txt"))
    assert save_wmppc(w, run("img"))[0]
    res = comparative_sharedness(run("img"), [run("txt")], [run("other")], top=0.25)
    assert save_sharedness(res, run("img"))[0]
    comp = feats / "img" / COMPARISONS
    hand = {
        "format": MATCH_FORMAT,
        "method": "wmppc",
        "source": "img",
        "source_layer": 3,
        "target": "other",
        "target_layers": [7],
        "n_samples": N_ROWS,
        "feature": [1] * D_SAE,
        "layer": [7] * D_SAE,
        "rho": [0.5] * D_SAE,
    }
    (comp / "L03__other__wmppc.json").write_text(json.dumps(hand))  # another source layer: skipped quietly
    (comp / "stray.json").write_text(json.dumps({"source": "someone_else", "features": []}))
    (comp / "notes.json").write_text(json.dumps({"hello": 1}))
    assert show.main(["--run", "img", "--out", str(prev / "img"), *base]) == 0
    return {
        "root": root,
        "feats": feats,
        "prev": prev,
        "img": img,
        "txt": txt,
        "txt3": txt3,
        "ids": ids,
        "res": res,
        "w": w,
    }


def test_comparison_files_are_read(site):
    comps = load_comparisons(site["feats"] / "img", "img", 7)
    assert [(c.target, c.target_layers, c.methods, c.full) for c in comps.matches] == [
        ("other", [7], ["comp_sharedness"], True),
        ("txt", [3, 7], ["wmppc"], True),
        ("txt", [7], ["comp_sharedness"], True),
    ]
    assert [c.key for c in comps.matches] == ["rho_other", "rho_txt_wmppc_L3-7", "rho_txt_comp_sharedness_L7"]
    assert [c.label for c in comps.matches] == [
        "other · sharedness · L7",
        "txt · wMPPC · all layers (3, 7)",
        "txt · sharedness · L7 (last)",
    ]
    other, txt_all, txt_last = comps.matches
    assert txt_last.origins == ["L07__txt__comp_sharedness.json", "sharedness_L07.json"]  # merged, full file first
    # the toolkit's own files are all read; only the foreign and unknown ones are reported
    assert sorted(comps.read) == [
        "L07__other__comp_sharedness.json",
        "L07__txt__comp_sharedness.json",
        "L07__txt__wmppc.json",
        "sharedness_L07.json",
        "wmppc__txt.json",
    ]
    assert [x.split(":")[0] for x in comps.ignored] == ["notes.json", "stray.json"]
    w, res = site["w"], site["res"]
    [score] = comps.scores
    assert (score.target, score.all_layers, score.last_layer) == ("txt", w.all_layers, w.last_layer)
    live = np.flatnonzero(site["img"].any(0))
    assert sorted(txt_all.matches) == sorted(txt_last.matches) == sorted(other.matches) == live.tolist()
    for i in live.tolist():
        b, j, r = txt_all.matches[i]
        assert (b, j) == (w.best_layer[0][i], w.best_feature[0][i]) and r == pytest.approx(
            w.rho_all_layers[0][i], abs=1e-6
        )
        b, j, r = txt_last.matches[i]
        m = res.matches["txt"]
        assert (b, j) == (7, m.feature[i]) and r == pytest.approx(m.rho[i], abs=1e-6)
    assert txt_all.matches[16][:2] == (3, 5) and txt_all.matches[16][2] == pytest.approx(1.0)  # planted, layer 3
    assert txt_last.matches[12][:2] == (7, 20) and txt_last.matches[16][0] == 7
    [delta] = comps.deltas
    assert delta.min_group == ["txt"] and delta.max_group == ["other"]
    assert sorted(delta.delta) == sorted(res.selected.tolist())
    assert load_comparisons(site["feats"] / "txt", "txt", 7).matches == []


def test_same_target_and_layers_merge_across_methods(tmp_path):
    d = 6
    feature, rho = np.arange(d)[::-1], np.linspace(0.1, 0.6, d)
    for method in ("wmppc", "comp_sharedness"):
        save_best_matches(
            tmp_path / "A",
            source="A",
            source_layer=2,
            target="B",
            target_layers=[4],
            feature=feature,
            layer=4,
            rho=rho,
            method=method,
        )
    comps = load_comparisons(tmp_path / "A", "A", 2)
    [col] = comps.matches
    assert col.methods == ["comp_sharedness", "wmppc"] and col.label == "B · sharedness + wMPPC · L4"
    assert col.key == "rho_B" and col.matches[1] == (4, 4, pytest.approx(0.2)) and not comps.ignored
    assert load_comparisons(tmp_path / "A", "A", 3).matches == []  # another source layer


def test_index_dom(site):
    index = site["prev"] / "img" / "index.html"
    d = dom(index)
    [table] = d.find_all("table", id="features")
    assert has_class(table.parent, "tablewrap")  # scrolls within its box, captions stay reachable
    heads = table.find_all("th")
    keys = [th.attrs.get("data-key") for th in heads]
    assert keys == [
        "index",
        None,
        "names",
        "support",
        "freq",
        "mean",
        "max",
        "mass",
        "delta",
        "rho_other",
        "rho_txt_wmppc_L3-7",
        "rho_txt_comp_sharedness_L7",
        "caption",
    ]
    assert heads[10].all_text() == "best in txtwMPPC · all layers (3, 7)"
    assert heads[11].all_text() == "best in txtsharedness · L7 (last)"
    x, ids, w, res = site["img"], site["ids"], site["w"], site["res"]
    support = (x > 0).sum(0)
    shown = [j for j in range(D_SAE) if support[j] >= 10]
    rows = table.find_all("tr")[1:]
    assert [int(r.attr("data-index")) for r in rows] == shown
    txt_support = (site["txt"] > 0).sum(0)
    selected = set(res.selected.tolist())
    for r in rows:
        j = int(r.attr("data-index"))
        cells = r.find_all("td")
        assert len(cells) == len(keys)
        assert cells[1].find_all("img")[0].attrs["class"] == "thumb"
        names = [n for n, _ in concept_names(j)] if j % 4 != 3 else []
        assert cells[2].all_text() == ", ".join(names[:3])
        assert all(n.lower() in r.attrs["data-text"] for n in names)  # the filter finds every name
        assert float(cells[3].attr("data-v")) == support[j]
        assert float(cells[4].attr("data-v")) == pytest.approx(support[j] / N_ROWS)
        assert float(cells[7].attr("data-v")) == pytest.approx(x[:, j].sum(), rel=1e-5)
        assert (cells[8].attrs["data-v"] != "") == (j in selected)
        # wMPPC over txt's layers 3 and 7: the layer in the cell; a link only to a feature of the layer shown
        b, k, rho = int(w.best_layer[0][j]), int(w.best_feature[0][j]), float(w.rho_all_layers[0][j])
        assert cells[10].all_text() == match_text(b, k, rho) and float(cells[10].attr("data-v")) == pytest.approx(
            rho, abs=1e-6
        )
        links = cells[10].find_all("a")
        assert bool(links) == (b == 7 and txt_support[k] >= 10)
        # sharedness over txt's last layer
        best = int(res.matches["txt"].feature[j])
        assert cells[11].all_text().startswith(f"L7 #{best} ρ=")
        links = cells[11].find_all("a")
        assert bool(links) == (txt_support[best] >= 10)
        if links:
            assert links[0].attrs["href"] == f"../txt/features/f{best:05d}.html"
        top = int(ids[np.lexsort((np.arange(N_ROWS), -x[:, j]))[0]])
        assert cells[-1].attr("data-v").startswith(f"row {top} shows")
        assert r.attr("data-text").startswith(str(j))
    row16 = next(r for r in rows if r.attrs["data-index"] == "16").find_all("td")
    assert row16[10].all_text().startswith("L3 #5 ρ=1.000") and row16[11].all_text().startswith("L7 #")
    text = d.all_text()
    assert f"txt: all layers {w.all_layers:.3f}, last layer {w.last_layer:.3f}" in text
    [details] = d.find_all("details")
    listed = details.all_text()
    assert "ignored notes.json" in listed and "ignored stray.json" in listed and "wmppc__txt.json" in listed
    assert "ignored wmppc__txt.json" not in listed and "ignored sharedness" not in listed
    assert f"img.thumb{{max-width:{THUMB}px" in index.read_text() and THUMB >= 120
    assert d.find_all("img", id="zoom")
    for link in local_links(index):  # every link resolves to a file on disk
        assert (index.parent / unquote(link.split("#")[0])).is_file(), link
    # a run without a names file: no names column
    d = dom(site["prev"] / "txt" / "index.html")
    assert "names" not in [th.attrs.get("data-key") for th in d.find_all("th")]


def test_feature_pages(site):
    folder = site["prev"] / "img" / "features"
    pages = sorted(folder.glob("f*.html"))
    x, ids, w = site["img"], site["ids"], site["w"]
    assert len(pages) == sum((x > 0).sum(0) >= 10)
    for page in pages:
        j = int(page.stem[1:])
        for link in local_links(page):
            assert (page.parent / unquote(link)).is_file(), (page.name, link)
        d = dom(page)
        [svg] = d.find_all("svg")
        acts = x[:, j][x[:, j] > 0]
        counts = np.histogram(acts, bins=30, range=(acts.min(), acts.max()))[0]
        assert len(svg.find_all("rect")) == int((counts > 0).sum())
        assert "activation (rows where the feature fires)" in svg.all_text() and "rows" in svg.all_text()
        [rows] = d.find_all("table", **{"class": "rows"})
        order = np.lexsort((np.arange(N_ROWS), -x[:, j]))[:9]
        got = [tr.find_all("td")[1].all_text() for tr in rows.find_all("tr")[1:]]
        assert got == [str(int(ids[n])) for n in order]
        assert f"row {int(ids[order[0]])} shows a" in d.all_text()  # captions of the paired rows
        # names with their cosines
        named = d.find_all("table", **{"class": "names"})
        if j % 4 == 3:
            assert not named
        else:
            [named] = named
            got = [[td.all_text() for td in tr.find_all("td")] for tr in named.find_all("tr")[1:]]
            assert got == [[n, f"{c:.3f}"] for n, c in concept_names(j)]
            assert d.find_all("h1")[0].all_text() == f"Feature {j}: " + ", ".join(n for n, _ in concept_names(j)[:3])
        # one row per compared run and layers, none twice
        [matches] = d.find_all("table", **{"class": "matches"})
        got = [[td.all_text() for td in tr.find_all("td")][:4] for tr in matches.find_all("tr")[1:]]
        assert [g[:2] for g in got] == [
            ["other", "sharedness · L7"],
            ["txt", "wMPPC · all layers (3, 7)"],
            ["txt", "sharedness · L7 (last)"],
        ]
        b, k, rho = int(w.best_layer[0][j]), int(w.best_feature[0][j]), float(w.rho_all_layers[0][j])
        assert got[1][2:] == [f"layer {b}, feature {k}", f"{rho:.3f}"]
    # the text run's pages link their captions file
    page = next((site["prev"] / "txt" / "features").glob("f*.html"))
    assert any(link.endswith(".txt") for link in local_links(page))


# ------------------------------------------------------------------------------------------------
# headless Chromium, driven from outside through the DevTools protocol on a pipe: trusted mouse clicks
# on the sort header and typing into the filter box, then the rows' order read back from the page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """A headless Chromium and one page, driven with DevTools-protocol messages over
    --remote-debugging-pipe (the browser reads commands on fd 3, writes replies on fd 4; NUL-separated)."""

    def __init__(self, exe: str, profile: Path, timeout: float = 60.0):
        self.timeout, self.next_id, self.buf = timeout, 0, b""
        cmd_r, self.cmd_w = os.pipe()
        self.res_r, res_w = os.pipe()
        # numbered 10 and up so that moving them to 3 and 4 cannot clobber one with the other
        a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_r, res_w))
        os.close(cmd_r)
        os.close(res_w)
        args = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "--window-size=1400,1000",
            "about:blank",
        ]
        self.log = open(profile.parent / "chromium.log", "w+")  # noqa: SIM115
        trampoline = f"import os, sys; os.dup2({a}, 3); os.dup2({b}, 4); os.execv(sys.argv[1], sys.argv[1:])"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", trampoline, *args],
            pass_fds=(a, b),
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
        )
        os.close(a)
        os.close(b)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send one command and wait for its reply (events in between are dropped)."""
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                ready, _, _ = select.select([self.res_r], [], [], self.timeout)
                chunk = os.read(self.res_r, 1 << 20) if ready else b""
                if not chunk:
                    self.log.seek(0)
                    raise AssertionError(f"no reply from chromium to {method}: {self.log.read()[-2000:]}")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, (method, reply["error"])
                return reply.get("result", {})

    def page(self, method: str, **params) -> dict:
        return self.call(method, self.session, **params)

    def js(self, expression: str):
        reply = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in reply, reply["exceptionDetails"]
        return reply["result"].get("value")

    def open(self, url: str) -> None:
        """Load `url` afresh (through about:blank, so that a new #hash reloads the page) and wait until the
        page's script has run to its end."""
        for target in ("about:blank", url):
            self.page("Page.navigate", url=target)
        check = (
            f"document.URL.startsWith({json.dumps(url.split('#')[0])}) && document.body !== null"
            " && document.body.dataset.ready === '1'"
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            reply = self.page("Runtime.evaluate", expression=check, returnByValue=True)
            if reply.get("result", {}).get("value") is True:  # an evaluation in the page being replaced: retried
                return
            time.sleep(0.02)
        raise AssertionError(f"{url} did not finish loading")

    def click(self, selector: str) -> None:
        """A real left click (mouse pressed and released) in the middle of the element."""
        x, y = self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center', inline: 'center'});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        self.page("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def rows(self) -> list[tuple[int, bool]]:
        """(feature index, visible) of the index table's rows, in page order."""
        return [
            tuple(r)
            for r in self.js(
                "Array.from(document.querySelectorAll('#features tbody tr'))"
                ".map(r => [Number(r.dataset.index), !r.hidden])"
            )
        ]

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.cmd_w, self.res_r):
            os.close(fd)
        self.log.close()


@pytest.mark.skipif(
    _chromium() is None,
    reason="chromium is not installed (Debian: apt-get install chromium); the DOM-level tests above still ran",
)
def test_click_sort_header_and_filter_in_headless_chromium(site, tmp_path):
    index = site["prev"] / "img" / "index.html"
    x = site["img"]
    support = (x > 0).sum(0)
    shown = [j for j in range(D_SAE) if support[j] >= 10]
    delta = site["res"].delta
    exe = _chromium()
    assert exe is not None, "skipped above without chromium"
    browser = Chromium(exe, tmp_path / "profile")
    try:
        browser.open(index.resolve().as_uri())
        assert browser.rows() == [(j, True) for j in shown]  # as written: by index
        freq = '#features th[data-key="freq"]'
        browser.click(freq)  # numbers sort descending first
        assert [j for j, _ in browser.rows()] == sorted(shown, key=lambda j: (-support[j], j))
        assert browser.js(f"document.querySelector('{freq}').getAttribute('aria-sort')") == "descending"
        browser.click(freq)  # the same header again: ascending
        assert [j for j, _ in browser.rows()] == sorted(shown, key=lambda j: (support[j], j))
        assert browser.js("location.hash") == "#sort=freq:asc"
        browser.click('#features th[data-key="delta"]')  # Delta: descending, blanks (not selected) last
        sel = [j for j in site["res"].selected.tolist() if j in shown]
        want = sorted(sel, key=lambda j: (-delta[j], j)) + [j for j in shown if j not in sel]
        assert [j for j, _ in browser.rows()] == want
        # type a concept name into the filter box
        browser.click("#filter")
        browser.page("Input.insertText", text="Zebra")
        named = [j for j in want if j % 4 != 3]
        assert browser.rows() == [(j, j in named) for j in want] and 0 < len(named) < len(want)
        assert (
            browser.js("document.getElementById('count').textContent") == f"{len(named)} of {len(want)} features shown"
        )
        # the state lives in the address: opening it again gives the same view
        url = browser.js("location.href")
        assert url.endswith("#sort=delta:desc&filter=Zebra")
        browser.open(index.resolve().as_uri() + "#sort=freq:asc&filter=zebra")
        assert browser.rows() == [(j, j in named) for j in sorted(shown, key=lambda j: (support[j], j))]
    finally:
        browser.close()


def _reversed_site(site) -> Path:
    """img's previews written before txt's: its matches into txt cannot be links at build time."""
    prev = site["root"] / "previews_reversed"
    if not (prev / "txt" / "index.html").exists():
        base = ["--features_dir", str(site["feats"]), "--size", str(TILE), "--min_support", "10", "--html"]
        assert show.main(["--run", "img", "--out", str(prev / "img"), *base, "--no-progress"]) == 0
        assert not any(h.startswith("../txt/") for h in local_links(prev / "img" / "index.html"))
        assert show.main(["--run", "txt", "--out", str(prev / "txt"), *base, "--no-progress"]) == 0
    return prev


def test_match_labels_wait_for_the_matched_run_in_the_page(site):
    prev = _reversed_site(site)
    spans = [n for n in dom(prev / "img" / "index.html").iter() if n.tag == "span" and has_class(n, "xm")]
    assert spans and {n.attrs["data-run"] for n in spans} >= {"txt"}
    listed = (prev / "txt" / LINKS_FILE).read_text()
    assert listed.startswith('(window.SC_PAGES = window.SC_PAGES || {})["txt"] = {"layer": 7, "features": [')
    scripts = [n.attrs.get("src") for n in dom(prev / "img" / "index.html").find_all("script")]
    assert f"../txt/{LINKS_FILE}" in scripts
    page = next((prev / "img" / "features").glob("f*.html"))
    assert f"../../txt/{LINKS_FILE}" in [n.attrs.get("src") for n in dom(page).find_all("script")]


def test_grids_are_sized_to_their_rows_with_bordered_labelled_tiles():
    from PIL import Image

    assert [grid_shape(n) for n in (1, 3, 4, 5, 7, 9)] == [(1, 1), (3, 1), (2, 2), (3, 2), (3, 3), (3, 3)]
    tiles = [Image.new("RGB", (60, 60), (0, 200, 0)) for _ in range(4)]
    g = make_grid(tiles, size=60, labels=["1.5", "2", "", "0.3"])
    assert g.size == (120, 120)  # 4 rows: 2x2, no blank tiles
    a = np.asarray(g).astype(int)
    assert tuple(a[30, 0]) == (150, 150, 150) and tuple(a[0, 90]) == (150, 150, 150)  # thin border
    assert tuple(a[30, 30]) == (0, 200, 0)
    assert a[56, 2].sum() < 60 and a[116, 62].sum() < 60  # a dark label box in the bottom-left corner
    assert tuple(a[116, 2]) == (0, 200, 0)  # tile 2: an empty label, none drawn
    small = [Image.new("RGB", (40, 40), (0, 200, 0))]
    assert tuple(np.asarray(make_grid(small, size=40, labels=["9"]))[36, 2]) == (0, 200, 0)  # < 48 px: no label
    assert make_grid(tiles[:1], size=60).size == (60, 60)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_links_resolve_in_chromium_whatever_the_build_order_and_the_table_fits(site, tmp_path):
    prev = _reversed_site(site)
    exe = _chromium()
    assert exe is not None, "skipped above without chromium"
    browser = Chromium(exe, tmp_path / "profile")
    try:
        browser.open((prev / "img" / "index.html").resolve().as_uri())
        hrefs = browser.js("Array.from(document.querySelectorAll('#features td.m a')).map(a => a.href)")
        to_txt = [h for h in hrefs if "/txt/features/" in h]
        assert to_txt and browser.js("document.querySelectorAll('span.xm').length") < len(hrefs)
        for h in to_txt:
            assert Path(unquote(h.removeprefix("file://"))).exists()
        # at 1400 px the table fits its frame: nothing cut off, no sideways scrolling
        fits = "(() => { const w = document.querySelector('.tablewrap'); return w.scrollWidth <= w.clientWidth; })()"
        assert browser.js(fits) is True
        assert browser.js("document.querySelector('img.thumb').naturalWidth") > 0
    finally:
        browser.close()


# ------------------------------------------------------------------------------------------------
# the comparative-sharedness picture


def _check_labels(fig) -> list[str]:
    """The index labels on the plot: none overlaps another or leaves the axes."""
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts]
    for n, (_, a) in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
        assert not any(a.overlaps(b) for _, b in boxes[n + 1 :])
    return [t for t, _ in boxes]


def test_plot_sharedness(site, tmp_path):
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    from sae.viz.plots import plot_sharedness, sharedness_figure

    res = site["res"]
    path = tmp_path / "sharedness.png"
    plot_sharedness(res, path)
    assert mpimg.imread(path).shape[:2] == (780, 1125)  # 7.5 x 5.2 inches at 150 dpi
    fig = sharedness_figure(res)
    ax, cbar = fig.axes
    assert ax.get_ylabel() == r"$\Delta = S\,(\rho_G^2-\rho_H^2)$" and cbar.get_ylabel() == r"$\rho_G^2-\rho_H^2$"
    assert "summed activation" in ax.get_xlabel()
    title = ax.get_title()
    assert (
        "Comparative sharedness of img (layer 7)" in title and "G (min) = txt" in title and "H (max) = other" in title
    )
    live_sel = [j for j in res.selected.tolist() if res.weight[j] > 0]
    labels = _check_labels(fig)
    assert labels and set(labels) <= {str(j) for j in live_sel}
    # the legend's colours are the colour map's: red for features G shares more, blue for H
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[0].startswith("shared more with G") and texts[1].startswith("shared more with H")
    assert texts[2].startswith("selected: top") and "dead not shown" in legend.get_title().get_text()
    sc = ax.collections[0]
    g_colour, h_colour = (np.asarray(h.get_color()) for h in legend.legend_handles[:2])
    assert np.allclose(g_colour, sc.to_rgba(0.8 * sc.norm.vmax)) and np.allclose(
        h_colour, sc.to_rgba(0.8 * sc.norm.vmin)
    )
    assert g_colour[0] > g_colour[2] and h_colour[2] > h_colour[0]
    plt.close(fig)

    # crowded: 20 selected features almost on the same spot; the labels placed still never overlap
    rng = np.random.default_rng(0)
    d = 60
    weight = np.concatenate([np.full(20, 50.0) + rng.random(20) * 0.01, rng.random(d - 20) * 40 + 1])
    rho_g, rho_h = np.concatenate([0.9 + rng.random(20) * 1e-3, rng.random(d - 20) * 0.5]), rng.random(d) * 0.2
    delta = weight * (rho_g**2 - rho_h**2)
    crowded = SimpleNamespace(
        source="a",
        layer=1,
        min_group=["g"],
        max_group=["h"],
        weight=weight,
        delta=delta,
        rho_min_group=rho_g,
        rho_max_group=rho_h,
        selected=np.argsort(-delta)[:20],
        top=0.33,
    )
    fig = sharedness_figure(cast("SharednessResult", crowded), label_top=20)  # only the fields the figure reads
    assert 1 <= len(_check_labels(fig)) < 20
    plt.close(fig)


def test_index_plots_the_layers_training_curves(tmp_path):
    from sae.viz.browser import _training_curves

    run = tmp_path / "run"
    (run / "saes" / "group00" / "layer07").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"sae_dirs": {"layer07": "saes/group00/layer07"}}))
    lines = [
        {"step": s, "loss": 1 / s, "fvu": 0.5 / s, "l0": 8.0, "dead_fraction": None if s < 3 else 0.1, "lr": 1e-3}
        for s in range(1, 6)
    ]
    (run / "saes" / "group00" / "layer07" / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    html = _training_curves(run, 7)
    d = DOM(html).root
    polylines = d.find_all("polyline")
    assert len(polylines) == 4 and "5 points, last step 5" in html
    assert [len(p.attr("points").split()) for p in polylines] == [5, 5, 5, 3]  # nulls (no dead count yet) skipped
    first, last = (tuple(map(float, pt.split(","))) for pt in polylines[0].attr("points").split()[::4])
    assert first[0] < last[0] and first[1] < last[1]  # the loss falls: its line goes down (SVG y grows downward)
    assert _training_curves(run, 3) == "" and _training_curves(None, 7) == ""
