"""Data parallelism under `torchrun`: which process this is, its share of the rows, and the reductions.

Started by `torchrun --nproc_per_node N ...` (the environment holds RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address), `init()` joins the process group: NCCL when the process has a CUDA device, gloo
otherwise. Without torchrun every function here is the one-process identity (world size 1, rank 0) and
torch.distributed is never touched, so single-process code pays nothing.

Conventions of the callers (training, extraction, comparisons):
- every rank computes the same global plan (batches, row order, layer pairs) from the same seed, then
  takes its own share of it (`share`: contiguous, sizes differ by at most one);
- reductions are sums over ranks (`all_sum`), maxima (`all_max`) or gathers (`all_gather_object`);
- only rank 0 writes shared outputs (`is_main`); the others wait at `barrier()`.
"""

from __future__ import annotations

import atexit
import datetime
import os
from typing import Any

import numpy as np

_STATE: dict[str, Any] = {"initialized": False}


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "auto") -> None:
    """Join the process group once if launched by torchrun (no-op otherwise): NCCL on CUDA, else gloo.
    On CUDA, LOCAL_RANK picks the process's GPU."""
    if _STATE["initialized"] or not launched():
        return
    import torch
    import torch.distributed as dist

    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("SAE_DIST_TIMEOUT_S", "1800")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        atexit.register(_leave)  # torch asks for destroy_process_group before exit (NCCL warns without it)
    _STATE.update(initialized=True, cuda=cuda)


def _leave() -> None:
    """Leave the process group at exit (no barrier: a rank that failed must not hang the others)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    if not launched():
        return 1
    init()
    import torch.distributed as dist

    return dist.get_world_size()


def rank() -> int:
    if not launched():
        return 0
    init()
    import torch.distributed as dist

    return dist.get_rank()


def is_main() -> bool:
    """Rank 0: the one process that writes shared outputs."""
    return rank() == 0


def local_device() -> str:
    """'cuda:<LOCAL_RANK>' for a CUDA process group, else 'auto' (the caller's usual choice)."""
    if launched() and _STATE.get("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "auto"


def engine_device(device: str) -> str:
    """The comparisons' --device for this rank: under torchrun on CUDA, 'auto'/'cuda' become its own GPU."""
    if launched() and device in ("auto", "cuda"):
        return local_device()
    return device


def share(n: int, of_rank: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous part of range(n): sizes n // world or n // world + 1, lower ranks larger."""
    r = rank() if of_rank is None else of_rank
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def share_rows(rows: np.ndarray) -> np.ndarray:
    """This rank's part of a global batch of row indices."""
    return rows[share(len(rows))]


def barrier() -> None:
    """Wait for every rank. On gloo an all-reduce of one tensor kept for the whole process, not
    dist.barrier(): gloo's barrier holds the collectives still in flight until its worker thread frees it,
    which can fall in interpreter shutdown, and freeing their Python tensors there aborts the process."""
    if not launched():
        return
    import torch
    import torch.distributed as dist

    if _STATE.get("cuda"):
        dist.barrier()
    else:
        all_sum(_STATE.setdefault("token", torch.zeros(1)))


def _reduce(t, op: str):
    if not launched():
        return t
    import torch.distributed as dist

    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def all_sum(t):
    """In place: the sum over ranks of tensor `t` (returned)."""
    return _reduce(t, "sum")


def all_max(t):
    """In place: the elementwise maximum over ranks (bool tensors: any rank True)."""
    if t.dtype.is_floating_point or not launched():
        return _reduce(t, "max")
    import torch

    as_int = t.to(torch.int32)
    _reduce(as_int, "max")
    t.copy_(as_int.to(t.dtype))
    return t


def all_min(t):
    """In place: the elementwise minimum over ranks."""
    return _reduce(t, "min")


def all_sum_float(value: float) -> float:
    """A Python number summed over ranks."""
    if not launched():
        return value
    import torch

    return float(all_sum(torch.tensor([value], dtype=torch.float64, device=_comm_device()))[0])


def _comm_device():
    import torch

    return torch.device(f"cuda:{torch.cuda.current_device()}") if _STATE.get("cuda") else torch.device("cpu")


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects; [obj] on one process)."""
    if not launched():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not launched():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors_(tensors) -> None:
    """Overwrite each tensor with rank 0's (in place), e.g. a model's freshly initialised parameters."""
    if not launched():
        return
    import torch.distributed as dist

    for t in tensors:
        dist.broadcast(t.data if hasattr(t, "data") else t, src=0)


def reduce_grads_(params, weight: float) -> None:
    """grad <- sum over ranks of weight_r * grad_r, for every parameter that has a gradient. With
    weight_r = n_r / n_global (the rank's share of the global batch) and per-rank losses that are means
    over the rank's rows, this is the gradient of the global batch's mean loss. One flat all-reduce."""
    if not launched():
        return
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]) * weight
    all_sum(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def batch_rows(n_local: int) -> int:
    """The number of rows of the global batch whose share this rank holds (n_local on one process)."""
    if not launched():
        return n_local
    return int(all_sum_float(float(n_local)))


def centered_sum_sq(e):
    """sum_n ||e_n - mean(e)||^2 over the global batch [n_global, d] of which this rank holds rows e
    [n_local, d], times n_local / n_global: a per-rank normaliser such that the trainer's row-weighted
    average of num_r / centered_sum_sq(e_r) is (sum_r num_r) / (the global centred sum of squares).
    On one process: the usual two-pass value."""
    if not launched():
        return (e - e.mean(0)).pow(2).sum()
    import torch

    with torch.no_grad():
        stats = torch.cat([e.detach().sum(0).double(), e.detach().double().pow(2).sum().reshape(1)])
        n = torch.tensor([float(e.shape[0])], dtype=torch.float64, device=e.device)
        stats = all_sum(torch.cat([stats, n]))
        s, ss, n_global = stats[:-2], stats[-2], stats[-1]
        total = ss - (s * s).sum() / n_global
        return (total * e.shape[0] / n_global).to(e.dtype)


def global_top_mask(values, total: int):
    """bool [m]: which of this rank's candidate `values` [m] are among the `total` largest values of all
    ranks' candidates together (every rank's candidates must include its entries of that global top)."""
    if not launched():
        return values.new_ones(values.shape, dtype=bool)
    import torch
    import torch.distributed as dist

    padded = torch.full((total,), float("-inf"), dtype=torch.float32, device=values.device)
    local = values.detach().float()
    local = local.topk(min(total, local.numel())).values if local.numel() > total else local
    padded[: local.numel()] = local
    gathered = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, padded)
    pool = torch.cat(gathered)
    tau = pool.topk(min(total, pool.numel())).values.min()
    return values.detach().float() >= tau


def broadcast_stop(signum: int | None) -> int | None:
    """The signal any rank received (the largest number), or None: every rank then stops at the same step."""
    import torch

    t = torch.tensor([signum or 0], dtype=torch.int64, device=_comm_device())
    all_max(t)
    return int(t[0]) or None
