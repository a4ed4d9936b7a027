"""Grouping inputs of different lengths into padded batches."""
import pytest
import torch

from pipeline.batching import GPU_MAX_PADDING, batches_by_length, max_padding


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
