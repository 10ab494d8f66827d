"""SAE folders of other libraries: export to SAELens, sparsify and dictionary_learning; read SAELens and sparsify.

Our model (sae/nn/model.py) multiplies inputs by s = cfg.input_scale; the other libraries have no such
factor, so export folds it into the weights, which leaves codes unchanged and reconstructions in input units:

    W_enc' = s W_enc  [d_in, d_sae]     b_enc' = b_enc     W_dec' = W_dec / s  [d_sae, d_in]     b_dec' = b_dec / s
    pre = (x - b_dec') W_enc' + b_enc = (s x - b_dec) W_enc + b_enc;   x_hat = z W_dec' + b_dec' = (z W_dec + b_dec) / s

Architectures map by their inference rule: topk, matryoshka, msae_* (k = cfg.k) -> TopK; batchtopk (one
global threshold t) -> JumpReLU with every latent's threshold max(t, 0); relu -> SAELens "standard".

Folders written (ours -> theirs):
- SAELens (cfg.json + sae_weights.safetensors): topk family -> topk, batchtopk -> jumprelu, relu -> standard;
- sparsify (cfg.json + sae.safetensors): topk family -> topk; batchtopk and relu are refused (no such SAE there);
- dictionary_learning (config.json + ae.pt): topk family -> AutoEncoderTopK, batchtopk -> BatchTopKSAE (its
  threshold), relu -> JumpReluAutoEncoder with zero thresholds.

dictionary_learning's plain AutoEncoder is not used for relu: its loader rescales decoder rows to unit
norm, which would divide every code by s.

Reading (`read_foreign`): SAELens standard / topk / jumprelu folders and sparsify TopK folders become a
SparseAutoencoder with input_scale 1 (architecture relu / topk / jumprelu, the last with per-latent
thresholds); SAELens's apply_b_dec_to_input = false and rescale_acts_by_decoder_norm = true are folded
into b_enc and W_enc / W_dec. Anything that would change the function (activation normalisation, skip
connections, transcoders, groupmax) is refused with a one-line error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae.nn.config import SAEConfig
from sae.nn.model import SparseAutoencoder
from sae.util.atomic import atomic_path, read_json, write_json
from sae.util.errors import InputError

FORMATS = ("saelens", "sparsify", "dictionary_learning")
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"  # the cfg.json layout written here: SAELens >= 6 reads it without conversion


def folded_weights(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], threshold [d_sae] (JumpReLU
    thresholds; zeros for relu, absent for the TopK family) with input_scale folded in, float32 on CPU."""
    s = float(sae.cfg.input_scale)
    out = {
        "W_enc": sae.W_enc.detach().float().cpu() * s,
        "b_enc": sae.b_enc.detach().float().cpu().clone(),
        "W_dec": sae.W_dec.detach().float().cpu() / s,
        "b_dec": sae.b_dec.detach().float().cpu() / s,
    }
    arch = sae.cfg.architecture
    if arch in ("batchtopk", "jumprelu"):
        out["threshold"] = sae.get_buffer("threshold").detach().float().cpu().clamp_min(0).expand(sae.cfg.d_sae).clone()
    elif arch == "relu":
        out["threshold"] = torch.zeros(sae.cfg.d_sae)
    return {k: v.contiguous() for k, v in out.items()}


def _kind(sae: SparseAutoencoder) -> str:
    """'topk', 'jumprelu' or 'relu': the inference rule of `sae`."""
    arch = sae.cfg.architecture
    return "jumprelu" if arch in ("batchtopk", "jumprelu") else "relu" if arch == "relu" else "topk"


