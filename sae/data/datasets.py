"""Captioned image datasets as paired rows: row n of an image run and of a text run is the same pair.

Sources, all read through `datasets`:
- a Hugging Face dataset name (default COCO 2017 train with one caption per image,
  `wangherr/coco2017_train_image_caption`, as in the paper), aliases `coco` and `flowers`
  (`efekankavalci/flowers102-captions`); offline it must already be in the local datasets cache;
- a local folder in the imagefolder layout (images + `metadata.jsonl` with `file_name` and `text`),
  or a folder written by `Dataset.save_to_disk`;
- `shapes`, `shapes:N` or `shapes:N:SEED`: a generated dataset of coloured shapes whose captions name
  colour, shape, size and position (`make_shapes_dataset`), written under `--data_root` in the
  imagefolder layout and loaded through the same code.

Rows are the dataset indices `row_ids` (the first `--max_samples` rows, or the rows a previous run
kept, `--row_ids_from`). Images are decoded lazily, one row at a time; an unreadable image is never
replaced: it is an InputError naming the row, unless `--skip_bad`, in which case the extraction drops
the row and records the kept row ids in its metadata so that the other modality can drop it too.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sae.util.atomic import atomic_path, write_json
from sae.util.errors import InputError

COCO = "wangherr/coco2017_train_image_caption"
FLOWERS = "efekankavalci/flowers102-captions"
ALIASES = {"coco": COCO, "flowers": FLOWERS, "flowers102": FLOWERS}
SHAPES_DEFAULT_ROWS = 1000


def _help(text: str, **extra: Any) -> Any:
    return {"help": text, **extra}


@dataclass
class DataConfig:
    """The dataset flags shared by train_image.py and train_text.py."""

    dataset: str = field(
        default=COCO,
        metadata=_help(
            "Hugging Face dataset name (aliases: coco, flowers), a local folder (imagefolder layout: images + "
            "metadata.jsonl with file_name and text), or shapes[:N[:SEED]] for the generated shapes dataset"
        ),
    )
    split: str = field(default="train", metadata=_help("dataset split"))
    image_column: str = field(default="image", metadata=_help("column holding the images"))
    text_column: str = field(default="text", metadata=_help("column holding the captions"))
    max_samples: int | None = field(default=None, metadata=_help("use only the first N rows"))
    skip_bad: bool = field(
        default=False,
        metadata=_help(
            "drop rows whose image cannot be read (their ids are left out of the run's row_ids) instead of stopping"
        ),
    )
    row_ids_from: str | None = field(
        default=None,
        metadata=_help(
            "use exactly the rows of an earlier run or activation cache (its meta.json / run.json, or a "
            "directory holding one): a text run then drops the rows its image run dropped"
        ),
    )
    data_root: str = field(default="data", metadata=_help("where generated datasets (shapes) are written"))


class BadRow:
    """An item that could not be read: `position` in the run, dataset `row_id`, and why."""

    def __init__(self, position: int, row_id: int, reason: str):
        self.position, self.row_id, self.reason = position, row_id, reason

    def __repr__(self) -> str:
        return f"BadRow(row {self.row_id}: {self.reason})"


@dataclass
class Pairs:
    """Rows `row_ids` (int64 [N] dataset indices) of a captioned image dataset.

    `image(n)` / `text(n)` read the n-th row of the run (dataset row `row_ids[n]`).
    """

    source: str  # dataset name or absolute folder path
    split: str
    image_column: str
    text_column: str | None  # None: rows without captions (images only)
    row_ids: np.ndarray
    dataset: Any  # datasets.Dataset (the whole split)
    fingerprint: str
    max_samples: int | None = None
    _texts: list[str | None] | None = field(default=None, repr=False)
    _raw_images: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.row_ids)

    def texts(self) -> list[str | None]:
        """All captions in row order (None is kept as None: a bad row)."""
        if self._texts is None:
            col = self.dataset.select_columns([self.text_column]).select(self.row_ids.tolist())
            self._texts = [t if t is None or isinstance(t, str) else str(t) for t in col[self.text_column]]
        return self._texts

    def text(self, n: int) -> str:
        t = self.texts()[n]
        if t is None:
            raise InputError(f"row {int(self.row_ids[n])}: the caption is missing (column '{self.text_column}')")
        return t

    def image(self, n: int) -> Any:
        """The n-th image as an RGB PIL image; InputError naming the dataset row if it cannot be read."""
        item = self.read(n, "image")
        if isinstance(item, BadRow):
            raise InputError(
                f"row {item.row_id}: unreadable image ({item.reason}); fix or remove it, or pass "
                f"--skip_bad to drop such rows"
            )
        return item

    def read(self, n: int, modality: str) -> Any:
        """The n-th image (RGB PIL) or caption, or a BadRow when it cannot be read."""
        row_id = int(self.row_ids[n])
        if modality == "text":
            t = self.texts()[n]
            return BadRow(n, row_id, f"missing caption in column '{self.text_column}'") if t is None else t
        return _decode_image(self._image_source()[row_id][self.image_column], n, row_id)

    def _image_source(self) -> Any:
        if self._raw_images is None:
            import datasets

            ds = self.dataset.select_columns([self.image_column])
            if isinstance(ds.features[self.image_column], datasets.Image):
                ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
            self._raw_images = ds
        return self._raw_images

    def torch_dataset(self, modality: str, start: int = 0) -> RowDataset:
        """A torch Dataset over rows start..N-1 yielding (n, image | caption | BadRow)."""
        return RowDataset(self, modality, start)

    def identity(self, modality: str) -> dict[str, Any]:
        """What one modality's rows depend on (cache keys)."""
        return {
            "source": self.source,
            "split": self.split,
            "fingerprint": self.fingerprint,
            "column": self.image_column if modality == "image" else self.text_column,
            "n_rows": len(self.row_ids),
            "max_samples": self.max_samples,
            "row_ids_sha": hashlib.sha256(np.ascontiguousarray(self.row_ids, dtype=np.int64).data).hexdigest()[:16],
        }

    def describe(self) -> dict[str, Any]:
        """The dataset fields a run's metadata records."""
        return {
            "name": self.source,
            "split": self.split,
            "image_column": self.image_column,
            "text_column": self.text_column,
            "max_samples": self.max_samples,
            "fingerprint": self.fingerprint,
        }


