"""How a model process takes memory from glibc's malloc.

By default glibc maps every allocation above its mmap threshold (128 KB, rising to at most
32 MB) freshly from the kernel and unmaps it when freed, so each large activation of a network
page-faults and zero-fills all its pages anew: 7.4 M page faults (~30 GB zeroed) for one 12 s
synthesis on a CPU, a quarter of its time, and more with bfloat16 kernels, which wait on memory
sooner. `reuse_freed_memory` serves large blocks from the heap and keeps what is freed, so the
next activation reuses pages already mapped; `release_freed_memory` hands the free part back to
the kernel. `model_pass` marks network passes and releases once none has run for a while, so a
busy process keeps its pages from pass to pass (a release after every pass made the next one
fault its activations in again: 3-8 % of a pass on one thread) and an idle one goes back to its
resident size between requests; a process that has grown by more than KEEP_FREED_BYTES since
its last release releases as its pass ends, so keeping adds at most that to its peak. An idle
GPU process also hands back the device memory torch's caching allocator keeps
(`release_device_cache`): the model stages share one GPU with no fence between their memory, and
one stage's cached peak is memory the others cannot have.

All of it does nothing where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: free memory at the heap's top is kept up to 2 GB
RELEASE_AFTER_IDLE_S = 2.0
KEEP_FREED_BYTES = 512 << 20
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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


def release_device_cache() -> None:
    """Return the GPU memory torch caches but no tensor uses to the driver, and the pinned host
    memory `to_device` staged copies in (nothing where CUDA was never initialised in this
    process)."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        # (a torch older than this call keeps its pinned cache: the GPU machines' images lag ours)
        empty_host_cache = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
        if empty_host_cache is not None:
            empty_host_cache()


def to_device(host: np.ndarray | torch.Tensor, device: torch.device | str,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host array or tensor as a tensor on `device` (and of `dtype`), copied without waiting for
    the GPU. A plain copy from pageable memory first waits for every kernel queued on the stream,
    other threads' included: inside a batch's pass it drains the GPU's queue, on a replica's event
    loop it stalls the replica until the running batch ends. On CUDA the data is staged in pinned
    memory (torch's caching host allocator keeps it until the copy has run) and copied
    asynchronously; elsewhere this is a plain conversion."""
    import numpy as np
    import torch

    if isinstance(host, np.ndarray):
        # torch wants writable memory (arrays from Ray's object store are read-only)
        host = torch.from_numpy(host if host.flags.writeable else host.copy())
    if dtype is not None:
        host = host.to(dtype)
    if host.device.type != "cpu" or torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _resident_bytes() -> int:
    """This process's resident memory (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except OSError:
        return 0


class _IdleRelease:
    """Counts the passes running in this process. The last one to end releases the freed memory
    at once if the process has grown by more than KEEP_FREED_BYTES since the last release (or the
    first pass), which bounds what keeping costs (passes of other shapes, such as a long input's
    pitch, features and synthesis in one process, cannot reuse each other's blocks and would
    stack them: a 600 s conversion's peak went from 3.8 to 6.8 GB); else it arms a timer that
    releases unless another pass has started by then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._timer: threading.Timer | None = None
        self._baseline: int | None = None  # resident bytes after the last release

    def enter(self) -> None:
        with self._lock:
            self._running += 1
            if self._baseline is None:
                self._baseline = _resident_bytes()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def exit(self, release_after_s: float) -> None:
        with self._lock:
            self._running -= 1
            if self._running:
                return
            release_now = _resident_bytes() > self._baseline + KEEP_FREED_BYTES
            if not release_now:
                self._timer = threading.Timer(release_after_s, self._release_if_idle)
                self._timer.daemon = True
                self._timer.start()
        if release_now:
            self._release()

    def _release_if_idle(self) -> None:
        with self._lock:
            if self._running:
                return
            self._timer = None
        self._release()  # a pass starting meanwhile only faults in what it then needs
        release_device_cache()

    def _release(self) -> None:
        release_freed_memory()
        with self._lock:
            self._baseline = _resident_bytes()


_IDLE_RELEASE = _IdleRelease()


@contextmanager
def model_pass(release_after_idle_s: float = RELEASE_AFTER_IDLE_S) -> Iterator[None]:
    """A network pass: the memory passes free goes back to the kernel once no pass has run for
    `release_after_idle_s`, or as it ends when the process holds more than KEEP_FREED_BYTES
    beyond what it held after the last release."""
    _IDLE_RELEASE.enter()
    try:
        yield
    finally:
        _IDLE_RELEASE.exit(release_after_idle_s)
