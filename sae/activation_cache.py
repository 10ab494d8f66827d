"""On-disk activation cache: one pass of an encoder over a dataset, every requested layer at once.

Layout (format `actcache-v1`) of `<cache_dir>/<key>/`, the key hashing the model (name, weights tag,
local file stamps, preprocessing), the dataset (source, split, fingerprint, column, row ids,
max_samples, skip_bad), the layers, the storage dtype and the recorded token:

    meta.json                  written last: a directory without it is never read
    row_ids.npy      int64     [N]        dataset row of each run row (rows dropped by --skip_bad absent)
    token_row.npy    int32     [n_tok]    run row n (0..N-1) of each stored token
    token_pos.npy    int16     [n_tok]    position of each stored token in its sequence (0 = CLS/first)
    layer{L:02d}/
        tokens-{s:05d}.npy     [shard_rows, d]  all real (non-padding) tokens of all rows, in row order;
                                                every shard but the last holds exactly shard_tokens rows,
                                                the same tokens for every layer (row-aligned)
        pooled.npy             [N, d]           the recorded position of each row (--token)

Values are float16 / float32, or bfloat16 stored as its uint16 bit pattern (`to_tensor` turns any of
them into a float tensor). Layers are block indices counted from 0 (negatives resolved).

Writing and resuming: the extraction writes into `<cache_dir>/.<key>.partial/`. Each token shard is
filled through a memory map under a temporary name and renamed when full; then `progress.json`
(atomic) records the shards done and the row to restart from (a row may straddle two shards: the
tokens it already has in finished shards are skipped when it is recomputed). A killed run started
again with the same flags resumes from the last finished shard; at the end the files above are
written, meta.json last, and the directory is renamed to `<key>` in one step. An exclusive lock
keeps two processes from writing the same key. A later run with the same key, or with a subset of
the layers of a finished cache, reuses it without loading the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sae.atomic import _fsync_dir, atomic_path, read_json, write_json
from sae.cli import InputError
from sae.data import BadRow, Pairs

FORMAT = "actcache-v1"
DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32), "bfloat16": np.dtype(np.uint16)}


def _help(text: str, **extra: Any) -> Any:
    return {"help": text, **extra}


@dataclass
class CacheConfig:
    """Flags of the extraction stage."""

    cache_dir: str = field(default="activation_cache", metadata=_help("root of the activation caches"))
    cache_dtype: str = field(default="float16", metadata=_help(
        "storage dtype of activations (bfloat16 is stored as uint16 bits)", choices=tuple(DTYPES)))
    extract_batch_size: int = field(default=32, metadata=_help("rows per encoder forward"))
    num_workers: int = field(default=4, metadata=_help("DataLoader worker processes (decode + preprocess)"))
    shard_mb: int = field(default=256, metadata=_help("size of one token shard file, in MiB"))


# ------------------------------------------------------------------------------------------- reading


@dataclass
class ActivationCache:
    """A finished cache directory (see the module docstring); arrays are read-only memory maps."""

    path: Path
    meta: dict[str, Any]

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def d_model(self) -> int:
        return int(self.meta["d_model"])

    @property
    def dtype(self) -> str:
        return str(self.meta["dtype"])

    @property
    def n_rows(self) -> int:
        return int(self.meta["n_rows"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def row_ids(self) -> np.ndarray:
        """int64 [N]: the dataset row of each run row."""
        return np.load(self.path / "row_ids.npy")

    def _layer_dir(self, layer: int) -> Path:
        if layer not in self.meta["layers"]:
            raise InputError(f"layer {layer} is not in the activation cache {self.path} "
                             f"(layers: {', '.join(map(str, self.layers))})")
        return self.path / layer_dir_name(layer)

    def token_shards(self, layer: int) -> list[np.ndarray]:
        """[shard_rows, d] arrays of all real tokens, row-aligned across layers."""
        d = self._layer_dir(layer)
        return [np.load(d / f"tokens-{s:05d}.npy", mmap_mode="r") for s in range(len(self.meta["shard_sizes"]))]

    def pooled(self, layer: int) -> np.ndarray:
        """[N, d] vectors at the recorded position (meta['token'])."""
        return np.load(self._layer_dir(layer) / "pooled.npy", mmap_mode="r")

    def token_row(self) -> np.ndarray:
        """int32 [n_tokens]: run row of each stored token (index into row_ids)."""
        return np.load(self.path / "token_row.npy", mmap_mode="r")

    def token_pos(self) -> np.ndarray:
        """int16 [n_tokens]: sequence position of each stored token."""
        return np.load(self.path / "token_pos.npy", mmap_mode="r")

    def shard_slices(self) -> list[slice]:
        """Token ranges of the shards, e.g. token_row()[shard_slices()[s]] for shard s."""
        ends = np.cumsum([0] + list(self.meta["shard_sizes"]))
        return [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]

    def to_tensor(self, arr: np.ndarray) -> torch.Tensor:
        """A float32 tensor from any array of this cache (bfloat16 bits decoded)."""
        t = torch.from_numpy(np.array(arr, copy=True))  # memmaps are read-only
        if self.dtype == "bfloat16":
            t = t.view(torch.int16).view(torch.bfloat16)
        return t.float()


def layer_dir_name(layer: int) -> str:
    return f"layer{layer:02d}"


def open_cache(path: str | Path) -> ActivationCache:
    """Open a finished cache; InputError for anything else (an unfinished extraction included)."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise InputError(f"{path} is not a finished activation cache (no meta.json)")
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: unknown activation cache format {meta.get('format')!r} (expected {FORMAT})")
    return ActivationCache(path, meta)


