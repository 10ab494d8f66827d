"""Concept names for the features of an embedding-space SAE, from a vocabulary's text embeddings.

As in the MSAE repo's `sae_naming.py` (after Discover-then-Name): embed a word list with a text tower
of the same vision-language model, then name feature i by the m words whose embeddings have the
highest cosine with the feature's direction in embedding space (docs/analyses.md §4):

    v_w        = embedding of word w                                 [V, d] (raw, not centred)
    a_i        = W_dec[i] + offset                                   feature direction [d]
                 offset = 0 (default: the pure decoder direction) or b_dec ("b_dec": MSAE's "+ mean")
    names(i)   = the m words with the largest cos(a_i, v_w)

W_dec lives in the SAE's scaled units x * s; a positive factor 1/s does not change a cosine, so the
decoder row is the direction in embedding space. MSAE maps atoms to CLIP space as d_i / s + mu,
adding the training mean mu to every atom because its SAE is trained on mean-centred inputs; our SAE
is not centred (its b_dec, initialised at the geometric median, plays mu's role), so `offset="b_dec"`
reproduces MSAE's choice: (W_dec[i] + b_dec) / s is the decoded embedding of a unit code on feature
i alone. That offset pulls every atom towards the mean embedding, so all features then share the
names nearest to the mean; the default reads the direction alone.

Names file: `<features_dir>/<run>/names_layerNN.json` (NN = the layer, two digits), next to the run's
`layerNN/` folder, holding exactly {"<feature index>": [[word, cosine], ...], ...} with the words best
first; `show.py` reads it when present (`load_names`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sae.util.atomic import write_json
from sae.util.errors import InputError

if TYPE_CHECKING:
    from sae.nn.model import SparseAutoencoder

OFFSETS = ("none", "b_dec")
# the repository's vocab/default.txt; an installed wheel carries it as sae/vocab/default.txt
_PACKAGED_VOCAB = Path(__file__).resolve().parents[1] / "vocab" / "default.txt"
DEFAULT_VOCAB = (
    _PACKAGED_VOCAB if _PACKAGED_VOCAB.exists() else Path(__file__).resolve().parents[2] / "vocab" / "default.txt"
)


def load_vocab(path: str | Path = DEFAULT_VOCAB) -> list[str]:
    """Words of a word-list file, one per line (blank lines and lines starting with '#' skipped,
    surrounding spaces stripped, duplicates dropped keeping the first)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"vocabulary file not found: {path}") from None
    except UnicodeDecodeError:
        raise InputError(f"vocabulary file {path} is not UTF-8 text") from None
    words = list(dict.fromkeys(w.strip() for w in text.splitlines() if w.strip() and not w.lstrip().startswith("#")))
    if not words:
        raise InputError(f"vocabulary file {path} holds no words")
    return words


def embed_vocab(
    words: Sequence[str], embed_fn: Callable[[list[str]], Any], batch: int = 256, progress: bool = False
) -> np.ndarray:
    """Embed `words` with any callable texts -> [n, d] (torch tensor or array), `batch` at a time,
    without gradients -> float32 [V, d]."""
    if not words:
        raise InputError("no words to embed")
    parts = []
    with torch.no_grad():
        for start in tqdm(range(0, len(words), batch), desc="embedding vocabulary", disable=not progress, leave=False):
            out = embed_fn(list(words[start : start + batch]))
            out = out.detach().float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float32)
            n = len(words[start : start + batch])
            if out.ndim != 2 or out.shape[0] != n:
                raise InputError(f"the text tower returned shape {out.shape} for {n} texts")
            parts.append(out.astype(np.float32))
    return np.concatenate(parts)


def feature_directions(sae: SparseAutoencoder, offset: str = "none") -> np.ndarray:
    """Each feature's direction in embedding space [d_sae, d_in] (see the module docstring)."""
    if offset not in OFFSETS:
        raise InputError(f"--offset must be one of {', '.join(OFFSETS)} (got {offset!r})")
    W = sae.W_dec.detach().double().cpu().numpy()
    if offset == "b_dec":
        W = W + sae.b_dec.detach().double().cpu().numpy()[None, :]
    return W / sae.cfg.input_scale


