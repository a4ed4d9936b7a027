"""Where crepe's GPU pitch time goes: a batch of 16 × 10 s through `crepe_f0_batch` (CREPE-full,
fp16), split into its phases (network, log-probabilities, viterbi, the rest), its top CUDA
kernels and kernel count (torch.profiler), and the viterbi pass alone, eager against replayed
from a CUDA graph (as crepe_f0_batch runs it on CUDA: the same kernels without a launch each
from Python; its steps are sequential, ~15 small kernels each). Prints tables and writes JSON;
asserts nothing (it reports whether the graph's path equals the eager one). `--device cpu` is a
dry run of the script (fp32, no graph).

    python bench/pitch_gpu.py [--batch 16] [--seconds 10] [--device cuda] [--out bench/results/pitch-gpu.json]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import gpu as gpu_bench  # noqa: E402
from bench.gpu import ensure_crepe_full_weights, profile_options, synced, write_result  # noqa: E402
from pipeline import crepe  # noqa: E402
from pipeline.convert import network_precision  # noqa: E402


def phases(model: crepe.Crepe, audios: list[torch.Tensor]) -> dict[str, float]:
    """Seconds of each phase of crepe_f0_batch, by wrapping its steps (synchronised at each)."""
    seconds: dict[str, float] = {}

    def clocked(name: str, fn):
        def run(*args, **kwargs):
            t0 = synced()
            out = fn(*args, **kwargs)
            seconds[name] = seconds.get(name, 0.0) + synced() - t0
            return out
        return run

    names = {"_network_outputs": "network_outputs", "_log_probs": "log_probs", "viterbi_pass": "viterbi"}
    originals = {name: getattr(crepe, name) for name in names}
    try:
        for name, fn in originals.items():
            setattr(crepe, name, clocked(names[name], fn))
        t0 = synced()
        crepe.crepe_f0_batch(model, audios, dithers=[np.random.default_rng(i) for i in range(len(audios))])
        seconds["total"] = synced() - t0
    finally:
        for name, fn in originals.items():
            setattr(crepe, name, fn)
    seconds["rest"] = seconds["total"] - sum(v for k, v in seconds.items() if k != "total")
    return seconds


def main() -> None:
    args = profile_options(__doc__, "pitch-gpu").parse_args()
    gpu_bench.DEVICE = device = args.device  # synced() waits for the device only on CUDA
    cuda = device == "cuda"
    result: dict = {"gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
                    "batch": args.batch, "seconds": args.seconds, "crepe_full_weights": ensure_crepe_full_weights()}
    model = crepe.load_crepe("full", device)
    gen = torch.Generator(device=device).manual_seed(0)
    audios = [0.1 * torch.randn(int(args.seconds * 16000), device=device, generator=gen) for _ in range(args.batch)]

    with torch.inference_mode(), network_precision(device, "fp16" if cuda else "fp32"):
        phases(model, audios)  # warm-up
        result["phases_s"] = phases(model, audios)
        print("phases (s): " + "  ".join(f"{k} {v:.3f}" for k, v in result["phases_s"].items()), flush=True)
        activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
        with torch.profiler.profile(activities=[activity]) as prof:
            crepe.crepe_f0_batch(model, audios, dithers=[np.random.default_rng(i) for i in range(len(audios))])
            synced()
        events = prof.key_averages()
        result["kernels"] = int(sum(e.count for e in events))  # CUDA: kernels and copies; CPU: operators
        table = events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=15)
        result["top_kernels"] = table
        print(f"{'CUDA kernels' if cuda else 'operators'}: {result['kernels']}\n{table}", flush=True)

        frames = int(args.seconds * 100) + 1
        pieces = args.batch * -(-frames // crepe.BATCH_FRAMES)
        log_prob = torch.log_softmax(3 * torch.randn(pieces, crepe.BATCH_FRAMES, crepe.PITCH_BINS, device=device,
                                                     generator=gen), dim=-1)
        lengths = torch.full((pieces,), crepe.BATCH_FRAMES, device=device)
        lengths[1::2] = frames % crepe.BATCH_FRAMES or crepe.BATCH_FRAMES
        eager_path = crepe.viterbi(log_prob, lengths)
        t0 = synced()
        crepe.viterbi(log_prob, lengths)
        row: dict = {"pieces": pieces, "eager_s": synced() - t0}
        try:
            if not cuda:
                raise RuntimeError("CUDA graphs need a CUDA device")
            t0 = time.perf_counter()
            graphed = crepe._GraphedViterbi(pieces, crepe.BATCH_FRAMES, torch.device(device))
            row["capture_s"] = time.perf_counter() - t0
            graphed(log_prob, lengths)
            t0 = synced()
            graph_path = graphed(log_prob, lengths)
            row["graph_s"] = synced() - t0  # with the copies in and out
            row["graph_equals_eager"] = bool(torch.equal(graph_path, eager_path))
        except Exception as exc:  # noqa: BLE001 - a benchmark reports what failed
            row["graph_error"] = f"{type(exc).__name__}: {exc}"
        result["viterbi"] = row
        print("viterbi " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
