"""Data-parallel extraction under torchrun: each rank extracts its share of the rows, rank 0 merges.

The rows are split across ranks by whole extraction batches (`--extract_batch_size`): rank r takes a
contiguous run of batches, so every batch holds exactly the rows it holds in a one-process run. Each rank
extracts its rows as an ordinary cache (resumable, locked, see sae/data/cache.py) under
`<cache_dir>/.<key>.parts/`; rank 0 then writes the one cache `<cache_dir>/<key>/` from them: row ids,
pooled vectors and token rows/positions concatenated, and the token shards cut where a one-process run
cuts them (after the batch that brings a layer's shard to its cap), so every array file equals the
one-process cache's bit for bit (meta.json too, but for its timing fields). The parts are then deleted.

Per rank: the model, one batch, and its share of the cache on disk; rank 0 needs the whole cache's disk
space once more while it merges (the parts are deleted after).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sae.data import cache as C
from sae.util import distributed
from sae.util.atomic import _fsync_dir, atomic_path, write_json


def extract_activations(
    spec: Any,
    pairs: Any,
    layers: Sequence[int],
    cfg: C.CacheConfig | None = None,
    *,
    token: str = "pooled",
    skip_bad: bool = False,
    device: str = "auto",
    shard_tokens: int | None = None,
    progress: bool = True,
) -> C.ActivationCache:
    """`sae.data.cache.extract_activations`, split over the ranks under torchrun (every rank calls it with the
    same arguments and gets the merged cache); one process: that function itself."""
    cfg = cfg or C.CacheConfig()
    if distributed.world_size() == 1:
        return C.extract_activations(
            spec,
            pairs,
            layers,
            cfg,
            token=token,
            skip_bad=skip_bad,
            device=device,
            shard_tokens=shard_tokens,
            progress=progress,
        )
    layers = spec.info().resolve_layers(layers)
    material = C.cache_material(spec, pairs, layers, cfg.cache_dtype, token, skip_bad)
    found = C.find_cache(cfg.cache_dir, material)
    if found is not None:
        return found
    root = Path(cfg.cache_dir)
    key = C.cache_key(material)
    B = cfg.extract_batch_size
    n_batches = -(-len(pairs) // B)
    mine = distributed.share(n_batches)
    a, b = mine.start * B, min(mine.stop * B, len(pairs))
    parts_dir = root / f".{key}.parts"
    part_path = None
    if b > a:
        sub = dataclasses.replace(pairs, row_ids=pairs.row_ids[a:b], _texts=None, _raw_images=None)
        part = C.extract_activations(
            spec,
            sub,
            layers,
            dataclasses.replace(cfg, cache_dir=str(parts_dir)),
            token=token,
            skip_bad=skip_bad,
            device=distributed.local_device() if device in ("auto", "cuda") else device,
            shard_tokens=shard_tokens,
            progress=progress,
        )
        part_path = str(part.path)
    paths = distributed.all_gather_object((a, part_path))
    if distributed.is_main():
        with C._exclusive(root / f".{key}.lock"):
            if C.find_cache(root, material) is None:
                t0 = time.time()
                parts = [(start, C.open_cache(p)) for start, p in paths if p is not None]
                merge_parts(parts, pairs, material, root, key, cfg, shard_tokens, len(paths))
                if progress:
                    print(f"merged {len(parts)} ranks' caches into {root / key} in {time.time() - t0:.1f} s")
        shutil.rmtree(parts_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            (root / f".{key}.lock").unlink()
    distributed.barrier()
    return C.open_cache(root / key)


def _shard_cuts(
    parts: list[tuple[int, C.ActivationCache]], pairs: Any, groups: list[list[int]], caps: dict[int, int], B: int
) -> tuple[list[int], dict[int, list[int]]]:
    """Where a one-process run closes its shards: (rows per shard, {group index: tokens per shard})."""
    position = {int(r): n for n, r in enumerate(pairs.row_ids)}
    kept_pos = np.concatenate([[position[int(r)] for r in c.row_ids] for _, c in parts]).astype(np.int64)
    batch = kept_pos // B  # the one-process batch of each kept row
    per_row = []
    for group in groups:
        counts = [np.bincount(c.token_row(group[0]), minlength=c.n_rows) for _, c in parts]
        per_row.append(np.concatenate(counts))
    shard_rows: list[int] = []
    shard_tokens: dict[int, list[int]] = {g: [] for g in range(len(groups))}
    fill, rows_in, toks_in = dict.fromkeys(caps, 0), 0, [0] * len(groups)
    bounds = np.flatnonzero(np.diff(batch)) + 1
    for lo, hi in zip([0, *bounds], [*bounds, len(batch)]):
        rows_in += int(hi - lo)
        for g, group in enumerate(groups):
            t = int(per_row[g][lo:hi].sum())
            toks_in[g] += t
            for layer in group:
                fill[layer] += t
        if any(fill[layer] >= caps[layer] for layer in caps):
            shard_rows.append(rows_in)
            for g in range(len(groups)):
                shard_tokens[g].append(toks_in[g])
            fill, rows_in, toks_in = dict.fromkeys(caps, 0), 0, [0] * len(groups)
    if rows_in:
        shard_rows.append(rows_in)
        for g in range(len(groups)):
            shard_tokens[g].append(toks_in[g])
    return shard_rows, shard_tokens


def _write_resharded(sources: list[np.ndarray], sizes: list[int], folder: Path, dtype: np.dtype, width: int) -> None:
    """The concatenation of `sources` [n_i, width] cut into files tokens-SSSSS.npy of `sizes` rows, each
    written as the one-process writer does (its fixed-size header, then the raw values)."""
    it = iter(sources)
    cur, at = next(it, None), 0
    for s, size in enumerate(sizes):
        final = folder / f"tokens-{s:05d}.npy"
        header = C._npy_header(dtype, (size, width))
        with atomic_path(final) as tmp:
            pieces = []
            need = size
            while need:
                assert cur is not None
                take = min(need, len(cur) - at)
                pieces.append(cur[at : at + take])
                at += take
                need -= take
                if at == len(cur):
                    cur, at = next(it, None), 0
            if len(header) == C._HEADER:
                with open(tmp, "wb") as f:
                    f.write(header)
                    for p in pieces:
                        f.write(np.ascontiguousarray(p).tobytes())
            else:
                with open(tmp, "wb") as f:
                    np.save(f, np.concatenate(pieces) if pieces else np.zeros((0, width), dtype))


def merge_parts(
    parts: list[tuple[int, C.ActivationCache]],
    pairs: Any,
    material: dict[str, Any],
    root: Path,
    key: str,
    cfg: C.CacheConfig,
    shard_tokens: int | None,
    world: int,
) -> None:
    """Write `<root>/<key>/` from the ranks' caches (ordered by their first row), as one process would."""
    first = parts[0][1]
    layers = [int(x) for x in first.meta["layers"]]
    widths = {layer: first.d_of(layer) for layer in layers}
    dtype = C.DTYPES[first.dtype]
    caps = {
        layer: int(shard_tokens or max(1, (cfg.shard_mb << 20) // (widths[layer] * dtype.itemsize))) for layer in layers
    }
    groups = [list(map(int, lay["layers"])) for lay in first.meta["layouts"]]
    per_layer = first.meta["token_files"] == "per_layer"
    shard_rows, shard_sizes = _shard_cuts(parts, pairs, groups, caps, cfg.extract_batch_size)
    partial = root / f".{key}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    offsets = np.cumsum([0] + [c.n_rows for _, c in parts[:-1]])
    for g, group in enumerate(groups):
        for layer in group:
            folder = partial / C.layer_dir_name(layer)
            folder.mkdir()
            sources = [s for _, c in parts for s in c.token_shards(layer)]
            _write_resharded(sources, shard_sizes[g], folder, dtype, widths[layer])
            _save(folder / "pooled.npy", np.concatenate([np.asarray(c.pooled(layer)) for _, c in parts]))
        rows = np.concatenate([c.token_row(group[0]) + o for (_, c), o in zip(parts, offsets)]).astype(np.int32)
        pos = np.concatenate([c.token_pos(group[0]) for _, c in parts]).astype(np.int16)
        for target in [partial / C.layer_dir_name(layer) for layer in group] if per_layer else [partial]:
            _save(target / "token_row.npy", rows)
            _save(target / "token_pos.npy", pos)
    row_ids = np.concatenate([c.row_ids for _, c in parts]).astype(np.int64)
    _save(partial / "row_ids.npy", row_ids)
    meta = dict(first.meta)
    meta.update(
        key=key,
        base_key=C._base_key(material),
        material=material,
        n_rows=int(len(row_ids)),
        shard_rows=shard_rows,
        layouts=[
            {"layers": group, "n_tokens": int(sum(shard_sizes[g])), "shard_sizes": shard_sizes[g]}
            for g, group in enumerate(groups)
        ],
        dataset=pairs.describe(),
        bad_rows=[r for _, c in parts for r in c.meta["bad_rows"]],
        n_requested_rows=len(pairs),
        seconds_last_session=round(max(float(c.meta["seconds_last_session"]) for _, c in parts), 3),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    write_json(partial / "meta.json", meta)
    final = root / key
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(root)


def _save(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)
