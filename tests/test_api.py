"""The public API: the names `sae` exports, and the docs/api.md example run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers import one_thread

import sae

ROOT = Path(__file__).resolve().parents[1]


def test_public_names_resolve_lazily():
    code = (
        "import sys, sae; print('sae.nn.model' in sys.modules); "
        "from sae import SparseAutoencoder; print(SparseAutoencoder.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["False", "sae.nn.model"]  # `import sae` alone loads no torch module
    for name in sae.__all__:
        assert getattr(sae, name) is not None
    assert set(sae.__all__) >= {"SparseAutoencoder", "SAEConfig", "load_sae", "train_saes"}


def test_docs_api_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)
    example = next(b for b in blocks if "train_saes(" in b)
    monkeypatch.chdir(tmp_path)
    with one_thread():
        exec(compile(example, "docs/api.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("[8, 8, 8")  # k = 8 active latents per row
    for name in ("sae.safetensors", "cfg.json", "metrics.json"):
        assert (tmp_path / "my_saes" / "layer00" / name).exists()
