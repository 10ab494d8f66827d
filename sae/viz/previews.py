"""What each SAE feature means, at a glance: its top-activating rows as image grids and captions.

`write_previews(cfg)` (called by `show` in sae/viz/show_run.py, the body of show.py) reads one layer of a
recorded run (`sae/data/features.py`), finds for every live feature its `TOP` = 9 highest-activating rows,
fetches those rows from the run's own dataset by row id (run.json `dataset` + `row_ids`; nothing assumes
COCO), and writes into the preview folder (`previews/<run>` by default):

    show.json                              the folder's manifest: run, layer, features_dir (written first;
                                           a folder holding another run or layer is refused)
    mass{K}_feat{i:05d}.jpg                grid of the top rows' images (up to 3x3, sized to the rows they
                                           have; tiles `size` px with a thin border and their activation,
                                           white background), best row top left, row-major
    mass{K}_feat{i:05d}.txt                text runs only: the 9 captions, one per line
                                           (rank, activation, dataset row id, caption; tab-separated)
    features.json                          per shown feature: statistics, top rows, captions, names,
                                           histogram
    index.html, features/f{i:05d}.html     with --html: the static browser (sae/viz/browser.py)

K = mass_key(S) encodes the feature's activation mass S = sum_n z[n, i] over all rows (the S_i weight
of wMPPC and of comparative sharedness) as fixed-width text that sorts like the number, for any finite
S (`mass_key`): `ls` sorts the grids by mass (`ls -r`: the heaviest first) and every name still carries
the feature index. Each file is written under a temporary name and renamed into place: a killed run
leaves no half-written file, and a rerun skips the grids that exist. A rerun with another selection
removes the grids, caption files and pages of the features no longer shown (only files named as above).

Top rows are computed for all features at once from the CSR codes with one sort of the non-zero
entries by (feature, activation descending, row ascending): no dense [N, d_sae] matrix is built.
"""

from __future__ import annotations

import math
import re
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sae.analysis.naming import load_names, names_path
from sae.data.datasets import Pairs
from sae.data.features import FeatureRun, SparseCodes, open_run
from sae.util.atomic import atomic_path, read_json, write_json
from sae.util.errors import InputError

TOP = 9  # rows shown per feature (a 3x3 grid)
GRID = 3
HIST_BINS = 30
SHOW_FORMAT = "show-v1"


# ------------------------------------------------------------------------------------------------
# Top rows and statistics of every feature, from CSR codes


