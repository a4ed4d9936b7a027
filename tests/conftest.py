import pytest
import torch

from tests.fixtures import build_fixtures, default_cache_dir

# Two cores on CI: one intra-op thread per test process keeps timings steady and avoids
# oversubscription when Ray workers run beside the tests.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def fixture_set() -> dict:
    """Random-weight voices, HuBERT, RMVPE and inputs in the real formats (cached across runs)."""
    return build_fixtures(default_cache_dir())
