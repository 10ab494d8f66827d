"""Joint image+text SAEs on a vision-language embedding space: modality score, energy, Bridge Score.

Notation (docs/analyses.md §2; Papadimitriou, Su, Fel et al. 2025). One SAE encodes both modalities.
z_img [N_img, c] and z_txt [N_txt, c] are its codes (>= 0) for image and text embeddings; for the
Bridge Score the rows are N matching (image, caption) pairs: row n of z_img and row n of z_txt.
D [c, d] is the decoder (W_dec; unit-norm rows, so D D^T is the cosine matrix of the concepts).

    m_img_i   = (1/N_img) sum_n z_img[n, i]        m_txt_i = (1/N_txt) sum_n z_txt[n, i]
    mu_i      = m_img_i / (m_img_i + m_txt_i)      modality score: 1 = image only, 0 = text only
                (per-modality means, so unequal N_img / N_txt do not move it; NaN for dead concepts)
    energy_i  = (sum_n z_img[n, i] + sum_n z_txt[n, i]) / (N_img + N_txt)   (all inputs together)
    energy_sq_i, frequency_i: the same with z^2 and [z > 0]
    dead_i    = energy_i < 1e-9
    buckets   : text-only mu < eps, image-only mu > 1 - eps, bimodal otherwise (eps = 0.05); each with
                its concept count and its share of the live concepts' total energy
    C         = (1/N) z_img^T z_txt                 [c, c] co-activation over pairs (rows: image side)
    B         = C * (D D^T)                         Bridge Score matrix, element-wise; not symmetric
    B_ij      = (1/N) sum_n z_img[n, i] z_txt[n, j] cos(d_i, d_j)

Identity (the test): with x0 = z D, the reconstruction without decoder bias in the SAE's scaled units,
    sum_ij B_ij = (1/N) sum_n <x0_img_n, x0_txt_n>.
Our SAE reconstructs x_hat = (z D + b) / s (b = b_dec, s = cfg.input_scale), so
    (1/N) sum_n <x_hat_img_n, x_hat_txt_n> = (sum B + E[z_img] D.b + b.D^T E[z_txt] + |b|^2) / s^2
with E over the N pairs (`alignment_terms`).

B is never materialised by `bridge_summary`: it is built in blocks of image-side rows, B[r0:r1] =
(z_img[:, r0:r1]^T z_txt / N) * (D[r0:r1] D^T) from sparse products, keeping a running top list, the
totals and the per-concept bridge masses (sum_j |B_ij| and sum_i |B_ij|). Memory: one [block, c]
block (block = 1024: 64 MiB at c = 8192).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse
import torch
from tqdm.auto import tqdm

from sae.analysis.stability import encode_codes
from sae.data.features import SparseCodes
from sae.nn.sources import check_finite_rows
from sae.util.errors import InputError

if TYPE_CHECKING:
    from sae.nn.model import SparseAutoencoder

Codes = np.ndarray | torch.Tensor | SparseCodes | scipy.sparse.spmatrix
DEAD_ENERGY = 1e-9
BRIDGE_DEFINITION = (
    "B_ij = (1/N) sum_n z_img[n,i] z_txt[n,j] cos(d_i, d_j) (Papadimitriou et al. 2025); sum_B in the SAE's "
    "scaled units (inputs times input_scale s), sum_B_input_units = sum_B / s^2, sum_B_per_unit_norm = "
    "sum_B_input_units / mean_n |img_n| |txt_n|; sum_B_input_units = mean <x_hat_img, x_hat_txt> only without a "
    "decoder bias (the paper's joint SAE: analyze.py joint --no_b_dec)"
)


def as_csr(z: Codes) -> scipy.sparse.csr_matrix:
    """Codes [N, c] (dense numpy/torch, SparseCodes or scipy sparse) as a float64 CSR matrix."""
    if isinstance(z, SparseCodes):
        return scipy.sparse.csr_matrix(
            (np.asarray(z.values, dtype=np.float64), np.asarray(z.indices), np.asarray(z.indptr)),
            shape=(z.n_rows, z.d_sae),
        )
    if isinstance(z, torch.Tensor):
        z = z.detach().cpu().numpy()
    if scipy.sparse.issparse(z):
        return scipy.sparse.csr_matrix(z, dtype=np.float64)  # pyright: ignore[reportCallIssue, reportArgumentType]  # scipy-stubs: spmatrix is a mixin, not the sparse base csr_matrix() takes
    z = np.asarray(z)
    if z.ndim != 2:
        raise InputError(f"codes must be 2-D [rows, concepts], got shape {z.shape}")
    return scipy.sparse.csr_matrix(z.astype(np.float64))


# ------------------------------------------------------------------------------------------------
# Modality score and energy


@dataclass
class ModalityStats:
    """Per-concept statistics of a joint SAE's codes, float64 [c] (see the module docstring)."""

    n_image: int
    n_text: int
    mean_image: np.ndarray
    mean_text: np.ndarray
    freq_image: np.ndarray
    freq_text: np.ndarray
    energy: np.ndarray
    energy_sq: np.ndarray
    frequency: np.ndarray

    @property
    def dead(self) -> np.ndarray:
        return self.energy < DEAD_ENERGY

    @property
    def modality(self) -> np.ndarray:
        """mu [c]: m_img / (m_img + m_txt); NaN for dead concepts."""
        total = self.mean_image + self.mean_text
        out = np.full(len(total), np.nan)
        live = ~self.dead & (total > 0)
        out[live] = self.mean_image[live] / total[live]
        return out