# --------------------------------------------------------------------------------------------- keys


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def cache_material(spec: Any, pairs: Pairs, layers: Sequence[int], dtype: str, token: str,
                   skip_bad: bool) -> dict[str, Any]:
    """Everything the cached arrays depend on (layers already resolved)."""
    return {"format": FORMAT, "modality": spec.modality, "model": spec.identity(),
            "data": pairs.identity(spec.modality), "skip_bad": bool(skip_bad),
            "dtype": dtype, "token": token, "layers": sorted(int(x) for x in layers)}


def cache_key(material: dict[str, Any]) -> str:
    """'<Model>-<name>-<hash>' (readable prefix, 16 hex digits of the material's hash)."""
    model = material["model"]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(model["name"]).rstrip("/")).name)[-40:]
    return f"{model['model']}-{slug}-{_hash(material)[:16]}"


def _base_key(material: dict[str, Any]) -> str:
    return _hash({k: v for k, v in material.items() if k != "layers"})[:16]


def find_cache(cache_dir: str | Path, material: dict[str, Any]) -> ActivationCache | None:
    """The finished cache for `material`, or one with the same everything and a superset of layers."""
    root = Path(cache_dir)
    exact = root / cache_key(material)
    if (exact / "meta.json").exists():
        return open_cache(exact)
    if not root.is_dir():
        return None
    base, wanted = _base_key(material), set(material["layers"])
    for meta_path in sorted(root.glob("*/meta.json")):
        if meta_path.parent.name.startswith("."):  # an extraction still in progress
            continue
        with contextlib.suppress(OSError, ValueError):
            meta = read_json(meta_path)
            if meta.get("format") == FORMAT and meta.get("base_key") == base and wanted <= set(meta["layers"]):
                return open_cache(meta_path.parent)
    return None


# ------------------------------------------------------------------------------------------ writing


class _Collate:
    """DataLoader collate_fn: drops unreadable rows, preprocesses the rest (runs in the workers)."""

    def __init__(self, preprocess: Any):
        self.preprocess = preprocess

    def __call__(self, items: list[tuple[int, Any]]) -> tuple[list[int], list[BadRow], dict | None]:
        good = [(n, x) for n, x in items if not isinstance(x, BadRow)]
        bad = [x for _, x in items if isinstance(x, BadRow)]
        batch = self.preprocess([x for _, x in good]) if good else None
        return [n for n, _ in good], bad, batch


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        except OSError:
            raise InputError(f"another process is writing this activation cache ({lock_path.name}); "
                             f"wait for it or stop it") from None
        yield


