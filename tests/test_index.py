import numpy as np
import pytest

from pipeline.assets import AssetError
import faiss
import torch

from pipeline.index import (RetrievalIndex, blend, blend_on_device, build_index, load_index, search,
                           search_on_device, write_index)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 16)).astype(np.float32)
    path = tmp_path_factory.mktemp("idx") / "added_IVF25_Flat_nprobe_1_x_v2.index"
    write_index(build_index(vectors), path)
    return path, vectors


def test_load_reconstructs_all_vectors_and_keeps_nprobe(stored):
    path, vectors = stored
    index = load_index(path)
    assert index.vectors.shape == vectors.shape
    assert index.dim == 16
    import faiss
    assert faiss.extract_index_ivf(index.index).nprobe == 1
    assert set(map(tuple, index.vectors.round(5))) == set(map(tuple, vectors.round(5)))


def test_weights_are_reference_inverse_square_of_squared_distance(stored):
    index = load_index(stored[0])
    q = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    ids, weight = search(index, q)
    dist, ids_ref = index.index.search(q, 8)
    expected = np.square(1 / dist)
    expected /= expected.sum(axis=1, keepdims=True)
    assert (ids == ids_ref).all()
    np.testing.assert_allclose(weight, expected, rtol=1e-6)


def test_exact_hit_gives_no_nan_and_returns_the_stored_vector(stored):
    index = load_index(stored[0])
    q = index.vectors[[3, 700]]
    out = blend(q.copy(), index, 1.0)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, q, atol=1e-6)


def test_blend_rate_zero_and_one(stored):
    index = load_index(stored[0])
    q = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_array_equal(blend(q, index, 0.0), q)
    ids, weight = search(index, q)
    retrieved = (index.vectors[ids] * weight[..., None]).sum(axis=1)
    np.testing.assert_allclose(blend(q, index, 1.0), retrieved, atol=1e-6)
    half = blend(q, index, 0.5)
    np.testing.assert_allclose(half, 0.5 * retrieved + 0.5 * q, atol=1e-6)


def test_bad_index_files(tmp_path):
    with pytest.raises(AssetError, match="not found"):
        load_index(tmp_path / "missing.index")
    junk = tmp_path / "junk.index"
    junk.write_bytes(b"not a faiss index at all")
    with pytest.raises(AssetError, match="faiss"):
        load_index(junk)


# --- the same search in torch (what GPUs run) -----------------------------------------------------

def _queries(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = vectors[rng.integers(0, len(vectors), n)] + 0.3 * rng.standard_normal((n, vectors.shape[1]))
    q[:2] = vectors[[5, 9]]  # exact hits
    return q.astype(np.float32)


def _assert_same_search(index: RetrievalIndex, q: np.ndarray) -> None:
    ids, weight = search(index, q)
    ivf = index.on_device(torch.device("cpu"))
    assert ivf is not None
    ids_t, weight_t = search_on_device(ivf, torch.from_numpy(q))
    np.testing.assert_array_equal(ids_t.numpy(), ids)
    np.testing.assert_allclose(weight_t.numpy(), weight, atol=1e-6, rtol=0)


def test_torch_search_finds_what_faiss_finds(stored):
    index = load_index(stored[0])
    _assert_same_search(index, _queries(stored[1], 300, seed=3))
    q = _queries(stored[1], 50, seed=4)
    np.testing.assert_allclose(blend_on_device(torch.from_numpy(q), index, 0.6).numpy(), blend(q, index, 0.6),
                               atol=1e-5, rtol=0)


def test_torch_search_probes_as_many_lists_as_faiss_and_pads_short_lists(tmp_path):
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((240, 8)).astype(np.float32)
    ivf = faiss.index_factory(8, "IVF60,Flat")  # ~4 vectors a list: fewer than k = 8
    ivf.train(vectors)
    ivf.add(vectors)
    for nprobe in (1, 3):
        ivf.nprobe = nprobe
        write_index(ivf, tmp_path / "small.index")
        index = load_index(tmp_path / "small.index")
        q = _queries(vectors, 100, seed=nprobe)
        if nprobe == 1:
            assert (search(index, q)[0] < 0).any()  # the padding is exercised
        _assert_same_search(index, q)


def test_an_index_that_is_not_ivf_flat_is_searched_by_faiss(stored):
    vectors = stored[1]
    flat = faiss.IndexFlatL2(vectors.shape[1])
    flat.add(vectors)
    index = RetrievalIndex(flat, vectors)
    assert index.on_device(torch.device("cpu")) is None
    q = _queries(vectors, 20, seed=5)
    np.testing.assert_allclose(blend_on_device(torch.from_numpy(q), index, 0.5).numpy(), blend(q, index, 0.5))
