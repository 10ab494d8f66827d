"""Where tensors go: `--device auto` is the GPU when there is one."""

from __future__ import annotations

import torch

from sae.util.errors import InputError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' / None -> cuda when present, else cpu; asking for cuda without one is an InputError."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} asked for, but no CUDA device is available")
    return torch.device(device)
