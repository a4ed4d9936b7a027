import numpy as np
import pytest
import scipy.stats
import torch

from tests.fixtures import build_fixtures, default_cache_dir

# Two cores on CI: one intra-op thread per test process keeps timings steady and avoids
# oversubscription when Ray workers run beside the tests.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def fixture_set() -> dict:
    """Random-weight voices, HuBERT, RMVPE and inputs in the real formats (cached across runs)."""
    return build_fixtures(default_cache_dir())


@pytest.fixture
def recorded_dither(monkeypatch):
    """Records the dither torchcrepe draws from the global RNG, in order."""
    draws = []
    draw = scipy.stats.triang.rvs

    def record(*args, **kwargs):
        noise = draw(*args, **kwargs)
        draws.append(np.asarray(noise).ravel())
        return noise

    monkeypatch.setattr(scipy.stats.triang, "rvs", record)
    return draws