def export_sae(sae: SparseAutoencoder, fmt: str, out: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` as a folder of library `fmt` (one of FORMATS) that its own loader reads with the same
    codes and reconstructions; `metadata` (model, layer, dataset, ...) goes into its config."""
    if fmt not in FORMATS:
        raise InputError(f"unknown --format '{fmt}'; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata or {})
    w = folded_weights(sae)
    kind, cfg = _kind(sae), sae.cfg
    if fmt == "saelens":
        arch = {"topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}[kind]
        tensors = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if kind == "jumprelu":
            tensors["threshold"] = w["threshold"]
        sl_cfg: dict[str, Any] = {
            "architecture": arch,
            "d_in": cfg.d_in,
            "d_sae": cfg.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {"sae_lens_version": SAELENS_VERSION, **meta},
        }
        if kind == "topk":
            sl_cfg.update(k=cfg.active_k, rescale_acts_by_decoder_norm=False)
        with atomic_path(out / SAELENS_WEIGHTS) as tmp:
            save_file(tensors, str(tmp))
        write_json(out / "cfg.json", sl_cfg)
    elif fmt == "sparsify":
        if kind != "topk":
            raise InputError(
                f"sparsify has only TopK SAEs; a {cfg.architecture} SAE exports to saelens or dictionary_learning"
            )
        tensors = {"encoder.weight": w["W_enc"].t().contiguous(), "encoder.bias": w["b_enc"]}
        tensors.update(W_dec=w["W_dec"], b_dec=w["b_dec"])
        with atomic_path(out / "sae.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        sp_cfg = {
            "activation": "topk",
            "expansion_factor": max(1, cfg.d_sae // cfg.d_in),
            "normalize_decoder": False,  # rows have norm 1 / input_scale once it is folded in
            "num_latents": cfg.d_sae,
            "k": cfg.active_k,
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": cfg.d_in,
        }
        write_json(out / "cfg.json", sp_cfg)
        write_json(out / "share_concepts.json", meta)
    else:
        dict_class = {"topk": "AutoEncoderTopK", "jumprelu": "BatchTopKSAE", "relu": "JumpReluAutoEncoder"}[kind]
        if kind == "relu":
            state = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
            state["b_enc"] = w["b_enc"] - w["b_dec"] @ w["W_enc"]  # it encodes x, not x - b_dec
        else:
            state = {
                "encoder.weight": w["W_enc"].t().contiguous(),
                "encoder.bias": w["b_enc"],
                "decoder.weight": w["W_dec"].t().contiguous(),
                "b_dec": w["b_dec"],
                "k": torch.tensor(cfg.active_k, dtype=torch.int),
                "threshold": w["threshold"][0].clone() if kind == "jumprelu" else torch.tensor(-1.0),
            }
        with atomic_path(out / "ae.pt") as tmp:
            torch.save(state, tmp)
        trainer = {"dict_class": dict_class, "activation_dim": cfg.d_in, "dict_size": cfg.d_sae}
        if kind != "relu":
            trainer["k"] = cfg.active_k
        write_json(out / "config.json", {"trainer": {**trainer, **meta}})
    return out


# ---- reading other libraries' folders ----------------------------------------------------------------


def detect_format(path: Path) -> str:
    """'native', 'saelens' or 'sparsify' for an SAE folder; InputError for anything else."""
    cfg_path = path / "cfg.json"
    if cfg_path.exists() and (path / SAELENS_WEIGHTS).exists():
        return "saelens"
    if cfg_path.exists() and (path / "sae.safetensors").exists():
        cfg = read_json(cfg_path)
        if isinstance(cfg, dict) and "input_scale" in cfg and "architecture" in cfg:
            return "native"
        if isinstance(cfg, dict) and "d_in" in cfg and ("num_latents" in cfg or "expansion_factor" in cfg):
            return "sparsify"
        return "native"  # the native reader says what is wrong with it
    raise InputError(
        f"{path} is not an SAE checkpoint (needs cfg.json and sae.safetensors (this toolkit, sparsify) "
        f"or cfg.json and {SAELENS_WEIGHTS} (SAELens))"
    )


def _build(
    cfg: SAEConfig, W_enc, b_enc, W_dec, b_dec, threshold=None, device: str | torch.device = "cpu"
) -> SparseAutoencoder:
    sae = SparseAutoencoder(cfg, device=device)
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(value)
        if threshold is not None:
            sae.get_buffer("threshold").copy_(threshold)
    return sae


def _check_shapes(path: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        if name not in tensors:
            raise InputError(f"{path}: the weights have no '{name}'")
        if tuple(tensors[name].shape) != shape:
            raise InputError(f"{path}: '{name}' has shape {tuple(tensors[name].shape)}, expected {shape}")


def read_saelens(path: Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """A SAELens (>= 6, or older standard/topk/jumprelu) folder as a SparseAutoencoder."""
    cfg = read_json(path / "cfg.json")
    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "topk", "jumprelu"):
        raise InputError(f"{path}: SAELens architecture '{arch}' is not supported (standard, topk, jumprelu are)")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise InputError(
            f"{path}: normalize_activations='{cfg['normalize_activations']}' rescales inputs at run time; "
            "fold it into the weights with SAELens first"
        )
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    t = {k: v.float() for k, v in load_file(str(path / SAELENS_WEIGHTS)).items()}
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        shapes["threshold"] = (d_sae,)
    _check_shapes(path, t, shapes)
    W_enc, b_enc, W_dec, b_dec = t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"]
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        n = W_dec.norm(dim=1).clamp_min(1e-8)  # pre * ||W_dec_i||, decoded through W_dec / ||W_dec_i||
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc  # pre = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
    ours = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    k = int(cfg["k"]) if arch == "topk" else None
    sae_cfg = SAEConfig(architecture=ours, d_in=d_in, d_sae=d_sae, k=k)
    return _build(sae_cfg, W_enc, b_enc, W_dec, b_dec, t.get("threshold") if ours == "jumprelu" else None, device)


def read_sparsify(path: Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """A sparsify TopK SAE folder as a SparseAutoencoder."""
    cfg = read_json(path / "cfg.json")
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag):
            raise InputError(f"{path}: sparsify {flag}=true is not an autoencoder this toolkit reads")
    if cfg.get("activation", "topk") != "topk":
        raise InputError(f"{path}: sparsify activation '{cfg.get('activation')}' is not supported (topk is)")
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("num_latents") or d_in * int(cfg["expansion_factor"]))
    t = {k: v.float() for k, v in load_file(str(path / "sae.safetensors")).items()}
    _check_shapes(
        path, t, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    )
    sae_cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=int(cfg["k"]))
    return _build(sae_cfg, t["encoder.weight"].t(), t["encoder.bias"], t["W_dec"], t["b_dec"], None, device)


def read_foreign(path: Path, fmt: str, device: str | torch.device = "cpu") -> SparseAutoencoder:
    return read_saelens(path, device) if fmt == "saelens" else read_sparsify(path, device)


def run_metadata(sae_dir: Path) -> dict[str, Any]:
    """Model, layer and dataset of the run an SAE folder belongs to (run.json up to 3 levels above it)."""
    for parent in list(sae_dir.resolve().parents)[:3]:
        if (parent / "run.json").exists():
            info = read_json(parent / "run.json")
            name = sae_dir.name.split("_seed")[0]
            layer = int(name[5:]) if name.startswith("layer") and name[5:].isdigit() else None
            return {
                "model_name": info.get("model_name") or info.get("model"),
                "hook_name": name,
                "hook_layer": layer,
                "dataset_path": info.get("dataset"),
                "share_concepts_run": info.get("name"),
                "token": info.get("token"),
                "modality": info.get("modality"),
            }
    return {}
