"""Make tests/goldens/<case>.npz by running the reference RVC on our own test fixtures.

    .venv/bin/python tests/goldens/make_goldens.py --ref REF_DIR --oracle ORACLE_DIR \
        --oracle-python ORACLE_VENV/bin/python [--work DIR] [--cases NAME ...]

Runs in our venv: builds the fixtures with tests/fixtures.py, lays them out as the oracle expects
(fixtures.json + weights/ + indices/ + hubert_base.pt + rmvpe.pt, as symlinks), then runs the
oracle's run_reference.py once per case in the oracle's venv (through reference_runner.py) at a
fixed seed, keeps from each dump only what cannot be derived, and checks that load_golden derives
the rest (the synthesizer noise among it) bit for bit. See README.md next to this.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
from tests.fixtures import build_fixtures  # noqa: E402
from tests.goldens import load_golden  # noqa: E402

SEED = 0
SIZE_TARGET = 6 * 2**20  # all goldens together; they live in git
REFERENCE_CHUNKING = (1, 6, 38, 41)  # x_pad, x_query, x_center, x_max of the reference's CPU fp32 Config


@dataclass(frozen=True)
class Case:
    voice: str
    audio: str  # key of build_fixtures()["audio"]
    f0_method: str = "rmvpe"
    index_rate: float | None = 0.76  # None: no index at all (--no-index)
    protect: float = 0.33
    rms_mix_rate: float = 1.0
    filter_radius: int = 3
    f0_up_key: int = 0
    chunking: tuple[int, int, int, int] = REFERENCE_CHUNKING
    limiter: bool = False  # the input peak is above 0.95, so the reference scales it down
    intermediates: bool = True  # keep KEEP_INTERMEDIATES too

    def reference_args(self) -> list[str]:
        args = ["--voice", self.voice, "--f0-method", self.f0_method, "--protect", str(self.protect),
                "--rms-mix-rate", str(self.rms_mix_rate), "--filter-radius", str(self.filter_radius),
                "--f0-up-key", str(self.f0_up_key), "--seed", str(SEED), "--noise", "record"]
        if self.index_rate is None:
            return args + ["--no-index"]
        return args + ["--index-rate", str(self.index_rate)]


CASES = {
    # crepe full with its dither, index, the input peak limiter (peak 0.98 > 0.95)
    "v2_40k_crepe_index": Case("v2-40k-f0", "speech_2p5s_loud", f0_method="crepe", limiter=True),
    # v1 features (layer 9 + final_proj), key shift, RMS mix
    "v1_32k_rmvpe_index": Case("v1-32k-f0", "speech_2s", rms_mix_rate=0.25, f0_up_key=3),
    # no f0 model: no pitch inputs, no NSF noise, no protect
    "v2_48k_nof0": Case("v2-48k-nof0", "speech_2s", index_rate=None),
    # small chunking constants split a 7 s input into 3 chunks
    "v2_40k_chunked": Case("v2-40k-f0", "speech_7s", index_rate=0.5, protect=0.2, chunking=(1, 1, 3, 4),
                           intermediates=False),
    # WORLD's harvest and its 3-tap median filter (filter radius 3), a key down
    "v2_40k_harvest": Case("v2-40k-f0", "speech_2s", f0_method="harvest", f0_up_key=-2, intermediates=False),
    # Praat's autocorrelation pitch, padded to p_len
    "v2_40k_pm": Case("v2-40k-f0", "speech_2s", f0_method="pm", intermediates=False),
}

# What the tests compare against or inject (c* = every chunk); the rest of a dump is either
# derivable (see __init__.py, which adds it back) or too large for the repository. The random
# draws of the synthesizer are not stored: load_golden regenerates them bitwise.
KEEP = [
    "audio_load", "audio_in",  # decoded; after the peak limit (what Pipeline.pipeline gets)
    "split_points",  # floored to ×160
    "crepe_f0", "crepe_pd", "crepe_pd_median", "crepe_f0_mean",
    "crepe_dither", "crepe_dither_batches",  # the reference's dither draws, to inject into ours
    "f0_raw", "pitch", "pitchf", "diag_crepe_pd_margin", "diag_rmvpe_margin",
    "c*_p_len", "c*_pitch", "c*_pitchf",  # the synthesizer's length and pitch inputs
    "c*_index_ix", "c*_index_weight", "c*_diag_knn_gap89", "c*_diag_ivf_gap12",
    "audio_out", "out_sr", "meta_json",
]
# Per-stage intermediates of chunk 0, for cases with Case.intermediates (large: C = 768 for v2).
KEEP_INTERMEDIATES = [
    "audio_hp",  # after the 48 Hz high-pass
    "c0_feats", "c0_feats_index",  # content features; after the index blend
    "audio_concat",  # synthesizer output with the padding trimmed, before the RMS mix and int16
]
KEEP_FLOAT64 = {"audio_hp", "crepe_dither"}
# (kept, dropped where it holds the same values as the kept one)
DUPLICATES = [("audio_in", "audio_load"), ("c0_feats", "c0_feats_index")]


def oracle_layout(fx: dict, out: Path) -> Path:
    """Symlink build_fixtures() files into the layout oracle_common.fixture_paths reads."""
    for sub in ("weights", "indices"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    voices = {}

    def link(target: str | Path, rel: str) -> str:
        path = out / rel
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(Path(target).resolve())
        return path.name

    for name, files in fx["voices"].items():
        # the reference rewrites "trained" to "added" in index paths
        voices[name] = {"pth": link(files["pth"], f"weights/{name}.pth"),
                        "index": link(files["index"], f"indices/added_{name}.index")}
    manifest = {"hubert": link(fx["hubert"], "hubert_base.pt"), "voices": voices,
                "source": "tests/fixtures.py build_fixtures (rvc-serve)"}
    link(fx["rmvpe"], "rmvpe.pt")  # the reference opens $rmvpe_root/rmvpe.pt
    (out / "fixtures.json").write_text(json.dumps(manifest, indent=1))
    return out


def run_reference(case: Case, fx: dict, fixtures_dir: Path, dump: Path, args: argparse.Namespace) -> None:
    cmd = [args.oracle_python, "-W", "ignore", str(HERE / "reference_runner.py"), "--oracle", str(args.oracle)]
    if case.chunking != REFERENCE_CHUNKING:
        cmd += ["--chunking", *map(str, case.chunking)]
    cmd += ["--", "--ref", str(args.ref), "--fixtures", str(fixtures_dir), "--input",
            str(Path(fx["audio"][case.audio]).resolve()), "--out", str(dump), *case.reference_args()]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the oracle is CPU fp32 only
    print("[goldens] $", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def extract(dump: Path, case: Case) -> dict[str, np.ndarray]:
    """The kept arrays that hold values; floats as float32 (except KEEP_FLOAT64), integers as int32."""
    patterns = KEEP + (KEEP_INTERMEDIATES if case.intermediates else [])
    src = np.load(dump, allow_pickle=True)  # the dump holds None for what a run lacks (pitch of a no-f0 voice)
    out = {}
    for key in src.files:
        if not any(re.fullmatch(p.replace("*", r"\d+"), key) for p in patterns):
            continue
        a = src[key]
        if a.dtype == object or a.size == 0:
            continue
        if key == "audio_out" or a.dtype.kind in "US":
            out[key] = a
        elif a.dtype.kind == "f":
            out[key] = a if key in KEEP_FLOAT64 else a.astype(np.float32)
        else:
            out[key] = a.astype(np.int32)
    for kept, duplicate in DUPLICATES:
        if kept in out and duplicate in out and np.array_equal(out[kept], out[duplicate]):
            del out[duplicate]
    return out


def verify_derived(name: str, directory: Path, dump: Path) -> None:
    """What load_golden adds back must be what the reference had, bit for bit."""
    golden, full = load_golden(name, directory), np.load(dump, allow_pickle=True)
    derived = [k for k in full.files if re.fullmatch(r"c\d+_noise_.*", k)] + ["audio_load"]
    if "c0_feats" in golden:
        derived.append("c0_feats_final")
    for key in derived:
        if key not in golden or not np.array_equal(golden[key], full[key]):
            raise SystemExit(f"{name}: load_golden's {key} differs from the reference's")


def check(name: str, case: Case, arrays: dict[str, np.ndarray]) -> dict:
    """Fail loudly if the run is not the case it claims to be."""
    meta = json.loads(str(arrays["meta_json"]))
    ran = tuple(meta["config"][k] for k in ("x_pad", "x_query", "x_center", "x_max"))
    if ran != case.chunking:
        raise SystemExit(f"{name}: reference ran with chunking {ran}, wanted {case.chunking}")
    chunked = case.chunking != REFERENCE_CHUNKING
    if chunked != (meta["n_chunks"] > 1):
        raise SystemExit(f"{name}: {meta['n_chunks']} chunks")
    if case.limiter != ("audio_load" in arrays):  # audio_load is dropped where it equals audio_in
        raise SystemExit(f"{name}: the input peak limiter {'did not act' if case.limiter else 'acted'}")
    if meta["noise"] != "record" or meta["seed"] != SEED:
        raise SystemExit(f"{name}: noise {meta['noise']} seed {meta['seed']}")
    return meta


def make_goldens(fx: dict, work: Path, args: argparse.Namespace, names: list[str]) -> None:
    fixtures_dir = oracle_layout(fx, work / "oracle-fixtures")
    (work / "dumps").mkdir(parents=True, exist_ok=True)
    for name in names:
        case = CASES[name]
        dump = work / "dumps" / f"{name}.npz"
        run_reference(case, fx, fixtures_dir, dump, args)
        arrays = extract(dump, case)
        meta = check(name, case, arrays)
        path = args.out_dir / f"{name}.npz"
        np.savez_compressed(path, **arrays)
        verify_derived(name, args.out_dir, dump)
        print(f"[goldens] {name}: {meta['n_chunks']} chunk(s), {meta['output_samples']} samples @ "
              f"{meta['out_sr']} Hz, {len(arrays)} arrays, {path.stat().st_size / 2**20:.2f} MiB", flush=True)


def report_sizes(out_dir: Path) -> None:
    total = 0
    for path in sorted(out_dir.glob("*.npz")):
        size = path.stat().st_size
        total += size
        print(f"[goldens] {path.name:28s} {size / 2**20:6.2f} MiB")
    print(f"[goldens] total {total / 2**20:.2f} MiB (target {SIZE_TARGET / 2**20:.0f} MiB)")
    if total > SIZE_TARGET:
        print("[goldens] WARNING: over the size target", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", type=Path, required=True, help="reference checkout (branch 20240604)")
    ap.add_argument("--oracle", type=Path, required=True, help="folder with run_reference.py")
    ap.add_argument("--oracle-python", required=True, help="python of the oracle's venv")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "rvc-goldens",
                    help="fixtures, oracle layout and full dumps (outside the repository)")
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = ap.parse_args()
    args.ref, args.oracle, args.work = args.ref.resolve(), args.oracle.resolve(), args.work.resolve()
    fx = build_fixtures(args.work / "fixtures")
    make_goldens(fx, args.work, args, args.cases)
    report_sizes(args.out_dir)


if __name__ == "__main__":
    main()
