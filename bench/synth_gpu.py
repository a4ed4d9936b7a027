"""Where the synthesizer's GPU time goes: a batch of 16 × 10 s through `Synthesizer.infer` in
fp16, its top CUDA kernels (torch.profiler), and each distinct residual-block convolution of the
decoder timed alone: cuDNN's dilated 1-D convolution (its heuristic's algorithm, and with
`cudnn.benchmark`), split into `dilation` interleaved phases of undilated ones (the same sums: a
dilation-d convolution reads every d-th sample), as a 2-D convolution in channels-last
memory, and as a Triton implicit GEMM over the time-major input (each tile size tried; the
fastest reported). Prints tables and writes JSON; asserts nothing. `--device cpu` is a dry run
(fp32; with TRITON_INTERPRET=1 and triton installed the Triton way runs in its interpreter).

    python bench/synth_gpu.py [--batch 16] [--seconds 10] [--device cuda] [--out bench/results/synth-gpu.json]
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.crepe_conv import timed  # noqa: E402
from bench.gpu import profile_options, write_result  # noqa: E402
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


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the Triton way is then not timed
    triton = None

if triton is not None:
    @triton.jit
    def _time_major_conv_kernel(x_ptr, w_ptr, bias_ptr, res_ptr, y_ptr, M, T, N, LEFT, C, TAPS, DILATION,
                                IN_SLOPE, OUT_SLOPE, HAS_BIAS: tl.constexpr, IN_ACT: tl.constexpr,
                                OUT_ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """y[b, t, :] = act(Σ_tap act_in(x[b, t + tap·d − left, :]) @ w[tap] + bias) (+ res[b, t, :]):
        an implicit GEMM over the time-major input, read in place; samples outside [0, T) read
        as zeros ('same' padding without a padded copy). The optional leaky ReLUs and residual
        add are the decoder's glue around its convolutions, done on the way in and out (the
        input may be the fp32 residual sum: it is cast to the weights' dtype as it is loaded).
        Shapes are runtime values, so one compilation per tile serves every convolution."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)  # output rows b·T + t
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        t = rm % T
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for tap in range(TAPS):
            src = t + tap * DILATION - LEFT
            ok = (rm < M) & (src >= 0) & (src < T)
            row = (rm + tap * DILATION - LEFT) * C  # the same item's row src
            for c0 in range(0, C, BK):
                a = tl.load(x_ptr + row[:, None] + (c0 + rk)[None, :], mask=ok[:, None], other=0.0)
                if IN_ACT:
                    a = tl.where(a > 0, a, a * IN_SLOPE)
                b = tl.load(w_ptr + (tap * C + c0 + rk)[:, None] * N + rn[None, :], mask=(rn < N)[None, :], other=0.0)
                acc += tl.dot(a.to(b.dtype), b)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if OUT_ACT:
            acc = tl.where(acc > 0, acc, acc * OUT_SLOPE)
        out = rm[:, None] * N + rn[None, :]
        keep = (rm < M)[:, None] & (rn < N)[None, :]
        if HAS_RESIDUAL:
            acc += tl.load(res_ptr + out, mask=keep, other=0.0).to(tl.float32)
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=keep)


