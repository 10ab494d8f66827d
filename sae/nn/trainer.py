"""Train several SAEs in one pass over the data (one per layer; also several seeds or k side by side).

`train_saes(source, specs, tcfg, out_dir)`:
- every step reads one batch of rows [batch_size] and feeds each SAE the rows of its source key;
- fp32 parameters and Adam state; bf16 autocast (unless --no-autocast) and TF32 on CUDA;
- batch order: `ActivationSource.batches` (shuffled windows; strata mixed in every batch for a
  joint SAE; whole inputs with --batch_groups);
- learning rate (`default_lr`; the unit-norm decoder of topk, batchtopk and matryoshka at
  DECODER_LR_SCALE times it): linear warm-up, constant, linear decay to 0 over the last
  `decay_fraction` of steps. Measured (bench/quality.py, d 32, 400 steps, TopK, 8x superposition,
  heavy-tailed, k 8; cosine / FVU): decay over the last 20% 0.585 / 0.222; over the whole run after
  warm-up, as sparsify's trainer, 0.539 / 0.279; with the encoder at 0.5, no decay 0.667 / 0.145
  against 0.657 / 0.147: the 20% decay stays;
- inputs scaled so that the centred rows' mean squared norm E||x - mean||^2 is d_in (the factor is stored
  in each cfg.json; --no-scale_inputs keeps 1), so that one lr and one l1_coef fit every encoder, and a
  shared mean (which b_dec takes) changes nothing: data shifted by a constant trains the same SAE. The
  uncentred E||x||^2 shrank the signal under a large mean; bench/quality.py's 18 cells with a mean of
  norm 10, uncentred -> centred, 2,000 steps: cos +0.004 / +0.012 / +0.005 on average (up to +0.067 /
  +0.102 / +0.046) for topk / batchtopk / matryoshka, FVU within 0.013; 200 steps: FVU +0.004 / +0.006
  / +0.002 on average (up to +0.020), cos within 0.020 (docs/quality.md). b_dec starts at the geometric
  median of 4096 rows; the mean gives the same figures (0.585 / 0.222; 0.584 / 0.224 with the offset);
- dead latents: rows since each latent last fired; past `dead_window` (default_dead_window) they
  feed the AuxK loss; the bar shows the dead % once that many rows have been trained on;
- checkpoints (`out_dir/trainer_state.safetensors`, no pickle) every `checkpoint_every` steps and on SIGINT/SIGTERM;
  started again with the same arguments it resumes, and the final weights equal an uninterrupted
  run's (the data order is a function of (seed, epoch) only);
- every `log_every` steps, a line of `<out_dir>/<spec.name>/train_log.jsonl` per SAE (step, loss, FVU,
  L0, dead fraction, lr; sae/nn/trainlog.py), cut back to the checkpoint's step on resume; with
  `tcfg.wandb`, the same numbers go to that Weights & Biases project;
- at the end: `<out_dir>/<spec.name>/{sae.safetensors, cfg.json, metrics.json}` (metrics.json:
  `evaluate`'s output, with the firing-frequency histogram, "world_size" and the "peak_lr" it trained
  at). A relu SAE's decoder norms are folded first (`fold_decoder_norms_`), so the saved files,
  metrics.json and the returned SAE (whose codes the pipeline records) are one and the same function. A
  batchtopk SAE's inference threshold is estimated at the final weights from the first THRESHOLD_ROWS
  training rows (`estimate_threshold_`); metrics.json then holds "threshold", "threshold_rows" and the
  inference "l0" it gives.

Under torchrun (data parallel, sae/util/distributed.py) every rank walks the same global batches and reads
only its share of each; gradients (weighted by the share), the dead-latent counters, BatchTopK's selection
and threshold, the displayed metrics and the evaluation are reduced over the ranks, so the weights equal a
one-process run's with the same global batch. Only rank 0 writes; a checkpoint resumes under any world size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sae.nn.checkpoint import load_trainer_state, save_sae, save_trainer_state
from sae.nn.config import SAEConfig, TrainConfig
from sae.nn.metrics import _SUMS, MetricsAccumulator
from sae.nn.model import SCALED_START, SparseAutoencoder, TrainOutput
from sae.nn.sources import ActivationSource
from sae.nn.trainlog import TrainLog, WandbLogger
from sae.util import distributed
from sae.util.atomic import write_json
from sae.util.device import resolve_device
from sae.util.errors import InputError

STATE_FILE = "trainer_state.safetensors"
OLD_STATE_FILE = "trainer_state.pt"  # pickled; never loaded
THRESHOLD_ROWS = 1 << 17  # training rows (at most one epoch) for BatchTopK's final threshold estimate


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after a SIGINT/SIGTERM once the checkpoint is safely on disk."""


