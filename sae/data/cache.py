"""On-disk activation cache: one pass of an encoder over a dataset, every requested layer at once.

The layout (`actcache-v2`: meta.json, row_ids, token_row/token_pos, per layer token shards and pooled
vectors) is specified in docs/formats.md; this module is its writer (`extract_activations`) and reader
(`open_cache`). Behaviour beyond the layout:

- The training tokens are the real (non-padding) tokens of each row; for SiglipText also its final
  position, the model's own pooled position (sae.encoders.adapter.EncoderOutput.train_mask_of).
- A value that is not finite (NaN, inf, or a float16 overflow) stops the extraction naming the layer and row.
- Writing and resuming: the extraction writes into `<cache_dir>/.<key>.partial/`. A shard is closed
  after the batch that brings any layer's shard to `shard_mb` MiB; then `progress.json` (`_Progress`,
  atomic) records the shards done and the row to restart from. A killed run started again with the
  same flags resumes from the last closed shard; at the end meta.json is written last and the folder is
  renamed to `<key>` in one step. An exclusive lock keeps two processes from writing the same key.
- A later run with the same key, or with a subset of the layers of a finished cache, reuses it without
  loading the model. Temporary files of dead processes, and unfinished extractions of dead processes
  that closed no shard yet, are removed by the next extraction in the same `cache_dir` once untouched
  for 10 minutes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from sae.data.datasets import BadRow, Pairs
from sae.util.atomic import (
    STALE_S,
    _fsync_dir,
    atomic_path,
    last_touched,
    read_json,
    remove_dead_temporaries,
    write_json,
)
from sae.util.disk import free_bytes, human_bytes, open_memmap
from sae.util.errors import InputError
from sae.util.readers import read_npy

FORMAT = "actcache-v2"
TOKEN_CHOICES = ("pooled", "first", "last", "mean", "eot")  # the recorded position per row (encoders: TOKEN_HELP)
DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32), "bfloat16": np.dtype(np.uint16)}
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class LayerOutput(Protocol):
    """What the cache reads of one forward pass (sae.encoders.adapter.EncoderOutput)."""

    hidden: dict[int, torch.Tensor]  # {layer: [B, T, d]}
    pooled: dict[int, torch.Tensor]  # {layer: [B, d]} the recorded position

    def train_mask_of(self, layer: int) -> torch.Tensor: ...  # [B, T_layer] bool: the tokens stored for training


class Encoder(Protocol):
    """A loaded encoder with hooked blocks (sae.encoders.adapter.Adapter)."""

    model: str
    name: str
    n_blocks: int
    device: torch.device
    train_final: bool  # the final position is stored for training even when it is padding

    preprocess: Callable[[list[Any]], dict[str, torch.Tensor]]  # raw items -> batch of CPU tensors (picklable)

    def forward(self, batch: dict[str, torch.Tensor], layers: Sequence[int], token: str = "pooled") -> LayerOutput: ...
    def d_of(self, layer: int) -> int: ...
    def token_rule(self, token: str) -> str: ...


class LayerInfo(Protocol):
    def resolve_layers(self, layers: Sequence[int] | None) -> list[int]: ...


class EncoderSpec(Protocol):
    """A choice of encoder, loaded on demand (sae.encoders.registry.ModelSpec)."""

    @property
    def model(self) -> str: ...
    @property
    def modality(self) -> str: ...
    def identity(self) -> dict[str, Any]: ...  # what the activations depend on (cache key)
    def info(self) -> LayerInfo: ...
    def load(self, device: str) -> Encoder: ...


def _help(text: str, **extra: Any) -> Any:
    return {"help": text, **extra}


@dataclass
class CacheConfig:
    """Flags of the extraction stage."""

    cache_dir: str = field(default="activation_cache", metadata=_help("root of the activation caches"))
    cache_dtype: str = field(
        default="float16",
        metadata=_help("storage dtype of activations (bfloat16 is stored as uint16 bits)", choices=tuple(DTYPES)),
    )
    extract_batch_size: int = field(default=32, metadata=_help("rows per encoder forward"))
    num_workers: int | None = field(
        default=None,
        metadata=_help(
            "DataLoader worker processes (decode + preprocess); default: 4 with a GPU, 0 on CPU, where workers "
            "take cores from the forward (see bench/extract.py)"
        ),
    )
    shard_mb: int = field(default=256, metadata=_help("size of one token shard file, in MiB"))


def default_workers(device: torch.device) -> int:
    """DataLoader workers when --num_workers is not given: 4 on CUDA, 0 on CPU."""
    return 4 if device.type == "cuda" else 0


# ------------------------------------------------------------------------------------------- reading


@dataclass
class ActivationCache:
    """A finished cache directory (see the module docstring); arrays are read-only memory maps."""

    path: Path
    meta: dict[str, Any]

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    def d_of(self, layer: int) -> int:
        """Width of `layer`'s activations."""
        self._layer_dir(layer)
        return int(self.meta["widths"][str(layer)])

    @property
    def d_model(self) -> int:
        """The width shared by every layer (InputError when they differ: use d_of)."""
        widths = {self.d_of(layer) for layer in self.layers}
        if len(widths) != 1:
            raise InputError(f"the layers of {self.path} have different widths: use d_of(layer)")
        return widths.pop()

    @property
    def dtype(self) -> str:
        return str(self.meta["dtype"])

    @property
    def n_rows(self) -> int:
        return int(self.meta["n_rows"])

    @property
    def layouts(self) -> list[list[int]]:
        """Groups of layers sharing one token layout (same tokens of the same rows), shallowest first."""
        return [list(g["layers"]) for g in self.meta["layouts"]]

    def _layout(self, layer: int | None) -> dict[str, Any]:
        layouts = self.meta["layouts"]
        if layer is None:
            if len(layouts) > 1:
                raise InputError(f"the layers of {self.path} have different token layouts: name a layer")
            return layouts[0]
        self._layer_dir(layer)
        return next(g for g in layouts if layer in g["layers"])

    def n_tokens_of(self, layer: int | None = None) -> int:
        """Stored tokens of `layer` (None: the only layout)."""
        return int(self._layout(layer)["n_tokens"])

    @property
    def n_tokens(self) -> int:
        return self.n_tokens_of(None)

    @property
    def row_ids(self) -> np.ndarray:
        """int64 [N]: the dataset row of each run row."""
        return read_npy(self.path / "row_ids.npy", mmap=False)

    def _layer_dir(self, layer: int) -> Path:
        if layer not in self.meta["layers"]:
            raise InputError(
                f"layer {layer} is not in the activation cache {self.path} (layers: {', '.join(map(str, self.layers))})"
            )
        return self.path / layer_dir_name(layer)

    def token_shards(self, layer: int) -> list[np.ndarray]:
        """[n_tok_s, d] arrays of the stored tokens of each shard (row-aligned across layers)."""
        d = self._layer_dir(layer)
        return [read_npy(d / f"tokens-{s:05d}.npy") for s in range(len(self.meta["shard_rows"]))]

    def pooled(self, layer: int) -> np.ndarray:
        """[N, d] vectors at the recorded position (meta['token'])."""
        return read_npy(self._layer_dir(layer) / "pooled.npy")

    def _token_file(self, name: str, layer: int | None) -> np.ndarray:
        self._layout(layer)  # checks the layer, or that there is one layout
        if self.meta["token_files"] == "per_layer":
            if layer is None:
                layer = self.layers[0]
            return read_npy(self._layer_dir(layer) / f"{name}.npy")
        return read_npy(self.path / f"{name}.npy")

    def token_row(self, layer: int | None = None) -> np.ndarray:
        """int32 [n_tokens]: run row of each stored token of `layer` (index into row_ids)."""
        return self._token_file("token_row", layer)

    def token_pos(self, layer: int | None = None) -> np.ndarray:
        """int16 [n_tokens]: sequence position of each stored token of `layer`."""
        return self._token_file("token_pos", layer)

    def shard_slices(self, layer: int | None = None) -> list[slice]:
        """Token ranges of the shards, e.g. token_row()[shard_slices()[s]] for shard s."""
        ends = np.cumsum([0] + list(self._layout(layer)["shard_sizes"]))
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
        raise InputError(
            f"{path}: activation cache format {meta.get('format')!r} is not {FORMAT} (made by an "
            f"older version: delete it, the next run extracts again)"
        )
    return ActivationCache(path, meta)