class RowDataset:
    """torch-style Dataset of (position, item) for rows start..N-1 of a Pairs (decodes in workers)."""

    def __init__(self, pairs: Pairs, modality: str, start: int = 0):
        self.pairs, self.modality, self.start = pairs, modality, start
        if modality == "text":
            pairs.texts()  # materialise the captions once, before workers fork

    def __len__(self) -> int:
        return len(self.pairs) - self.start

    def __getitem__(self, i: int) -> tuple[int, Any]:
        n = self.start + i
        return n, self.pairs.read(n, self.modality)


def _decode_image(value: Any, n: int, row_id: int) -> Any:
    """{'bytes','path'} / path / PIL image -> RGB PIL image fully loaded, or BadRow."""
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict) and value.get("bytes"):
            img = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            img = Image.open(value["path"])
        elif isinstance(value, str):
            img = Image.open(value)
        else:
            return BadRow(n, row_id, f"no image data ({type(value).__name__})")
        img.load()
        return img.convert("RGB") if img.mode != "RGB" else img
    except Exception as e:  # any decoder failure: the row is unreadable
        return BadRow(n, row_id, f"{type(e).__name__}: {str(e)[:120]}")


# -------------------------------------------------------------------------------------------- loading


def _dir_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            h.update(f"{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:160]}"


def _load_split(source: str, split: str) -> tuple[Any, str, str]:
    """(datasets.Dataset, resolved source, fingerprint)."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir():
            path = path.resolve()
            if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise InputError(f"{path} has no split '{split}' (splits: {', '.join(map(str, ds))})")
                    ds = ds[split]
            else:
                ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
            return ds, str(path), _dir_fingerprint(path)
        ds = datasets.load_dataset(source, split=split)
        return ds, source, str(getattr(ds, "_fingerprint", ""))
    except InputError:
        raise
    except Exception as e:
        where = "folder" if path.is_dir() else "dataset"
        hint = (
            ""
            if path.is_dir()
            else (
                "; without network it must be in the local datasets cache (HF_DATASETS_OFFLINE=1): download it "
                "once, or give a local folder (images + metadata.jsonl)"
            )
        )
        raise InputError(f"cannot load {where} '{source}' split '{split}' ({_one_line(e)}){hint}") from e


def load_pairs(
    dataset: str = COCO,
    split: str = "train",
    image_column: str = "image",
    text_column: str | None = "text",
    max_samples: int | None = None,
    row_ids: np.ndarray | list[int] | None = None,
    data_root: str | Path = "data",
) -> Pairs:
    """Open a captioned image dataset (see the module docstring for `dataset`) as paired rows.

    row_ids: exactly these dataset rows, in this order (e.g. the rows an image run kept); else the
    first `max_samples` rows (all when None). text_column None: images only, no caption column needed.
    """
    source = ALIASES.get(dataset, dataset)
    if source == "shapes" or source.startswith("shapes:"):
        source = str(shapes_dataset(source, data_root))
    ds, resolved, fingerprint = _load_split(source, split)
    for col in (image_column, text_column):
        if col is not None and col not in ds.column_names:
            raise InputError(
                f"dataset '{dataset}' has no column '{col}' (columns: {', '.join(ds.column_names)}); "
                f"use --image_column / --text_column"
            )
    if max_samples is not None and max_samples <= 0:
        raise InputError(f"--max_samples must be positive, got {max_samples}")
    if row_ids is not None:
        ids = np.asarray(row_ids, dtype=np.int64)
        if max_samples is not None:
            ids = ids[:max_samples]
        if len(ids) and (ids.min() < 0 or ids.max() >= len(ds)):
            raise InputError(f"row ids out of range for '{dataset}' split '{split}' ({len(ds)} rows)")
    else:
        ids = np.arange(min(len(ds), max_samples or len(ds)), dtype=np.int64)
    if len(ids) == 0:
        raise InputError(f"dataset '{dataset}' split '{split}' selects no rows")
    return Pairs(resolved, split, image_column, text_column, ids, ds, fingerprint, max_samples)


def read_row_ids(path: str | Path) -> np.ndarray:
    """The row ids recorded by an earlier run: a meta.json/run.json (key 'row_ids', or a 'row_ids.npy'
    beside it), a directory holding one, or a .npy file."""
    p = Path(path)
    if p.is_dir():
        for name in ("meta.json", "run.json"):
            if (p / name).exists():
                p = p / name
                break
        else:
            if (p / "row_ids.npy").exists():
                p = p / "row_ids.npy"
            else:
                raise InputError(f"--row_ids_from {path}: no meta.json, run.json or row_ids.npy in that directory")
    if not p.exists():
        raise InputError(f"--row_ids_from {path}: no such file")
    try:
        if p.suffix == ".npy":
            return np.load(p).astype(np.int64)
        info = json.loads(p.read_text())
        if "row_ids" in info:
            return np.asarray(info["row_ids"], dtype=np.int64)
        if (p.parent / "row_ids.npy").exists():
            return np.load(p.parent / "row_ids.npy").astype(np.int64)
    except (ValueError, OSError) as e:
        raise InputError(f"--row_ids_from {path}: cannot read row ids ({_one_line(e)})") from e
    raise InputError(f"--row_ids_from {path}: it records no row_ids")


def pairs_from_config(cfg: DataConfig) -> Pairs:
    """load_pairs from the flags of DataConfig (--row_ids_from read here)."""
    ids = read_row_ids(cfg.row_ids_from) if cfg.row_ids_from else None
    return load_pairs(cfg.dataset, cfg.split, cfg.image_column, cfg.text_column, cfg.max_samples, ids, cfg.data_root)


# ------------------------------------------------------------------------------- generated shapes data

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SIZES = {"small": 0.14, "large": 0.26}  # radius as a fraction of the image side
POSITIONS = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
SHAPES_VERSION = 1


def shape_row(rng: np.random.Generator, size: int = 64) -> tuple[Any, dict[str, str]]:
    """One image (RGB PIL, size x size) and its attributes + caption."""
    from PIL import Image, ImageDraw

    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    scale = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    r = SIZES[scale] * size
    cx, cy = (np.array(POSITIONS[position]) * size + rng.uniform(-0.03, 0.03, 2) * size).tolist()
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    where = "in the center" if position == "center" else f"in the {position}"
    caption = f"a {scale} {colour} {shape} {where}"
    return img, {"text": caption, "shape": shape, "colour": colour, "size": scale, "position": position}


def make_shapes_dataset(directory: str | Path, n: int = 200, seed: int = 0, size: int = 64) -> Path:
    """Write n captioned shape images (deterministic in seed) in the imagefolder layout, atomically:
    `{i:06d}.png` + `metadata.jsonl` ({file_name, text, shape, colour, size, position}) + `shapes.json`.
    An existing folder made with the same parameters is kept as is."""
    directory = Path(directory)
    params = {"n": n, "seed": seed, "size": size, "version": SHAPES_VERSION}
    if (directory / "shapes.json").exists() and json.loads((directory / "shapes.json").read_text()) == params:
        return directory
    if n <= 0:
        raise InputError(f"the shapes dataset needs at least one row, got {n}")
    rng = np.random.default_rng(seed)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        lines = []
        for i in range(n):
            img, meta = shape_row(rng, size)
            name = f"{i:06d}.png"
            img.save(tmp / name, compress_level=1)
            lines.append(json.dumps({"file_name": name, **meta}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        write_json(tmp / "shapes.json", params)
    return directory


def shapes_dataset(spec: str = "shapes", data_root: str | Path = "data") -> Path:
    """'shapes', 'shapes:N' or 'shapes:N:SEED' -> the generated folder under data_root."""
    parts = spec.split(":")
    try:
        n = int(parts[1]) if len(parts) > 1 and parts[1] else SHAPES_DEFAULT_ROWS
        seed = int(parts[2]) if len(parts) > 2 else 0
    except ValueError:
        raise InputError(f"--dataset {spec}: expected shapes, shapes:N or shapes:N:SEED") from None
    if len(parts) > 3:
        raise InputError(f"--dataset {spec}: expected shapes, shapes:N or shapes:N:SEED")
    return make_shapes_dataset(Path(data_root) / f"shapes-{n}-seed{seed}", n, seed)
