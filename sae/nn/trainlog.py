"""Training curves: `train_log.jsonl` beside each SAE, and the optional Weights & Biases logger.

Each line of train_log.jsonl is one JSON object, written (and flushed) as training goes:
    {"step": 100, "rows_seen": 409600, "loss": 0.41, "fvu": 0.23, "l0": 32.0, "dead_fraction": 0.01, "lr": 2e-4}
`step` counts finished optimisation steps; loss, fvu and l0 are that step's batch values (fvu: the
batch's squared error over its variance about its mean, scaled units); dead_fraction is null until one
dead window of rows has been trained on. A resumed run first drops the entries after the checkpoint's
step, so the file always describes the weights that training continues from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sae.util.atomic import atomic_path
from sae.util.errors import InputError

LOG_FILE = "train_log.jsonl"


def read_train_log(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a train_log.jsonl (or of the folder holding one); an unfinished last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_FILE
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
    return entries


class TrainLog:
    """Appends entries to `<sae_dir>/train_log.jsonl`, after dropping any past `resume_step`."""

    def __init__(self, sae_dir: Path, resume_step: int):
        sae_dir.mkdir(parents=True, exist_ok=True)
        self.path = sae_dir / LOG_FILE
        kept = [e for e in read_train_log(self.path) if e["step"] <= resume_step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
        self._file = self.path.open("a")

    def write(self, entry: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in entry.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class WandbLogger:
    """Logs every SAE's entries to one Weights & Biases run (keys `<sae name>/<metric>`)."""

    def __init__(self, project: str, run_name: str, run_id: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise InputError(
                "--wandb needs the wandb package: pip install wandb (or pip install 'share-concepts[wandb]')"
            ) from None
        self._wandb = wandb
        self._run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", config=config)

    def log(self, name: str, entry: dict[str, Any]) -> None:
        prefix = f"{name}/" if name else ""
        values = {prefix + k: v for k, v in entry.items() if k != "step" and v is not None}
        self._run.log(values, step=entry["step"])

    def close(self) -> None:
        self._run.finish()