def _to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return t.to(torch.float16 if dtype == "float16" else torch.float32).cpu().numpy()


class _Writer:
    """Token shards of all layers, filled through memory maps; the state lives in `progress.json`."""

    def __init__(self, root: Path, layers: list[int], d: int, dtype: str, shard_tokens: int, n_req: int,
                 progress: dict[str, Any]):
        self.root, self.layers, self.d, self.dtype = root, layers, d, dtype
        self.np_dtype = DTYPES[dtype]
        self.cap = shard_tokens
        self.shard = int(progress["shards_done"])
        self.tokens_total = int(progress["tokens_done"])
        self.fill = 0
        self.bufs: dict[int, np.ndarray] | None = None
        self.rows = np.empty(self.cap, dtype=np.int32)
        self.pos = np.empty(self.cap, dtype=np.int16)
        self.pooled: dict[int, np.ndarray] = {}
        for layer in layers:
            ldir = root / layer_dir_name(layer)
            ldir.mkdir(exist_ok=True)
            work = ldir / "pooled.work.npy"
            mode = "r+" if work.exists() and progress["kept_done"] > 0 else "w+"
            self.pooled[layer] = np.lib.format.open_memmap(work, mode=mode, dtype=self.np_dtype, shape=(n_req, d))

    def _part(self, layer: int) -> Path:
        return self.root / layer_dir_name(layer) / f".tokens-{self.shard:05d}.npy.part"

    def _open(self) -> None:
        self.bufs = {layer: np.lib.format.open_memmap(self._part(layer), mode="w+", dtype=self.np_dtype,
                                                      shape=(self.cap, self.d)) for layer in self.layers}

    def append(self, arrays: dict[int, np.ndarray], rows: np.ndarray, pos: np.ndarray,
               on_shard: Any) -> None:
        """Add tokens (the same count for every layer); calls on_shard(tokens_done) after each full shard."""
        i, n = 0, len(rows)
        while i < n:
            if self.bufs is None:
                self._open()
            take = min(n - i, self.cap - self.fill)
            for layer in self.layers:
                self.bufs[layer][self.fill:self.fill + take] = arrays[layer][i:i + take]
            self.rows[self.fill:self.fill + take] = rows[i:i + take]
            self.pos[self.fill:self.fill + take] = pos[i:i + take]
            self.fill += take
            self.tokens_total += take
            i += take
            if self.fill == self.cap:
                self._close_shard(self.cap)
                on_shard(self.tokens_total)

    def _close_shard(self, n: int) -> None:
        """Move the current shard (its first n tokens) to its final names."""
        for layer in self.layers:
            buf, part = self.bufs[layer], self._part(layer)
            final = self.root / layer_dir_name(layer) / f"tokens-{self.shard:05d}.npy"
            if n == self.cap:
                buf.flush()
                del buf
                os.replace(part, final)
            else:
                with atomic_path(final) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, np.asarray(buf[:n]))
                del buf
                part.unlink()
        for name, arr in (("token_row", self.rows), ("token_pos", self.pos)):
            with atomic_path(self.root / f"{name}-{self.shard:05d}.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, arr[:n])
        self.bufs = None
        self.shard += 1
        self.fill = 0

    def finish(self) -> list[int]:
        """Close the last (partial) shard; return every shard's size."""
        if self.fill:
            self._close_shard(self.fill)
        sizes = []
        for s in range(self.shard):
            sizes.append(int(np.load(self.root / f"token_row-{s:05d}.npy", mmap_mode="r").shape[0]))
        return sizes

    def flush_pooled(self) -> None:
        for arr in self.pooled.values():
            arr.flush()


def _concat_npy(parts: list[Path], out: Path, dtype: Any) -> None:
    total = sum(np.load(p, mmap_mode="r").shape[0] for p in parts)
    with atomic_path(out) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,))
        i = 0
        for p in parts:
            x = np.load(p, mmap_mode="r")
            arr[i:i + len(x)] = x
            i += len(x)
        arr.flush()
        del arr