# --------------------------------------------------------------------------------------------- keys


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def cache_material(
    spec: EncoderSpec, pairs: Pairs, layers: Sequence[int], dtype: str, token: str, skip_bad: bool
) -> dict[str, Any]:
    """Everything the cached arrays depend on (layers already resolved)."""
    return {
        "format": FORMAT,
        "modality": spec.modality,
        "model": spec.identity(),
        "data": pairs.identity(spec.modality),
        "skip_bad": bool(skip_bad),
        "dtype": dtype,
        "token": token,
        "layers": sorted(int(x) for x in layers),
    }


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


# ------------------------------------------------------------------------------ leftovers of dead runs


def _lock_free(lock_path: Path) -> bool:
    """Whether no process holds the lock of an extraction (False where locks are not supported: keep)."""
    try:
        import fcntl
    except ImportError:
        return False
    if not lock_path.exists():
        return True
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return True


def clean_cache_dir(cache_dir: str | Path, keep: str | None = None, show: bool = True) -> None:
    """Remove what dead extractions left in `cache_dir`: temporary files, and `.<key>.partial` folders
    whose lock is free, untouched for STALE_S seconds, that closed no shard yet (nothing to resume) or
    have another format. Unfinished extractions with closed shards are kept (started again with the
    same flags they resume) and named. `keep`: the key being extracted now."""
    root = Path(cache_dir)
    if not root.is_dir():
        return
    resumable = []
    for partial in sorted(root.glob(".*.partial")):
        key = partial.name[1 : -len(".partial")]
        if key == keep or not partial.is_dir() or not _lock_free(root / f".{key}.lock"):
            continue
        with contextlib.suppress(OSError):
            if last_touched(partial) < STALE_S:
                continue
        shards = 0
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            fmt = read_json(partial / "config.json")["material"]["format"]
            shards = int(read_json(partial / "progress.json")["shards_done"]) if fmt == FORMAT else 0
        if shards == 0:
            shutil.rmtree(partial, ignore_errors=True)
            with contextlib.suppress(OSError):
                (root / f".{key}.lock").unlink()
        else:
            resumable.append(partial)
    remove_dead_temporaries(root)  # after the partials: removing a file inside one touches its folder
    if resumable and show:
        size = sum(f.stat().st_size for p in resumable for f in p.rglob("*") if f.is_file())
        tqdm.write(
            f"note: {len(resumable)} unfinished extraction(s) with other settings in {root} "
            f"({size / 2**30:.2f} GiB, {', '.join(p.name for p in resumable)}): started again with "
            f"their flags they resume; delete them otherwise"
        )


