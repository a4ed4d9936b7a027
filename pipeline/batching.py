"""Grouping inputs of different lengths into zero-padded batches.

The networks that batch inputs of different lengths (rmvpe, HuBERT) mask each item's padding so
every item gets its values alone; the padding still costs its arithmetic. On GPUs, where a batch
of 16 costs little more than one input, some padding is worth it; on CPUs it costs its full price
and batching gains little, so they batch equal lengths only.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from .memory import release_device_cache

# Share of a GPU batch's frames that may be padding.
GPU_MAX_PADDING = 0.3


def max_padding(device: torch.device) -> float:
    return GPU_MAX_PADDING if device.type == "cuda" else 0.0


def batches_by_length(lengths: Sequence[int], max_batch: int, max_padding: float,
                      max_total: int | None = None) -> list[list[int]]:
    """Indices of `lengths` grouped longest first into batches of at most `max_batch` items and
    `max_total` padded length (items × longest), in which padding is at most `max_padding` of
    the batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            longest, count = lengths[batch[0]], len(batch) + 1
            used = sum(lengths[j] for j in batch) + lengths[i]
            if (count <= max_batch and (max_total is None or count * longest <= max_total)
                    and used >= (1 - max_padding) * count * longest):
                batch.append(i)
                continue
        batches.append([i])
    return batches


class DeviceOutOfMemory(RuntimeError):
    """An item that does not fit in the device's free memory even alone (the job's error)."""


def halving_on_device_oom(run: Callable[[list[int]], Sequence], indices: list[int]) -> list:
    """`run(indices)`, or, when the device runs out of memory, the same in halves (each halved
    again as needed): several processes share a GPU with no fence between their memory, so a
    batch that fits alone may not fit beside a neighbour's peak. Each item's result does not
    depend on its batch (padding is masked, random draws are per item), so the halves give the
    whole's results. An item that fails alone raises DeviceOutOfMemory (from the device's error,
    whose text, sizes and allocator advice, is for the logs, not for the job's client)."""
    try:
        return list(run(indices))
    except torch.OutOfMemoryError as exc:
        if len(indices) == 1:
            raise DeviceOutOfMemory("out of GPU memory for a piece of this input, even alone: try again later") from exc
        warnings.warn(f"a batch of {len(indices)} ran out of device memory; retrying it in halves ({exc})",
                      RuntimeWarning)
    # past the except block, so the failed attempt's tensors (its traceback's frames) are freed
    release_device_cache()
    half = len(indices) // 2
    return halving_on_device_oom(run, indices[:half]) + halving_on_device_oom(run, indices[half:])