def _check_finite(arrays: dict[int, np.ndarray], pooled: dict[int, np.ndarray], rows: np.ndarray,
                  pairs: Pairs, kept: list[int], positions: list[int]) -> None:
    """float16 storage overflows above 65504: stop with the first row concerned rather than store inf."""
    for layer, arr in arrays.items():
        bad = ~np.isfinite(arr).all(1)
        if bad.any() or not np.isfinite(pooled[layer]).all():
            n = int(rows[int(np.argmax(bad))]) - len(kept) if bad.any() else 0
            raise InputError(f"layer {layer}, row {int(pairs.row_ids[positions[n]])}: activations overflow "
                             f"float16 (|x| > 65504); use --cache_dtype bfloat16 or float32")


@contextlib.contextmanager
def _resume_note(partial: Path) -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        tqdm.write(f"interrupted: the finished shards are kept in {partial}; run again with the same flags "
                   f"to resume")
        raise


def _resumable(partial: Path, layers: list[int], state: dict[str, Any], n_req: int, d: int) -> bool:
    """Whether every file a resume relies on is there (else the extraction starts over)."""
    try:
        if state["kept_done"] and len(np.load(partial / "kept.npy", mmap_mode="r")) < state["kept_done"]:
            return False
        for s in range(state["shards_done"]):
            if not (partial / f"token_row-{s:05d}.npy").exists() or not (partial / f"token_pos-{s:05d}.npy").exists():
                return False
        for layer in layers:
            ldir = partial / layer_dir_name(layer)
            if any(not (ldir / f"tokens-{s:05d}.npy").exists() for s in range(state["shards_done"])):
                return False
            if state["kept_done"] and np.load(ldir / "pooled.work.npy", mmap_mode="r").shape != (n_req, d):
                return False
        return True
    except (OSError, ValueError, KeyError):
        return False


def _free_bytes(path: Path) -> int:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(path).free
    return 1 << 62


def extract_activations(spec: Any, pairs: Pairs, layers: Sequence[int], cfg: CacheConfig | None = None, *,
                        token: str = "pooled", skip_bad: bool = False, device: str = "auto",
                        adapter: Any = None, shard_tokens: int | None = None,
                        progress: bool = True) -> ActivationCache:
    """The activation cache of `spec` (a wrappedmodels.ModelSpec) on `pairs` for `layers`: reused when a
    finished one exists (the model is then never loaded), else extracted (resuming a killed run).

    adapter: an already loaded adapter of `spec` (else `spec.load(device)` when needed).
    shard_tokens: tokens per shard (default: cfg.shard_mb MiB per shard); a resumed run keeps its own.
    """
    cfg = cfg or CacheConfig()
    if cfg.cache_dtype not in DTYPES:
        raise InputError(f"--cache_dtype {cfg.cache_dtype!r} is not one of {', '.join(DTYPES)}")
    if cfg.extract_batch_size <= 0:
        raise InputError("--extract_batch_size must be positive")
    from wrappedmodels import TOKEN_CHOICES

    if token not in TOKEN_CHOICES:
        raise InputError(f"--token {token!r} is not one of {', '.join(TOKEN_CHOICES)}")
    if token == "eot" and spec.modality != "text":
        raise InputError(f"--token eot applies to text models, not to {spec.model}")
    layers = spec.info().resolve_layers(layers)
    material = cache_material(spec, pairs, layers, cfg.cache_dtype, token, skip_bad)
    found = find_cache(cfg.cache_dir, material)
    if found is not None:
        return found
    root = Path(cfg.cache_dir)
    key = cache_key(material)
    with _exclusive(root / f".{key}.lock"):
        found = find_cache(cfg.cache_dir, material)  # finished by another process meanwhile
        if found is not None:
            return found
        if adapter is None:
            adapter = spec.load(device)
        adapter.token_rule(token)  # validates --token for this model before any work
        _build(adapter, pairs, layers, cfg, material, root, key, shard_tokens, progress)
    return open_cache(root / key)


