"""The one entry point of the benchmarks: `python bench/run.py NAME [its options]`.

    pipeline    RTF per stage for 10/60/600 s inputs, ours vs the reference  (bench/pipeline.py)
    gpu         precision fidelity, RTF and batched throughput on a GPU       (bench/gpu.py)
    load        the service under concurrent clients on 127.0.0.1            (bench/load.py)
    flops       FLOPs and weight bytes per audio second of each network      (bench/flops.py)
    crepe_conv  GPU: crepe's main convolution several ways                   (bench/crepe_conv.py)
    synth_gpu   GPU: the synthesizer's top kernels and its convolutions      (bench/synth_gpu.py)
    pitch_gpu   GPU: crepe's pitch phases, the viterbi eager vs CUDA graph   (bench/pitch_gpu.py)
    rmvpe_gpu   GPU: rmvpe's float32 pass several exact ways, and reduced ones (bench/rmvpe_gpu.py)

Each writes its JSON under bench/results/ and stays runnable on its own; `--help` after the
name shows a benchmark's options.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BENCHMARKS = ("pipeline", "gpu", "load", "flops", "crepe_conv", "synth_gpu", "pitch_gpu", "rmvpe_gpu")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(BENCHMARKS)}}} [options]\n\n{__doc__}")
    name = sys.argv[1]
    # Each benchmark parses sys.argv itself, as when it is run directly.
    sys.argv = [str(ROOT / "bench" / f"{name}.py"), *sys.argv[2:]]
    importlib.import_module(f"bench.{name}").main()


if __name__ == "__main__":
    main()