def modality_stats(z_img: Codes, z_txt: Codes) -> ModalityStats:
    """ModalityStats from image codes [N_img, c] and text codes [N_txt, c] (N_img may differ)."""
    zi, zt = as_csr(z_img), as_csr(z_txt)
    if zi.shape[1] != zt.shape[1]:
        raise InputError(f"image and text codes have different widths: {zi.shape[1]} vs {zt.shape[1]}")
    if zi.shape[0] == 0 or zt.shape[0] == 0:
        raise InputError("need at least one image row and one text row")
    ni, nt = zi.shape[0], zt.shape[0]
    col = lambda m: np.asarray(m.sum(0)).ravel()  # noqa: E731
    si, st = col(zi), col(zt)
    sqi, sqt = col(zi.multiply(zi)), col(zt.multiply(zt))
    fi, ft = col(zi > 0), col(zt > 0)
    n = ni + nt
    return ModalityStats(ni, nt, si / ni, st / nt, fi / ni, ft / nt, (si + st) / n, (sqi + sqt) / n, (fi + ft) / n)


def modality_buckets(stats: ModalityStats, eps: float = 0.05) -> dict[str, Any]:
    """Live concepts by modality: text-only (mu < eps), image-only (mu > 1 - eps), bimodal; with the
    fraction of the count and of the total energy in each."""
    mu = stats.modality
    live = ~stats.dead
    e_total = stats.energy[live].sum()
    n_live = int(live.sum())
    masks = {"text": live & (mu < eps), "image": live & (mu > 1 - eps), "bimodal": live & (mu >= eps) & (mu <= 1 - eps)}
    out: dict[str, Any] = {"eps": eps, "n_live": n_live, "n_dead": int((~live).sum())}
    for name, m in masks.items():
        out[name] = {
            "count": int(m.sum()),
            "count_fraction": float(m.sum() / max(1, n_live)),
            "energy_fraction": float(stats.energy[m].sum() / e_total) if e_total > 0 else float("nan"),
        }
    return out


def modality_histogram(stats: ModalityStats, bins: int = 20) -> dict[str, list[float]]:
    """Histogram of mu over live concepts on [0, 1]: by count and weighted by energy."""
    mu = stats.modality
    live = ~stats.dead
    edges = np.linspace(0, 1, bins + 1)
    counts, _ = np.histogram(mu[live], bins=edges)
    energy, _ = np.histogram(mu[live], bins=edges, weights=stats.energy[live])
    return {"edges": edges.tolist(), "count": counts.tolist(), "energy": energy.tolist()}


# ------------------------------------------------------------------------------------------------
# Bridge Score


