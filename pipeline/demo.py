"""A complete demo voice set in the real file formats, generated from a seed with no downloads.

DEMO ONLY: every weight is random, so a demo voice's output is noise-like, not a real voice.
It exists so the service and the tests run on a fresh machine.

    DIR/hubert_base.pt            fairseq-layout HuBERT/ContentVec checkpoint
    DIR/voices/demo/model.pth     RVC v2 40 kHz voice with f0
    DIR/voices/demo/added.index   faiss IVF-Flat over features of generated speech
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import signal

from .convert import chunk_features, prepare_input
from .hubert import Hubert, load_hubert, random_hubert_checkpoint, save_hubert_checkpoint
from .index import build_index, write_index
from .synthesizer import random_voice_checkpoint, save_voice

DEMO_VOICE = "demo"
_VOWEL_FORMANTS = ((730, 1090, 2440), (530, 1840, 2480), (270, 2290, 3010), (570, 840, 2410), (300, 870, 2240))


def synthetic_speech(seconds: float, sample_rate: int = 16000, seed: int = 0, peak: float = 0.7) -> np.ndarray:
    """Speech-like float32 audio: syllables of a formant-filtered glottal buzz on a moving pitch,
    fricative noise bursts, and pauses (quiet points for the chunk split search)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    out = np.zeros(n)
    base_f0 = rng.uniform(100, 200)
    cursor = int(0.2 * sample_rate)
    while cursor < n - int(0.15 * sample_rate):
        length = min(int(rng.uniform(0.12, 0.32) * sample_rate), n - cursor)
        if rng.random() < 0.8:
            f0 = base_f0 * 2 ** (rng.uniform(-0.3, 0.3) + np.linspace(0, rng.uniform(-0.2, 0.2), length))
            phase = np.cumsum(f0) / sample_rate
            sound = signal.sawtooth(2 * np.pi * phase)
            for formant, bandwidth in zip(_VOWEL_FORMANTS[rng.integers(len(_VOWEL_FORMANTS))], (80, 100, 150)):
                sound = _resonate(sound, formant, bandwidth, sample_rate)
        else:
            b, a = signal.butter(4, min(0.99, 3000 / (sample_rate / 2)), btype="high")
            sound = signal.lfilter(b, a, rng.standard_normal(length))
        sound *= np.hanning(length) * rng.uniform(0.3, 1.0) / (np.abs(sound).max() + 1e-9)
        out[cursor:cursor + length] += sound
        cursor += length + int(rng.uniform(0.02, 0.1) * sample_rate)
        if rng.random() < 0.15:
            cursor += int(rng.uniform(0.3, 0.6) * sample_rate)
    out += 1e-4 * rng.standard_normal(n)  # room noise: real silence is never exactly zero
    return (out * peak / np.abs(out).max()).astype(np.float32)


def _resonate(x: np.ndarray, freq: float, bandwidth: float, sample_rate: int) -> np.ndarray:
    r = np.exp(-np.pi * bandwidth / sample_rate)
    theta = 2 * np.pi * freq / sample_rate
    return signal.lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], x)


def pipeline_features(hubert: Hubert, audio16k: np.ndarray, version: str) -> np.ndarray:
    """Features [T50, C] of audio prepared as a conversion prepares it, taken over the whole
    padded input (what a single-chunk conversion sees)."""
    prepared = prepare_input(audio16k)
    return chunk_features(hubert, prepared.audio_pad, version).numpy()


def write_demo_assets(data_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the demo set under `data_dir`; returns the paths written."""
    data_dir = Path(data_dir)
    voice_dir = data_dir / "voices" / DEMO_VOICE
    voice_dir.mkdir(parents=True, exist_ok=True)
    hubert_path = data_dir / "hubert_base.pt"
    save_hubert_checkpoint(random_hubert_checkpoint(seed), hubert_path)
    hubert = load_hubert(hubert_path)

    voice = random_voice_checkpoint(seed + 1, version="v2", sample_rate=40000, f0=True)
    voice["info"] = "DEMO voice: random weights, output is noise-like (rvc-serve demo-assets)"
    model_path = voice_dir / "model.pth"
    save_voice(voice, model_path)

    training_audio = [synthetic_speech(8.0, seed=seed * 100 + i) for i in range(3)]
    feats = np.concatenate([pipeline_features(hubert, a, "v2") for a in training_audio])
    index_path = voice_dir / "added.index"
    write_index(build_index(feats), index_path)
    return {"hubert": hubert_path, "model": model_path, "index": index_path}