@dataclass
class FeatureNames:
    """The top-m vocabulary entries of each feature: indices [c, m] into `words`, cosines [c, m]."""

    words: list[str]
    indices: np.ndarray
    cosines: np.ndarray

    def names(self, feature: int) -> list[tuple[str, float]]:
        return [(self.words[j], float(c)) for j, c in zip(self.indices[feature], self.cosines[feature])]

    def to_json(self, features: Sequence[int] | None = None) -> dict[str, list[list[Any]]]:
        """{"<feature>": [[word, cosine], ...]} for `features` (default all)."""
        feats = range(len(self.indices)) if features is None else features
        return {str(int(f)): [[w, round(c, 6)] for w, c in self.names(int(f))] for f in feats}


def name_features(
    directions: np.ndarray | torch.Tensor,
    vocab_embeddings: np.ndarray | torch.Tensor,
    words: Sequence[str],
    top: int = 5,
    *,
    center_vocab: bool = False,
    block: int = 4096,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> FeatureNames:
    """Name each row of directions [c, d] by the `top` words of vocab_embeddings [V, d] (rows aligned
    with `words`) with the highest cosine. `center_vocab` subtracts the vocabulary's mean embedding
    first. Zero directions (dead features) get cosines 0."""
    from sae.analysis.stability import unit_rows
    from sae.util.device import resolve_device

    A = directions.detach().cpu().numpy() if isinstance(directions, torch.Tensor) else np.asarray(directions)
    V = (
        vocab_embeddings.detach().cpu().numpy()
        if isinstance(vocab_embeddings, torch.Tensor)
        else np.asarray(vocab_embeddings)
    )
    if V.ndim != 2 or A.ndim != 2:
        raise InputError("directions and vocabulary embeddings must be 2-D")
    if V.shape[0] != len(words):
        raise InputError(f"{V.shape[0]} vocabulary embeddings for {len(words)} words: the rows must be the words")
    if V.shape[1] != A.shape[1]:
        raise InputError(
            f"vocabulary embeddings have width {V.shape[1]}, the SAE's space {A.shape[1]}: "
            "embed the vocabulary with the text tower of the model the SAE was trained on"
        )
    if not np.isfinite(V).all():
        raise InputError("vocabulary embeddings hold NaN or inf")
    V = V.astype(np.float64)
    if center_vocab:
        V = V - V.mean(0)
    top = min(top, V.shape[0])
    dev = resolve_device(device)
    v = torch.from_numpy(unit_rows(V)).to(dev)
    a_all = unit_rows(A)
    idx = np.empty((A.shape[0], top), dtype=np.int64)
    cos = np.empty((A.shape[0], top), dtype=np.float32)
    for start in tqdm(range(0, A.shape[0], block), desc="naming features", disable=not progress, leave=False):
        a = torch.from_numpy(a_all[start : start + block]).to(dev)
        t = (a @ v.T).topk(top, dim=1)
        idx[start : start + len(a)] = t.indices.cpu().numpy()
        cos[start : start + len(a)] = t.values.cpu().numpy()
    return FeatureNames(list(words), idx, cos)


def names_path(features_dir: str | Path, run: str, layer: int) -> Path:
    """Where a run's names for one layer live: <features_dir>/<run>/names_layerNN.json."""
    return Path(features_dir) / run / f"names_layer{layer:02d}.json"


def write_names(path: str | Path, names: dict[str, list[list[Any]]]) -> Path:
    """Write a names mapping atomically."""
    write_json(path, names)
    return Path(path)


def load_names(path: str | Path) -> dict[int, list[tuple[str, float]]] | None:
    """{feature: [(word, cosine), ...]} from a names file; None if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        return {int(k): [(str(w), float(c)) for w, c in v] for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise InputError(f"{path} is not a names file ({{feature: [[word, cosine], ...]}}): {e}") from None
