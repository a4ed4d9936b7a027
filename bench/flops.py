"""FLOPs and minimum bytes per second of audio for each network: the hardware floor of each stage.

    python bench/flops.py [--out bench/results/flops.json]

Counts with torch's FlopCounterMode (matrix products and convolutions: 2 FLOPs per
multiply-add) on one second of 16 kHz audio through the fixture models (random weights, real
shapes), and the weight bytes each network must read at least once per pass. Divide by a
device's measured rates for the floor; docs/performance.md does that for an H200.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.convert import chunk_features  # noqa: E402
from pipeline.crepe import load_crepe  # noqa: E402
from pipeline.demo import synthetic_speech  # noqa: E402
from pipeline.hubert import load_hubert  # noqa: E402
from pipeline.rmvpe import load_rmvpe, log_mel  # noqa: E402
from pipeline.synthesizer import SynthNoise, load_voice  # noqa: E402
from tests.fixtures import build_fixtures, default_cache_dir  # noqa: E402

SECONDS = 4.0  # long enough that per-pass constants (padding, attention) are small


def count(fn) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return counter.get_total_flops() / SECONDS


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "flops.json"))
    args = ap.parse_args()
    fx = build_fixtures(default_cache_dir())
    audio = synthetic_speech(SECONDS, sample_rate=16000, seed=0).astype(np.float32)
    samples = torch.from_numpy(audio)
    rows = {}

    crepe = load_crepe("full", "cpu")
    frames = torch.nn.functional.pad(samples, (512, 512)).unfold(0, 1024, 160).contiguous()
    rows["crepe-full"] = {"gflop_per_audio_s": count(lambda: crepe(frames)) / 1e9, "weight_mb": weight_bytes(crepe) / 1e6}
    tiny = load_crepe("tiny", "cpu")
    rows["crepe-tiny"] = {"gflop_per_audio_s": count(lambda: tiny(frames)) / 1e9, "weight_mb": weight_bytes(tiny) / 1e6}
    rmvpe = load_rmvpe(fx["rmvpe"])
    mel = log_mel(samples, rmvpe.mel_basis, rmvpe.window)
    rows["rmvpe"] = {"gflop_per_audio_s": count(lambda: rmvpe.salience(mel)) / 1e9, "weight_mb": weight_bytes(rmvpe.net) / 1e6}
    hubert = load_hubert(fx["hubert"])
    rows["hubert (v2 features)"] = {"gflop_per_audio_s": count(lambda: chunk_features(hubert, audio, "v2")) / 1e9,
                                    "weight_mb": weight_bytes(hubert) / 1e6}
    voice = load_voice(fx["voices"]["v2-40k-f0"]["pth"])
    t = int(SECONDS * 100)
    phone = torch.randn(1, t, 768)
    nsff0 = torch.full((1, t), 200.0)
    pitch = torch.full((1, t), 100, dtype=torch.long)
    rows["synthesizer v2 40k"] = {
        "gflop_per_audio_s": count(lambda: voice.model.infer(phone, pitch, nsff0, noise=SynthNoise.zeros())) / 1e9,
        "weight_mb": weight_bytes(voice.model) / 1e6}
    for name, row in rows.items():
        print(f"{name:22s} {row['gflop_per_audio_s']:9.1f} GFLOP per audio second   weights {row['weight_mb']:7.1f} MB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seconds": SECONDS, "networks": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
