"""Random-weight test fixtures in the real file formats, built deterministically from seeds.

The goldens in tests/goldens/ were made by running the reference RVC on exactly these files
(tests/goldens/make_goldens.py), so the seeds and recipes here must not change without
remaking the goldens.

    DIR/hubert_base.pt, DIR/rmvpe.pt
    DIR/voices/<name>/model.pth + added.index    v2-40k-f0, v1-32k-f0, v2-48k-nof0
    DIR/audio/*.wav                              16 kHz mono PCM16 inputs (no resampling anywhere,
                                                 so the reference's ffmpeg decode and ours agree)
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
VOICES = {  # name: (seed, version, sample rate, f0)
    "v2-40k-f0": (21, "v2", 40000, True),
    "v1-32k-f0": (22, "v1", 32000, True),
    "v2-48k-nof0": (23, "v2", 48000, False),
}
AUDIO = {  # name: (seed, seconds, peak)
    "speech_2s": (31, 2.0, 0.7),
    "speech_2p5s_loud": (32, 2.5, 0.98),  # above 0.95: the input peak limiter acts
    "speech_7s": (33, 7.0, 0.7),  # chunked with the goldens' small chunking constants
}
HUBERT_SEED, RMVPE_SEED = 11, 12
TWIN_NOISE = 1e-3
_SOURCES = ["pipeline/hubert.py", "pipeline/synthesizer.py", "pipeline/rmvpe.py", "pipeline/index.py",
            "pipeline/demo.py", "pipeline/audio.py", "tests/fixtures.py"]


def fixtures_key() -> str:
    """Changes whenever the code that writes fixtures changes."""
    h = hashlib.sha256()
    for rel in _SOURCES:
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def build_fixtures(out_dir: str | Path) -> dict:
    """Write the fixture set (skipped if already complete for this code) and return its manifest."""
    from pipeline import demo
    from pipeline.hubert import load_hubert, random_hubert_checkpoint, save_hubert_checkpoint
    from pipeline.index import build_index, write_index
    from pipeline.rmvpe import random_rmvpe_state_dict, save_rmvpe
    from pipeline.synthesizer import random_voice_checkpoint, save_voice

    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == fixtures_key():
            return manifest
    (out / "audio").mkdir(parents=True, exist_ok=True)
    manifest = {"key": fixtures_key(), "hubert": str(out / "hubert_base.pt"), "rmvpe": str(out / "rmvpe.pt"),
                "voices": {}, "audio": {}}
    save_hubert_checkpoint(random_hubert_checkpoint(HUBERT_SEED), manifest["hubert"])
    save_rmvpe(random_rmvpe_state_dict(RMVPE_SEED), manifest["rmvpe"])

    inputs = {}
    for name, (seed, seconds, peak) in AUDIO.items():
        wav = demo.synthetic_speech(seconds, sample_rate=16000, seed=seed, peak=peak)
        path = out / "audio" / f"{name}.wav"
        sf.write(path, wav, 16000, subtype="PCM_16")
        inputs[name] = sf.read(path, dtype="float32")[0]
        manifest["audio"][name] = str(path)

    hubert = load_hubert(manifest["hubert"])
    features = {}
    for version in ("v1", "v2"):
        training = [demo.synthetic_speech(6.0, seed=900 + i) for i in range(3)]
        rows = [demo.pipeline_features(hubert, a, version) for a in training]
        rng = np.random.default_rng(7 if version == "v1" else 8)
        for wav in inputs.values():  # near twins of the inputs: nearly one-hot retrieval weights
            twin = demo.pipeline_features(hubert, wav, version)
            rows.append(twin + TWIN_NOISE * rng.standard_normal(twin.shape).astype(np.float32))
        features[version] = np.concatenate(rows)

    import faiss
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # single-threaded k-means: the same centroids on any machine
    try:
        for name, (seed, version, rate, f0) in VOICES.items():
            voice_dir = out / "voices" / name
            voice_dir.mkdir(parents=True, exist_ok=True)
            save_voice(random_voice_checkpoint(seed, version=version, sample_rate=rate, f0=f0),
                       voice_dir / "model.pth")
            write_index(build_index(features[version]), voice_dir / "added.index")
            manifest["voices"][name] = {"pth": str(voice_dir / "model.pth"),
                                        "index": str(voice_dir / "added.index")}
    finally:
        faiss.omp_set_num_threads(threads)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def default_cache_dir() -> Path:
    base = Path(os.environ.get("RVC_TEST_CACHE", Path.home() / ".cache" / "rvc-serve-tests"))
    return base / f"fixtures-{fixtures_key()}"
