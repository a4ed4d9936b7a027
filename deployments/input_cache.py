"""What the model stages compute from an input alone, kept by content for the next job of it.

A chunk's content features depend on its audio and the HuBERT version, an input's f0 track on
its audio, the f0 method and the seed; neither depends on the voice or on the job's other
parameters. So the same upload converted with ten voices (or ten pitch shifts) runs the
features and pitch stages once: later jobs take the arrays kept here, and jobs that ask while the
first is still computing wait for that computation instead of starting their own.

One per conversion replica, bounded in bytes, the least recently used out first; the conversion
keys entries by the upload's key (its tenant and the digest of its bytes, deployments/routing.py),
so one API key's jobs never reveal (by their speed) what another key uploaded. A computation is
cancelled only when every job waiting for it is gone; a failed one is not kept (the jobs waiting
for it fail with its error, as each would have alone).
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

import numpy as np


@dataclass
class _Computation:
    task: asyncio.Future
    waiters: int = 0


class InputCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._arrays: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._held = 0  # bytes of _arrays
        self._computing: dict[Hashable, _Computation] = {}

    @property
    def held_bytes(self) -> int:
        return self._held

    async def get(self, key: Hashable, compute: Callable[[], Awaitable[np.ndarray]]) -> tuple[np.ndarray, bool]:
        """(the array for `key`, whether this call was spared computing it): kept, being
        computed for another job, or computed now by `compute()` and kept."""
        if self.max_bytes == 0:
            return await compute(), False
        if key in self._arrays:
            self._arrays.move_to_end(key)
            return self._arrays[key], True
        computation = self._computing.get(key)
        shared = computation is not None
        if computation is None:
            computation = self._computing[key] = _Computation(asyncio.ensure_future(compute()))
            computation.task.add_done_callback(lambda task: self._settle(key, computation))
        computation.waiters += 1
        try:
            # shield: one waiter's cancellation (its job cancelled) leaves the others' computation
            return await asyncio.shield(computation.task), shared
        finally:
            computation.waiters -= 1
            if computation.waiters == 0 and not computation.task.done():
                computation.task.cancel()
                self._forget(key, computation)  # a job asking next computes afresh

    def _settle(self, key: Hashable, computation: _Computation) -> None:
        self._forget(key, computation)
        task = computation.task
        if task.cancelled() or task.exception() is not None:
            return
        array = task.result()
        array.flags.writeable = False  # every later job gets this very array
        if array.nbytes > self.max_bytes or key in self._arrays:
            return
        self._arrays[key] = array
        self._held += array.nbytes
        while self._held > self.max_bytes:
            _, evicted = self._arrays.popitem(last=False)
            self._held -= evicted.nbytes

    def _forget(self, key: Hashable, computation: _Computation) -> None:
        if self._computing.get(key) is computation:
            del self._computing[key]
