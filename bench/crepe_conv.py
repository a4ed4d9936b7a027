"""CREPE-full's second convolution (1024 → 128 channels, 64 taps, 128 steps: 75 % of the network's
FLOPs) computed several ways on a GPU in fp16, to find how far cuDNN's kernels are from the GEMM
rate. GPU only; prints a table and writes JSON; asserts nothing.

    python bench/crepe_conv.py [--frames 8192] [--out bench/results/crepe-conv.json]

Ways: cuDNN 2-D (the network's own, kernel 64×1, NCHW), cuDNN 1-D (NCL), cuDNN 2-D channels-last,
im2col (the windows copied out, then one matrix product, in slices of frames) and an implicit GEMM
in Triton (time-major input; each output step's window of 64 steps × 1024 channels is one
contiguous run of memory, so the kernel reads the windows in place, no copy).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

C_IN, C_OUT, TAPS, STEPS = 1024, 128, 64, 128


def timed(fn, reps: int = 5) -> float:
    """Mean seconds of fn() over `reps` calls after one warm-up (synchronised on a GPU)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the Triton way is then reported as not run
    triton = None

if triton is not None:
    @triton.jit
    def _implicit_gemm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, T, TP, C,
                              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        row = (rm // T) * TP * C + (rm % T) * C  # where output row m's window starts
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            a = tl.load(x_ptr + row[:, None] + (k0 + rk)[None, :], mask=(rm < M)[:, None], other=0.0)
            b = tl.load(w_ptr + (k0 + rk)[:, None] * N + rn[None, :], mask=(rn < N)[None, :], other=0.0)
            acc += tl.dot(a, b)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.float16),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])


def implicit_gemm(x_tm: torch.Tensor, w_kc: torch.Tensor, steps: int) -> torch.Tensor:
    """x_tm [B, steps + taps − 1, C] fp16 contiguous, w_kc [taps·C, N] fp16 → [B, steps, N] fp16."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    b, tp, c = x_tm.shape
    n = w_kc.shape[1]
    m, k = b * steps, w_kc.shape[0]
    y = torch.empty(b, steps, n, device=x_tm.device, dtype=torch.float16)
    bm, bn, bk = 128, 128, 64
    _implicit_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x_tm, w_kc, y, m, n, k, steps, tp, c, BM=bm, BN=bn, BK=bk, num_warps=8, num_stages=4)
    return y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=8192)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "crepe-conv.json"))
    args = ap.parse_args()
    b = args.frames
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, C_IN, STEPS + TAPS - 1, 1, device="cuda", dtype=torch.float16, generator=gen)
    w = (torch.randn(C_OUT, C_IN, TAPS, 1, device="cuda", generator=gen) / (C_IN * TAPS) ** 0.5).half()
    flop = 2 * b * STEPS * C_OUT * C_IN * TAPS
    x_tm = x[..., 0].transpose(1, 2).contiguous()  # [B, T + 63, C]
    w_kc = w[..., 0].permute(2, 1, 0).reshape(TAPS * C_IN, C_OUT).contiguous()  # [taps·C, N]
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w_cl = w.contiguous(memory_format=torch.channels_last)

    def im2col(slice_frames: int = 128) -> torch.Tensor:
        out = torch.empty(b, STEPS, C_OUT, device="cuda", dtype=torch.float16)
        for s in range(0, b, slice_frames):
            windows = x_tm[s:s + slice_frames].unfold(1, TAPS, 1)  # [b', T, C, taps]
            cols = windows.transpose(2, 3).reshape(-1, TAPS * C_IN)  # copies: [b'·T, taps·C]
            out[s:s + slice_frames] = (cols @ w_kc).view(-1, STEPS, C_OUT)
        return out

    # every way gives [B, T, N] (the convolutions' [B, N, T] as a transposed view)
    ways = {
        "cudnn 2-D NCHW (the network's)": lambda: F.conv2d(x, w)[..., 0].transpose(1, 2),
        "cudnn 1-D NCL": lambda: F.conv1d(x[..., 0], w[..., 0]).transpose(1, 2),
        "cudnn 2-D channels-last": lambda: F.conv2d(x_cl, w_cl)[..., 0].transpose(1, 2),
        "im2col + matmul (128-frame slices)": im2col,
        "triton implicit GEMM": lambda: implicit_gemm(x_tm, w_kc, STEPS),
    }
    torch.backends.cudnn.allow_tf32 = False  # the reference in true fp32
    expected = F.conv2d(x.float(), w.float())[..., 0].transpose(1, 2)  # [B, T, N]
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "platform": platform.platform(),
              "frames": b, "gflop": flop / 1e9, "ways": {}}
    with torch.inference_mode():
        for name, fn in ways.items():
            try:
                got = fn()
                err = float((got.float() - expected).norm() / expected.norm())
                seconds = timed(fn)
                row = {"seconds": seconds, "tflops": flop / seconds / 1e12, "rel_err_vs_fp32": err}
            except Exception as e:  # noqa: BLE001 - a way that does not run here is a result too
                row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            result["ways"][name] = row
            print(f"{name:38s} " + (f"{row['seconds'] * 1e3:8.1f} ms  {row['tflops']:6.1f} TFLOP/s  "
                                    f"rel err {row['rel_err_vs_fp32']:.1e}" if "seconds" in row else row["error"]),
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