# ------------------------------------------------------------------------------------------ writing


class _Collate:
    """DataLoader collate_fn: drops unreadable rows, preprocesses the rest (runs in the workers)."""

    def __init__(self, preprocess: Callable[[list[Any]], dict[str, torch.Tensor]]):
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
            raise InputError(
                f"another process is writing this activation cache ({lock_path.name}); wait for it or stop it"
            ) from None
        yield


def _stored(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """`t` in the storage dtype, on its device."""
    return t.to(_TORCH_DTYPES[dtype])


def _to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor already in the storage dtype -> numpy (bfloat16 as uint16 bits)."""
    if dtype == "bfloat16":
        return t.view(torch.int16).cpu().numpy().view(np.uint16)
    return t.cpu().numpy()


_HEADER = 128  # bytes of a .npy v1 header of a 2-D array of any realistic shape


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


@dataclass
class _Progress:
    """progress.json of an extraction's `.partial` folder, rewritten after each closed shard: where a
    resumed extraction starts."""

    shards_done: int = 0
    shard_rows: list[int] = field(default_factory=list)  # rows per closed shard
    partition: list[list[int]] | None = None  # layers grouped by token layout (known after the first batch)
    kept_done: int = 0  # rows in the closed shards (the first kept_done entries of kept.npy)
    restart: int = 0  # dataset position where a resumed run starts reading
    bad: list[list[int]] = field(default_factory=list)  # [position, row_id] of each skipped row before restart

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Progress:
        """Raises KeyError / TypeError / ValueError on a file that is not a progress record."""
        return cls(
            int(d["shards_done"]),
            [int(n) for n in d["shard_rows"]],
            None if d["partition"] is None else [[int(layer) for layer in group] for group in d["partition"]],
            int(d["kept_done"]),
            int(d["restart"]),
            [[int(a), int(b)] for a, b in d["bad"]],
        )


class _Writer:
    """Row-aligned shards of every layer, appended batch by batch; the state lives in `progress.json`.

    partition: groups of layers sharing a token layout (known after the first batch); `rows`/`pos`
    are kept per group. A shard's files are raw appends under `.tokens-s.npy.part` with room for the
    .npy header, which is written when the shard closes.
    """

    def __init__(
        self,
        root: Path,
        layers: list[int],
        widths: dict[int, int],
        dtype: str,
        caps: dict[int, int],
        n_req: int,
        state: _Progress,
    ):
        self.root, self.layers, self.widths, self.dtype = root, layers, widths, dtype
        self.np_dtype = DTYPES[dtype]
        self.caps = caps
        self.shard = state.shards_done
        self.shard_rows: list[int] = list(state.shard_rows)
        self.partition: list[list[int]] | None = state.partition
        self.files: dict[int, BinaryIO] | None = None
        self.fill = dict.fromkeys(layers, 0)
        self.rows_in_shard = 0
        self.rows: list[list[np.ndarray]] = []
        self.pos: list[list[np.ndarray]] = []
        self.pooled: dict[int, np.memmap] = {}
        for layer in layers:
            ldir = root / layer_dir_name(layer)
            ldir.mkdir(exist_ok=True)
            work = ldir / "pooled.work.npy"
            mode = "r+" if work.exists() and state.kept_done > 0 else "w+"
            self.pooled[layer] = open_memmap(work, mode=mode, dtype=self.np_dtype, shape=(n_req, widths[layer]))

    def set_partition(self, partition: list[list[int]]) -> None:
        if self.partition is None:
            self.partition = partition
        elif partition != self.partition:
            raise RuntimeError(
                f"the token layouts of the layers changed between batches ({self.partition} -> {partition})"
            )

    def _part(self, layer: int) -> Path:
        return self.root / layer_dir_name(layer) / f".tokens-{self.shard:05d}.npy.part"

    def append(self, arrays: dict[int, np.ndarray], rows: list[np.ndarray], pos: list[np.ndarray], n_rows: int) -> None:
        """Add the tokens of `n_rows` rows: arrays {layer: [n_tok_group, d]}, rows/pos per group."""
        assert self.partition is not None, "set_partition comes before the first append"
        if self.files is None:
            self.files = {}
            for layer in self.layers:
                f = open(self._part(layer), "wb")
                f.write(b"\0" * _HEADER)
                self.files[layer] = f
            self.rows, self.pos = [[] for _ in self.partition], [[] for _ in self.partition]
        for layer in self.layers:
            self.files[layer].write(np.ascontiguousarray(arrays[layer]).data.cast("B"))
            self.fill[layer] += len(arrays[layer])
        for g in range(len(self.partition)):
            self.rows[g].append(rows[g])
            self.pos[g].append(pos[g])
        self.rows_in_shard += n_rows

    def full(self) -> bool:
        return any(self.fill[layer] >= self.caps[layer] for layer in self.layers)

    def close_shard(self) -> None:
        """Publish the current shard: token files under their final names, then row/position files."""
        assert self.files is not None and self.partition is not None, "a shard is closed after an append"
        for layer in self.layers:
            f, part = self.files[layer], self._part(layer)
            final = self.root / layer_dir_name(layer) / f"tokens-{self.shard:05d}.npy"
            header = _npy_header(self.np_dtype, (self.fill[layer], self.widths[layer]))
            if len(header) == _HEADER:
                f.seek(0)
                f.write(header)
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(part, final)
            else:  # an unusual header length: rewrite the data behind a header of its own size
                f.close()
                data = np.fromfile(part, dtype=self.np_dtype, offset=_HEADER).reshape(-1, self.widths[layer])
                with atomic_path(final) as tmp:
                    with open(tmp, "wb") as out:
                        np.save(out, data)
                part.unlink()
        for g in range(len(self.partition)):
            for name, parts, dtype in (("token_row", self.rows[g], np.int32), ("token_pos", self.pos[g], np.int16)):
                with atomic_path(self.root / f"{name}-g{g}-{self.shard:05d}.npy") as tmp:
                    with open(tmp, "wb") as out:
                        np.save(out, np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
        self.files = None
        self.shard_rows.append(self.rows_in_shard)
        self.shard += 1
        self.fill = dict.fromkeys(self.layers, 0)
        self.rows_in_shard = 0

    def finish(self) -> None:
        """Close the last shard if it holds rows."""
        if self.rows_in_shard:
            self.close_shard()

    def flush_pooled(self) -> None:
        for arr in self.pooled.values():
            arr.flush()


def _concat_npy(parts: list[Path], out: Path, dtype: Any) -> int:
    total = sum(np.load(p, mmap_mode="r").shape[0] for p in parts)
    with atomic_path(out) as tmp:
        arr = open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,))
        i = 0
        for p in parts:
            x = np.load(p, mmap_mode="r")
            arr[i : i + len(x)] = x
            i += len(x)
        arr.flush()
        del arr
    return total


def _check_finite(
    layer: int,
    raw: torch.Tensor,
    stored: torch.Tensor,
    token_rows: torch.Tensor,
    pairs: Pairs,
    positions: list[int],
    dtype: str,
) -> None:
    """Stop at the first row whose vectors are not finite: [n, d] raw (encoder dtype) and stored values,
    token_rows [n] the batch row of each vector."""
    bad = ~torch.isfinite(stored).all(1)
    if not bad.any():
        return
    i = int(bad.nonzero()[0, 0])
    row = int(pairs.row_ids[positions[int(token_rows[i])]])
    if bool(torch.isfinite(raw[i]).all()):
        raise InputError(
            f"layer {layer}, row {row}: activations overflow {dtype} (|x| > 65504); use --cache_dtype "
            f"bfloat16 or float32"
        )
    raise InputError(
        f"layer {layer}, row {row}: the encoder output holds NaN or inf (broken weights or input; nothing is cached)"
    )


@contextlib.contextmanager
def _resume_note(partial: Path) -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        tqdm.write(f"interrupted: the finished shards are kept in {partial}; run again with the same flags to resume")
        raise


def _resumable(partial: Path, layers: list[int], state: _Progress, n_req: int, widths: dict[int, int]) -> bool:
    """Whether every file a resume relies on is there (else the extraction starts over)."""
    try:
        if state.shards_done and state.partition is None:
            return False
        if state.kept_done and len(np.load(partial / "kept.npy", mmap_mode="r")) < state.kept_done:
            return False
        for s in range(state.shards_done):
            for g in range(len(state.partition or [])):
                for name in ("token_row", "token_pos"):
                    if not (partial / f"{name}-g{g}-{s:05d}.npy").exists():
                        return False
        for layer in layers:
            ldir = partial / layer_dir_name(layer)
            if any(not (ldir / f"tokens-{s:05d}.npy").exists() for s in range(state.shards_done)):
                return False
            if state.kept_done and np.load(ldir / "pooled.work.npy", mmap_mode="r").shape != (n_req, widths[layer]):
                return False
        return True
    except (OSError, ValueError):
        return False


def _free_bytes(path: Path) -> int:
    free = free_bytes(path)
    return 1 << 62 if free is None else free


def extract_activations(
    spec: EncoderSpec,
    pairs: Pairs,
    layers: Sequence[int],
    cfg: CacheConfig | None = None,
    *,
    token: str = "pooled",
    skip_bad: bool = False,
    device: str = "auto",
    adapter: Encoder | None = None,
    shard_tokens: int | None = None,
    progress: bool = True,
) -> ActivationCache:
    """The activation cache of `spec` (a sae.encoders.registry.ModelSpec) on `pairs` for `layers`: reused when a
    finished one exists (the model is then never loaded), else extracted (resuming a killed run).

    adapter: an already loaded adapter of `spec` (else `spec.load(device)` when needed).
    shard_tokens: close a shard once a layer holds this many tokens in it (default: cfg.shard_mb MiB);
        a resumed run keeps its own.
    Under torchrun, `sae.data.cache_parallel.extract_activations` splits the rows over the ranks.
    """
    cfg = cfg or CacheConfig()
    if cfg.cache_dtype not in DTYPES:
        raise InputError(f"--cache_dtype {cfg.cache_dtype!r} is not one of {', '.join(DTYPES)}")
    if cfg.extract_batch_size <= 0:
        raise InputError("--extract_batch_size must be positive")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise InputError("--num_workers must be 0 or more")
    if token not in TOKEN_CHOICES:
        raise InputError(f"--token {token!r} is not one of {', '.join(TOKEN_CHOICES)}")
    if token == "eot" and spec.modality != "text":
        raise InputError(f"--token eot applies to text models, not to {spec.model}")
    layers = list(spec.info().resolve_layers(layers))
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
        clean_cache_dir(root, keep=key, show=progress)
        if adapter is None:
            adapter = spec.load(device)
        adapter.token_rule(token)  # validates --token for this model before any work
        _build(adapter, pairs, layers, cfg, material, root, key, shard_tokens, progress)
    return open_cache(root / key)


def _partition(out: LayerOutput, layers: list[int]) -> list[list[int]]:
    """Layers grouped by token layout (same training mask), in layer order."""
    groups: list[list[int]] = []
    for layer in layers:
        for g in groups:
            a, b = out.train_mask_of(g[0]), out.train_mask_of(layer)
            if a.shape == b.shape and bool(torch.equal(a, b)):
                g.append(layer)
                break
        else:
            groups.append([layer])
    return groups


def _open_partial(
    partial: Path,
    material: dict[str, Any],
    layers: list[int],
    widths: dict[int, int],
    caps: dict[int, int],
    n_rows: int,
    show: bool,
) -> tuple[dict[int, int], _Progress]:
    """The `.partial` folder of an extraction, and where to start: (shard caps per layer, progress state).

    A folder made for other material, or whose progress a resume cannot use, is emptied and started over;
    the caps of a resumed folder are its own (config.json), so its shards keep their size.
    """
    state_path, config_path = partial / "progress.json", partial / "config.json"
    config = None
    if config_path.exists():
        with contextlib.suppress(OSError, ValueError):
            config = read_json(config_path)
    if config is None or config.get("material") != material:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        config = {
            "material": material,
            "caps": {str(k): v for k, v in caps.items()},
            "widths": {str(k): v for k, v in widths.items()},
        }
        write_json(config_path, config)
    caps = {layer: int(config["caps"][str(layer)]) for layer in layers}
    state = fresh = _Progress()
    if state_path.exists():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            saved = _Progress.from_json(read_json(state_path))
            if _resumable(partial, layers, saved, n_rows, widths):
                state = saved
                if show:
                    tqdm.write(f"resuming {partial.name} from row {saved.restart} ({saved.shards_done} shards done)")
        if state is fresh:  # something a resume needs is missing: start over
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            write_json(config_path, config)
    remove_dead_temporaries(partial, min_age_s=0)  # ours: the key's lock is held
    return caps, state


def _build(
    adapter: Encoder,
    pairs: Pairs,
    layers: list[int],
    cfg: CacheConfig,
    material: dict[str, Any],
    root: Path,
    key: str,
    shard_tokens: int | None,
    show: bool,
) -> None:
    from torch.utils.data import DataLoader, Dataset

    from sae.util.provenance import provenance

    skip_bad = material["skip_bad"]
    partial = root / f".{key}.partial"
    itemsize = DTYPES[cfg.cache_dtype].itemsize
    widths = {layer: adapter.d_of(layer) for layer in layers}
    caps = {layer: int(shard_tokens or max(1, (cfg.shard_mb << 20) // (widths[layer] * itemsize))) for layer in layers}
    state_path = partial / "progress.json"
    caps, state = _open_partial(partial, material, layers, widths, caps, len(pairs), show)
    n_req = len(pairs)
    kept: list[int] = []
    if state.kept_done:
        kept = np.load(partial / "kept.npy")[: state.kept_done].tolist()
    start = state.restart
    bad: list[list[int]] = [b for b in state.bad if b[0] < start]
    writer = _Writer(partial, layers, widths, cfg.cache_dtype, caps, n_req, state)
    modality = material["modality"]
    t0 = time.time()

    def save_progress(restart: int) -> None:
        """A shard is closed: record where a restart would begin (atomically, after the data)."""
        writer.flush_pooled()
        with atomic_path(partial / "kept.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(kept, dtype=np.int64))
        kept_bad = [b for b in bad if b[0] < restart]
        done = _Progress(writer.shard, writer.shard_rows, writer.partition, len(kept), int(restart), kept_bad)
        write_json(state_path, asdict(done))

    use_cuda = adapter.device.type == "cuda"
    workers = default_workers(adapter.device) if cfg.num_workers is None else int(cfg.num_workers)
    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(
        cast(Dataset, pairs.torch_dataset(modality, start)),  # a map-style dataset (__len__, __getitem__)
        batch_size=cfg.extract_batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_Collate(adapter.preprocess),
        pin_memory=use_cuda,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    desc = f"extract {adapter.model} layers {','.join(map(str, layers))}"
    checked_space = False
    bar = tqdm(total=n_req, initial=start, desc=desc, unit="row", disable=not show)
    with bar, _resume_note(partial):
        for positions, bad_items, batch in loader:
            for b in bad_items:
                if not skip_bad:
                    raise InputError(
                        f"row {b.row_id}: unreadable {'image' if modality == 'image' else 'caption'}"
                        f" ({b.reason}); fix or remove it, or pass --skip_bad to drop such rows"
                    )
                bad.append([b.position, b.row_id])
                tqdm.write(f"skipping row {b.row_id}: {b.reason}")
            bar.update(len(positions) + len(bad_items))
            if batch is None:
                continue
            out = adapter.forward(batch, layers, token=material["token"])
            n0, B = len(kept), len(positions)
            arrays, rows, pos, tokens_per_row = _stored_batch(
                out, layers, writer, n0, positions, pairs, cfg.cache_dtype
            )
            kept.extend(positions)
            if not checked_space:
                checked_space = True
                _check_space(partial, key, cfg.cache_dir, layers, widths, tokens_per_row, n_req, itemsize, show)
            writer.append(arrays, rows, pos, B)
            if writer.full():
                writer.close_shard()
                save_progress(max(positions + [b.position for b in bad_items]) + 1)
    if not kept:
        raise InputError("no readable rows: nothing to cache")
    writer.finish()
    writer.flush_pooled()
    _finish(partial, writer, layers, widths, kept, pairs, bad, material, adapter, key, time.time() - t0, provenance)
    _publish(partial, root, key)


def _publish(partial: Path, root: Path, key: str) -> None:
    """Rename the finished `.partial` folder to its key (atomic), then drop the files only a resume needed."""
    final = root / key
    if final.exists():  # a stale directory without meta.json
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(root)
    with contextlib.suppress(OSError):
        (root / f".{key}.lock").unlink()
    resume_only = ("token_row-*.npy", "token_pos-*.npy", "kept.npy", "progress.json", "config.json")
    for pattern in (*resume_only, "layer*/pooled.work.npy"):
        for p in final.glob(pattern):
            with contextlib.suppress(OSError):
                p.unlink()


def _stored_batch(
    out: LayerOutput,
    layers: list[int],
    writer: _Writer,
    n0: int,
    positions: list[int],
    pairs: Pairs,
    dtype: str,
) -> tuple[dict[int, np.ndarray], list[np.ndarray], list[np.ndarray], dict[int, float]]:
    """One encoder batch of B rows (the cache's rows n0..n0+B) in the stored dtype, checked finite: the
    pooled vectors go straight into the writer's memory maps; returns the token arrays {layer:
    [n_tok_group, d]}, per token group the row [n_tok] and position [n_tok] of each token, and the mean
    tokens per row of each layer."""
    partition = _partition(out, layers)
    writer.set_partition(partition)
    B = len(positions)
    arrays, rows, pos, tokens_per_row = {}, [], [], {}
    for group in partition:
        mask = out.train_mask_of(group[0])
        n_tok = mask.sum(1)
        token_rows = torch.repeat_interleave(torch.arange(B, device=mask.device), n_tok)
        rows.append((token_rows.cpu().numpy() + n0).astype(np.int32))
        pos.append(mask.nonzero()[:, 1].cpu().numpy().astype(np.int16))
        for layer in group:
            raw = out.hidden[layer][mask]
            stored = _stored(raw, dtype)
            _check_finite(layer, raw, stored, token_rows, pairs, positions, dtype)
            arrays[layer] = _to_numpy(stored, dtype)
            tokens_per_row[layer] = float(n_tok.float().mean())
    for layer in layers:
        stored = _stored(out.pooled[layer], dtype)
        _check_finite(layer, out.pooled[layer], stored, torch.arange(B), pairs, positions, dtype)
        writer.pooled[layer][n0 : n0 + B] = _to_numpy(stored, dtype)
    return arrays, rows, pos, tokens_per_row


def _check_space(
    partial: Path,
    key: str,
    cache_dir: str | Path,
    layers: list[int],
    widths: dict[int, int],
    tokens_per_row: dict[int, float],
    n_req: int,
    itemsize: int,
    show: bool,
) -> None:
    """After the first batch: estimate the cache's size from its tokens per row, print it, and refuse
    (one line) when the disk holds less."""
    est = int(sum(tokens_per_row[layer] * widths[layer] for layer in layers) * n_req * itemsize)
    free = _free_bytes(partial)
    if show:
        per = ", ".join(f"{layer}: ~{tokens_per_row[layer]:.0f} x {widths[layer]}" for layer in layers)
        tqdm.write(
            f"activation cache {partial.parent / key}: about {human_bytes(est)} ({n_req} rows x "
            f"tokens x width per layer [{per}] x {itemsize} B), {human_bytes(free)} free"
        )
    if est > free:
        raise InputError(
            f"the activation cache needs about {human_bytes(est)} but {cache_dir} "
            f"has {human_bytes(free)} free: use fewer --layers, --max_samples, "
            f"--cache_dtype float16/bfloat16 or another --cache_dir"
        )


def _finish(
    partial: Path,
    writer: _Writer,
    layers: list[int],
    widths: dict[int, int],
    kept: list[int],
    pairs: Pairs,
    bad: list[list[int]],
    material: dict[str, Any],
    adapter: Encoder,
    key: str,
    elapsed: float,
    provenance: Any,
) -> None:
    """Write the final files of a complete extraction into `partial`, meta.json last."""
    K = len(kept)
    for layer in layers:
        with atomic_path(partial / layer_dir_name(layer) / "pooled.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(writer.pooled[layer][:K]))
    writer.pooled.clear()
    assert writer.partition is not None, "kept rows imply a batch, which set the partition"
    per_layer = len(writer.partition) > 1
    layouts = []
    for g, group in enumerate(writer.partition):
        targets = [partial / layer_dir_name(layer) for layer in group] if per_layer else [partial]
        sizes = [
            int(np.load(partial / f"token_row-g{g}-{s:05d}.npy", mmap_mode="r").shape[0]) for s in range(writer.shard)
        ]
        for target in targets:
            for name, dtype in (("token_row", np.int32), ("token_pos", np.int16)):
                _concat_npy(
                    [partial / f"{name}-g{g}-{s:05d}.npy" for s in range(writer.shard)], target / f"{name}.npy", dtype
                )
        layouts.append({"layers": group, "n_tokens": int(sum(sizes)), "shard_sizes": sizes})
    with atomic_path(partial / "row_ids.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, pairs.row_ids[np.asarray(kept, dtype=np.int64)])
    write_json(
        partial / "meta.json",
        {
            "format": FORMAT,
            "key": key,
            "base_key": _base_key(material),
            "material": material,
            "modality": material["modality"],
            "model": adapter.model,
            "model_name": adapter.name,
            "layers": layers,
            "n_blocks": adapter.n_blocks,
            "widths": {str(layer): widths[layer] for layer in layers},
            "dtype": material["dtype"],
            "token": material["token"],
            "token_rule": adapter.token_rule(material["token"]),
            "train_tokens": train_tokens_rule(adapter),
            "n_rows": K,
            "shard_rows": writer.shard_rows,
            "token_files": "per_layer" if per_layer else "shared",
            "layouts": layouts,
            "dataset": pairs.describe(),
            "skip_bad": material["skip_bad"],
            "bad_rows": [b[1] for b in bad],
            "n_requested_rows": len(pairs),
            "seconds_last_session": round(elapsed, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "provenance": provenance(),
        },
    )


def train_tokens_rule(adapter: Encoder) -> str:
    """Which tokens of a row are stored for SAE training, in words (run.json / meta.json)."""
    return "real tokens + final position (the pooled one)" if adapter.train_final else "real tokens"
