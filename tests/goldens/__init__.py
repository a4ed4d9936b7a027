"""Reference RVC outputs on our test fixtures (made by make_goldens.py; see README.md).

The .npz files hold only what cannot be derived; `load_golden` adds back, bitwise as the
reference had them (make_goldens.py checks this against the full dump):

* the synthesizer's random draws per chunk (`c{i}_noise_prior` [192, p_len],
  `c{i}_noise_sine_rand_ini` [1, 1, 1], `c{i}_noise_nsf` [p_len·upp, 1]): the reference drew them
  from torch's default CPU generator seeded once with the golden's seed, in that order, chunk
  after chunk, and nothing else in a request draws from it;
* `c0_feats_final` [p_len, C], the synthesizer input of chunk 0: `c0_feats_index` (or
  `c0_feats` without an index) and `c0_feats` doubled in time and mixed by protect;
* `audio_load` where it equals `audio_in` (the peak limiter did not act).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

GOLDENS = Path(__file__).resolve().parent
INTER_CHANNELS = 192  # prior channels of every RVC synthesizer config


def golden_names(directory: Path = GOLDENS) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.npz"))


def load_golden(name: str, directory: Path = GOLDENS) -> dict:
    """Arrays of `name`.npz plus the derived ones above, and "meta": the run's meta_json as a dict."""
    with np.load(directory / f"{name}.npz") as z:
        golden = {k: z[k] for k in z.files}
    meta = json.loads(str(golden["meta_json"]))
    golden["meta"] = meta
    golden.setdefault("audio_load", golden["audio_in"])
    p_lens = [int(golden[f"c{i}_p_len"]) for i in range(meta["n_chunks"])]
    golden.update(reference_noise(meta["seed"], p_lens, meta["upp"], bool(meta["if_f0"])))
    if "c0_feats" in golden:
        protect = meta["args"]["protect"] if meta["if_f0"] else None
        golden["c0_feats_final"] = synthesizer_features(
            golden.get("c0_feats_index", golden["c0_feats"]), golden["c0_feats"], golden.get("c0_pitchf"),
            p_lens[0], protect)
    return golden


def reference_noise(seed: int, p_lens: list[int], upp: int, f0: bool) -> dict[str, np.ndarray]:
    """The reference synthesizer's draws for chunks of `p_lens` frames after `torch.manual_seed(seed)`."""
    generator = torch.Generator().manual_seed(seed)
    noise = {}
    for i, p_len in enumerate(p_lens):
        noise[f"c{i}_noise_prior"] = torch.randn(INTER_CHANNELS, p_len, generator=generator).numpy()
        if f0:
            noise[f"c{i}_noise_sine_rand_ini"] = torch.rand(1, 1, 1, generator=generator).numpy()
            noise[f"c{i}_noise_nsf"] = torch.randn(p_len * upp, 1, generator=generator).numpy()
    return noise


def synthesizer_features(feats_index: np.ndarray, feats: np.ndarray, pitchf: np.ndarray | None,
                         p_len: int, protect: float | None) -> np.ndarray:
    """[T50, C] → [p_len, C]: nearest ×2 in time; with protect < 0.5, frames whose f0 is below 1 Hz
    keep `1 − protect` of the pre-index features (float32 ops in the reference's order)."""
    doubled = np.repeat(feats_index, 2, axis=0)[:p_len]
    if protect is None or protect >= 0.5:
        return doubled
    w = np.where(pitchf[:p_len] < 1, np.float32(protect), np.float32(1))[:, None]
    return doubled * w + np.repeat(feats, 2, axis=0)[:p_len] * (np.float32(1) - w)
