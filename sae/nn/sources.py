"""Where training rows come from: row-aligned activation arrays, and a resumable shuffled order.

An `ActivationSource` holds, for each key (a layer name, or "x"), a list of 2-D shards whose rows
concatenate to the same `n_rows` for every key: row r of every key is the same token. Shards may be
numpy arrays or memmaps of float16/float32, or uint16 arrays holding bfloat16 bits.

`epoch_batches(n_rows, batch_size, seed, epoch, start_step)` yields the row indices of each step:
contiguous windows of `window` rows in random order, rows shuffled within each window (reads from
a memmap stay local), a function of (seed, epoch) only, so a resumed run sees the same batches.
Two other orders, chosen by the source (`ActivationSource.batches`):
- `strata_batches`: rows in contiguous strata (a joint SAE's image rows, then its text rows); every
  batch mixes the strata in their global proportion, to one row, at any scale;
- `group_batches`: rows in contiguous groups (the tokens of one image); a batch is every token of a
  fixed number of groups (the original repo's batches of 16 images with all their tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from sae.util.errors import InputError
from sae.util.readers import read_npy


def load_npy(path: str | Path, what: str = "activation") -> np.ndarray:
    """A .npy file holding a 2-D float array [rows, d_in], memory-mapped. Anything else (missing file,
    a directory, an .npz archive, another shape or dtype) is a one-line InputError naming it."""
    if Path(path).is_dir():
        raise InputError(f"{path} is a directory, not a .npy file [rows, d_in]")
    if not Path(path).exists():
        raise InputError(f"{what} file not found: {path}")
    arr = read_npy(path)
    if arr.ndim != 2:
        raise InputError(f"{path} must hold a 2-D array [rows, d_in], got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise InputError(f"{path} must hold floats, got dtype {arr.dtype}")
    return arr


def check_finite_rows(arr: np.ndarray, what: str, chunk_rows: int = 65536) -> None:
    """InputError naming the first row of a float array [rows, d] (memory maps read by chunks) that holds
    NaN or inf."""
    for start in range(0, arr.shape[0], chunk_rows):
        bad = ~np.isfinite(np.asarray(arr[start : start + chunk_rows])).reshape(
            min(chunk_rows, arr.shape[0] - start), -1
        )
        if bad.any():
            raise InputError(f"{what} row {start + int(np.argmax(bad.any(1)))} holds NaN or inf")


class ActivationSource:
    """Row-aligned activations: `read(key, rows)` -> float32 tensor [len(rows), d_in(key)]."""

    def __init__(
        self,
        shards: dict[str, Sequence[np.ndarray]],
        *,
        strata: Sequence[int] | None = None,
        groups: np.ndarray | None = None,
    ):
        """`strata`: sizes of contiguous row strata mixed in every batch (`strata_batches`); `groups`
        [n_rows]: a non-decreasing group id per row (e.g. the input each token came from), which
        `batches(groups_per_batch=G)` keeps together (`group_batches`)."""
        if not shards:
            raise InputError("no activation arrays given")
        self.shards = {key: list(parts) for key, parts in shards.items()}
        self._offsets: dict[str, np.ndarray] = {}
        n_rows = None
        for key, parts in self.shards.items():
            for p in parts:
                if p.ndim != 2:
                    raise InputError(f"activations '{key}' must be 2-D [rows, d_in], got shape {p.shape}")
            if len({p.shape[1] for p in parts}) != 1:
                raise InputError(f"activations '{key}' have shards of different widths")
            self._offsets[key] = np.cumsum([0] + [p.shape[0] for p in parts])
            n = int(self._offsets[key][-1])
            if n_rows is not None and n != n_rows:
                raise InputError(f"activations '{key}' have {n} rows, others {n_rows}")
            n_rows = n
        self.n_rows: int = n_rows or 0
        if self.n_rows == 0:
            raise InputError("the activation arrays have no rows")
        if strata is not None and sum(strata) != self.n_rows:
            raise InputError(f"strata of {sum(strata)} rows for {self.n_rows} rows")
        self.strata = None if strata is None else [int(s) for s in strata]
        self.group_bounds: np.ndarray | None = None
        if groups is not None:
            g = np.asarray(groups)
            if len(g) != self.n_rows or (len(g) > 1 and bool((np.diff(g) < 0).any())):
                raise InputError("row groups must be one non-decreasing id per row")
            self.group_bounds = np.concatenate([[0], np.flatnonzero(np.diff(g)) + 1, [len(g)]]).astype(np.int64)

    def steps_per_epoch(self, batch_size: int, groups_per_batch: int = 0) -> int:
        """Optimisation steps in one pass: over rows, or over groups when `groups_per_batch` > 0."""
        if groups_per_batch > 0:
            return -(-(len(self._bounds()) - 1) // groups_per_batch)
        return -(-self.n_rows // batch_size)

    def _bounds(self) -> np.ndarray:
        if self.group_bounds is None:
            raise InputError(
                "--batch_groups needs rows grouped by input (the token caches of train_image.py / train_text.py)"
            )
        return self.group_bounds

    def batches(
        self,
        batch_size: int,
        seed: int,
        epoch: int,
        start_step: int = 0,
        window: int = 1 << 20,
        groups_per_batch: int = 0,
    ) -> Iterator[np.ndarray]:
        """Row indices of each step of `epoch` from `start_step` on: `group_batches` when
        `groups_per_batch` > 0, `strata_batches` when the source has strata, else `epoch_batches`."""
        if groups_per_batch > 0:
            return group_batches(self._bounds(), groups_per_batch, seed, epoch, start_step)
        if self.strata is not None:
            return strata_batches(self.strata, batch_size, seed, epoch, start_step, window)
        return epoch_batches(self.n_rows, batch_size, seed, epoch, start_step, window)

    @classmethod
    def from_npy(cls, path: str, key: str = "x") -> ActivationSource:
        """One .npy file [rows, d_in] of any float dtype, memory-mapped (never read whole into RAM)."""
        return cls({key: [load_npy(path)]})

    @property
    def keys(self) -> list[str]:
        return list(self.shards)

    def d_in(self, key: str) -> int:
        return int(self.shards[key][0].shape[1])

    def read(self, key: str, rows: np.ndarray) -> torch.Tensor:
        """Rows `rows` (any order) of `key` as float32 [len(rows), d_in]."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        offsets = self._offsets[key]
        shard_of = np.searchsorted(offsets, sorted_rows, side="right") - 1
        out = torch.empty(len(rows), self.d_in(key), dtype=torch.float32)
        pos = 0
        for s in np.unique(shard_of):
            local = sorted_rows[shard_of == s] - offsets[s]
            block = self.shards[key][s][local]
            if block.dtype.kind == "f" and block.dtype.itemsize > 8:  # float128: torch has no such dtype
                block = block.astype(np.float64)
            t = torch.from_numpy(np.ascontiguousarray(block))
            if t.dtype == torch.uint16 or block.dtype == np.uint16:
                t = t.view(torch.bfloat16)
            out[pos : pos + len(local)] = t.float()
            pos += len(local)
        result = torch.empty_like(out)
        result[torch.from_numpy(order)] = out
        return result

    def sample_rows(self, n: int) -> np.ndarray:
        """Up to n row indices spread evenly over the whole source (deterministic)."""
        n = min(n, self.n_rows)
        return np.linspace(0, self.n_rows - 1, n).round().astype(np.int64)

    def check_finite(self, key: str, chunk_rows: int = 65536) -> None:
        """InputError naming the first row holding NaN or inf."""
        for s, part in enumerate(self.shards[key]):
            for start in range(0, part.shape[0], chunk_rows):
                block = np.asarray(part[start : start + chunk_rows])
                if block.dtype == np.uint16:
                    block = torch.from_numpy(block.copy()).view(torch.bfloat16).float().numpy()
                bad = ~np.isfinite(block).all(1)
                if bad.any():
                    row = int(self._offsets[key][s]) + start + int(np.argmax(bad))
                    raise InputError(f"activations '{key}' row {row} holds NaN or inf")


