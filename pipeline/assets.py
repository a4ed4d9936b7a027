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
    with open(path, "rb") as f:
        head = f.read(4)
    # torch files are zip archives (torch >= 1.6) or, in the legacy format, a pickle (0x80 = PROTO)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise AssetError(f"{path}: not a torch checkpoint (cannot load {what})")
    kwargs.setdefault("weights_only", True)
    try:
        return torch.load(path, map_location="cpu", **kwargs)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        text = str(e).strip()
        reason = text.splitlines()[0] if text else type(e).__name__
        if any(s in text for s in ("central directory", "PytorchStreamReader", "EOF", "Invalid argument")):
            reason = "truncated or corrupt file"
        elif "Weights only load failed" in text:
            # torch's message advises weights_only=False, which would run code from the file
            unsupported = [line.strip() for line in text.splitlines() if "Unsupported global" in line]
            reason = "holds objects other than tensors and plain data; refused for safety" + (
                f" ({unsupported[0]})" if unsupported else "")
        raise AssetError(f"{path}: cannot load {what}: {reason}") from None