def _paired(
    z_img: Codes, z_txt: Codes, D: np.ndarray | torch.Tensor
) -> tuple[scipy.sparse.csr_matrix, scipy.sparse.csr_matrix, np.ndarray]:
    zi, zt = as_csr(z_img), as_csr(z_txt)
    D = D.detach().cpu().numpy() if isinstance(D, torch.Tensor) else np.asarray(D)
    D = D.astype(np.float64)
    if zi.shape[0] != zt.shape[0]:
        raise InputError(f"the Bridge Score needs paired rows: {zi.shape[0]} image rows vs {zt.shape[0]} text rows")
    if not (zi.shape[1] == zt.shape[1] == D.shape[0]):
        raise InputError(f"codes have {zi.shape[1]} / {zt.shape[1]} concepts, the decoder {D.shape[0]} rows")
    if zi.shape[0] == 0:
        raise InputError("no pairs")
    return zi, zt, D


def bridge_matrix(z_img: Codes, z_txt: Codes, D: np.ndarray | torch.Tensor) -> np.ndarray:
    """The dense Bridge Score matrix B [c, c] (float64; rows image side). For small c; see
    `bridge_summary` for large dictionaries."""
    zi, zt, D = _paired(z_img, z_txt, D)
    C = (zi.T @ zt).toarray() / zi.shape[0]
    return C * (D @ D.T)


@dataclass
class BridgePair:
    i: int  # image-side concept (row of B)
    j: int  # text-side concept (column of B)
    bridge: float  # B_ij
    coactivation: float  # C_ij = E_pairs[z_img_i z_txt_j]
    cosine: float  # D_i . D_j

    def to_json(self, stats: ModalityStats | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "i": self.i,
            "j": self.j,
            "bridge": self.bridge,
            "coactivation": self.coactivation,
            "cosine": self.cosine,
        }
        if stats is not None:
            mu = stats.modality
            out.update(
                mu_i=_num(mu[self.i]),
                mu_j=_num(mu[self.j]),
                energy_i=float(stats.energy[self.i]),
                energy_j=float(stats.energy[self.j]),
            )
        return out


def _num(v: float) -> float | None:
    return None if not math.isfinite(v) else float(v)


class _TopList:
    """Running top-`k` entries (value, i, j) over blocks."""

    def __init__(self, k: int):
        self.k = k
        self.vals = np.empty(0)
        self.i = np.empty(0, dtype=np.int64)
        self.j = np.empty(0, dtype=np.int64)

    def add(self, block: np.ndarray, row0: int, mask: np.ndarray | None = None) -> None:
        if self.k <= 0:
            return
        vals = block if mask is None else np.where(mask, block, -np.inf)
        flat = vals.ravel()
        take = min(self.k, flat.size)
        idx = np.argpartition(-flat, take - 1)[:take]
        idx = idx[np.isfinite(flat[idx])]
        r, c = np.divmod(idx, block.shape[1])
        self.vals = np.concatenate([self.vals, flat[idx]])
        self.i = np.concatenate([self.i, r + row0])
        self.j = np.concatenate([self.j, c])
        order = np.lexsort((self.j, self.i, -self.vals))[: self.k]
        self.vals, self.i, self.j = self.vals[order], self.i[order], self.j[order]


@dataclass
class BridgeSummary:
    """What `bridge_summary` keeps of B [c, c] without materialising it."""

    n_pairs: int
    total: float  # sum_ij B_ij
    diagonal_total: float  # sum_i B_ii
    top_pairs: list[BridgePair]  # largest off-diagonal B_ij
    top_cross_pairs: list[BridgePair]  # largest B_ij with mu_i > 0.5 > mu_j (image- x text-dominant)
    top_diagonal: list[BridgePair]  # largest B_ii
    mass_image: np.ndarray  # [c] sum_j |B_ij|
    mass_text: np.ndarray  # [c] sum_i |B_ij|

    @property
    def bridge_modality(self) -> np.ndarray:
        """mu_B [c] = mass_image / (mass_image + mass_text); NaN where both are 0."""
        tot = self.mass_image + self.mass_text
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tot > 0, self.mass_image / tot, np.nan)

    def to_json(self, stats: ModalityStats | None = None) -> dict[str, Any]:
        return {
            "n_pairs": self.n_pairs,
            "sum_B": self.total,
            "sum_diagonal": self.diagonal_total,
            "sum_off_diagonal": self.total - self.diagonal_total,
            "top_pairs": [p.to_json(stats) for p in self.top_pairs],
            "top_cross_modal_pairs": [p.to_json(stats) for p in self.top_cross_pairs],
            "top_diagonal": [p.to_json(stats) for p in self.top_diagonal],
        }


