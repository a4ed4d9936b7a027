"""Where the synthesizer's GPU time goes: a batch of 16 × 10 s through `Synthesizer.infer` in
fp16, its top CUDA kernels (torch.profiler), and each distinct residual-block convolution of the
decoder timed alone, as cuDNN's dilated 1-D convolution and split into `dilation` interleaved
phases of undilated ones (the same sums: a dilation-d convolution reads every d-th sample).
GPU only; prints tables and writes JSON; asserts nothing.

    python bench/synth_gpu.py [--batch 16] [--seconds 10] [--out bench/results/synth-gpu.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.crepe_conv import timed  # noqa: E402
from pipeline.convert import network_precision  # noqa: E402
from pipeline.synthesizer import SynthNoise, load_voice  # noqa: E402
from tests.fixtures import build_fixtures  # noqa: E402


def phase_split_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """conv1d(x, weight, dilation=d, padding='same') as one undilated convolution of the d
    interleaved phases x[..., r::d] stacked along the batch."""
    b, c, t = x.shape
    d, k = dilation, weight.shape[-1]
    t_pad = -t % d
    phases = F.pad(x, (0, t_pad)).view(b, c, -1, d).permute(0, 3, 1, 2).reshape(b * d, c, -1)
    y = F.conv1d(phases, weight, bias, padding=k // 2)  # [B·d, C_out, T'/d]
    return y.view(b, d, y.shape[1], -1).permute(0, 2, 3, 1).reshape(b, y.shape[1], -1)[..., :t]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--work", default="/tmp/rvc-synth-gpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "synth-gpu.json"))
    args = ap.parse_args()
    fx = build_fixtures(Path(args.work) / "fixtures")
    voice = load_voice(fx["voices"]["v2-40k-f0"]["pth"], device="cuda")
    model, dec = voice.model, voice.model.dec
    b, t = args.batch, int(args.seconds * 100)
    gen = torch.Generator(device="cuda").manual_seed(0)
    phone = torch.randn(b, t, voice.feature_dim, device="cuda", generator=gen)
    pitch = torch.randint(1, 256, (b, t), device="cuda", generator=gen)
    nsff0 = torch.full((b, t), 200.0, device="cuda")
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": b, "frames": t}

    def infer() -> torch.Tensor:
        return model.infer(phone, pitch, nsff0, sid=0, noise=SynthNoise.zeros())

    with torch.inference_mode(), network_precision("cuda", "fp16"):
        seconds = timed(infer, reps=3)
        result["infer_s"] = seconds
        print(f"infer {b} × {args.seconds:g} s fp16: {seconds * 1e3:.1f} ms ({b * args.seconds / seconds:.0f}× real time)")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            infer()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
        print(table)
        result["top_kernels"] = table

        # each distinct residual-block convolution, at its stage's length
        rows, seen = [], set()
        length = t
        per_stage = len(dec.resblocks) // len(dec.ups)
        for i, up in enumerate(dec.ups):
            length *= up.stride[0]
            for block in dec.resblocks[i * per_stage:(i + 1) * per_stage]:
                convs = [c for name in ("convs1", "convs2", "convs") for c in getattr(block, name, [])]
                for conv in convs:
                    key = (conv.in_channels, conv.kernel_size[0], conv.dilation[0], length)
                    if key in seen:
                        continue
                    seen.add(key)
                    x = torch.randn(b, conv.in_channels, length, device="cuda", dtype=torch.float16, generator=gen)
                    w, bias = conv.weight.half(), None if conv.bias is None else conv.bias.half()
                    d = conv.dilation[0]
                    ref = F.conv1d(x, w, bias, dilation=d, padding="same")
                    row = {"channels": key[0], "kernel": key[1], "dilation": d, "length": length,
                           "gflop": 2 * b * length * key[0] * conv.out_channels * key[1] / 1e9,
                           "cudnn_ms": timed(lambda x=x, w=w, bias=bias, d=d: F.conv1d(x, w, bias, dilation=d, padding="same"))
                           * 1e3}
                    if d > 1:
                        split = phase_split_conv(x, w, bias, d)
                        row["phase_split_ms"] = timed(lambda x=x, w=w, bias=bias, d=d: phase_split_conv(x, w, bias, d)) * 1e3
                        row["phase_split_max_diff"] = float((split - ref).abs().max())
                    row["cudnn_tflops"] = row["gflop"] / row["cudnn_ms"]
                    rows.append(row)
                    print(" ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                          flush=True)
        result["convolutions"] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