@dataclass
class SAESpec:
    """One SAE to train: its output subdirectory, the source key it reads, its configuration."""

    name: str
    key: str
    cfg: SAEConfig


@dataclass
class TrainedSAE:
    sae: SparseAutoencoder
    metrics: dict[str, Any]  # evaluate()'s numbers and firing histogram
    path: Path


def sparsify_lr(d_sae: int) -> float:
    """sparsify's peak lr rule 2e-4 / sqrt(d_sae / 2^14). Measured against 2x and 0.5x on planted data
    (bench/quality.py, d 32, d_sae 256, batch 1024, 400 steps, TopK, encoder scale 0.5; cosine / FVU):
    8x superposition/heavy-tailed/k 8: 0.657 / 0.147, x2 0.715 / 0.129, x0.5 0.597 / 0.183; but 2x
    superposition/uniform/offset 10/k 4: 0.987 / 0.093, x2 0.977 / 0.079 with 69% dead latents, x0.5
    0.897 / 0.224."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


LR_SCALE = {"topk": 2.0}
"""The default peak lr's multiple of `sparsify_lr` by architecture (1 where absent). topk at 2, measured with
today's other defaults on bench/quality.py's 36 regimes at d 64 (cosine / FVU, x 2 against x 1; worse on both
in no cell): after 200 steps of 1,024 rows better on both in 36 cells (mean +0.063 / -0.045); after 380 steps
of 4,096 in 32 and no worse (by 0.001) in 34, the other 2 (2x superposition, k 32) trading cos for FVU
(0.930 / 0.054 -> 0.914 / 0.046); after 2,000 steps of 1,024 no worse in 28, six k 32 cells trading cos for
FVU (down to -0.035 / -0.003) and two 8x heavy-tailed k 8 cells FVU for cos (up to +0.017 / +0.003). The
goal against the TopK peers is met in 36 / 36 / 34 cells instead of 36 / 32 / 33. 380 steps of 4,096 at
larger d, against the constant-lr sparsify loop: d 256 (d_sae 2,048), 8x, heavy-tailed, k 8: 0.716 / 0.256
-> 0.874 / 0.174 (the loop 0.532 / 0.366); 2x, uniform, k 8: 0.998 / 0.050 -> 0.999 / 0.036 (0.996 /
0.033); d 768 (d_sae 6,144), 2x, uniform, k 8: 0.998 / 0.031 -> 0.998 / 0.014 (0.979 / 0.025). batchtopk
and matryoshka stay at 1: after 2,000 steps x 2 costs batchtopk cos (mean -0.015, down to -0.067) and
kills up to 45 % of its latents (docs/quality.md, "Peak lr x 2 for batchtopk and matryoshka")."""


def default_lr(cfg: SAEConfig) -> float:
    """The peak lr of an SAE trained without --lr: LR_SCALE[architecture] * sparsify_lr(d_sae)."""
    return LR_SCALE.get(cfg.architecture, 1.0) * sparsify_lr(cfg.d_sae)


DECODER_LR_SCALE = 10.0
"""The decoder's lr multiple for topk, batchtopk and matryoshka with unit-norm decoder rows. With rows
held at norm 1 an Adam step of size lr turns a row by about lr per coordinate, slower than the encoder
(which starts at 0.2 W_dec^T) and than a peer whose free decoder rows start at norm 0.1 (SAELens), so
the dictionary's directions lag. bench/quality.py's data and scoring, d 32, d_sae 256, 6 atoms per row,
20,000 rows, batch 1024, TopK, cosine / FVU at decoder lr x 1 / 3 / 10, 200 steps: 2x superposition,
heavy-tailed, k 8: 0.753 / 0.104, 0.901 / 0.084, 0.933 / 0.081; 2x, uniform, offset 10, k 4: 0.790 /
0.345, 0.861 / 0.321, 0.884 / 0.316; 8x, heavy-tailed, k 8: 0.630 / 0.206, 0.684 / 0.181, 0.712 /
0.173; the same after 2000 steps: 0.850 / 0.134, 0.888 / 0.132, 0.898 / 0.132 (no latent dead at any
scale)."""


def decoder_lr_scale(cfg: SAEConfig, tcfg: TrainConfig) -> float:
    """The decoder's lr multiple for an SAE (TrainConfig.decoder_lr_scale, or DECODER_LR_SCALE where it applies)."""
    if tcfg.decoder_lr_scale is not None:
        return tcfg.decoder_lr_scale
    return DECODER_LR_SCALE if cfg.architecture in SCALED_START and cfg.unit_decoder else 1.0