def bridge_summary(
    z_img: Codes,
    z_txt: Codes,
    D: np.ndarray | torch.Tensor,
    *,
    top: int = 20,
    modality: np.ndarray | None = None,
    block: int = 1024,
    progress: bool = False,
) -> BridgeSummary:
    """Stream B = (z_img^T z_txt / N) * (D D^T) in blocks of image-side rows (see the module
    docstring): totals, the `top` largest off-diagonal entries, the `top` largest with
    mu_i > 0.5 > mu_j (needs `modality` [c]; live concepts only), the `top` largest diagonal
    entries, and the bridge masses."""
    zi, zt, D = _paired(z_img, z_txt, D)
    n, c = zi.shape
    ziT = zi.T.tocsr()  # [c, N]
    ztT = zt.T.tocsr()  # [c, N], for single co-activations
    total = 0.0
    mass_img = np.zeros(c)
    mass_txt = np.zeros(c)
    tops, cross = _TopList(top), _TopList(top)
    diag_vals = np.empty(c)
    img_side = txt_side = None
    if modality is not None:
        mu = np.asarray(modality, dtype=np.float64)
        img_side = np.nan_to_num(mu, nan=-1.0) > 0.5
        txt_side = np.nan_to_num(mu, nan=2.0) < 0.5
    for r0 in tqdm(range(0, c, block), desc="bridge blocks", disable=not progress, leave=False):
        r1 = min(c, r0 + block)
        C = (ziT[r0:r1] @ zt).toarray() / n  # [b, c]
        B = C * (D[r0:r1] @ D.T)
        total += B.sum()
        absB = np.abs(B)
        mass_img[r0:r1] = absB.sum(1)
        mass_txt += absB.sum(0)
        rows = np.arange(r0, r1)
        diag_vals[r0:r1] = B[rows - r0, rows]
        B[rows - r0, rows] = -np.inf  # off-diagonal lists only
        tops.add(B, r0)
        if img_side is not None and txt_side is not None:
            cross.add(B, r0, img_side[r0:r1, None] & txt_side[None, :])

    def pairs(t: _TopList) -> list[BridgePair]:
        out = []
        for v, i, j in zip(t.vals, t.i, t.j):
            i, j = int(i), int(j)
            coact = float(ziT[i].multiply(ztT[j]).sum() / n)
            out.append(BridgePair(i, j, float(v), coact, float(D[i] @ D[j])))
        return out

    diag = _TopList(top)
    diag.add(diag_vals[None, :], 0)
    diag.i, diag.j = diag.j.copy(), diag.j.copy()  # the entry (0, i) of that row is B_ii
    return BridgeSummary(
        n, float(total), float(diag_vals.sum()), pairs(tops), pairs(cross), pairs(diag), mass_img, mass_txt
    )


def alignment_terms(
    z_img: Codes,
    z_txt: Codes,
    D: np.ndarray | torch.Tensor,
    b: np.ndarray | None = None,
    scale: float = 1.0,
    bridge_total: float | None = None,
) -> dict[str, float]:
    """Decompose the mean paired reconstruction dot product (see the module docstring).

    Returns sum_B (= mean <z_img D, z_txt D>), image_bias_term = E[z_img] D.b, text_bias_term =
    b.D^T E[z_txt], bias_norm_sq = |b|^2, scaled_total (their sum: mean <z_img D + b, z_txt D + b>)
    and input_units_total = scaled_total / scale^2 (mean <x_hat_img, x_hat_txt> of our SAE)."""
    zi, zt, D = _paired(z_img, z_txt, D)
    n = zi.shape[0]
    if bridge_total is None:
        bridge_total = (
            float(bridge_matrix(zi, zt, D).sum()) if D.shape[0] <= 4096 else bridge_summary(zi, zt, D, top=0).total
        )
    b = np.zeros(D.shape[1]) if b is None else np.asarray(b, dtype=np.float64)
    mi = np.asarray(zi.sum(0)).ravel() / n
    mt = np.asarray(zt.sum(0)).ravel() / n
    t_img = float(mi @ D @ b)
    t_txt = float(b @ D.T @ mt)
    nb = float(b @ b)
    scaled = bridge_total + t_img + t_txt + nb
    return {
        "sum_B": float(bridge_total),
        "image_bias_term": t_img,
        "text_bias_term": t_txt,
        "bias_norm_sq": nb,
        "scale": float(scale),
        "scaled_total": scaled,
        "input_units_total": scaled / scale**2,
    }