def time_major_conv(x_tm: torch.Tensor, w_kc: torch.Tensor, bias: torch.Tensor | None, taps: int, dilation: int,
                    bm: int = 128, bn: int = 64, bk: int = 32, warps: int = 4, stages: int = 3, *,
                    in_slope: float | None = None, out_slope: float | None = None,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """conv1d(x, w, dilation=d, padding='same') for x_tm [B, T, C] (time-major, contiguous) and
    w_kc [taps·C, N] (tap-major rows: w_kc[tap·C + c, n] = w[n, c, tap]) → [B, T, N] in the
    weights' dtype; with in_slope / out_slope a leaky ReLU of the input / output, with
    `residual` [B, T, N] that added (the output then in its dtype)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    b, t, c = x_tm.shape
    n = w_kc.shape[1]
    y = torch.empty(b, t, n, device=x_tm.device, dtype=w_kc.dtype if residual is None else residual.dtype)
    m = b * t
    _time_major_conv_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x_tm, w_kc, bias if bias is not None else w_kc, residual if residual is not None else y, y,
        m, t, n, dilation * (taps - 1) // 2, c, taps, dilation, in_slope or 0.0, out_slope or 0.0,
        HAS_BIAS=bias is not None, IN_ACT=in_slope is not None, OUT_ACT=out_slope is not None,
        HAS_RESIDUAL=residual is not None, BM=bm, BN=bn, BK=min(bk, c), num_warps=warps, num_stages=stages)
    return y


TRITON_TILES = ((128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 64, 32, 4, 4), (256, 64, 32, 8, 3),
                (128, 32, 32, 4, 4))  # (BM, BN, BK, warps, stages): the fastest per shape is reported


def channels_last_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """conv1d(x, weight, dilation=d, padding='same') for x [B, C, T, 1] and weight [C_out, C, k, 1]
    in channels-last memory ([B, T, C] rows: what tensor cores' implicit GEMMs read; the
    decoder's CPU layout) as a 2-D convolution."""
    k = weight.shape[2]
    return F.conv2d(x, weight, bias, padding=(dilation * (k - 1) // 2, 0), dilation=(dilation, 1))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_runs(device: str) -> bool:
    return triton is not None and (device == "cuda" or _interpreting())


def _fastest_tile(run: Callable[..., torch.Tensor]) -> tuple[float, str]:
    """Milliseconds of run(*tile) with the fastest of TRITON_TILES, and that tile (the first
    tile only in the interpreter, which is slow)."""
    times = {tile: timed(lambda tile=tile: run(*tile)) * 1e3
             for tile in (TRITON_TILES[:1] if _interpreting() else TRITON_TILES)}
    best = min(times, key=times.get)
    return times[best], "x".join(map(str, best))


def _distinct(dec, t: int, items_of: Callable) -> list[tuple[tuple, object, int]]:
    """Over the decoder's residual blocks, each distinct key (channels, kernel, dilation, stage
    length) of the (convolution, item) pairs items_of(block) yields: the key, its first item and
    how many items share it."""
    found: dict[tuple, list] = {}
    length = t
    per_stage = len(dec.resblocks) // len(dec.ups)
    for i, up in enumerate(dec.ups):
        length *= up.stride[0]
        for block in dec.resblocks[i * per_stage:(i + 1) * per_stage]:
            for conv, item in items_of(block):
                key = (conv.in_channels, conv.kernel_size[0], conv.dilation[0], length)
                found.setdefault(key, [item, 0])[1] += 1
    return [(key, item, count) for key, (item, count) in found.items()]


def _print_row(row: dict) -> None:
    print(" ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)


def conv_rows(dec, b: int, t: int, device: str, dtype: torch.dtype, gen: torch.Generator) -> list[dict]:
    """Each distinct residual-block convolution at its stage's length, timed four ways: cuDNN's
    1-D convolution with its heuristic algorithm and with `cudnn.benchmark` (which tries them
    all), the phase split, and the channels-last 2-D convolution (with `cudnn.benchmark`)."""
    def convs(block):
        return [(c, c) for name in ("convs1", "convs2", "convs") for c in getattr(block, name, [])]

    return [_conv_row(key, conv, count, b, device, dtype, gen) for key, conv, count in _distinct(dec, t, convs)]


def _conv_row(key: tuple, conv, count: int, b: int, device: str, dtype: torch.dtype, gen: torch.Generator) -> dict:
    channels, k, d, length = key
    x = torch.randn(b, channels, length, device=device, generator=gen).to(dtype)
    w, bias = conv.weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype)
    ref = F.conv1d(x, w, bias, dilation=d, padding="same")
    row = {"channels": channels, "kernel": k, "dilation": d, "length": length, "count": count,
           "gflop": 2 * b * length * channels * conv.out_channels * k / 1e9}
    row["cudnn_ms"] = timed(lambda: F.conv1d(x, w, bias, dilation=d, padding="same")) * 1e3
    x2 = x[..., None].contiguous(memory_format=torch.channels_last)
    w2 = w[..., None].contiguous(memory_format=torch.channels_last)
    with cudnn_benchmark():
        row["cudnn_benchmark_ms"] = timed(lambda: F.conv1d(x, w, bias, dilation=d, padding="same")) * 1e3
        row["channels_last_ms"] = timed(lambda: channels_last_conv(x2, w2, bias, d)) * 1e3
    row["channels_last_max_diff"] = float((channels_last_conv(x2, w2, bias, d)[..., 0] - ref).abs().max())
    if _triton_runs(device):
        run = partial(time_major_conv, x.transpose(1, 2).contiguous(),
                      w.permute(2, 1, 0).reshape(-1, w.shape[0]).contiguous(), bias, k, d)
        row["triton_max_diff"] = float((run().transpose(1, 2) - ref).abs().max())
        row["triton_ms"], row["triton_tile"] = _fastest_tile(run)
    if d > 1:
        row["phase_split_ms"] = timed(lambda: phase_split_conv(x, w, bias, d)) * 1e3
        row["phase_split_max_diff"] = float((phase_split_conv(x, w, bias, d) - ref).abs().max())
    row["best_tflops"] = row["gflop"] / min(v for name, v in row.items() if name.endswith("_ms"))
    _print_row(row)
    return row


def pair_rows(dec, b: int, t: int, device: str, dtype: torch.dtype, gen: torch.Generator) -> list[dict]:
    """Each distinct step of a residual block (leaky ReLU of the fp32 sum, dilated convolution,
    leaky ReLU, undilated convolution, added into the sum) timed as the pipeline runs it on a GPU
    (cuDNN convolutions in `dtype` with the glue as separate kernels) and as two Triton kernels
    that do the glue on the way in and out."""
    def pairs(block):
        return [(c1, (c1, c2)) for c1, c2 in zip(getattr(block, "convs1", []), getattr(block, "convs2", []))]

    return [_pair_row(key, pair, count, b, device, dtype, gen) for key, pair, count in _distinct(dec, t, pairs)]


def _pair_row(key: tuple, pair: tuple, count: int, b: int, device: str, dtype: torch.dtype,
              gen: torch.Generator) -> dict:
    from pipeline.synthesizer import LRELU_SLOPE as slope

    channels, k, d, length = key
    c1, c2 = pair
    total = torch.randn(b, channels, length, device=device, generator=gen)
    w1, w2 = c1.weight.to(dtype), c2.weight.to(dtype)
    b1, b2 = c1.bias.to(dtype), c2.bias.to(dtype)

    def eager():
        h = F.leaky_relu_(F.conv1d(F.leaky_relu(total, slope).to(dtype), w1, b1, dilation=d, padding="same"), slope)
        return total + F.conv1d(h, w2, b2, padding="same")

    row = {"channels": channels, "kernel": k, "dilation": d, "length": length, "count": count,
           "eager_ms": timed(eager) * 1e3}
    if _triton_runs(device):
        total_tm = total.transpose(1, 2).contiguous()
        w1_kc = w1.permute(2, 1, 0).reshape(-1, w1.shape[0]).contiguous()
        w2_kc = w2.permute(2, 1, 0).reshape(-1, w2.shape[0]).contiguous()

        def fused(*tile):
            h = time_major_conv(total_tm, w1_kc, b1, k, d, *tile, in_slope=slope, out_slope=slope)
            return time_major_conv(h, w2_kc, b2, k, 1, *tile, residual=total_tm)

        ref = eager()
        row["fused_max_diff"] = float((fused().transpose(1, 2) - ref).abs().max())
        row["fused_ref_max"] = float(ref.abs().max())
        row["triton_fused_ms"], row["triton_tile"] = _fastest_tile(fused)
    _print_row(row)
    return row


def per_pass_totals(rows: list[dict]) -> dict[str, float]:
    """Milliseconds per decoder pass (each row times its count): each way that ran for every
    row, and with the fastest way for each row."""
    ways = dict.fromkeys(k for r in rows for k in r if k.endswith("_ms"))
    totals = {w: sum(r["count"] * r[w] for r in rows) for w in ways if all(w in r for r in rows)}
    totals["best_of_each_ms"] = sum(r["count"] * min(v for k, v in r.items() if k.endswith("_ms")) for r in rows)
    return totals


@contextmanager
def cudnn_benchmark():
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def main() -> None:
    ap = profile_options(__doc__, "synth-gpu")
    ap.add_argument("--work", default="/tmp/rvc-synth-gpu")
    args = ap.parse_args()
    device = args.device
    precision, dtype = ("fp16", torch.float16) if device == "cuda" else ("fp32", torch.float32)
    fx = build_fixtures(Path(args.work) / "fixtures")
    voice = load_voice(fx["voices"]["v2-40k-f0"]["pth"], device=device)
    model, dec = voice.model, voice.model.dec
    b, t = args.batch, int(args.seconds * 100)
    gen = torch.Generator(device=device).manual_seed(0)
    phone = torch.randn(b, t, voice.feature_dim, device=device, generator=gen)
    pitch = torch.randint(1, 256, (b, t), device=device, generator=gen)
    nsff0 = torch.full((b, t), 200.0, device=device)
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                    "precision": precision, "batch": b, "frames": t}

    def infer() -> torch.Tensor:
        return model.infer(phone, pitch, nsff0, sid=0, noise=SynthNoise.zeros())

    with torch.inference_mode(), network_precision(device, precision):
        seconds = timed(infer, reps=3)
        result["infer_s"] = seconds
        print(f"infer {b} × {args.seconds:g} s {precision}: {seconds * 1e3:.1f} ms ({b * args.seconds / seconds:.0f}× real time)")
        from torch.profiler import ProfilerActivity, profile

        activity, sort = (ProfilerActivity.CUDA, "self_cuda_time_total") if device == "cuda" else \
            (ProfilerActivity.CPU, "self_cpu_time_total")
        with profile(activities=[activity]) as prof:
            infer()
            if device == "cuda":
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by=sort, row_limit=25)
        print(table)
        result["top_kernels"] = table
        result["convolutions"] = conv_rows(dec, b, t, device, dtype, gen)
        result["convolutions_per_pass_ms"] = per_pass_totals(result["convolutions"])
        print("residual-block convolutions per pass: " + "  ".join(
            f"{k[:-3]} {v:.1f} ms" for k, v in result["convolutions_per_pass_ms"].items()))
        result["block_steps"] = pair_rows(dec, b, t, device, dtype, gen)
        result["block_steps_per_pass_ms"] = per_pass_totals(result["block_steps"])
        print("residual-block steps with their glue, per pass: " + "  ".join(
            f"{k[:-3]} {v:.1f} ms" for k, v in result["block_steps_per_pass_ms"].items()))
    write_result(result, args.out)


if __name__ == "__main__":
    main()
