import numpy as np
import pytest

from pipeline.assets import AssetError
from pipeline.index import blend, build_index, load_index, search, write_index


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
