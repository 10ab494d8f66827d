"""The Hugging Face Hub: `hf://ORG/NAME/SUBFOLDER` SAE paths, and pushing a run's SAEs.

A pushed repository holds one folder per SAE (`layer05/`: sae.safetensors, cfg.json, metrics.json,
train_log.jsonl), the run's `run.json` (without its row ids) and a model card `README.md`. Downloads go
through huggingface_hub's cache, so HF_HUB_OFFLINE=1 reads a repository already in the cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from sae.util.errors import InputError
from sae.util.readers import read_json

PREFIX = "hf://"


def parse_hf(path: str) -> tuple[str, str | None, str]:
    """'hf://ORG/NAME[@REVISION][/SUB/FOLDER]' -> (repo id, revision or None, subfolder or '')."""
    parts = path[len(PREFIX) :].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise InputError(f"'{path}' is not a Hub path: use hf://ORG/NAME/SUBFOLDER")
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", revision or None, "/".join(parts[2:])


def resolve_sae_path(path: str | Path) -> Path:
    """A local folder for `path`: itself, or for hf://ORG/NAME/SUB the downloaded (or cached) SUB folder."""
    if not str(path).startswith(PREFIX):
        return Path(path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, revision, sub = parse_hf(str(path))
    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=[f"{sub}/*"] if sub else None)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise InputError(f"cannot get {path} from the Hugging Face Hub: {str(e).splitlines()[0]}") from None
    local = Path(root) / sub
    if not local.is_dir():
        raise InputError(f"{path}: the repository {repo_id} has no folder '{sub}'")
    return local


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(info: dict[str, Any], repo_id: str) -> str:
    """README.md of a pushed run: what the SAEs are, how to load them, provenance and final metrics."""
    layers = [str(layer) for layer in info.get("layers", [])]
    metrics = info.get("sae_metrics", {})
    rows = [
        f"| layer{int(layer):02d} | {_fmt(m.get('fvu'))} | {_fmt(m.get('cosine'))} | {_fmt(m.get('l0'))} | "
        f"{_fmt(m.get('dead_fraction'))} | {m.get('eval_rows')} |"
        for layer in layers
        if isinstance(m := metrics.get(layer, {}), dict)
    ]
    prov = info.get("provenance", {})
    return "\n".join(
        [
            "---",
            "library_name: share-concepts",
            "tags: [sparse-autoencoder, interpretability]",
            "---",
            f"# Sparse autoencoders on {info.get('model_name') or info.get('model')}",
            "",
            f"{info.get('architecture')} SAEs (k = {info.get('k')}, d_sae = {info.get('d_sae')}) trained by "
            f"share-concepts on the {info.get('modality')} encoder `{info.get('model')}`, one per layer "
            f"({', '.join(layers)}), on {info.get('dataset')} (split {info.get('split')}, {info.get('n_rows')} "
            f"rows, token {info.get('token')}).",
            "",
            "```python",
            "from sae import load_sae",
            "",
            f'sae = load_sae("hf://{repo_id}/layer{int(layers[0]) if layers else 0:02d}")',
            "codes = sae.encode(x)  # x [n, d_in] in the encoder's units -> codes [n, d_sae]",
            "```",
            "",
            "## Final metrics (held-out rows of the training tokens)",
            "",
            "| SAE | FVU | cosine | L0 | dead fraction | rows |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            "FVU: squared error over the variance about the mean; each folder's train_log.jsonl has the curve.",
            "",
            "## Provenance",
            "",
            *(f"- {k}: {v}" for k, v in prov.items()),
            "",
        ]
    )


def stage_run(run_dir: str | Path, out: str | Path, repo_id: str) -> Path:
    """Lay out the folder that `push_run` uploads: SAE folders, run.json (without row ids), README.md."""
    run_dir, out = Path(run_dir), Path(out)
    info_path = run_dir / "run.json"
    if not info_path.exists():
        raise InputError(f"{run_dir} is not a finished run (no run.json)")
    info = read_json(info_path)
    out.mkdir(parents=True, exist_ok=True)
    for name, rel in info.get("sae_dirs", {}).items():
        src = run_dir / rel
        dst = out / name
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("sae.safetensors", "cfg.json", "metrics.json", "train_log.jsonl"):
            if (src / f).exists():
                shutil.copy2(src / f, dst / f)
    public = {k: v for k, v in info.items() if k not in ("row_ids", "activation_cache")}
    (out / "run.json").write_text(json.dumps(public, indent=2))
    (out / "README.md").write_text(model_card(info, repo_id))
    return out


def push_run(run_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a run's SAEs to the Hub repository `repo_id` (created if missing); returns the commit URL."""
    import tempfile

    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_run(run_dir, tmp, repo_id)
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(staged), repo_id=repo_id, commit_message="share-concepts SAEs")
    return str(getattr(commit, "commit_url", commit))
