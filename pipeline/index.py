"""Feature retrieval from an RVC `.index` (faiss IVF-Flat over the voice's training features).

The reference reads the index and reconstructs all stored vectors on every request; we do it
once per voice (`load_index`) and keep both the faiss index and the vectors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .assets import AssetError

TOP_K = 8
_ADD_BATCH = 8192


@dataclass
class RetrievalIndex:
    index: faiss.Index
    vectors: np.ndarray  # [N, dim] float32, the stored training features
    path: Path | None = None

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]


def load_index(path: str | Path) -> RetrievalIndex:
    """Read an RVC `.index` (nprobe as stored) and reconstruct its vectors once."""
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path}: index file not found")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise AssetError(f"{path}: not a readable faiss index ({first})") from None
    if index.ntotal == 0:
        raise AssetError(f"{path}: the index holds no vectors (a 'trained_' index; use the 'added_' one)")
    try:
        vectors = index.reconstruct_n(0, index.ntotal)
    except RuntimeError:
        raise AssetError(f"{path}: index vectors cannot be reconstructed") from None
    return RetrievalIndex(index=index, vectors=np.ascontiguousarray(vectors, dtype=np.float32), path=path)


def search(index: RetrievalIndex, feats: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """k nearest stored vectors of each row of `feats` [T, dim]: (ids [T, k], weights [T, k]).

    Weights are the reference's: (1/D)^2 of faiss's squared L2 distances, normalised per row.
    Where a row has exact hits (D = 0, which makes the reference produce NaN), the exact hits
    share the weight equally instead.
    """
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    dist, ids = index.index.search(feats, k)
    exact = dist <= 0
    with np.errstate(divide="ignore"):
        weight = np.square(1 / dist)
    hit_rows = exact.any(axis=1)
    if hit_rows.any():
        weight[hit_rows] = exact[hit_rows].astype(np.float32)
    # An IVF list shorter than k pads with id -1; like the reference, such ids point at the last
    # row, but we give them no weight.
    weight[ids < 0] = 0
    weight /= weight.sum(axis=1, keepdims=True)
    return ids, weight


def blend(feats: np.ndarray, index: RetrievalIndex, rate: float) -> np.ndarray:
    """index_rate · retrieved + (1 − index_rate) · feats, with feats [T, dim] float32."""
    ids, weight = search(index, feats)
    retrieved = np.sum(index.vectors[ids] * np.expand_dims(weight, axis=2), axis=1)
    return retrieved * rate + (1 - rate) * feats


def build_index(features: np.ndarray) -> faiss.Index:
    """An IVF-Flat index built as the reference's `train_index` builds it (nprobe 1 stored).

    (The reference first k-means-reduces sets above 200 000 rows to 10 000 centres; our demo
    and test sets are far smaller.)
    """
    features = np.ascontiguousarray(features, dtype=np.float32)
    n, dim = features.shape
    n_ivf = max(1, min(int(16 * np.sqrt(n)), n // 39))
    index = faiss.index_factory(dim, f"IVF{n_ivf},Flat")
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = 1
    index.train(features)
    for start in range(0, n, _ADD_BATCH):
        index.add(features[start:start + _ADD_BATCH])
    return index


def write_index(index: faiss.Index, path: str | Path) -> None:
    faiss.write_index(index, str(path))