def _build(adapter: Any, pairs: Pairs, layers: list[int], cfg: CacheConfig, material: dict[str, Any],
           root: Path, key: str, shard_tokens: int | None, show: bool) -> None:
    from torch.utils.data import DataLoader

    from sae.provenance import provenance

    skip_bad = material["skip_bad"]
    partial = root / f".{key}.partial"
    itemsize = DTYPES[cfg.cache_dtype].itemsize
    default_shard = shard_tokens or max(1, (cfg.shard_mb << 20) // (adapter.d_model * itemsize))
    state_path, config_path = partial / "progress.json", partial / "config.json"
    config = None
    if config_path.exists():
        with contextlib.suppress(OSError, ValueError):
            config = read_json(config_path)
    if config is None or config.get("material") != material:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        config = {"material": material, "shard_tokens": default_shard, "d_model": adapter.d_model}
        write_json(config_path, config)
    state = {"shards_done": 0, "tokens_done": 0, "kept_done": 0, "restart": 0, "skip_tokens": 0, "bad": []}
    if state_path.exists():
        saved = read_json(state_path)
        if _resumable(partial, layers, saved, len(pairs), adapter.d_model):
            state = saved
            if show:
                tqdm.write(f"resuming {partial.name} from row {saved['restart']} ({saved['shards_done']} shards done)")
        else:  # something a resume needs is missing: start over
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            write_json(config_path, config)
    n_req = len(pairs)
    kept: list[int] = []
    if state["kept_done"]:
        kept = np.load(partial / "kept.npy")[: state["kept_done"]].tolist()
    bad: list[list[int]] = [b for b in state["bad"] if b[0] < state["restart"]]
    writer = _Writer(partial, layers, adapter.d_model, cfg.cache_dtype, int(config["shard_tokens"]), n_req, state)
    modality = material["modality"]
    start, skip = int(state["restart"]), int(state["skip_tokens"])
    t0 = time.time()

    def on_shard(tokens_done: int) -> None:
        """A shard is complete: record where a restart would begin (atomically, after the data)."""
        k = int(np.searchsorted(row_end, tokens_done, side="right"))  # rows of this batch fully stored
        if k < len(row_end):  # row k straddles the boundary (or starts at it)
            kept_done, restart, skip_tokens = n0 + k, positions[k], tokens_done - int(row_start[k])
        else:
            kept_done, restart, skip_tokens = n0 + len(row_end), positions[-1] + 1, 0
        writer.flush_pooled()
        with atomic_path(partial / "kept.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(kept[:kept_done], dtype=np.int64))
        write_json(state_path, {"shards_done": writer.shard, "tokens_done": tokens_done, "kept_done": kept_done,
                                "restart": int(restart), "skip_tokens": int(skip_tokens),
                                "bad": [b for b in bad if b[0] < restart]})

    use_cuda = adapter.device.type == "cuda"
    workers = max(0, int(cfg.num_workers))
    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(pairs.torch_dataset(modality, start), batch_size=cfg.extract_batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_Collate(adapter.preprocess), pin_memory=use_cuda,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    desc = f"extract {adapter.model} layers {','.join(map(str, layers))}"
    checked_space = False
    bar = tqdm(total=n_req, initial=start, desc=desc, unit="row", disable=not show)
    with bar, _resume_note(partial):
        for positions, bad_items, batch in loader:
            for b in bad_items:
                if not skip_bad:
                    raise InputError(f"row {b.row_id}: unreadable {'image' if modality == 'image' else 'caption'}"
                                     f" ({b.reason}); fix or remove it, or pass --skip_bad to drop such rows")
                bad.append([b.position, b.row_id])
                tqdm.write(f"skipping row {b.row_id}: {b.reason}")
            bar.update(len(positions) + len(bad_items))
            if batch is None:
                continue
            out = adapter.forward(batch, layers, token=material["token"])
            mask = out.mask
            counts = mask.sum(1).cpu().numpy().astype(np.int64)
            n0 = len(kept)
            rows = np.repeat(np.arange(n0, n0 + len(positions), dtype=np.int32), counts)
            pos = mask.nonzero()[:, 1].cpu().numpy().astype(np.int16)
            arrays = {layer: _to_numpy(out.hidden[layer][mask], cfg.cache_dtype) for layer in layers}
            pooled = {layer: _to_numpy(out.pooled[layer], cfg.cache_dtype) for layer in layers}
            if cfg.cache_dtype == "float16":
                _check_finite(arrays, pooled, rows, pairs, kept, positions)
            for layer in layers:
                writer.pooled[layer][n0:n0 + len(positions)] = pooled[layer]
            if skip:  # the first row was partly stored before the restart
                if positions[0] != start or counts[0] < skip:
                    raise RuntimeError(f"cannot resume {partial}: delete it and run again")
                arrays = {layer: a[skip:] for layer, a in arrays.items()}
                rows, pos = rows[skip:], pos[skip:]
                counts = counts.copy()
                counts[0] -= skip
                skip = 0
            row_end = writer.tokens_total + np.cumsum(counts)
            row_start = row_end - counts
            kept.extend(positions)
            if not checked_space and show:
                checked_space = True
                est = int(counts.mean() * n_req * adapter.d_model * itemsize * len(layers))
                free = _free_bytes(partial)
                tqdm.write(f"activation cache {partial.parent / key}: about {est / 2**30:.2f} GiB "
                           f"({len(layers)} layers x {n_req} rows x ~{counts.mean():.0f} tokens x "
                           f"{adapter.d_model} x {itemsize} B), {free / 2**30:.1f} GiB free")
                if est > free:
                    raise InputError(f"the activation cache needs about {est / 2**30:.1f} GiB but {cfg.cache_dir} "
                                     f"has {free / 2**30:.1f} GiB free: use fewer --layers, --max_samples, "
                                     f"--cache_dtype float16/bfloat16 or another --cache_dir")
            writer.append(arrays, rows, pos, on_shard)
    if not kept:
        raise InputError("no readable rows: nothing to cache")
    sizes = writer.finish()
    writer.flush_pooled()
    K = len(kept)
    for layer in layers:
        ldir = partial / layer_dir_name(layer)
        with atomic_path(ldir / "pooled.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(writer.pooled[layer][:K]))
    writer.pooled.clear()
    _concat_npy([partial / f"token_row-{s:05d}.npy" for s in range(len(sizes))], partial / "token_row.npy",
                np.int32)
    _concat_npy([partial / f"token_pos-{s:05d}.npy" for s in range(len(sizes))], partial / "token_pos.npy",
                np.int16)
    with atomic_path(partial / "row_ids.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, pairs.row_ids[np.asarray(kept, dtype=np.int64)])
    elapsed = time.time() - t0
    write_json(partial / "meta.json", {
        "format": FORMAT, "key": key, "base_key": _base_key(material), "material": material,
        "modality": modality, "model": adapter.model, "model_name": adapter.name, "layers": layers,
        "n_blocks": adapter.n_blocks, "d_model": adapter.d_model, "dtype": material["dtype"],
        "token": material["token"], "token_rule": adapter.token_rule(material["token"]),
        "n_rows": K, "n_tokens": int(sum(sizes)), "shard_tokens": int(config["shard_tokens"]),
        "shard_sizes": sizes, "dataset": pairs.describe(), "skip_bad": skip_bad,
        "bad_rows": [b[1] for b in bad], "n_requested_rows": n_req,
        "seconds_last_session": round(elapsed, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "provenance": provenance(),
    })
    final = root / key
    if final.exists():  # a stale directory without meta.json
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(root)
    for p in list(final.glob("token_row-*.npy")) + list(final.glob("token_pos-*.npy")) + \
            list(final.glob("kept.npy")) + list(final.glob("progress.json")) + list(final.glob("config.json")) + \
            list(final.glob("layer*/pooled.work.npy")):
        with contextlib.suppress(OSError):
            p.unlink()
