"""Feature retrieval from an RVC `.index` (faiss IVF-Flat over the voice's training features).

The reference reads the index and reconstructs all stored vectors on every request; we do it
once per voice (`load_index`) and keep both the faiss index and the vectors.

On CPUs faiss searches. Features on a GPU are searched there (`blend_on_device`): the same
inverted-file search in torch (the probed lists' vectors, exact squared distances of the
candidates), so they need not go to the host and back between the content and synthesis stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from .assets import AssetError

TOP_K = 8
_ADD_BATCH = 8192


@dataclass(frozen=True)
class _DeviceIvf:
    """An IVF-Flat index's contents as tensors on one device."""

    vectors: torch.Tensor  # [N, dim], row i = stored id i
    norms: torch.Tensor  # [N] squared norms of the vectors
    centroids: torch.Tensor  # [L, dim] the coarse quantizer's
    list_of: torch.Tensor  # [N] long, the inverted list each vector is in
    nprobe: int


@dataclass
class RetrievalIndex:
    index: faiss.Index
    vectors: np.ndarray  # [N, dim] float32, the stored training features
    path: Path | None = None
    _on_device: dict[torch.device, _DeviceIvf | None] = field(default_factory=dict, repr=False)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def on_device(self, device: torch.device) -> _DeviceIvf | None:
        """The index as tensors on `device` (made once), or None if it is not an IVF-Flat index
        with ids 0..N-1 (faiss then searches it on the CPU)."""
        if device not in self._on_device:
            self._on_device[device] = _device_ivf(self.index, self.vectors, device)
        return self._on_device[device]


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


def _device_ivf(index: faiss.Index, vectors: np.ndarray, device: torch.device) -> _DeviceIvf | None:
    if not isinstance(index, faiss.IndexIVFFlat):
        return None
    lists = index.invlists
    list_of = np.full(index.ntotal, -1, dtype=np.int64)
    for number in range(index.nlist):
        size = lists.list_size(number)
        if size:
            ids = faiss.rev_swig_ptr(lists.get_ids(number), size)
            if ids.min() < 0 or ids.max() >= index.ntotal:
                return None
            list_of[ids] = number
    if (list_of < 0).any():  # ids not 0..N-1: rows of `vectors` would not be the ids
        return None
    centroids = index.quantizer.reconstruct_n(0, index.nlist)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    on_device = as_tensor(vectors)
    return _DeviceIvf(on_device, on_device.square().sum(dim=1), as_tensor(centroids), as_tensor(list_of),
                      max(1, min(index.nprobe, index.nlist)))


def search_on_device(ivf: _DeviceIvf, feats: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """`search` of feats [T, dim] float32 on their device: the nprobe lists nearest each row,
    the k nearest of their vectors, the reference's weights (ids [T, k], weights [T, k])."""
    # the nearest lists, as faiss's flat quantizer picks them
    to_centroids = torch.cdist(feats, ivf.centroids).square()  # [T, L]
    probed = to_centroids.topk(ivf.nprobe, dim=1, largest=False).indices  # [T, nprobe]
    member = (ivf.list_of[None, :, None] == probed[:, None, :]).any(dim=2)  # [T, N]
    # candidates by ‖x‖² − 2x·y + ‖y‖² (one matrix product), then the k best by exact distances
    approx = ivf.norms[None, :] - 2 * feats @ ivf.vectors.T  # [T, N]; ‖x‖² is the same per row
    approx = approx.masked_fill(~member, float("inf"))
    n = min(ivf.vectors.shape[0], 2 * k)
    candidates = approx.topk(n, dim=1, largest=False).indices  # [T, n]
    dist = (feats[:, None, :] - ivf.vectors[candidates]).square().sum(dim=2)  # [T, n] exact
    dist = dist.masked_fill(~member.gather(1, candidates), float("inf"))
    dist, order = dist.sort(dim=1, stable=True)
    ids = candidates.gather(1, order)[:, :k]
    dist = dist[:, :k]
    if ids.shape[1] < k:  # fewer vectors than k in the whole index
        pad = k - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, pad), value=-1)
        dist = torch.nn.functional.pad(dist, (0, pad), value=float("inf"))
    ids = ids.masked_fill(dist.isinf(), -1)  # a probed list shorter than k, as faiss reports it
    exact = dist <= 0
    weight = torch.where(ids >= 0, 1 / dist.square(), 0.0)
    hit_rows = exact.any(dim=1, keepdim=True)
    weight = torch.where(hit_rows, exact.float(), weight)
    return ids, weight / weight.sum(dim=1, keepdim=True)


_DISTANCES_PER_BLOCK = 2**26  # rows of the [T, N] distance matrix searched at once (256 MB)


def blend_on_device(feats: torch.Tensor, index: RetrievalIndex, rate: float) -> torch.Tensor:
    """`blend` of feats [T, dim] on their own device (faiss on the CPU for other index types)."""
    ivf = index.on_device(feats.device)
    if ivf is None:
        return torch.from_numpy(blend(feats.cpu().numpy(), index, rate)).to(feats.device)
    feats = feats.float()
    rows = max(1, _DISTANCES_PER_BLOCK // ivf.vectors.shape[0])
    retrieved = []
    with torch.autocast(feats.device.type, enabled=False):  # distances in fp32 whatever the caller's
        for block in feats.split(rows):
            ids, weight = search_on_device(ivf, block)
            retrieved.append((ivf.vectors[ids.clamp(min=0)] * weight[..., None]).sum(dim=1))
    return torch.cat(retrieved) * rate + (1 - rate) * feats


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