# ------------------------------------------------------------------------------------------------
# A joint SAE: training on both modalities, and the full analysis


def check_embeddings(img: np.ndarray, txt: np.ndarray, paired: bool = True) -> None:
    """InputError unless img [N_img, d] and txt [N_txt, d] are 2-D float arrays of one width d
    (and N_img == N_txt when `paired`)."""
    for name, a in (("image", img), ("text", txt)):
        if a.ndim != 2:
            raise InputError(f"{name} embeddings must be 2-D [rows, d], got shape {a.shape}")
        if a.dtype.kind != "f":
            raise InputError(f"{name} embeddings must be floats, got dtype {a.dtype}")
        if a.shape[0] == 0:
            raise InputError(f"{name} embeddings have no rows")
        check_finite_rows(a, f"{name} embeddings")
    if img.shape[1] != txt.shape[1]:
        raise InputError(
            f"image embeddings have width {img.shape[1]}, text embeddings {txt.shape[1]}: "
            "a joint SAE needs one shared embedding space"
        )
    if paired and img.shape[0] != txt.shape[0]:
        raise InputError(
            f"{img.shape[0]} image rows vs {txt.shape[0]} text rows: the Bridge Score needs "
            "row n of both files to be one (image, caption) pair"
        )


def training_rows(n_image: int, n_text: int, image_fraction: float | None) -> tuple[int, int]:
    """How many image and text rows a joint SAE trains on: all of both, or the largest counts with
    n_img / (n_img + n_txt) = image_fraction (a data diet)."""
    if image_fraction is None:
        return n_image, n_text
    if not 0 < image_fraction < 1:
        raise InputError(f"--image_fraction must be in (0, 1) (got {image_fraction})")
    total = min(n_image / image_fraction, n_text / (1 - image_fraction))
    ni = min(n_image, int(round(total * image_fraction)))
    nt = min(n_text, int(round(total * (1 - image_fraction))))
    if ni == 0 or nt == 0:
        raise InputError(f"--image_fraction {image_fraction} leaves no rows of one modality")
    return ni, nt


def joint_source(img: np.ndarray, txt: np.ndarray) -> Any:
    """The training rows of a joint SAE: key "x", rows [0, n_img) images then texts, as two strata, so
    every batch holds both modalities in their global proportion (to one row) at any scale
    (`sae.nn.sources.strata_batches`)."""
    from sae.nn.sources import ActivationSource

    return ActivationSource({"x": [img, txt]}, strata=[img.shape[0], txt.shape[0]])


