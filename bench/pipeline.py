"""Pipeline benchmark: real-time factor per stage, ours and (optionally) the reference's.

    .venv/bin/python bench/pipeline.py [--seconds 10,60,600] [--f0-method crepe] [--device cpu] [--precision fp32]
        [--malloc-default] [--eager-glue]
        [--ref /tmp/oracle-work/ref --oracle ../shared/oracle --oracle-python /tmp/oracle-work/venv/bin/python]
        [--out bench/results/pipeline.json]

Voices and models are the test fixtures (random weights in the real formats: the same FLOPs as
real ones). With --ref, the reference RVC runs on the very same input files in the same run
through the oracle's bench_reference.py, and the ratio is printed. RTF = wall / audio seconds
(lower is faster). Prints a table and writes JSON; it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from pipeline import audio as audio_io  # noqa: E402
from pipeline.convert import (  # noqa: E402
    PRECISIONS,
    ConversionParams,
    Converter,
    compile_decoder_glue,
)
from pipeline.demo import synthetic_speech  # noqa: E402
from pipeline.index import load_index  # noqa: E402
from pipeline.memory import reuse_freed_memory  # noqa: E402
from pipeline.pitch import PITCH_METHODS  # noqa: E402
from pipeline.synthesizer import load_voice  # noqa: E402
from tests.fixtures import build_fixtures, default_cache_dir  # noqa: E402

STAGES = ("decode", "prepare", "pitch", "features", "retrieval", "synthesis", "finish", "encode")


def make_inputs(seconds: list[float], work: Path) -> tuple[Path, dict[float, Path]]:
    """44.1 kHz PCM16 speech-like wavs (what users upload, so decode resamples): one source of the
    longest length and its leading cuts, which is how the reference bench cuts its inputs."""
    work.mkdir(parents=True, exist_ok=True)
    longest = max(seconds)
    source = work / f"source_{longest:g}s.wav"
    if not source.exists():
        sf.write(source, synthetic_speech(longest, sample_rate=44100, seed=0), 44100, subtype="PCM_16")
    audio = sf.read(source, dtype="int16")[0]
    paths = {}
    for s in seconds:
        path = work / f"speech_{s:g}s.wav"
        if not path.exists():
            sf.write(path, audio[: int(round(s * 44100))], 44100, subtype="PCM_16")
        paths[s] = path
    return source, paths


def bench_ours(fx: dict, inputs: dict[float, Path], f0_method: str, device: str, precision: str,
               work: Path, reuse_memory: bool = True, compile_glue: bool = True) -> dict:
    v = fx["voices"]["v2-40k-f0"]
    if reuse_memory:
        reuse_freed_memory()  # as the service's model replicas and `rvc-serve convert` do
    compile_s = None
    started = time.perf_counter()
    if compile_glue and compile_decoder_glue(device, precision):  # as the service's synthesis replicas do
        compile_s = time.perf_counter() - started
    started = time.perf_counter()
    voice = load_voice(v["pth"], device=device)
    index = load_index(v["index"])
    converter = Converter.from_paths(fx["hubert"], rmvpe_path=fx["rmvpe"], device=device, precision=precision)
    load_s = time.perf_counter() - started
    params = ConversionParams(f0_method=f0_method)
    converter.convert(np.zeros(32000, np.float32), voice, index, params)  # warm-up
    results = {}
    for seconds, path in inputs.items():
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        audio = audio_io.load_audio(path)
        timings["decode"] = time.perf_counter() - t0
        out = converter.convert(audio, voice, index, params, timings=timings)
        t1 = time.perf_counter()
        audio_io.write_audio(work / f"out_{seconds:g}s.mp3", audio_io.to_int16(out), voice.sample_rate)
        timings["encode"] = time.perf_counter() - t1
        wall = time.perf_counter() - t0
        results[f"{seconds:g}"] = {"wall_s": wall, "rtf": wall / seconds, "peak_rss_mb": _peak_rss_mb(),
                                   "stages_s": {k: timings.get(k, 0.0) for k in STAGES},
                                   "stages_rtf": {k: timings.get(k, 0.0) / seconds for k in STAGES}}
        print(f"ours  {seconds:>6g} s: wall {wall:8.2f} s  RTF {wall / seconds:.3f}  peak RSS {_peak_rss_mb()} MB  "
              + "  ".join(f"{k} {timings.get(k, 0.0):.2f}" for k in STAGES), flush=True)
    return {"load_s": load_s, "glue_compile_s": compile_s, "inputs": results}


def _peak_rss_mb() -> int:
    """This process's peak resident memory so far (inputs run shortest first)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def bench_reference(fx: dict, source: Path, inputs: dict[float, Path], args: argparse.Namespace,
                    work: Path) -> dict:
    """The reference on the same files, through the oracle's bench_reference.py."""
    from tests.goldens.make_goldens import oracle_layout

    layout = oracle_layout(fx, work / "oracle-fixtures")
    out_json = work / "reference.json"
    cmd = [args.oracle_python, "-W", "ignore", str(Path(args.oracle) / "bench_reference.py"),
           "--ref", args.ref, "--fixtures", str(layout), "--voice", "v2-40k-f0",
           "--seconds", ",".join(f"{s:g}" for s in inputs), "--f0-method", args.f0_method,
           "--source", str(source), "--workdir", str(work / "reference"), "--out", str(out_json)]
    print("reference:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={"CUDA_VISIBLE_DEVICES": "" if args.device == "cpu" else "0",
                                         "PATH": "/usr/bin:/bin:/usr/local/bin"})
    return json.loads(out_json.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", default="10,60,600")
    ap.add_argument("--f0-method", default="crepe", choices=PITCH_METHODS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS,
                    help="ours (pipeline.convert.network_precision); the reference runs its own fp32")
    ap.add_argument("--malloc-default", action="store_true",
                    help="leave glibc's allocator as it is (no pipeline.memory.reuse_freed_memory)")
    ap.add_argument("--eager-glue", action="store_true",
                    help="leave the decoder's CPU glue eager (no pipeline.synthesizer.compile_pointwise)")
    ap.add_argument("--ref", help="reference checkout (branch 20240604); runs the reference too")
    ap.add_argument("--oracle", default=str(ROOT.parent / "shared" / "oracle"))
    ap.add_argument("--oracle-python", default="/tmp/oracle-work/venv/bin/python")
    ap.add_argument("--work", default="/tmp/rvc-bench")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline.json"))
    args = ap.parse_args()

    seconds = [float(s) for s in args.seconds.split(",")]
    work = Path(args.work)
    fx = build_fixtures(default_cache_dir())
    source, inputs = make_inputs(seconds, work / "inputs")
    result = {"machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
                          "device": args.device,
                          "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                          "torch": torch.__version__},
              "f0_method": args.f0_method, "precision": args.precision,
              "reuse_freed_memory": not args.malloc_default, "compiled_glue": not args.eager_glue,
              "ours": bench_ours(fx, inputs, args.f0_method, args.device, args.precision, work,
                                 reuse_memory=not args.malloc_default, compile_glue=not args.eager_glue)}
    if args.ref:
        ref = bench_reference(fx, source, inputs, args, work)
        result["reference"] = ref
        for s in inputs:
            ours = result["ours"]["inputs"][f"{s:g}"]["rtf"]
            theirs = _reference_rtf(ref, s)
            if theirs:
                print(f"{s:>6g} s: reference RTF {theirs:.3f}  ours {ours:.3f}  speed-up {theirs / ours:.2f}x")
                result["ours"]["inputs"][f"{s:g}"]["speedup_vs_reference"] = theirs / ours
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def _reference_rtf(ref: dict, seconds: float) -> float | None:
    rtfs = [run["rtf"] for run in ref.get("runs", []) if abs(run["seconds"] - seconds) < 1e-6]
    return min(rtfs) if rtfs else None


if __name__ == "__main__":
    main()
