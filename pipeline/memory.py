"""How a model process takes memory from glibc's malloc.

By default glibc maps every allocation above its mmap threshold (128 KB, rising to at most
32 MB) freshly from the kernel and unmaps it when freed, so each large activation of a network
page-faults and zero-fills all its pages anew: 7.4 M page faults (~30 GB zeroed) for one 12 s
synthesis on a CPU, a quarter of its time, and more with bfloat16 kernels, which wait on memory
sooner. `reuse_freed_memory` serves large blocks from the heap and keeps what is freed, so the
next activation reuses pages already mapped; `release_freed_memory` hands the free part back to
the kernel once a request is done, so a process's resident memory between requests stays what
it was (its peak within a request is about the same: docs/performance.md).

Both do nothing where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: free memory at the heap's top is kept up to 2 GB


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
    except (OSError, AttributeError):
        return None
    return libc


def reuse_freed_memory() -> bool:
    """Serve every allocation from the heap and keep freed memory for reuse (for the whole
    process, from now on). True where it took effect."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))


def release_freed_memory() -> None:
    """Return the heap's free memory to the kernel (malloc_trim)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