def _optimizer(sae: SparseAutoencoder, lr: float, decoder_scale: float) -> torch.optim.Adam:
    """Adam over the SAE's parameters; each group's "lr_scale" multiplies the scheduled lr (`_step`)."""
    rest = [p for name, p in sae.named_parameters() if name != "W_dec"]
    groups = [{"params": [sae.W_dec], "lr_scale": decoder_scale}, {"params": rest, "lr_scale": 1.0}]
    return torch.optim.Adam(groups, lr=lr)


def lr_factor(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    """Multiplier of the peak lr at `step` (0-based) of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = int(total * (1 - decay_fraction))
    if decay_fraction > 0 and step >= decay_start:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


def default_dead_window(rows_per_epoch: int, training_rows: int, batch_size: int) -> int:
    """Rows without firing after which a latent is dead (TrainConfig.dead_window's default)."""
    return max(batch_size, min(10_000_000, rows_per_epoch, training_rows // 10))


class _SignalFlag:
    """Remembers SIGINT/SIGTERM instead of dying mid-step (main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> _SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _fingerprint(source: ActivationSource, specs: list[SAESpec], tcfg: TrainConfig) -> str:
    desc = {
        "n_rows": source.n_rows,
        "d_in": {k: source.d_in(k) for k in source.keys},
        "specs": [(s.name, s.key, {k: v for k, v in s.cfg.to_dict().items() if k != "input_scale"}) for s in specs],
        "train": {k: v for k, v in tcfg.to_dict().items() if k not in _NOT_FINGERPRINTED},
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


_NOT_FINGERPRINTED = ("device", "checkpoint_every", "eval_rows", "log_every", "wandb")  # resume may change them


def _batches(source: ActivationSource, tcfg: TrainConfig, start: int, total: int) -> Iterator[tuple[int, np.ndarray]]:
    steps_per_epoch = source.steps_per_epoch(tcfg.batch_size, tcfg.batch_groups)
    step = start
    while step < total:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        for rows in source.batches(
            tcfg.batch_size, tcfg.seed, epoch, in_epoch, tcfg.shuffle_window, groups_per_batch=tcfg.batch_groups
        ):
            yield step, rows
            step += 1
            if step >= total:
                return


def _prepare(
    source: ActivationSource, specs: list[SAESpec], device: torch.device, scale_inputs: bool = True
) -> list[SparseAutoencoder]:
    """Fill in d_in / input_scale (1 unless `scale_inputs`: the centred rows' mean squared norm becomes d_in),
    build each SAE and initialise b_dec from a sample of rows."""
    sample_rows = source.sample_rows(16384)
    samples = {key: source.read(key, sample_rows) for key in {s.key for s in specs}}
    saes = []
    for spec in specs:
        x = samples[spec.key]
        spec.cfg.d_in = x.shape[1]
        xd = x.double()
        mean_sq = float(xd.pow(2).sum(1).mean())
        if mean_sq <= 0:
            raise InputError(f"activations '{spec.key}' are all zero")
        centred_sq = float((xd - xd.mean(0)).pow(2).sum(1).mean())  # E||x - mean||^2: b_dec takes the mean
        if centred_sq <= 1e-12 * mean_sq:  # the rows' spread is below float32's resolution
            raise InputError(f"activations '{spec.key}': every row is the same; an SAE has nothing to learn")
        spec.cfg.input_scale = math.sqrt(spec.cfg.d_in / centred_sq) if scale_inputs else 1.0
        sae = SparseAutoencoder(spec.cfg, device=device)
        spread = torch.linspace(0, len(x) - 1, min(4096, len(x))).round().long()  # x is in row order
        sae.init_b_dec_(x[spread] * spec.cfg.input_scale)
        saes.append(sae)
    return saes


def evaluate(
    sae: SparseAutoencoder, source: ActivationSource, key: str, rows: np.ndarray, batch_size: int = 4096
) -> dict[str, Any]:
    """Dataset-level metrics of `sae` on `rows` of `key` (inference codes, input units): the numbers
    of MetricsAccumulator.compute() plus "firing_histogram" (MetricsAccumulator.frequency_histogram:
    log10 firing-frequency bin edges and counts over the live latents, and the dead count)."""
    device = sae.W_dec.device
    acc = MetricsAccumulator(d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae)
    rows = distributed.share_rows(rows)  # under torchrun each rank its share, summed below
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            x = source.read(key, rows[start : start + batch_size]).to(device)
            codes = sae.encode(x)
            acc.update(x, sae.decode(codes), codes)
    if distributed.launched():  # the sums of every rank's share
        for name in _SUMS:
            setattr(acc, name, distributed.all_sum(getattr(acc, name).to(device)))
        acc.n_rows = distributed.batch_rows(acc.n_rows)
    return {**acc.compute(), "firing_histogram": acc.frequency_histogram()}


def train_saes(
    source: ActivationSource,
    specs: list[SAESpec],
    tcfg: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, TrainedSAE]:
    """Train every SAE of `specs` on `source`; see the module docstring. Returns them by spec name."""
    out_dir = Path(out_dir)
    _check_inputs(source, specs, tcfg, out_dir)
    distributed.init(tcfg.device)
    world = distributed.world_size()
    device = resolve_device(distributed.local_device() if tcfg.device in ("auto", "cuda") else tcfg.device)
    last_batch = source.n_rows % tcfg.batch_size or tcfg.batch_size
    if min(tcfg.batch_size, last_batch) < world:
        raise InputError(f"a batch of {min(tcfg.batch_size, last_batch)} rows cannot be split over {world} processes")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    steps_per_epoch = source.steps_per_epoch(tcfg.batch_size, tcfg.batch_groups)
    total = max(1, math.ceil(tcfg.epochs * steps_per_epoch))
    warmup = tcfg.warmup_steps if tcfg.warmup_steps is not None else min(1000, max(1, total // 20))
    batch_rows = -(-source.n_rows // steps_per_epoch) if tcfg.batch_groups else tcfg.batch_size  # mean rows per step
    dead_window = tcfg.dead_window or default_dead_window(source.n_rows, total * batch_rows, batch_rows)
    fingerprint = _fingerprint(source, specs, tcfg)
    state_path = out_dir / STATE_FILE
    run = _start_or_resume(source, specs, tcfg, state_path, fingerprint, device)

    main_rank = distributed.is_main()  # under torchrun only rank 0 writes the logs
    logs = [TrainLog(out_dir / spec.name if spec.name else out_dir, run.step) if main_rank else None for spec in specs]
    wandb = (
        WandbLogger(tcfg.wandb, out_dir.name, f"{out_dir.name}-{fingerprint}", {"train": tcfg.to_dict()})
        if tcfg.wandb and main_rank
        else None
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and tcfg.autocast
        else contextlib.nullcontext()
    )
    bar = tqdm(
        total=total,
        initial=run.step,
        desc=f"training {len(specs)} SAE(s)",
        unit="step",
        disable=not progress or not main_rank,
        dynamic_ncols=True,
    )
    with _SignalFlag() as flag:
        for step, rows in _batches(source, tcfg, run.step, total):
            mine = distributed.share_rows(rows)  # this rank's part of the global batch (all of it on one process)
            batch = {key: source.read(key, mine).to(device, non_blocking=True) for key in {s.key for s in specs}}
            factor = lr_factor(step, total, warmup, tcfg.decay_fraction)
            run.rows_seen += len(rows)
            run.step = done = step + 1
            log_now = done % tcfg.log_every == 0 or done == total
            shown = []
            for i, (spec, log) in enumerate(zip(specs, logs)):
                xs = batch[spec.key] * spec.cfg.input_scale
                with autocast:
                    out = _step(run, i, xs, dead_window, run.lrs[i] * factor, len(rows))
                if len(shown) < 3 or log_now:
                    entry = _step_figures(out, xs, run.since_fired[i], dead_window, run.rows_seen)
                    if len(shown) < 3:
                        dead = entry["dead_fraction"]
                        shown.append(
                            f"loss {entry['loss']:.4f} fvu {entry['fvu']:.3f} L0 {out.l0:.1f} dead "
                            + ("n/a" if dead is None else f"{dead:.1%}")
                        )
                    if log_now and log is not None:
                        entry = {"step": done, "rows_seen": run.rows_seen, **entry, "lr": run.lrs[i] * factor}
                        log.write(entry)
                        if wandb is not None:
                            wandb.log(spec.name, entry)
            bar.set_postfix_str(" | ".join(shown) + (" ..." if len(specs) > 3 else ""), refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step)
            if distributed.launched():  # stop together: a signal seen by any rank stops every rank here
                flag.received = distributed.broadcast_stop(flag.received)
            if flag.received is not None:
                _save_checkpoint(run, specs, fingerprint, state_path)
                bar.close()
                _close(logs)
                raise TrainingInterrupted(
                    f"stopped by signal {flag.received} after step {done}/{total}; checkpoint saved in "
                    f"{state_path}; run the same command again to resume"
                )
            if done % tcfg.checkpoint_every == 0 and done < total:
                _save_checkpoint(run, specs, fingerprint, state_path)
    bar.close()
    _close(logs)
    if wandb is not None:
        wandb.close()
    _save_checkpoint(run, specs, fingerprint, state_path)
    return _save_and_evaluate(source, specs, run.saes, run.lrs, tcfg, out_dir, device, steps_per_epoch)


def _check_inputs(source: ActivationSource, specs: list[SAESpec], tcfg: TrainConfig, out_dir: Path) -> None:
    """One-line errors for an unusable output folder, source or spec; fills each cfg.d_in. Creates out_dir."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output directory {out_dir} is an existing file; choose another --out")
    if (out_dir / OLD_STATE_FILE).exists() and not (out_dir / STATE_FILE).exists():
        raise InputError(
            f"{out_dir / OLD_STATE_FILE} is a checkpoint in the old pickle format, which is never loaded (it could "
            "run code); delete it to train from the start"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if len({s.name for s in specs}) != len(specs):
        raise InputError("two SAEs share an output name")
    if source.n_rows < 2:
        raise InputError(f"training needs at least 2 rows of activations, got {source.n_rows}")
    for spec in specs:
        if spec.key not in source.keys:
            raise InputError(f"no activations named '{spec.key}' (have {source.keys})")
        spec.cfg.d_in = source.d_in(spec.key)
        spec.cfg.validate()


@dataclass
class _Run:
    """The training state a checkpoint holds, with the configs: per SAE (in spec order) the model, its
    optimiser, its peak lr and rows since each latent last fired ([d_sae] int64); and the steps and rows done."""

    saes: list[SparseAutoencoder]
    opts: list[torch.optim.Adam]
    lrs: list[float]
    since_fired: list[torch.Tensor]
    step: int
    rows_seen: int


def _start_or_resume(
    source: ActivationSource,
    specs: list[SAESpec],
    tcfg: TrainConfig,
    state_path: Path,
    fingerprint: str,
    device: torch.device,
) -> _Run:
    """A fresh run (every rank starting from rank 0's initialisation), or the one checkpointed at
    `state_path` if it was made with the same settings (then each spec.cfg becomes the saved one)."""
    state = load_trainer_state(state_path) if state_path.exists() else None
    if state is not None and state["fingerprint"] != fingerprint:
        raise InputError(f"{state_path.parent} holds a run with other settings; choose another --out or delete it")
    if state is None:
        saes = _prepare(source, specs, device, tcfg.scale_inputs)
        for sae in saes:
            distributed.broadcast_tensors_([*sae.parameters(), *sae.buffers()])
        since_fired = [torch.zeros(s.cfg.d_sae, dtype=torch.long, device=device) for s in specs]
        step = rows_seen = 0
    else:
        for spec in specs:
            spec.cfg = SAEConfig.from_dict(state["cfgs"][spec.name])
        saes = [SparseAutoencoder(spec.cfg, device=device) for spec in specs]
        for sae, spec in zip(saes, specs):
            sae.load_state_dict(state["saes"][spec.name])
        since_fired = [state["since_fired"][s.name].to(device) for s in specs]
        step = state["step"]
        rows_seen = state.get("rows_seen", step * tcfg.batch_size)
    lrs = [tcfg.lr or default_lr(s.cfg) for s in specs]
    opts = [_optimizer(sae, lr, decoder_lr_scale(s.cfg, tcfg)) for sae, lr, s in zip(saes, lrs, specs)]
    if state is not None:
        for opt, spec in zip(opts, specs):
            opt.load_state_dict(state["opts"][spec.name])
    return _Run(saes, opts, lrs, since_fired, step, rows_seen)


def _save_checkpoint(run: _Run, specs: list[SAESpec], fingerprint: str, path: Path) -> None:
    """Write `run` to `path` (rank 0 only; sae/nn/checkpoint.py: safetensors, no pickle)."""
    if not distributed.is_main():
        return
    snapshot = {
        "fingerprint": fingerprint,
        "step": run.step,
        "cfgs": {s.name: s.cfg.to_dict() for s in specs},
        "saes": {s.name: sae.state_dict() for s, sae in zip(specs, run.saes)},
        "opts": {s.name: opt.state_dict() for s, opt in zip(specs, run.opts)},
        "since_fired": {s.name: sf.cpu() for s, sf in zip(specs, run.since_fired)},
        "rows_seen": run.rows_seen,
    }
    save_trainer_state(snapshot, path)


def _step(run: _Run, i: int, xs: torch.Tensor, dead_window: int, lr: float, batch_rows: int) -> TrainOutput:
    """One optimiser step of SAE `i` on this rank's scaled rows xs [n, d_in] of a global batch of `batch_rows`:
    loss (AuxK on the latents silent for `dead_window` rows), gradients averaged over the ranks, the
    decoder's unit-norm constraint, and the dead-latent counters."""
    sae, opt, since_fired = run.saes[i], run.opts[i], run.since_fired[i]
    out = sae.training_loss(xs, since_fired >= dead_window)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    distributed.reduce_grads_(sae.parameters(), xs.shape[0] / batch_rows)
    sae.remove_parallel_grad_()
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_scale"]
    opt.step()
    sae.normalize_decoder_()
    since_fired += batch_rows
    since_fired[distributed.all_max(out.fired.clone())] = 0  # fired on any rank
    return out


def _step_figures(
    out: TrainOutput, xs: torch.Tensor, since_fired: torch.Tensor, dead_window: int, rows_seen: int
) -> dict[str, Any]:
    """The numbers shown on the bar and logged: loss, FVU over the global batch, L0 and the dead fraction
    (None before one window of rows, when nothing can be dead yet)."""
    var = distributed.centered_sum_sq(xs) / xs.shape[0]
    fvu = float(out.recon_loss * xs.shape[1] / var.clamp_min(1e-12))
    dead = float((since_fired >= dead_window).float().mean()) if rows_seen >= dead_window else None
    return {"loss": float(out.loss.detach()), "fvu": fvu, "l0": out.l0, "dead_fraction": dead}


def _close(logs: list[TrainLog | None]) -> None:
    for log in logs:
        if log is not None:
            log.close()


def _save_and_evaluate(
    source: ActivationSource,
    specs: list[SAESpec],
    saes: list[SparseAutoencoder],
    lrs: list[float],
    tcfg: TrainConfig,
    out_dir: Path,
    device: torch.device,
    steps_per_epoch: int,
) -> dict[str, TrainedSAE]:
    """The end of a run: fold (relu), estimate batchtopk's threshold at the final weights, evaluate, and
    (rank 0) write each SAE's files and metrics.json."""
    eval_rows = source.sample_rows(tcfg.eval_rows or source.n_rows)
    results = {}
    for spec, sae, lr in zip(specs, saes, lrs):
        path = out_dir / spec.name if spec.name else out_dir
        sae.fold_decoder_norms_()  # relu: metrics, the returned SAE and the files are the one folded SAE
        extra: dict[str, Any] = {}
        if spec.cfg.architecture == "batchtopk":
            n_batches = max(1, min(steps_per_epoch, -(-THRESHOLD_ROWS // tcfg.batch_size)))
            batches = (
                source.read(spec.key, rows).to(device) * spec.cfg.input_scale
                for _, rows in _batches(source, tcfg, 0, n_batches)
            )
            extra["threshold_rows"] = sae.estimate_threshold_(batches)
            extra["threshold"] = float(sae.threshold)
        metrics = {
            "eval_rows": int(len(eval_rows)),
            **extra,
            **evaluate(sae, source, spec.key, eval_rows, tcfg.batch_size),
        }
        metrics["world_size"] = distributed.world_size()
        metrics["peak_lr"] = lr  # the encoder's; the decoder's is decoder_lr_scale times it
        if distributed.is_main():
            save_sae(sae, path)
            write_json(path / "metrics.json", metrics)
        results[spec.name] = TrainedSAE(sae, metrics, path)
    distributed.barrier()  # the files exist when any rank returns
    return results
