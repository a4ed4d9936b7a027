"""Where rmvpe's GPU time goes now that its network runs in float32 whatever the caller's
precision (`rmvpe.full_float32`: fp16 flipped a voicing frame; batched 16 × 10 s pitch went from
0.08 to 0.32 s on an H100, session 14), and which float32-exact ways make it faster.

A batch of 16 × 10 s of synthetic speech through random-weight rmvpe (the real file format,
`random_rmvpe_state_dict`), each variant timed (median of 3 after a warm-up) and compared with
the shipped float32 pass: largest salience difference and voicing flips (frames whose peak
salience crosses the 0.03 threshold). Variants: the U-Net alone (the rest is the BiGRU and the
output layer); weights and activations channels-last (cuDNN's NHWC kernels); cuDNN's algorithm
search (`cudnn.benchmark`); BatchNorm folded into the convolution before it (one pass less over
the activations per layer); all three; and, for contrast, TF32, fp16 and bf16. Top CUDA kernels
of the shipped pass. Prints a table and writes JSON; asserts nothing. `--device cpu` is a dry run.

    python bench/rmvpe_gpu.py [--batch 16] [--seconds 10] [--device cuda] [--out bench/results/rmvpe-gpu.json]
"""
from __future__ import annotations

import copy
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.fusion import fuse_conv_bn_eval  # noqa: E402

from bench import gpu as gpu_bench  # noqa: E402
from bench.gpu import profile_options, synced, write_result  # noqa: E402
from pipeline import rmvpe  # noqa: E402
from pipeline.demo import synthetic_speech  # noqa: E402


def folded(net: rmvpe.RmvpeNet) -> rmvpe.RmvpeNet:
    """A copy of `net` with each BatchNorm that follows a convolution folded into it."""
    net = copy.deepcopy(net)
    for module in net.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, bn = module[i], module[i + 1]
            if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(bn, nn.BatchNorm2d):
                module[i] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))
                module[i + 1] = nn.Identity()
    return net


@contextmanager
def cudnn(benchmark: bool = False, tf32: bool = False) -> Iterator[None]:
    if not torch.cuda.is_available():
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=benchmark, allow_tf32=tf32):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def timed(fn: Callable[[], torch.Tensor], repeats: int = 3) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up (and cuDNN's search where it is on)
    times = []
    for _ in range(repeats):
        t0 = synced()
        out = fn()
        times.append(synced() - t0)
    return statistics.median(times), out


def main() -> None:
    args = profile_options(__doc__, "rmvpe-gpu").parse_args()
    gpu_bench.DEVICE = device = args.device  # synced() waits for the device only on CUDA
    cuda = device == "cuda"
    result: dict = {"gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
                    "batch": args.batch, "seconds": args.seconds}
    work = Path("/tmp/rvc-rmvpe-gpu")
    work.mkdir(parents=True, exist_ok=True)
    weights = work / "rmvpe.pt"
    if not weights.exists():
        rmvpe.save_rmvpe(rmvpe.random_rmvpe_state_dict(0), weights)
    model = rmvpe.load_rmvpe(weights, device)
    with torch.inference_mode():
        mels = [rmvpe.log_mel(torch.from_numpy(synthetic_speech(args.seconds, seed=i)).to(device),
                              model.mel_basis, model.window) for i in range(args.batch)]
        frames = mels[0].shape[-1]
        batch = torch.stack([nn.functional.pad(m, (0, rmvpe._padded_frames(frames) - frames)) for m in mels])

    plain_net, folded_net = model.net, folded(model.net)
    channels_last_net = copy.deepcopy(plain_net).to(memory_format=torch.channels_last)
    all_three_net = folded(plain_net).to(memory_format=torch.channels_last)

    def whole(net: nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: net(batch)[:, :frames]

    def unet(net: nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: net._local_features(batch, None)

    variants: dict[str, tuple[Callable[[], torch.Tensor], Callable[[], object]]] = {
        "fp32 (shipped)": (whole(plain_net), lambda: rmvpe.full_float32(torch.device(device))),
        "fp32 U-Net only": (unet(plain_net), lambda: rmvpe.full_float32(torch.device(device))),
        "fp32 channels-last": (whole(channels_last_net), lambda: cudnn()),
        "fp32 cudnn.benchmark": (whole(plain_net), lambda: cudnn(benchmark=True)),
        "fp32 BN folded": (whole(folded_net), lambda: cudnn()),
        "fp32 all three": (whole(all_three_net), lambda: cudnn(benchmark=True)),
        "tf32": (whole(plain_net), lambda: cudnn(tf32=True)),
        "fp16 autocast": (whole(plain_net), lambda: torch.autocast(device, dtype=torch.float16)),
        "bf16 autocast": (whole(plain_net), lambda: torch.autocast(device, dtype=torch.bfloat16)),
    }
    rows: dict[str, dict] = {}
    shipped: torch.Tensor | None = None
    for name, (fn, context) in variants.items():
        try:
            with torch.inference_mode(), context():
                seconds, out = timed(fn)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports what failed
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"{name:22s} failed: {rows[name]['error']}", flush=True)
            continue
        row = {"seconds": seconds, "x_realtime": args.batch * args.seconds / seconds}
        if shipped is None:
            shipped = out.float()
        elif out.shape == shipped.shape:
            out = out.float()
            voiced, shipped_voiced = out.max(-1).values > rmvpe.THRESHOLD, shipped.max(-1).values > rmvpe.THRESHOLD
            row.update(max_abs_diff=float((out - shipped).abs().max()),
                       voicing_flips=int((voiced != shipped_voiced).sum()), frames=int(voiced.numel()))
        rows[name] = row
        shown = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        print(f"{name:22s} " + "  ".join(shown), flush=True)
    result["variants"] = rows

    if cuda:
        with torch.inference_mode(), rmvpe.full_float32(torch.device(device)):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                whole(plain_net)()
                synced()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12)
        result["top_kernels"] = table
        print(table, flush=True)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