def epoch_order(n_rows: int, seed: int, epoch: int, window: int) -> Iterator[np.ndarray]:
    """This epoch's row order, window by window (each a shuffled contiguous range)."""
    rng = np.random.default_rng([seed, epoch])
    n_windows = -(-n_rows // window)
    for w in rng.permutation(n_windows):
        start = int(w) * window
        yield start + rng.permutation(min(window, n_rows - start))


def epoch_batches(
    n_rows: int, batch_size: int, seed: int, epoch: int, start_step: int = 0, window: int = 1 << 20
) -> Iterator[np.ndarray]:
    """Row indices of each step of `epoch`, from step `start_step` on; the last batch may be short."""
    skip = start_step * batch_size
    buf: list[np.ndarray] = []
    have = 0
    for chunk in epoch_order(n_rows, seed, epoch, window):
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        chunk = chunk[skip:]
        skip = 0
        buf.append(chunk)
        have += len(chunk)
        while have >= batch_size:
            flat = np.concatenate(buf)
            yield flat[:batch_size]
            rest = flat[batch_size:]
            buf, have = ([rest] if len(rest) else []), len(rest)
    if have:
        yield np.concatenate(buf)


def strata_batches(
    strata: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    window: int = 1 << 20,
) -> Iterator[np.ndarray]:
    """Row indices of each step of `epoch` when the rows are contiguous strata (sizes `strata`, e.g.
    [n_image, n_text] for a joint SAE): every batch holds each stratum in its global proportion, to
    one row (batch b takes floor((b+1) B n_j / N) - floor(b B n_j / N) rows of stratum j, the last
    stratum the rest), each stratum in its own `epoch_order`. A function of (seed, epoch) only."""
    sizes = [int(s) for s in strata]
    n_rows = sum(sizes)
    starts = np.cumsum([0] + sizes[:-1])
    n_steps = -(-n_rows // batch_size)

    def quota(j: int, pos: int) -> int:  # rows of stratum j among the first `pos` rows of the epoch
        return sizes[j] * pos // n_rows

    streams = []
    for j, (s0, n) in enumerate(zip(starts, sizes)):
        order = epoch_order(n, seed + 7919 * j, epoch, window)
        streams.append(_Stream(order, int(s0), quota(j, start_step * batch_size) if j < len(sizes) - 1 else None))
    last = len(sizes) - 1
    streams[last].skip(start_step * batch_size - sum(quota(j, start_step * batch_size) for j in range(last)))
    for b in range(start_step, n_steps):
        lo, hi = b * batch_size, min(n_rows, (b + 1) * batch_size)
        counts = [quota(j, hi) - quota(j, lo) for j in range(last)]
        counts.append(hi - lo - sum(counts))
        yield np.concatenate([s.take(c) for s, c in zip(streams, counts)])


class _Stream:
    """Consecutive pieces of one stratum's row order (offset by the stratum's first row)."""

    def __init__(self, order: Iterator[np.ndarray], offset: int, skip: int | None = 0):
        self.order, self.offset, self.buf = order, offset, np.empty(0, dtype=np.int64)
        if skip:
            self.skip(skip)

    def take(self, n: int) -> np.ndarray:
        while len(self.buf) < n:
            self.buf = np.concatenate([self.buf, next(self.order)])
        out, self.buf = self.buf[:n], self.buf[n:]
        return out + self.offset

    def skip(self, n: int) -> None:
        self.take(n)


def group_batches(
    bounds: np.ndarray, groups_per_batch: int, seed: int, epoch: int, start_step: int = 0
) -> Iterator[np.ndarray]:
    """Row indices of each step of `epoch` when rows come in contiguous groups (the tokens of one image
    or caption; group g = rows bounds[g]:bounds[g+1]): every batch holds all rows of `groups_per_batch`
    groups, the groups in a random order (a function of (seed, epoch) only); the last batch may hold fewer."""
    n_groups = len(bounds) - 1
    perm = np.random.default_rng([seed, epoch, 1]).permutation(n_groups)
    for b in range(start_step, -(-n_groups // groups_per_batch)):
        chosen = perm[b * groups_per_batch : (b + 1) * groups_per_batch]
        yield np.concatenate([np.arange(int(bounds[g]), int(bounds[g + 1])) for g in chosen])
