"""Grouping inputs of different lengths into padded batches."""
import pytest
import torch

from pipeline.batching import (GPU_MAX_PADDING, DeviceOutOfMemory, batches_by_length, halving_on_device_oom,
                               max_padding)


@pytest.mark.parametrize(("lengths", "max_batch", "padding", "expected"), [
    ([64, 64, 64], 16, 0.0, [[0, 1, 2]]),
    ([32, 64, 32, 64], 16, 0.0, [[1, 3], [0, 2]]),  # longest first, equal lengths only
    ([32, 64, 32, 64], 16, 0.2, [[1, 3, 0], [2]]),  # 160 of 192 frames used; a fourth: 192 of 256
    ([32, 64, 32, 64], 16, 0.3, [[1, 3, 0, 2]]),
    ([64, 64, 64], 2, 0.0, [[0, 1], [2]]),
    ([2**14, 2**14, 2**14], 16, 0.0, [[0, 1], [2]]),  # max_total
])
def test_batches_by_length(lengths, max_batch, padding, expected):
    assert batches_by_length(lengths, max_batch, padding, max_total=2**15) == expected
    if max(lengths) < 2**14:
        assert batches_by_length(lengths, max_batch, padding) == expected


def test_only_gpus_batch_with_padding():
    assert max_padding(torch.device("cpu")) == 0.0
    assert max_padding(torch.device("cuda")) == GPU_MAX_PADDING > 0


def fits(limit: int, calls: list):
    """A batch function that runs out of device memory above `limit` items, recording each call."""
    def run(indices: list[int]) -> list[int]:
        calls.append(list(indices))
        if len(indices) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [10 * i for i in indices]
    return run


def test_a_batch_that_runs_out_of_device_memory_runs_again_in_halves():
    calls: list = []
    with pytest.warns(RuntimeWarning) as warned:
        out = halving_on_device_oom(fits(2, calls), [3, 1, 4, 0, 2])
    assert out == [30, 10, 40, 0, 20]
    assert [str(w.message).split(";")[0] for w in warned] == [
        "a batch of 5 ran out of device memory", "a batch of 3 ran out of device memory"]
    assert calls == [[3, 1, 4, 0, 2], [3, 1], [4, 0, 2], [4], [0, 2]]


def test_a_batch_that_fits_runs_once():
    calls: list = []
    assert halving_on_device_oom(fits(8, calls), [0, 1, 2]) == [0, 10, 20]
    assert calls == [[0, 1, 2]]


def test_an_item_that_does_not_fit_alone_fails_with_a_clear_error():
    with pytest.warns(RuntimeWarning), pytest.raises(DeviceOutOfMemory, match="out of GPU memory") as raised:
        halving_on_device_oom(fits(0, []), [0, 1])
    assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)


def test_other_errors_are_not_retried():
    calls = []

    def run(indices):
        calls.append(indices)
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        halving_on_device_oom(run, [0, 1, 2])
    assert len(calls) == 1
