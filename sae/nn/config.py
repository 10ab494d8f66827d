"""Configuration dataclasses. Each field's `help` metadata is its command-line help text."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sae.util.cli import add_dataclass_args, dataclass_from_args
from sae.util.errors import InputError

ARCHITECTURES = ("topk", "batchtopk", "msae_uw", "msae_rw", "matryoshka", "relu")
# read from other libraries' folders (sae/nn/interop.py) for inference, never trained here:
# jumprelu = pre * (pre > threshold_i), one threshold per latent
LOADED_ONLY = ("jumprelu",)
# matryoshka's default prefixes hold at least this many times k latents. Published Matryoshka SAEs start at 3k
# to 72k (a SAELens Gemma-2-2B release: 128 latents at k 40; Bussmann et al.: 2,304 at k 32); a prefix of about k
# latents must rebuild each row with most of them (14 of 32 active per row at k 32). bench/quality.py, d 64,
# d_sae 512, k 32, 200 steps, cos / FVU, smallest prefix 32 (k) -> 128 (4k): 2x heavy-tailed offset 10
# 0.560 / 0.069 -> 0.618 / 0.061 (seeds 1, 2: 0.546 -> 0.618, 0.558 -> 0.621; SAELens at the same widths
# 0.571-0.593), 2x uniform 0.657 / 0.106 -> 0.751 / 0.096, 8x heavy-tailed 0.453 / 0.146 -> 0.463 / 0.136.
MIN_PREFIX_PER_K = 4


def _help(text: str, **extra: Any) -> Any:
    return {"help": text, **extra}


@dataclass
class SAEConfig:
    """What an SAE is: stored as cfg.json beside its weights."""

    architecture: str = field(
        default="topk",
        metadata=_help(
            "topk (Gao et al. 2024), batchtopk (Bussmann et al. 2024), msae_uw / msae_rw (Matryoshka over k, "
            "Zaigrajew et al. 2025, uniform / reverse weights), matryoshka (nested dictionary prefixes, "
            "Bussmann/Nabeshima 2025), relu (L1 penalty weighted by decoder norms)",
            choices=ARCHITECTURES,
        ),
    )
    d_in: int = field(default=0, metadata=_help("input width (set from the data)"))
    d_sae: int = field(default=0, metadata=_help("number of latents (expansion_factor * d_in when 0)"))
    k: int | None = field(
        default=None,
        metadata=_help(
            "active latents per row: per row (topk, matryoshka), on average over the batch (batchtopk), "
            "smallest nested level and inference k (msae_*); unused by relu. Default 32; for msae_* the "
            "first of --k_levels, else 64 (MSAE's levels 64, 128, ...)"
        ),
    )
    k_levels: list[int] | None = field(
        default=None,
        metadata=_help(
            "msae_*: the nested k values; default k, 2k, 4k, ... (< d_sae), then d_sae (with the default "
            "k: 64, 128, ..., d_sae, MSAE's rule)"
        ),
    )
    prefixes: list[int] | None = field(
        default=None,
        metadata=_help(
            "matryoshka: nested prefix sizes; default d_sae/16, /8, /4, /2, d_sae (groups 1/16,1/16,1/8,1/4,1/2), "
            "without the prefixes smaller than 4k"
        ),
    )
    l1_coef: float = field(
        default=0.05,
        metadata=_help("relu: coefficient of sum_i z_i ||W_dec_i|| (inputs scaled: centred mean squared norm d_in)"),
    )
    k_aux: int | None = field(
        default=None,
        metadata=_help("topk/batchtopk/matryoshka: dead latents used by the AuxK loss (default d_in // 2); 0 disables"),
    )
    aux_coef: float = field(default=1 / 32, metadata=_help("weight of the AuxK loss"))
    seed: int = field(default=0, metadata=_help("initialisation seed"))
    input_scale: float = field(
        default=1.0,
        metadata=_help("inputs are multiplied by this before encoding (training sets E||x - mean||^2 = d_in)"),
    )
    b_dec_init: str = field(
        default="geometric_median",
        metadata=_help("initial pre-encoder bias b_dec", choices=("geometric_median", "mean", "zeros")),
    )
    decoder_bias: bool = field(
        default=True,
        metadata=_help(
            "train a decoder bias b_dec (off, or --no_b_dec: b_dec stays 0, as the Bridge Score paper's joint SAE)"
        ),
    )
    encoder_bias: bool = field(
        default=True, metadata=_help("train an encoder bias b_enc (off: b_enc stays 0, as in the original repo)")
    )
    unit_decoder: bool = field(
        default=True,
        metadata=_help(
            "topk family: keep decoder rows at unit norm during training (off: normalised once at init, as in "
            "the original repo)"
        ),
    )
    init: str = field(
        default="tied",
        metadata=_help(
            "weights at init: tied = unit-norm decoder rows, W_enc = W_dec^T (x 0.2 for topk, batchtopk, "
            "matryoshka: sae/nn/model.py ENC_INIT_SCALE); original = W_enc kaiming-uniform [d_in, d_sae], "
            "W_dec = W_enc^T with unit rows (the original repo)",
            choices=("tied", "original"),
        ),
    )

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES + LOADED_ONLY:
            raise InputError(f"unknown --sae '{self.architecture}'; choose one of {', '.join(ARCHITECTURES)}")
        if self.k is None:
            if self.architecture.startswith("msae"):
                self.k = self.k_levels[0] if self.k_levels else 64
            else:
                self.k = 32

    def validate(self) -> None:
        """Check the sizes once d_in and d_sae are known."""
        if self.d_in <= 0 or self.d_sae <= 0:
            raise InputError(f"d_in and d_sae must be positive (got {self.d_in}, {self.d_sae})")
        if self.architecture != "relu" and not 0 < self.active_k < self.d_sae:
            raise InputError(f"--k must satisfy 0 < k < d_sae (got k={self.k}, d_sae={self.d_sae})")
        if self.architecture.startswith("msae") and self.k_levels is not None:
            levels = self.k_levels
            if sorted(set(levels)) != list(levels) or levels[0] < 1 or levels[-1] > self.d_sae:
                raise InputError(f"--k_levels must increase strictly within 1..d_sae (got {levels})")
        if self.architecture == "matryoshka" and self.prefixes is not None:
            p = self.prefixes
            if sorted(set(p)) != list(p) or p[0] < 1 or p[-1] != self.d_sae:
                raise InputError(f"--prefixes must increase strictly and end at d_sae={self.d_sae} (got {p})")

    @property
    def levels(self) -> list[int]:
        """msae_*: nested k values, ascending, ending at d_sae."""
        if self.k_levels is not None:
            return list(self.k_levels)
        out, k = [], self.active_k
        while k < self.d_sae:
            out.append(k)
            k *= 2
        return out + [self.d_sae]

    @property
    def active_k(self) -> int:
        """`k` once `__post_init__` has filled its default (never None on a constructed config)."""
        assert self.k is not None, "SAEConfig.__post_init__ sets k"
        return self.k

    @property
    def prefix_sizes(self) -> list[int]:
        """matryoshka: nested prefix sizes, ascending, ending at d_sae. The default drops prefixes of fewer
        than MIN_PREFIX_PER_K * k latents: a prefix near k latents is asked to rebuild each row alone and
        becomes a dense code, not a sparse one."""
        if self.prefixes is not None:
            return list(self.prefixes)
        halves = {self.d_sae // f for f in (16, 8, 4, 2)}
        return sorted({p for p in halves if p >= MIN_PREFIX_PER_K * self.active_k} | {self.d_sae})

    @property
    def aux_k(self) -> int:
        if self.architecture in ("relu", "msae_uw", "msae_rw"):
            return 0  # MSAE parity: no AuxK; ReLU SAEs have no dead-latent loss
        return self.d_in // 2 if self.k_aux is None else self.k_aux

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainConfig:
    """How to train: shared by every SAE trained in one pass."""

    epochs: float = field(default=5, metadata=_help("passes over the data (fractions allowed)"))
    batch_size: int = field(default=4096, metadata=_help("rows per optimisation step"))
    lr: float | None = field(
        default=None,
        metadata=_help(
            "peak learning rate (default 2e-4 * sqrt(16384 / d_sae), sparsify's scaling; twice that for topk)"
        ),
    )
    warmup_steps: int | None = field(
        default=None, metadata=_help("linear warm-up steps (default min(1000, 5%% of the steps))")
    )
    decay_fraction: float = field(default=0.2, metadata=_help("final fraction of steps with linear decay to 0"))
    decoder_lr_scale: float | None = field(
        default=None,
        metadata=_help(
            "the decoder's learning rate is --lr times this (default: 10 for topk, batchtopk and matryoshka with "
            "unit-norm decoder rows, where it sets how fast the directions turn; 1 otherwise)"
        ),
    )
    dead_window: int | None = field(
        default=None,
        metadata=_help(
            "a latent is dead (and feeds the AuxK loss) after this many rows without firing; default "
            "min(10M, rows per epoch, training rows / 10), at least one batch: 10M as Gao et al., capped "
            "at one epoch (a latent silent on a whole pass over the data is dead on it) and at a tenth of "
            "training, so AuxK acts during at least 90%% of a short run"
        ),
    )
    checkpoint_every: int = field(default=1000, metadata=_help("steps between checkpoints (also on Ctrl-C/SIGTERM)"))
    eval_rows: int = field(default=262144, metadata=_help("rows used for the final metrics (0 = all rows)"))
    shuffle_window: int = field(
        default=1 << 20,
        metadata=_help("rows are shuffled within contiguous windows of this size (in random window order)"),
    )
    batch_groups: int = field(
        default=0,
        metadata=_help(
            "when > 0, a step trains on every token of this many inputs (images or captions, in random order) "
            "instead of --batch_size tokens (the original repo: 16 images, 256 captions)"
        ),
    )
    scale_inputs: bool = field(
        default=True, metadata=_help("scale inputs to E||x - mean||^2 = d_in (off: as they are, the original repo)")
    )
    autocast: bool = field(default=True, metadata=_help("bf16 autocast on CUDA (off: fp32, the original repo)"))
    seed: int = field(default=0, metadata=_help("data-order seed"))
    device: str = field(default="auto", metadata=_help("auto (cuda if present), cpu or cuda[:i]"))
    log_every: int = field(
        default=10, metadata=_help("steps between lines of each SAE's train_log.jsonl (the last step is always logged)")
    )
    wandb: str | None = field(
        default=None, metadata=_help("also log the curves to this Weights & Biases project (needs the wandb package)")
    )

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise InputError(f"--epochs must be positive (got {self.epochs})")
        if self.batch_size < 1:
            raise InputError(f"--batch_size must be at least 1 (got {self.batch_size})")
        if self.lr is not None and not self.lr > 0:
            raise InputError(f"--lr must be positive (got {self.lr})")
        if self.decoder_lr_scale is not None and not self.decoder_lr_scale > 0:
            raise InputError(f"--decoder_lr_scale must be positive (got {self.decoder_lr_scale})")
        if self.log_every < 1:
            raise InputError(f"--log_every must be at least 1 (got {self.log_every})")
        if self.batch_groups < 0:
            raise InputError(f"--batch_groups must be >= 0 (got {self.batch_groups})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SAE_SKIP = ("architecture", "d_in", "d_sae", "input_scale", "seed")


def add_sae_args(parser: argparse._ActionsContainer) -> None:
    """The SAE and training flags shared by every training entry point."""
    parser.add_argument(
        "--sae",
        default="topk",
        choices=SAEConfig.__dataclass_fields__["architecture"].metadata["choices"],
        help=SAEConfig.__dataclass_fields__["architecture"].metadata["help"],
    )
    parser.add_argument("--expansion_factor", type=float, default=8, help="d_sae = expansion_factor * d_in")
    parser.add_argument("--d_sae", type=int, default=0, help="number of latents (overrides --expansion_factor)")
    add_dataclass_args(parser, SAEConfig, skip=_SAE_SKIP)
    parser.add_argument(
        "--no_b_dec", dest="decoder_bias", action="store_false", help="no decoder bias (= --no-decoder_bias)"
    )
    add_dataclass_args(parser, TrainConfig)


def sae_config_from_args(args: argparse.Namespace, d_in: int, seed: int | None = None) -> SAEConfig:
    d_sae = args.d_sae or int(round(args.expansion_factor * d_in))
    return dataclass_from_args(
        SAEConfig, args, architecture=args.sae, d_in=d_in, d_sae=d_sae, seed=args.seed if seed is None else seed
    )
