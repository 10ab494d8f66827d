"""Final projected embeddings of both towers of a vision-language model, for joint SAEs and names.

`embed_pairs` runs the image tower on the images and the text tower on the captions of the same rows
(`adapter.embed(adapter.preprocess(items))`: open_clip encode_image / encode_text, SigLIP
get_image_features / get_text_features; float32 and not L2-normalised unless asked) and writes, into
one folder, atomically (the folder appears complete or not at all):

    image.npy    float32 [N, d]   row n: the image of pair n
    text.npy     float32 [N, d]   row n: its caption
    row_ids.npy  int64 [N]        dataset row of each pair
    meta.json    format, vlm, both models' identities, dataset, N, d, normalize, skipped rows, provenance

`embed_texts` embeds a word list with a text tower, cached as `<cache>/<key>.npy` keyed by the text
model's identity and a hash of the words (analyze.py names --vlm).

VLMS maps `--vlm` to the (image, text) families of sae.encoders.registry: clip -> ClipVision + ClipText
(OpenAI CLIP, DFN and any open_clip model via --clip_model_name), siglip2 -> SigLIP2Vision + SiglipText.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm.auto import tqdm

from sae.data.datasets import BadRow, Pairs
from sae.util.atomic import atomic_path, read_json, write_json
from sae.util.disk import open_memmap
from sae.util.errors import InputError
from sae.util.readers import read_npy

FORMAT = "share-concepts-embeddings-v1"
VLMS = {
    "clip": ("ClipVision", "ClipText", "clip_model_name"),
    "siglip2": ("SigLIP2Vision", "SiglipText", "siglip2_model_name"),
}
FILES = ("image.npy", "text.npy", "row_ids.npy", "meta.json")


# ------------------------------------------------------------------------------------------------
# Which model


def add_vlm_args(parser: argparse.ArgumentParser, default: str | None = "clip") -> None:
    """--vlm, --clip_model_name, --siglip2_model_name and --clip_pretrained (defaults as in
    registry.add_model_args)."""
    from sae.encoders import registry

    group = parser.add_argument_group("vision-language model")
    group.add_argument(
        "--vlm",
        default=default,
        choices=tuple(VLMS),
        help="clip: the open_clip towers of --clip_model_name (OpenAI CLIP, DFN, ...); siglip2: the "
        "transformers towers of --siglip2_model_name" + (f" (default: {default})" if default else ""),
    )
    for flag in ("clip_model_name", "siglip2_model_name"):
        name, help_text = registry.NAME_FLAGS[flag]
        group.add_argument(f"--{flag}", default=name, help=f"{help_text} (default: {name})")
    group.add_argument(
        "--clip_pretrained",
        default="openai",
        help="open_clip weights tag for builtin names (default: openai; ignored for hf-hub: names "
        "and local directories)",
    )


def vlm_specs(
    vlm: str,
    clip_model_name: str | None = None,
    siglip2_model_name: str | None = None,
    clip_pretrained: str | None = "openai",
) -> tuple[Any, Any]:
    """(image ModelSpec, text ModelSpec) of a --vlm choice."""
    from sae.encoders import registry

    if vlm not in VLMS:
        raise InputError(f"--vlm must be one of {', '.join(VLMS)} (got {vlm!r})")
    image_model, text_model, flag = VLMS[vlm]
    name = clip_model_name if flag == "clip_model_name" else siglip2_model_name
    return (
        registry.ModelSpec(image_model, name, clip_pretrained),
        registry.ModelSpec(text_model, name, clip_pretrained),
    )


def specs_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    return vlm_specs(args.vlm, args.clip_model_name, args.siglip2_model_name, args.clip_pretrained)


def _check_embed(adapter: Any) -> None:
    if not callable(getattr(adapter, "embed", None)) or getattr(adapter, "d_embed", None) is None:
        raise InputError(
            f"{adapter.model} '{adapter.name}' gives no final projected embedding (a SigLIP vision "
            "tower without its head, or an adapter without Adapter.embed)"
        )


def _embed(adapter: Any, batch: dict[str, Any]) -> np.ndarray:
    """adapter.embed on a preprocessed batch (it moves the batch to its device) -> float32 [B, d] on the CPU."""
    return adapter.embed(batch).detach().float().cpu().numpy()


# ------------------------------------------------------------------------------------------------
# Paired embeddings of a dataset


class _PairRows:
    """torch-style Dataset of (position, image | BadRow, caption | BadRow) over all rows of a Pairs."""

    def __init__(self, pairs: Pairs):
        self.pairs = pairs
        pairs.texts()  # materialise the captions once, before workers fork

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, n: int) -> tuple[int, Any, Any]:
        return n, self.pairs.read(n, "image"), self.pairs.read(n, "text")


class _Collate:
    """Drops rows with an unreadable image or caption; preprocesses the rest with both towers."""

    def __init__(self, image_preprocess: Any, text_preprocess: Any):
        self.image_preprocess, self.text_preprocess = image_preprocess, text_preprocess

    def __call__(self, items: list[tuple[int, Any, Any]]) -> tuple[list[int], list[BadRow], Any, Any]:
        good = [(n, i, t) for n, i, t in items if not isinstance(i, BadRow) and not isinstance(t, BadRow)]
        bad = [i if isinstance(i, BadRow) else t for _, i, t in items if isinstance(i, BadRow) or isinstance(t, BadRow)]
        if not good:
            return [], bad, None, None
        return (
            [n for n, _, _ in good],
            bad,
            self.image_preprocess([i for _, i, _ in good]),
            self.text_preprocess([t for _, _, t in good]),
        )


@dataclass
class Embeddings:
    """A folder written by `embed_pairs`: image / text [N, d] (memory-mapped), row_ids [N], meta."""

    path: Path
    image: np.ndarray
    text: np.ndarray
    row_ids: np.ndarray
    meta: dict[str, Any]


def open_embeddings(path: str | Path) -> Embeddings:
    """Open a folder written by `embed_pairs` (`--embeddings DIR`); InputError if it is not one."""
    path = Path(path)
    missing = [f for f in FILES if not (path / f).exists()]
    if missing:
        raise InputError(f"{path} is not an embeddings folder of `analyze.py embed` (missing {', '.join(missing)})")
    meta = read_json(path / "meta.json")
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}/meta.json: format {meta.get('format')!r}, expected {FORMAT}")
    img, txt = read_npy(path / "image.npy"), read_npy(path / "text.npy")
    ids = read_npy(path / "row_ids.npy", mmap=False)
    if img.ndim != 2 or img.dtype.kind != "f" or txt.dtype.kind != "f" or ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise InputError(
            f"{path}: image.npy {img.dtype}{list(img.shape)}, text.npy {txt.dtype}{list(txt.shape)} and row_ids.npy "
            f"{ids.dtype}{list(ids.shape)} are not float [N, d], float [N, d] and int [N]"
        )
    if img.shape != txt.shape or img.shape[0] != len(ids):
        raise InputError(f"{path}: image {img.shape}, text {txt.shape} and {len(ids)} row ids do not agree")
    return Embeddings(path, img, txt, ids, meta)


def embed_pairs(
    image_adapter: Any,
    text_adapter: Any,
    pairs: Pairs,
    out: str | Path,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    skip_bad: bool = False,
    normalize: bool = False,
    vlm: str | None = None,
    identity: dict[str, Any] | None = None,
    progress: bool = True,
) -> Embeddings:
    """Embed every (image, caption) row of `pairs` with both towers and write the folder `out`
    (module docstring). Rows with an unreadable image or caption stop the run (InputError), or with
    `skip_bad` are dropped from both files and listed in meta.json."""
    from torch.utils.data import DataLoader, Dataset

    from sae.util.provenance import provenance

    for adapter in (image_adapter, text_adapter):
        _check_embed(adapter)
    n, d = len(pairs), int(image_adapter.d_embed)
    if int(text_adapter.d_embed) != d:
        raise InputError(f"the image tower embeds into {d} dimensions, the text tower into {text_adapter.d_embed}")
    if n == 0:
        raise InputError("the dataset has no rows")
    if batch_size < 1:
        raise InputError(f"--batch_size must be at least 1 (got {batch_size})")
    if num_workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(
        cast(Dataset, _PairRows(pairs)),  # a map-style dataset (__len__, __getitem__)
        batch_size=batch_size,
        shuffle=False,
        num_workers=max(0, num_workers),
        collate_fn=_Collate(image_adapter.preprocess, text_adapter.preprocess),
        prefetch_factor=4 if num_workers > 0 else None,
    )
    out = Path(out)
    kept: list[int] = []
    skipped: list[dict[str, Any]] = []
    with atomic_path(out) as tmp:
        tmp.mkdir()
        img = open_memmap(tmp / "image.npy", mode="w+", dtype=np.float32, shape=(n, d))
        txt = open_memmap(tmp / "text.npy", mode="w+", dtype=np.float32, shape=(n, d))
        with tqdm(
            total=n,
            desc=f"embedding pairs ({image_adapter.model} + {text_adapter.model})",
            unit="pair",
            disable=not progress,
        ) as bar:
            for positions, bad, img_batch, txt_batch in loader:
                for b in bad:
                    if not skip_bad:
                        raise InputError(
                            f"row {b.row_id}: {b.reason}; fix or remove it, or pass --skip_bad to drop such rows"
                        )
                    skipped.append({"row_id": b.row_id, "reason": b.reason})
                    tqdm.write(f"skipping row {b.row_id}: {b.reason}")
                bar.update(len(positions) + len(bad))
                if not positions:
                    continue
                ei, et = _embed(image_adapter, img_batch), _embed(text_adapter, txt_batch)
                for name, e in (("image", ei), ("text", et)):
                    if e.shape != (len(positions), d):
                        raise InputError(f"the {name} tower returned shape {e.shape} for {len(positions)} rows")
                    if not np.isfinite(e).all():
                        raise InputError(
                            f"the {name} tower returned NaN or inf near row {int(pairs.row_ids[positions[0]])}"
                        )
                if normalize:
                    ei = ei / np.maximum(np.linalg.norm(ei, axis=1, keepdims=True), 1e-12)
                    et = et / np.maximum(np.linalg.norm(et, axis=1, keepdims=True), 1e-12)
                s = len(kept)
                img[s : s + len(positions)], txt[s : s + len(positions)] = ei, et
                kept.extend(positions)
        if not kept:
            raise InputError("every row was unreadable: nothing to embed")
        img.flush()
        txt.flush()
        del img, txt
        if len(kept) < n:  # rows were skipped: rewrite both files with the kept rows only
            for name in ("image.npy", "text.npy"):
                full = np.load(tmp / name, mmap_mode="r")
                np.save(tmp / f"kept_{name}", np.ascontiguousarray(full[: len(kept)]))
                del full
                os.replace(tmp / f"kept_{name}", tmp / name)
        row_ids = np.asarray(pairs.row_ids, dtype=np.int64)[np.asarray(kept, dtype=np.int64)]
        np.save(tmp / "row_ids.npy", row_ids)
        meta = {
            "format": FORMAT,
            "vlm": vlm,
            "image_model": image_adapter.model,
            "text_model": text_adapter.model,
            "identity": identity or {},
            "dataset": pairs.describe(),
            "n_rows": len(kept),
            "d": d,
            "normalize": normalize,
            "skipped": skipped,
            "rows": "row n of image.npy and of text.npy is the pair of dataset row row_ids[n]",
            "provenance": provenance(),
        }
        write_json(tmp / "meta.json", meta)
    return open_embeddings(out)


def embedding_identity(image_spec: Any, text_spec: Any, pairs: Pairs, normalize: bool, skip_bad: bool) -> dict:
    """What an embeddings folder depends on: a second `embed` with the same identity reuses it."""
    return {
        "image": image_spec.identity(),
        "text": text_spec.identity(),
        "data": pairs.identity("image"),
        "text_column": pairs.text_column,
        "normalize": normalize,
        "skip_bad": skip_bad,
    }


def existing(out: str | Path, identity: dict[str, Any], overwrite: bool) -> Embeddings | None:
    """The folder `out` when it holds embeddings of the same identity; None when it is free (or
    `overwrite`, which deletes it when it holds embeddings); InputError when it holds something else."""
    out = Path(out)
    if not out.exists():
        return None
    if (out / "meta.json").exists():
        emb = open_embeddings(out)
        if json.dumps(emb.meta.get("identity"), sort_keys=True) == json.dumps(identity, sort_keys=True, default=str):
            return emb
    if not (out / "meta.json").is_file() or out.is_symlink():
        raise InputError(f"{out} exists and does not hold embeddings of this toolkit; choose another --out")
    if not overwrite:
        raise InputError(
            f"{out} holds other embeddings; choose another --out (--overwrite would delete them and embed again)"
        )
    shutil.rmtree(out)
    return None


# ------------------------------------------------------------------------------------------------
# A word list through a text tower (cached)


def words_sha(words: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(words).encode()).hexdigest()


def embed_texts(
    text_spec: Any,
    words: Sequence[str],
    cache_dir: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 256,
    progress: bool = True,
) -> tuple[np.ndarray, Path, bool]:
    """The embeddings [V, d] of `words` by the text tower of `text_spec`, from
    `<cache_dir>/<key>.npy` when present (key: sha256 of the model's identity and the words), else
    computed and written there (with `<key>.json`: model, number of words, words hash).
    Returns (embeddings, cache file, whether it was read from the cache)."""
    from sae.analysis.naming import embed_vocab

    ident = {"text_model": text_spec.identity(), "words_sha256": words_sha(words), "n_words": len(words)}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{key}.npy"
    if path.exists() and (path.with_suffix(".json")).exists():
        with contextlib.suppress(InputError):  # a damaged cache file is computed again
            V = read_npy(path, mmap=False)
            if V.ndim == 2 and V.shape[0] == len(words) and V.dtype.kind == "f" and np.isfinite(V).all():
                return V, path, True
    adapter = text_spec.load(device)
    _check_embed(adapter)
    V = embed_vocab(
        list(words), lambda texts: _embed(adapter, adapter.preprocess(texts)), batch=batch_size, progress=progress
    )
    if not np.isfinite(V).all():
        raise InputError(f"the text tower {text_spec.name} returned NaN or inf for the vocabulary")
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, V)
        write_json(path.with_suffix(".json"), {**ident, "words": "first: " + ", ".join(words[:5])})
    except OSError as e:
        raise InputError(f"cannot write the vocabulary cache {path}: {e}") from None
    return V, path, False
