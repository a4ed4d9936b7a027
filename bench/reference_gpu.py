"""Run the shared oracle's bench_reference.py with the reference on its own GPU configuration.

    python bench/reference_gpu.py --oracle ORACLE_DIR -- <bench_reference.py arguments>

The oracle is CPU fp32 only (it refuses any other reference Config). For a GPU comparison we
let the reference run on the GPU in the fp32 configuration its Config picks for GPUs without
fast fp16 (chunking 1/6/38/41 s, as ours); its fp16 path needs fairseq's own HuBERT. Two stand-ins, both outside the timed model work: `ffmpeg` (the reference
shells out to the ffmpeg CLI to decode; GPU machines here have none) decodes with soundfile +
soxr to 16 kHz mono float32 instead, and `parselmouth`/`pyworld` (imported at module level for
the pm/harvest methods, which are not benchmarked) are empty modules.
"""
from __future__ import annotations

import argparse
import sys
import types


class _FfmpegStream:
    """ffmpeg-python's `input(path).output("-", ..., ar=sr).run(...)` decoding to f32le mono."""

    def __init__(self, path: str):
        self.path, self.rate = path, None

    def output(self, _target: str, **kwargs) -> "_FfmpegStream":
        self.rate = int(kwargs["ar"])
        return self

    def run(self, **_kwargs) -> tuple[bytes, bytes]:
        import numpy as np
        import soundfile as sf
        import soxr

        audio, rate = sf.read(self.path, dtype="float32", always_2d=True)
        mono = audio.mean(axis=1)
        if rate != self.rate:
            mono = soxr.resample(mono, rate, self.rate, quality="HQ")
        return np.ascontiguousarray(mono, dtype=np.float32).tobytes(), b""


def _install_stand_ins() -> None:
    ffmpeg = types.ModuleType("ffmpeg")
    ffmpeg.input = lambda path, **_kwargs: _FfmpegStream(path)
    ffmpeg.Error = RuntimeError
    sys.modules["ffmpeg"] = ffmpeg
    for name in ("av", "parselmouth", "pyworld"):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oracle", required=True)
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    sys.path.insert(0, args.oracle)
    _install_stand_ins()
    import oracle_common as oc
    import bench_reference

    def deployed_config():
        saved = sys.argv
        sys.argv = [saved[0]]
        try:
            from configs.config import Config

            cfg = Config()
        finally:
            sys.argv = saved
        # The reference's own fp32 GPU configuration (what its Config picks for GPUs without fast
        # fp16): its fp16 path cannot run on the oracle's HuBERT stand-in for fairseq.
        cfg.is_half = False
        cfg.x_pad, cfg.x_query, cfg.x_center, cfg.x_max = 1, 6, 38, 41
        return cfg

    oc.reference_config = deployed_config
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    bench_reference.main(rest)


if __name__ == "__main__":
    main()