def unit_rows(a: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """a [N, d] with every row scaled to unit L2 norm, float32 (zero rows stay zero)."""
    out = np.empty(a.shape, dtype=np.float32)
    for s in range(0, a.shape[0], chunk):
        block = np.asarray(a[s : s + chunk], dtype=np.float64)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        out[s : s + chunk] = block / np.where(norms > 0, norms, 1.0)
    return out


def train_joint_saes(
    img: np.ndarray,
    txt: np.ndarray,
    cfgs: dict[str, Any],
    tcfg: Any,
    out_dir: str | Path,
    *,
    image_fraction: float | None = None,
    source: dict[str, Any] | None = None,
    normalized: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one SAE per entry of `cfgs` (name -> SAEConfig; e.g. several seeds) on the image rows
    and the text rows together, in one pass (`sae.nn.trainer.train_saes`).

    The training source is `joint_source`: every batch mixes image and text rows in their global
    proportion (the first n_img / n_txt rows; all unless `image_fraction` asks for a data diet). Each
    SAE's folder gets `joint.json` recording this, `normalized` (whether the caller L2-normalised the
    embeddings) and `source` (where the embeddings came from: files, or an `analyze.py embed` folder
    and its models). Returns `train_saes`'s dict of TrainedSAE."""
    from sae.nn.trainer import SAESpec, train_saes

    check_embeddings(img, txt, paired=False)
    ni, nt = training_rows(img.shape[0], txt.shape[0], image_fraction)
    rows_source = joint_source(img[:ni], txt[:nt])
    rows_source.check_finite("x")
    specs = [SAESpec(name, "x", cfg) for name, cfg in cfgs.items()]
    results = train_saes(rows_source, specs, tcfg, out_dir, progress=progress)
    from sae.util.atomic import write_json

    for res in results.values():
        write_json(
            res.path / "joint.json",
            {
                "n_image": ni,
                "n_text": nt,
                "image_fraction": ni / (ni + nt),
                "rows": "training rows [0, n_image) are image embeddings, [n_image, n_image + n_text) text "
                "embeddings; every batch holds both in this proportion",
                "normalized": normalized,
                "source": source or {},
            },
        )
    return results


@dataclass
class JointReport:
    """Everything `analyze_joint` computes for one joint SAE."""

    stats: ModalityStats
    buckets: dict[str, Any]
    histogram: dict[str, list[float]]
    bridge: BridgeSummary
    alignment: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)
    scale: float = 1.0  # the SAE's input_scale s: B / s^2 is in input units

    def to_json(self) -> dict[str, Any]:
        st = self.stats
        live = ~st.dead
        mu = st.modality
        return {
            **self.extra,
            "n_image": st.n_image,
            "n_text": st.n_text,
            "c": len(st.energy),
            "n_dead": int(st.dead.sum()),
            "modality": {
                "buckets": self.buckets,
                "histogram": self.histogram,
                "mean_mu": _num(float(np.nanmean(mu))) if live.any() else None,
                "energy_weighted_mean_mu": _num(float((mu[live] * st.energy[live]).sum() / st.energy[live].sum()))
                if live.any()
                else None,
            },
            "bridge": self._bridge_json(),
            "alignment": self.alignment,
        }

    def _bridge_json(self) -> dict[str, Any]:
        """The bridge summary with B also in input units (/ s^2) and per unit norm, and its definition."""
        out = self.bridge.to_json(self.stats)
        s2 = self.scale**2
        out["sum_B_input_units"] = self.bridge.total / s2
        norm = self.extra.get("mean_norm_product")
        out["sum_B_per_unit_norm"] = _num(out["sum_B_input_units"] / norm) if norm else None
        for key in ("top_pairs", "top_cross_modal_pairs", "top_diagonal"):
            for pair in out[key]:
                pair["bridge_input_units"] = pair["bridge"] / s2
        out["definition"] = BRIDGE_DEFINITION
        return out

    def per_concept(self) -> dict[str, np.ndarray]:
        """Arrays [c] for `--out FILE.npz`."""
        st = self.stats
        return {
            "modality": st.modality,
            "energy": st.energy,
            "energy_sq": st.energy_sq,
            "frequency": st.frequency,
            "mean_image": st.mean_image,
            "mean_text": st.mean_text,
            "bridge_mass_image": self.bridge.mass_image,
            "bridge_mass_text": self.bridge.mass_text,
            "bridge_modality": self.bridge.bridge_modality,
        }


def analyze_codes(
    z_img: Codes,
    z_txt: Codes,
    D: np.ndarray | torch.Tensor,
    *,
    b: np.ndarray | None = None,
    scale: float = 1.0,
    top: int = 20,
    eps: float = 0.05,
    block: int = 1024,
    progress: bool = False,
) -> JointReport:
    """The joint-SAE analyses from codes of N pairs (z_img, z_txt [N, c]) and the decoder D [c, d]."""
    stats = modality_stats(z_img, z_txt)
    summary = bridge_summary(z_img, z_txt, D, top=top, modality=stats.modality, block=block, progress=progress)
    align = alignment_terms(z_img, z_txt, D, b, scale, bridge_total=summary.total)
    return JointReport(stats, modality_buckets(stats, eps), modality_histogram(stats), summary, align, scale=scale)