@dataclass
class FeatureColumns:
    """A layer's non-zero activations regrouped by feature (CSC order), each feature's sorted descending.

    ptr[i]:ptr[i+1] are the entries of feature i; `rows` are run row positions (0..N-1, not dataset
    row ids), `values` the activations, descending within a feature (ties: lower row first).
    """

    ptr: np.ndarray  # int64 [d_sae + 1]
    rows: np.ndarray  # int64 [nnz]
    values: np.ndarray  # float32 [nnz]
    n_rows: int
    mass: np.ndarray  # float64 [d_sae]: sum over rows of the activation (S_i)

    @classmethod
    def from_codes(cls, codes: SparseCodes) -> FeatureColumns:
        indptr = np.asarray(codes.indptr, dtype=np.int64)
        cols = np.asarray(codes.indices, dtype=np.int64)
        vals = np.asarray(codes.values, dtype=np.float32)
        if len(cols) and (cols.min() < 0 or cols.max() >= codes.d_sae):
            raise InputError(f"feature indices out of range [0, {codes.d_sae}) in the codes")
        if not np.isfinite(vals).all():
            raise InputError(f"the codes hold {int((~np.isfinite(vals)).sum())} non-finite values (NaN or inf)")
        rows = np.repeat(np.arange(codes.n_rows, dtype=np.int64), np.diff(indptr))
        order = np.lexsort((rows, -vals, cols))  # last key first: feature, then value desc, then row
        counts = np.bincount(cols, minlength=codes.d_sae)
        ptr = np.zeros(codes.d_sae + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        mass = np.bincount(cols, weights=vals.astype(np.float64), minlength=codes.d_sae)
        return cls(ptr, rows[order], vals[order], codes.n_rows, mass)

    @property
    def d_sae(self) -> int:
        return len(self.ptr) - 1

    @property
    def support(self) -> np.ndarray:
        """int64 [d_sae]: number of rows where each feature is > 0."""
        return np.diff(self.ptr)

    @property
    def freq(self) -> np.ndarray:
        """float64 [d_sae]: firing frequency, support / N."""
        return self.support / max(self.n_rows, 1)

    @property
    def mean_active(self) -> np.ndarray:
        """float64 [d_sae]: mean activation over the rows where the feature fires (0 for dead ones)."""
        return self.mass / np.maximum(self.support, 1)

    @property
    def max(self) -> np.ndarray:
        """float32 [d_sae]: the largest activation (0 for dead features)."""
        out = np.zeros(self.d_sae, dtype=np.float32)
        live = self.support > 0
        out[live] = self.values[self.ptr[:-1][live]]
        return out

    def top(self, k: int = TOP) -> tuple[np.ndarray, np.ndarray]:
        """(rows int64 [d_sae, k], values float32 [d_sae, k]): each feature's k highest rows, best first;
        padded with row -1 and value 0 where a feature fires on fewer than k rows."""
        j = np.arange(k)
        valid = j[None, :] < self.support[:, None]
        idx = np.where(valid, self.ptr[:-1, None] + j[None, :], 0)
        if len(self.rows) == 0:
            return np.full((self.d_sae, k), -1, np.int64), np.zeros((self.d_sae, k), np.float32)
        return np.where(valid, self.rows[idx], -1), np.where(valid, self.values[idx], 0).astype(np.float32)

    def activations(self, i: int) -> np.ndarray:
        """float32 [support_i]: feature i's non-zero activations, descending."""
        return self.values[self.ptr[i] : self.ptr[i + 1]]

    def histogram(self, i: int, bins: int = HIST_BINS) -> dict[str, Any]:
        """Histogram of feature i's non-zero activations, `bins` equal bins from its smallest to its largest
        activation: {lo, hi (the outer bin edges), counts [bins], zeros (rows at 0, not counted)}.
        A feature with a single distinct value gets the bins numpy puts around it (value +- 0.5)."""
        a = self.activations(i)
        lo, hi = (float(a[-1]), float(a[0])) if len(a) else (0.0, 1.0)
        counts, edges = np.histogram(a, bins=bins, range=(lo, hi))
        return {
            "lo": float(edges[0]),
            "hi": float(edges[-1]),
            "counts": counts.tolist(),
            "zeros": int(self.n_rows - len(a)),
        }


def select_features(
    cols: FeatureColumns, min_support: int = 16, features: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """(features to show, requested features skipped because they never fire).

    Without `features`: every live feature with at least `min_support` active rows, by index.
    With `features`: exactly those (min_support is not applied), minus the dead ones.
    """
    support = cols.support
    if features:
        bad = [i for i in features if not 0 <= i < cols.d_sae]
        if bad:
            raise InputError(
                f"--features {bad[0]} is out of range: the layer has {cols.d_sae} features (0..{cols.d_sae - 1})"
            )
        wanted = list(dict.fromkeys(int(i) for i in features))
        return [i for i in wanted if support[i] > 0], [i for i in wanted if support[i] == 0]
    if min_support < 0:
        raise InputError(f"--min_support must be >= 0, not {min_support}")
    return np.flatnonzero(support >= max(min_support, 1)).tolist(), []


# ------------------------------------------------------------------------------------------------
# Rows of the run's dataset (the adapter that isolates sae/data/datasets.py)


class RowSource:
    """Images and captions of a run's rows, by run position n (dataset row `row_ids[n]`).

    `has_captions` is False when the rows have no caption column (image runs only): captions are None.
    """

    def __init__(self, pairs: Pairs, run_name: str):
        self.pairs = pairs
        self.run_name = run_name
        self.has_captions = pairs.text_column is not None
        self._thumbs: dict[tuple[int, int], Any] = {}  # small LRU-less cache: rows recur across features
        self._lock = threading.Lock()

    @property
    def row_ids(self) -> np.ndarray:
        return np.asarray(self.pairs.row_ids, dtype=np.int64)

    def image(self, n: int) -> Any | None:
        """The n-th row's image (RGB PIL), or None when it cannot be read."""
        from sae.data.datasets import BadRow

        item = self.pairs.read(n, "image")
        return None if isinstance(item, BadRow) else item

    def thumbnail(self, n: int, size: int) -> Any | None:
        """The n-th image shrunk to fit size x size (aspect kept), cached; None when unreadable."""
        key = (n, size)
        with self._lock:
            if key in self._thumbs:
                return self._thumbs[key]
        from PIL import ImageOps

        img = self.image(n)
        thumb = None if img is None else ImageOps.contain(img, (size, size))
        with self._lock:
            if len(self._thumbs) >= 4096:
                self._thumbs.pop(next(iter(self._thumbs)))
            self._thumbs[key] = thumb
        return thumb

    def caption(self, n: int) -> str | None:
        return self.pairs.texts()[n] if self.has_captions else None


def open_row_source(
    run: FeatureRun,
    *,
    dataset: str | None = None,
    split: str | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    data_root: str | Path = "data",
    n_rows: int | None = None,
    need_captions: bool = False,
) -> RowSource:
    """The dataset rows of `run`, as named by its run.json (the arguments override it).

    Rows are run.json's row_ids; without them, dataset rows 0..n_rows-1 (the original repo's runs).
    The caption column (default "text") is optional unless `need_captions` (text runs): without it the
    source has no captions.

    An InputError starting with "run '<name>' has no images to show" when the run names no dataset or
    its dataset cannot be opened with an image column; one naming the caption column when captions are
    needed and the dataset lacks it.
    """
    from dataclasses import replace

    from sae.data.datasets import load_pairs

    info = run.info.get("dataset") or {}
    source = dataset or info.get("name")
    prefix = f"run '{run.name}' has no images to show"
    if not source:
        why = "it has no run.json (the original repo's format)" if not run.info else "its run.json names no dataset"
        raise InputError(
            f"{prefix}: {why}; pass --dataset (a dataset name or folder; the original repo used --dataset coco)"
        )
    if not image_column:
        # a run.json dataset without an image column has no images; a --dataset override defaults to "image"
        image_column = info.get("image_column") if info else "image"
    if not image_column:
        raise InputError(f"{prefix}: its dataset '{source}' has no image column; pass --image_column if it has one")
    caption_column = text_column or info.get("text_column") or "text"
    ids = run.row_ids
    if ids is None:  # the original repo recorded dataset rows 0..N-1 in order (shuffle=False)
        n = run.info.get("n_rows", n_rows)
        ids = None if n is None else list(range(int(n)))
    try:  # captions are optional here: their column is checked below
        pairs = load_pairs(
            source, split or info.get("split") or "train", image_column, None, row_ids=ids, data_root=data_root
        )
    except InputError as e:
        raise InputError(f"{prefix}: {e}") from None
    columns = list(pairs.dataset.column_names)
    if caption_column in columns:
        return RowSource(replace(pairs, text_column=caption_column), run.name)
    if need_captions or text_column:
        raise InputError(
            f"run '{run.name}' has no captions to show: its dataset '{source}' has no caption column "
            f"'{caption_column}' (columns: {', '.join(columns)}); pass --text_column"
        )
    return RowSource(pairs, run.name)


# ------------------------------------------------------------------------------------------------
# Grids and file names


MASS_BIAS = 400  # added to the decimal exponent (-324..308 for float64) to keep it 3 digits and >= 0


def mass_key(mass: float) -> str:
    """Fixed-width text (13 characters) that sorts as text like `mass` sorts as a number, any finite mass.

    mass = m * 10**e with 1 <= m < 10 (7 significant digits), E = e + 400:
        mass > 0:  'p' + E (3 digits) + '_' + m            654.171  -> 'p402_6.541710'
        mass = 0:  'o000_0.000000'
        mass < 0:  'n' + (999 - E) + '_' + m with each digit d replaced by 9 - d
                                                           -654.171 -> 'n597_3.458289'
    'n' < 'o' < 'p' and every field has a fixed width, so byte order and `ls`'s locale order agree.
    """
    if not math.isfinite(mass):
        raise ValueError(f"mass must be finite, not {mass}")
    if mass == 0:
        return "o000_0.000000"
    digits, exp = f"{abs(mass):.6e}".split("e")
    e = int(exp) + MASS_BIAS
    if mass > 0:
        return f"p{e:03d}_{digits}"
    return f"n{999 - e:03d}_" + "".join(str(9 - int(c)) if c.isdigit() else c for c in digits)


def preview_stem(index: int, mass: float) -> str:
    """'mass{mass_key(mass)}_feat{index:05d}': `ls` sorts by activation mass, the index stays visible."""
    return f"mass{mass_key(mass)}_feat{index:05d}"


# every grid / caption file this tool writes (also the older 'mass{S:013.3f}' names), and its pages
_PREVIEW_FILE = re.compile(r"mass(?:[nop]\d{3}_\d\.\d{6}|-?\d+\.\d{3})_feat(\d{5,})\.(?:jpg|txt)")
_PAGE_FILE = re.compile(r"f(\d{5,})\.html")


def written_files(out: Path) -> list[Path]:
    """The grids, caption files and feature pages show.py wrote in the preview folder `out` (by name)."""
    files = [p for p in out.glob("mass*_feat*.*") if _PREVIEW_FILE.fullmatch(p.name) and p.is_file()]
    files += [p for p in (out / "features").glob("f*.html") if _PAGE_FILE.fullmatch(p.name) and p.is_file()]
    return sorted(files)


def remove_stale(out: Path, keep: set[str]) -> list[str]:
    """Delete the files of `written_files(out)` whose path relative to `out` is not in `keep`; their names."""
    gone = []
    for path in written_files(out):
        rel = path.relative_to(out).as_posix()
        if rel not in keep:
            path.unlink(missing_ok=True)
            gone.append(rel)
    return gone


MIN_LABELLED = 48  # px: smaller tiles carry no activation label (it would hide the image)


def grid_shape(n: int, grid: int = GRID) -> tuple[int, int]:
    """(columns, rows) of a grid for n tiles: one row up to `grid` tiles, else ceil(sqrt(n)) columns (at most
    `grid`) and as many rows as needed: 3 -> 3x1, 4 -> 2x2, 5 -> 3x2, 9 -> 3x3."""
    cols = max(1, min(grid, n if n <= grid else math.ceil(math.sqrt(n))))
    return cols, max(1, min(grid, -(-n // cols)))


def make_grid(
    tiles: Sequence[Any | None], size: int = 100, grid: int = GRID, labels: Sequence[str] | None = None
) -> Any:
    """An RGB image on white, sized to the tiles it has (`grid_shape`: 3 tiles -> 3x1, 4 -> 2x2, 5 -> 3x2);
    tile t at row t // columns, column t % columns.

    Each tile is an image already fitting size x size (centred in its cell, with a thin grey border), or
    None for an unreadable image (a grey cell with a cross). `labels` (e.g. the activations) are written
    in the bottom-left corner of their tiles when tiles are at least MIN_LABELLED px.
    """
    from PIL import Image, ImageDraw, ImageFont

    tiles = list(tiles[: grid * grid])
    cols, rows = grid_shape(len(tiles), grid)
    canvas = Image.new("RGB", (cols * size, rows * size), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for t, tile in enumerate(tiles):
        x0, y0 = (t % cols) * size, (t // cols) * size
        if tile is None:
            draw.rectangle([x0, y0, x0 + size - 1, y0 + size - 1], fill=(200, 200, 200))
            draw.line([x0, y0, x0 + size - 1, y0 + size - 1], fill=(120, 120, 120), width=2)
            draw.line([x0, y0 + size - 1, x0 + size - 1, y0], fill=(120, 120, 120), width=2)
            box = (x0, y0, x0 + size - 1, y0 + size - 1)
        else:
            tx, ty = x0 + (size - tile.width) // 2, y0 + (size - tile.height) // 2
            canvas.paste(tile, (tx, ty))
            box = (tx, ty, tx + tile.width - 1, ty + tile.height - 1)
            draw.rectangle(box, outline=(150, 150, 150))
        if labels is not None and t < len(labels) and labels[t] and size >= MIN_LABELLED:
            l, top, r, b = draw.textbbox((0, 0), labels[t], font=font)
            w, h = r - l + 4, b - top + 4
            draw.rectangle([box[0] + 1, box[3] - h, box[0] + w, box[3] - 1], fill=(0, 0, 0))
            draw.text((box[0] + 3 - l, box[3] - h + 2 - top), labels[t], fill=(255, 255, 255), font=font)
    return canvas


def _save_jpeg(img: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="JPEG", quality=90)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ------------------------------------------------------------------------------------------------
# show.py


@dataclass
class ShowConfig:
    """The flags of show.py."""

    run: str | None = field(default=None, metadata={"help": "the run to show (a folder under --features_dir)"})
    features_dir: str = field(default="sae_features", metadata={"help": "folder holding the runs"})
    layer: int | None = field(default=None, metadata={"help": "layer to show (default: the run's deepest)"})
    out: str | None = field(default=None, metadata={"help": "preview folder (default: previews/<run>)"})
    min_support: int = field(default=16, metadata={"help": "show only features active on at least this many rows"})
    features: list[int] | None = field(
        default=None, metadata={"help": "show only these feature indices (min_support not applied)"}
    )
    size: int = field(default=100, metadata={"help": "tile size in pixels (the grid is 3 tiles square)"})
    html: bool = field(
        default=False,
        metadata={"help": "also write the static browser: index.html + features/f<index>.html (open from disk)"},
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "dataset of the rows (default: the one in run.json; needed for the original repo's runs)"},
    )
    split: str | None = field(default=None, metadata={"help": "dataset split (default: from run.json)"})
    image_column: str | None = field(default=None, metadata={"help": "image column (default: from run.json)"})
    text_column: str | None = field(default=None, metadata={"help": "caption column (default: from run.json)"})
    modality: str | None = field(
        default=None,
        metadata={
            "help": "image or text (default: from run.json; image for the original repo's runs)",
            "choices": ["image", "text"],
        },
    )
    data_root: str = field(default="data", metadata={"help": "where generated datasets (shapes) live"})
    workers: int = field(default=4, metadata={"help": "threads reading images and writing grids (0: none)"})
    progress: bool = field(default=True, metadata={"help": "progress bar on stderr"})


@dataclass
class FeaturePreview:
    """One shown feature: statistics, its top rows, and the files written for it."""

    index: int
    support: int
    freq: float
    mean: float  # mean activation over the rows where it fires
    max: float
    mass: float  # S_i
    positions: list[int]  # run row positions of the top rows, best first
    row_ids: list[int]  # their dataset row ids
    acts: list[float]
    captions: list[str | None] | None
    grid: str  # file name of the grid JPEG, relative to the preview folder
    captions_file: str | None
    hist: dict[str, Any]
    names: list[tuple[str, float]] | None = None  # concept names (word, cosine), best first (sae/analysis/naming.py)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ShowResult:
    out: Path
    manifest: dict[str, Any]
    previews: list[FeaturePreview]
    written: int
    skipped: int  # grids that already existed
    html: bool = False  # the browser pages are wanted (--html, or written before)
    run_dir: Path | None = None  # the run's folder (its comparisons/ feed the browser)
    removed: list[str] = field(default_factory=list)  # files of features no longer shown, deleted
    browser: Path | None = None  # index.html, when the browser was written

    def files(self) -> set[str]:
        """The grids and caption files of the shown features, relative to `out`."""
        return {p.grid for p in self.previews} | {p.captions_file for p in self.previews if p.captions_file}


FILE_NAMES = "mass{mass_key(S)}_feat{index:05d}.jpg (.txt: captions of text runs); see docs/show.md"


def _claim_folder(out: Path, manifest: dict[str, Any]) -> None:
    """Write show.json, or refuse a folder that already holds another run's or layer's previews.

    When the same run and layer was shown with another tile size or file naming, or its codes changed
    since (run recorded again), every grid, caption file and page is removed so that none is reused.
    """
    path = out / "show.json"
    if path.exists():
        try:
            old = read_json(path)
        except (OSError, ValueError):
            old = {}
        if (old.get("run"), old.get("layer")) != (manifest["run"], manifest["layer"]):
            raise InputError(
                f"{out} holds the previews of run '{old.get('run')}' layer {old.get('layer')}; "
                f"pass --out DIR for run '{manifest['run']}' layer {manifest['layer']}"
            )
        same = ("size", "codes", "file_names")
        if any(old.get(k) != manifest[k] for k in same):
            remove_stale(out, set())
    write_json(path, manifest)


def _fingerprint(codes: SparseCodes) -> str:
    """Changes when a layer is recorded again: shape, nnz and the sum of the values."""
    return f"{codes.n_rows}x{codes.d_sae}:{codes.nnz}:{float(np.sum(codes.values, dtype=np.float64)):.9g}"


def _load_names(run: FeatureRun, layer: int) -> dict[int, list[tuple[str, float]]]:
    """The run's concept names for `layer` (sae/analysis/naming.py), {} when it has none; a broken file is reported."""
    try:
        return load_names(names_path(run.path.parent, run.name, layer)) or {}
    except (InputError, OSError) as e:
        print(f"warning: concept names not shown: {e}", file=sys.stderr)
        return {}


@dataclass
class _Layer:
    """One layer of a run opened for showing: its codes, their columns, the rows and what to show."""

    run: FeatureRun
    layer: int
    codes: SparseCodes
    modality: str
    rows: RowSource
    cols: FeatureColumns
    chosen: list[int]
    names: dict[int, list[tuple[str, float]]]


def _open_layer(cfg: ShowConfig) -> _Layer:
    """Check the flags, open the run's layer and its dataset rows, and choose the features to show."""
    if not cfg.run:
        raise InputError("give --run (a run name under --features_dir)")
    if cfg.size < 8:
        raise InputError(f"--size must be at least 8 pixels, not {cfg.size}")
    if cfg.workers < 0:
        raise InputError(f"--workers must be >= 0, not {cfg.workers}")
    run = open_run(cfg.features_dir, cfg.run)
    layer = run.layers[-1] if cfg.layer is None else cfg.layer
    codes = run.load(layer)
    modality = cfg.modality or run.info.get("modality") or "image"
    if modality not in ("image", "text"):
        raise InputError(f"run '{run.name}' has modality '{modality}'; pass --modality image or text")
    rows = open_row_source(
        run,
        dataset=cfg.dataset,
        split=cfg.split,
        image_column=cfg.image_column,
        text_column=cfg.text_column,
        data_root=cfg.data_root,
        n_rows=codes.n_rows,
        need_captions=modality == "text",
    )
    if len(rows.row_ids) != codes.n_rows:
        raise InputError(
            f"run '{run.name}' layer {layer} has {codes.n_rows} rows but its dataset selection has "
            f"{len(rows.row_ids)}; check run.json row_ids / --dataset"
        )
    cols = FeatureColumns.from_codes(codes)
    chosen, dead = select_features(cols, cfg.min_support, cfg.features)
    for i in dead:
        print(f"feature {i} never fires in run '{run.name}' layer {layer}; skipped", file=sys.stderr)
    return _Layer(run, layer, codes, modality, rows, cols, chosen, _load_names(run, layer))


def _manifest(cfg: ShowConfig, shown: _Layer) -> dict[str, Any]:
    """show.json: what the preview folder holds."""
    run, codes = shown.run, shown.codes
    return {
        "format": SHOW_FORMAT,
        "run": run.name,
        "layer": shown.layer,
        "modality": shown.modality,
        "features_dir": str(Path(cfg.features_dir).resolve()),
        "n_rows": codes.n_rows,
        "d_sae": codes.d_sae,
        "codes": _fingerprint(codes),
        "size": cfg.size,
        "top": TOP,
        "dataset": run.info.get("dataset") or {"name": cfg.dataset},
        "file_names": FILE_NAMES,
        "captions": shown.rows.has_captions,
        "names": bool(shown.names),
    }


@dataclass
class _FeatureWriter:
    """Writes one feature's grid (and caption file) unless it exists; thread-safe (RowSource locks its cache)."""

    shown: _Layer
    out: Path
    size: int
    want_captions: bool

    def __post_init__(self) -> None:
        self.top_rows, self.top_vals = self.shown.cols.top(TOP)  # [d_sae, TOP] positions and activations
        if self.want_captions and self.shown.chosen:
            self.shown.rows.caption(0)  # materialise the captions once, before the worker threads start

    def __call__(self, i: int) -> tuple[FeaturePreview, bool]:
        """(feature i's preview, whether its grid was written now)."""
        cols, rows, out = self.shown.cols, self.shown.rows, self.out
        k = int(min(TOP, cols.support[i]))
        pos = self.top_rows[i, :k].tolist()
        acts = [float(v) for v in self.top_vals[i, :k]]
        captions = [rows.caption(n) for n in pos] if self.want_captions else None
        stem = preview_stem(i, float(cols.mass[i]))
        grid, txt = f"{stem}.jpg", (f"{stem}.txt" if self.shown.modality == "text" else None)
        if txt and captions is not None and not (out / txt).exists():
            lines = ["# rank\tactivation\trow_id\tcaption"]
            lines += [
                f"{r + 1}\t{a:.6g}\t{int(rows.row_ids[n])}\t{(c or '').replace(chr(10), ' ')}"
                for r, (n, a, c) in enumerate(zip(pos, acts, captions))
            ]
            _write_text(out / txt, "\n".join(lines) + "\n")
        done = (out / grid).exists()
        if not done:
            labels = [f"{a:.3g}" for a in acts]
            tiles = [rows.thumbnail(n, self.size) for n in pos]
            _save_jpeg(make_grid(tiles, self.size, labels=labels), out / grid)
        preview = FeaturePreview(
            index=i,
            support=int(cols.support[i]),
            freq=float(cols.freq[i]),
            mean=float(cols.mean_active[i]),
            max=float(cols.max[i]),
            mass=float(cols.mass[i]),
            positions=pos,
            row_ids=[int(rows.row_ids[n]) for n in pos],
            acts=acts,
            captions=captions,
            grid=grid,
            captions_file=txt if txt and (out / txt).exists() else None,
            hist=cols.histogram(i),
            names=self.shown.names.get(i),
        )
        return preview, not done


def _write_all(write: _FeatureWriter, chosen: list[int], workers: int, bar: Any) -> tuple[list[FeaturePreview], int]:
    """Run `write` over the chosen features, in index order; (previews, grids written)."""
    previews, written = [], 0
    if workers > 0:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:  # image decoding and JPEG encoding release the GIL
            done = pool.map(write, chosen)
    else:
        done = map(write, chosen)
    for preview, wrote in done:
        previews.append(preview)
        written += wrote
        bar.update()
    return previews, written


def write_previews(cfg: ShowConfig) -> ShowResult:
    """Write the grids, caption files and features.json of one layer of a run (pages and stale files:
    sae/viz/show_run.py)."""
    from tqdm import tqdm

    shown = _open_layer(cfg)
    out = Path(cfg.out or Path("previews") / shown.run.name)
    out.mkdir(parents=True, exist_ok=True)
    html = cfg.html or (out / "index.html").exists()  # a browser written before is kept in step
    manifest = _manifest(cfg, shown)
    _claim_folder(out, manifest)
    want_captions = (shown.modality == "text" or html) and shown.rows.has_captions
    write = _FeatureWriter(shown, out, cfg.size, want_captions)
    desc = f"previews {shown.run.name} L{shown.layer}"
    with tqdm(total=len(shown.chosen), desc=desc, unit="feature", file=sys.stderr, disable=not cfg.progress) as bar:
        previews, written = _write_all(write, shown.chosen, cfg.workers, bar)
    write_json(out / "features.json", {**manifest, "features": [p.to_json() for p in previews]})
    return ShowResult(out, manifest, previews, written, len(previews) - written, html=html, run_dir=shown.run.path)
