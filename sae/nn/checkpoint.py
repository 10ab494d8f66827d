"""SAE checkpoints: `sae.safetensors` + `cfg.json`, readable without this package.

sae.safetensors (float32):
    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in] (unit-norm rows unless cfg unit_decoder is
    false), b_dec [d_in],
    threshold [] (batchtopk only: the global inference threshold; jumprelu: [d_sae], one per latent)
cfg.json: the SAEConfig fields (architecture, d_in, d_sae, k, k_levels, prefixes, input_scale, ...),
plus "format", "version" and "provenance" (package versions, git commit).

With s = cfg["input_scale"], a reconstruction from the files alone is
    pre = (s * x - b_dec) @ W_enc + b_enc
    z   = top-k of pre per row, then ReLU      (topk, matryoshka, msae_*: k = cfg["k"])
        = pre * (pre > threshold)              (batchtopk, jumprelu; relu-clamped threshold)
        = ReLU(pre)                            (relu)
    x_hat = (z @ W_dec + b_dec) / s
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sae.nn.config import SAEConfig
from sae.nn.hub import resolve_sae_path
from sae.nn.interop import detect_format, read_foreign
from sae.nn.model import SparseAutoencoder
from sae.util.atomic import atomic_path, read_json, write_json
from sae.util.errors import InputError
from sae.util.provenance import provenance
from sae.util.readers import reading

FORMAT = "share-concepts-sae-v1"


def save_sae(sae: SparseAutoencoder, out_dir: str | Path) -> Path:
    """Write `out_dir/sae.safetensors` and `out_dir/cfg.json` atomically (decoder norms folded)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sae = _unit_norm_copy(sae)
    tensors = {
        name: p.detach().float().cpu().contiguous()
        for name, p in (("W_enc", sae.W_enc), ("b_enc", sae.b_enc), ("W_dec", sae.W_dec), ("b_dec", sae.b_dec))
    }
    if sae.cfg.architecture in ("batchtopk", "jumprelu"):
        tensors["threshold"] = sae.get_buffer("threshold").detach().float().cpu().contiguous()
    with atomic_path(out_dir / "sae.safetensors") as tmp:
        save_file(tensors, str(tmp))
    cfg = {"format": FORMAT, **sae.cfg.to_dict(), "provenance": provenance()}
    write_json(out_dir / "cfg.json", cfg)
    return out_dir


def _unit_norm_copy(sae: SparseAutoencoder) -> SparseAutoencoder:
    norms = sae.W_dec.detach().norm(dim=1)
    if torch.allclose(norms, torch.ones_like(norms), atol=1e-5):
        return sae
    copy = SparseAutoencoder(SAEConfig.from_dict(sae.cfg.to_dict()), device=sae.W_dec.device)
    copy.load_state_dict(sae.state_dict())
    copy.fold_decoder_norms_()
    return copy


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE folder written by `save_sae`, by SAELens or by sparsify (sae/nn/interop.py), or
    `hf://ORG/NAME/SUBFOLDER` from the Hugging Face Hub (sae/nn/hub.py)."""
    path = resolve_sae_path(path)
    fmt = detect_format(path)
    if fmt != "native":
        return read_foreign(path, fmt, device)
    if not (path / "cfg.json").exists() or not (path / "sae.safetensors").exists():
        raise InputError(f"{path} is not an SAE checkpoint (needs cfg.json and sae.safetensors)")
    raw = read_json(path / "cfg.json")
    if not isinstance(raw, dict):
        raise InputError(f"{path / 'cfg.json'}: not a JSON object")
    try:
        cfg = SAEConfig.from_dict(raw)
        cfg.validate()
        sae = SparseAutoencoder(cfg, device=device)
    except (TypeError, ValueError) as e:
        raise InputError(f"{path / 'cfg.json'}: not an SAE configuration ({e})") from None
    weights = path / "sae.safetensors"
    with reading(weights, "safetensors file"):
        tensors = load_file(str(weights), device=str(device))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", *(["threshold"] if "threshold" in tensors else [])):
            own = getattr(sae, name)
            if name not in tensors or tensors[name].shape != own.shape:
                got = list(tensors[name].shape) if name in tensors else "missing"
                raise InputError(f"{weights}: {name} is {got}, cfg.json needs {list(own.shape)}")
            if not torch.isfinite(tensors[name]).all():
                raise InputError(f"{weights}: {name} holds NaN or inf")
            own.copy_(tensors[name])
    return sae


# ------------------------------------------------------------------------------ trainer state (no pickle)

STATE_FORMAT = "share-concepts-trainer-state-v1"


def _split_tensors(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """`obj` with every tensor replaced by {"__tensor__": key}; the tensors go into `tensors[key]`."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split_tensors(v, tensors, f"{prefix}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a trainer state")


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict):
        return {k: _join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def save_trainer_state(state: dict[str, Any], path: str | Path) -> None:
    """Write a nested dict of tensors and plain values (ints, floats, str, lists, dicts with int or str
    keys) as one safetensors file, atomically: the tensors as tensors, the rest as JSON in its metadata.
    No pickle: loading it cannot run code."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(state, tensors, "s")
    meta = {"format": STATE_FORMAT, "state": json.dumps(skeleton)}
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    except (OSError, SafetensorError) as e:
        raise InputError(f"{path}: could not write the training checkpoint ({e})") from e


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """Read what `save_trainer_state` wrote; InputError naming the file when it is not such a file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATE_FORMAT:
                raise InputError(f"{path}: not a training checkpoint of this toolkit")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        return _join_tensors(json.loads(meta["state"]), tensors)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: unreadable training checkpoint ({e}); delete it to start training again") from e
