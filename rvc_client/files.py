"""Writing a file so that it appears whole or not at all."""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_MARK = ".rvc-partial-"  # in the names of files still being written


def partial_name(dest: Path) -> Path:
    # Same directory (the rename stays atomic) and the same suffix (writers pick formats by it).
    return dest.with_name(f".{dest.stem}{PARTIAL_MARK}{secrets.token_hex(4)}{dest.suffix}")


@contextmanager
def atomic_path(dest: str | Path, mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside `dest` to write to; renamed onto `dest` (with permission bits
    `mode`, if given) when the block ends without error, removed otherwise."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(dest)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
