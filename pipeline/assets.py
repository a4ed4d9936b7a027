"""Loading and checking model files: the one error type every loader raises."""
from __future__ import annotations

from pathlib import Path

import torch


class AssetError(ValueError):
    """A model or data file is missing, unreadable or not in the expected format."""


def torch_load_checked(path: str | Path, what: str, **kwargs) -> object:
    """`torch.load` on CPU with weights_only by default, turning every failure into an AssetError
    that names the file and the problem (missing, truncated, not a torch file, unsafe pickle)."""
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path}: {what} file not found")
    if path.stat().st_size == 0:
        raise AssetError(f"{path}: {what} file is empty")
    kwargs.setdefault("weights_only", True)
    try:
        return torch.load(path, map_location="cpu", **kwargs)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "central directory" in reason or "PytorchStreamReader" in reason or "EOF" in reason:
            reason = f"truncated or corrupt ({reason})"
        raise AssetError(f"{path}: cannot load {what}: {reason}") from None