def analyze_joint(
    sae: SparseAutoencoder,
    img: np.ndarray,
    txt: np.ndarray,
    *,
    top: int = 20,
    eps: float = 0.05,
    batch_size: int = 1024,
    device: str = "auto",
    progress: bool = False,
) -> JointReport:
    """Encode N paired image / text embeddings [N, d] with a joint SAE and run `analyze_codes`, with
    D = W_dec, b = b_dec, s = input_scale; also reports mean_pair_dot = (1/N) sum_n <img_n, txt_n>
    of the raw embeddings (what the reconstructions' alignment approximates), mean_norm_product =
    (1/N) sum_n |img_n| |txt_n| (B per unit norm divides by it) and decoder_bias."""
    check_embeddings(img, txt, paired=True)
    if img.shape[1] != sae.cfg.d_in:
        raise InputError(f"embeddings have width {img.shape[1]}, the SAE d_in={sae.cfg.d_in}")
    zi = encode_codes(sae, img, batch_size=batch_size, device=device, progress=progress, desc="encoding images")
    zt = encode_codes(sae, txt, batch_size=batch_size, device=device, progress=progress, desc="encoding texts")
    D = sae.W_dec.detach().double().cpu().numpy()
    b = sae.b_dec.detach().double().cpu().numpy()
    report = analyze_codes(zi, zt, D, b=b, scale=sae.cfg.input_scale, top=top, eps=eps, progress=progress)
    dot = norms = 0.0
    for s in range(0, img.shape[0], 65536):
        bi = np.asarray(img[s : s + 65536], dtype=np.float64)
        bt = np.asarray(txt[s : s + 65536], dtype=np.float64)
        dot += float((bi * bt).sum())
        norms += float((np.linalg.norm(bi, axis=1) * np.linalg.norm(bt, axis=1)).sum())
    report.extra["mean_pair_dot"] = dot / img.shape[0]
    report.extra["mean_norm_product"] = norms / img.shape[0]
    report.extra["decoder_bias"] = bool(getattr(sae.cfg, "decoder_bias", True))
    return report


def format_report(js: dict[str, Any], top: int = 10) -> str:
    """A short text version of `JointReport.to_json()`."""
    m = js["modality"]["buckets"]
    a = js["alignment"]
    lines = [
        f"{js['n_image']} image rows, {js['n_text']} text rows, {js['c']} concepts ({js['n_dead']} dead)",
        f"modality buckets (eps {m['eps']}):  "
        + "  ".join(
            f"{k}: {m[k]['count']} concepts, {m[k]['energy_fraction']:.1%} of energy"
            for k in ("image", "bimodal", "text")
        ),
        "Bridge Score B_ij = (1/N) sum_n z_img[n,i] z_txt[n,j] cos(d_i, d_j) (the paper's): sum B = "
        f"{js['bridge']['sum_B_input_units']:.6f} in input units"
        + (
            f", {js['bridge']['sum_B_per_unit_norm']:.6f} per unit norm"
            if js["bridge"].get("sum_B_per_unit_norm") is not None
            else ""
        )
        + f" ({a['sum_B']:.6f} in the SAE's scaled units)",
        f"mean <x_hat_img, x_hat_txt> = {a['input_units_total']:.6f} in input units"
        + (f" (raw embeddings: {js['mean_pair_dot']:.6f})" if "mean_pair_dot" in js else "")
        + (
            "; = sum B: no decoder bias (the paper's)"
            if js.get("decoder_bias") is False
            else "; differs from sum B by the decoder-bias terms (the paper's SAE has none: --no_b_dec)"
        ),
    ]

    def table(title: str, pairs: list[dict[str, Any]]) -> None:
        lines.append(title)
        lines.append("      i      j        B_ij    coact      cos   mu_i   mu_j")
        for p in pairs[:top]:
            f = lambda v: "  -  " if v is None else f"{v:.2f}"  # noqa: E731
            lines.append(
                f"{p['i']:>7}{p['j']:>7}{p['bridge']:>12.5f}{p['coactivation']:>9.4f}"
                f"{p['cosine']:>9.3f}{f(p.get('mu_i')):>7}{f(p.get('mu_j')):>7}"
            )

    table("strongest off-diagonal bridges (row i image side, column j text side):", js["bridge"]["top_pairs"])
    table(
        "strongest image-dominant -> text-dominant bridges (mu_i > 0.5 > mu_j):", js["bridge"]["top_cross_modal_pairs"]
    )
    return "\n".join(lines)
