"""`rvc-serve` command line: local conversion and asset commands without Ray, plus service tools.

Imports stay inside the commands so `rvc-serve convert` never loads Ray.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pipeline.pitch_methods import PITCH_METHODS


def _convert(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from pipeline import audio as audio_io
    from pipeline.convert import ConversionParams, Converter
    from pipeline.index import load_index
    from pipeline.memory import reuse_freed_memory
    from pipeline.synthesizer import load_voice

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    params = ConversionParams(index_rate=args.index_rate, rms_mix_rate=args.rms_mix_rate,
                              filter_radius=args.filter_radius, protect=args.protect,
                              f0_up_key=args.f0_up_key, f0_method=args.f0_method, seed=args.seed)
    started = time.perf_counter()
    voice = load_voice(args.model, device=args.device)
    index = load_index(args.index) if args.index and params.index_rate > 0 else None
    reuse_freed_memory()
    converter = Converter.from_paths(args.hubert, rmvpe_path=args.rmvpe, device=args.device, precision=args.precision)
    audio = audio_io.load_audio(args.input)
    with tqdm(total=None, unit="chunk", desc="converting", disable=args.quiet) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        out = converter.convert(audio, voice, index, params, progress=progress)
    rate = audio_io.write_audio(args.output, audio_io.to_int16(out), voice.sample_rate)
    if not args.quiet:
        seconds = audio.shape[0] / audio_io.SAMPLE_RATE
        wall = time.perf_counter() - started
        print(f"{args.output}: {out.shape[0] / voice.sample_rate:.2f} s at {rate} Hz "
              f"from {seconds:.2f} s of input in {wall:.1f} s (RTF {wall / max(seconds, 1e-9):.2f})")
    return 0


def _demo_assets(args: argparse.Namespace) -> int:
    from pipeline.demo import write_demo_assets

    paths = write_demo_assets(args.dir, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print("note: this is a DEMO voice with random weights; its output is noise-like, not a real voice")
    return 0


def _owner_key(args: argparse.Namespace) -> str | None:
    """The owner's API key, from --owner-key-file or the variable --owner-key-env names (never
    from the command line, where other users could read it); None for a public voice."""
    from .settings import read_keys_file

    if args.owner_key_file is not None:
        source = str(args.owner_key_file)
        try:
            keys = read_keys_file(args.owner_key_file)
        except OSError as e:
            raise ValueError(f"cannot read {source}: {e.strerror}") from None
    elif args.owner_key_env is not None:
        source = f"${args.owner_key_env}"
        value = os.environ.get(args.owner_key_env, "").strip()
        keys = [value] if value else []
    else:
        return None
    if len(keys) != 1:
        raise ValueError(f"{source} must hold exactly one API key, found {len(keys)}")
    return keys[0]


def _models_add(args: argparse.Namespace) -> int:
    from .registry import add_model
    from .settings import hash_key

    key = _owner_key(args)
    owner = None if key is None else hash_key(key)
    info = add_model(args.data_dir, args.model_id, args.pth, args.index, name=args.name, owner=owner)
    index = "with index" if info.index_path else "without index"
    # The tenant's 12-hex prefix, as in the service's logs; never the key.
    visibility = "public" if owner is None else f"owned by tenant {owner[:12]}"
    print(f"registered {info.model_id}: {info.version}, {info.sample_rate} Hz, "
          f"{'f0' if info.f0 else 'no f0'}, {index}, {visibility}")
    return 0


def _k8s(run):
    """A `rvc-serve k8s` command: API and kubeconfig failures become one-line errors (exit 2)."""
    def command(args: argparse.Namespace) -> int:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.config.config_exception import ConfigException
        from urllib3.exceptions import HTTPError

        try:
            return run(args)
        except ApiException as e:
            print(f"error: Kubernetes API: {e.status} {e.reason}", file=sys.stderr)
        except (ConfigException, HTTPError) as e:
            print(f"error: cannot reach the cluster: {e}", file=sys.stderr)
        return 2
    return command


def _overlay(args: argparse.Namespace):
    from .k8s_manifests import Overlay

    return Overlay(args.k8s_dir, args.overlay)


def _k8s_render(args: argparse.Namespace) -> int:
    from .k8s_manifests import dump

    overlay = _overlay(args)
    if args.update and overlay.update():
        print(f"wrote {overlay.generated_path}", file=sys.stderr)
    print("---\n".join(dump(obj) for obj in overlay.render()), end="")
    return 0


@_k8s
def _k8s_apply(args: argparse.Namespace) -> int:
    from .k8s_api import api_client, apply, describe

    objects = _overlay(args).render()
    api = api_client(args.kubeconfig, args.context)
    for obj in objects:
        print(f"{describe(obj)}: {apply(api, obj)}")
    return 0


@_k8s
def _k8s_status(args: argparse.Namespace) -> int:
    from .k8s_api import api_client, describe, wait_ready
    from .k8s_manifests import rayservice

    service = rayservice(_overlay(args).render())
    meta = service["metadata"]

    def report(status) -> None:
        print("\n  ".join([describe(service), *status.lines()]), flush=True)

    api = api_client(args.kubeconfig, args.context)
    if wait_ready(api, meta["name"], meta["namespace"], args.timeout, args.interval, report):
        return 0
    print(f"not ready after {args.timeout:g} s", file=sys.stderr)
    return 1


@_k8s
def _k8s_delete(args: argparse.Namespace) -> int:
    from .k8s_api import api_client, delete, describe
    from .k8s_manifests import rayservice

    service = rayservice(_overlay(args).render())
    meta = service["metadata"]
    deleted = delete(api_client(args.kubeconfig, args.context), meta["name"], meta["namespace"])
    print(f"{describe(service)}: {'deleted' if deleted else 'not found'} "
          "(the data volume and the Secrets are kept)")
    return 0


def _batch(args: argparse.Namespace) -> int:
    from rvc_client import Client, query_name

    from .batch import BatchOptions, HttpBackend, batch

    if args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    params = {query_name(name): str(getattr(args, name)) for name in CONVERSION_PARAMS
              if getattr(args, name) is not None}
    model_ids = tuple(model.strip() for model in args.model.split(",") if model.strip())
    options = BatchOptions(model_ids=model_ids, fmt=args.format, params=params, concurrency=args.concurrency,
                           overwrite=args.overwrite)
    if args.ray_address:
        from .batch_ray import ServeHandleBackend, connect

        connect(args.ray_address)
        summary = batch(args.input, args.output_dir, ServeHandleBackend(args.app, options, args.timeout), options,
                        progress=not args.quiet)
    else:
        if not args.url or not args.api_key:
            raise ValueError("HTTP mode needs --url and --api-key (or RVC_URL and RVC_API_KEY); "
                             "or give --ray-address")
        with Client(args.url, args.api_key) as client:
            summary = batch(args.input, args.output_dir, HttpBackend(client, options, args.timeout), options,
                            progress=not args.quiet)
    print(summary.text())
    return 130 if summary.interrupted else 1 if summary.failed else 0


# Conversion parameters of `convert` and `batch` (argparse dests). `batch` sends only those given:
# the service has the same defaults.
CONVERSION_PARAMS = {"index_rate": (float, 0.76), "rms_mix_rate": (float, 1.0), "filter_radius": (int, 3),
                     "protect": (float, 0.33), "f0_up_key": (int, 0), "f0_method": (str, "crepe")}


def _conversion_options(parser: argparse.ArgumentParser, with_defaults: bool) -> None:
    for name, (kind, default) in CONVERSION_PARAMS.items():
        extra = {"choices": PITCH_METHODS} if name == "f0_method" else {}
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default if with_defaults else None,
                            **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rvc-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="convert one file locally, without Ray")
    conv.add_argument("input", type=Path)
    conv.add_argument("-o", "--output", type=Path, required=True, help="output .wav, .flac or .mp3")
    conv.add_argument("--model", type=Path, required=True, help="RVC voice .pth")
    conv.add_argument("--index", type=Path, help="the voice's .index")
    conv.add_argument("--hubert", type=Path, default=Path("data/hubert_base.pt"),
                      help="hubert_base.pt (fairseq) or a transformers HuBERT directory")
    conv.add_argument("--rmvpe", type=Path, help="rmvpe.pt, needed for --f0-method rmvpe")
    _conversion_options(conv, with_defaults=True)
    conv.add_argument("--seed", type=int, default=0)
    conv.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    conv.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                      help="fp32: exact; fp16: faster on GPUs; bf16: faster on CPUs with AMX/AVX512-BF16 "
                           "(both within 1e-2 of fp32, see docs/performance.md)")
    conv.add_argument("-q", "--quiet", action="store_true")
    conv.set_defaults(func=_convert)

    bat = sub.add_parser("batch", help="convert a folder (or a list) of files through the service, resumably",
                         description="Outputs mirror the input folder under OUTPUT_DIR; a JSONL manifest "
                         "there records each file done or failed, so running the same command again "
                         "converts only what is left. Over HTTP (--url, --api-key) or through the "
                         "application's Serve handle (--ray-address).")
    bat.add_argument("input", type=Path, help="folder (searched recursively for .wav/.mp3/.flac) or a text "
                     "file naming one input a line (relative to its folder)")
    bat.add_argument("--model", required=True,
                     help="voice model id (see GET /v1/models-vc); several, comma-separated: every input in "
                          "each voice, each voice's outputs in a folder named for it")
    bat.add_argument("-o", "--output-dir", type=Path, required=True)
    bat.add_argument("--format", default="mp3", choices=["mp3", "flac", "wav"],
                     help="output format (flac and wav need --ray-address)")
    bat.add_argument("--concurrency", type=int, default=4, help="files in flight at once")
    bat.add_argument("--overwrite", action="store_true", help="replace outputs not recorded done in the manifest")
    bat.add_argument("--timeout", type=float, default=900.0, help="seconds one file may take")
    mode = bat.add_mutually_exclusive_group()
    mode.add_argument("--url", default=os.environ.get("RVC_URL"), help="service base URL (env RVC_URL)")
    mode.add_argument("--ray-address", help="`auto` or ray://host:10001: call the application's Serve handle")
    bat.add_argument("--api-key", default=os.environ.get("RVC_API_KEY"), help="HTTP mode (env RVC_API_KEY)")
    bat.add_argument("--app", default="rvc", help="Serve application name, Ray mode (default: rvc)")
    _conversion_options(bat, with_defaults=False)
    bat.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    bat.set_defaults(func=_batch)

    demo = sub.add_parser("demo-assets", help="write the demo voice set (random weights) to DIR")
    demo.add_argument("dir", type=Path)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo_assets)

    models = sub.add_parser("models", help="manage the voice registry").add_subparsers(dest="action", required=True)
    add = models.add_parser("add", help="validate a voice by loading it, then register it")
    add.add_argument("model_id", help="registry id: letters, digits, '.', '_', '-'")
    add.add_argument("--pth", type=Path, required=True, help="RVC voice .pth")
    add.add_argument("--index", type=Path, help="its .index (optional)")
    add.add_argument("--name", help="display name (default: the id)")
    add.add_argument("--data-dir", type=Path, default=Path(os.environ.get("RVC_DATA_DIR", "data")))
    visibility = add.add_mutually_exclusive_group()
    visibility.add_argument("--public", action="store_true", help="every API key may use it (the default)")
    visibility.add_argument("--owner-key-file", type=Path, metavar="FILE",
                            help="only the API key in FILE may use it (stored as the key's SHA-256 tenant id)")
    visibility.add_argument("--owner-key-env", metavar="VAR",
                            help="only the API key in environment variable VAR may use it")
    add.set_defaults(func=_models_add)

    k8s = sub.add_parser("k8s", help="the KubeRay deployment (k8s/ overlays)").add_subparsers(
        dest="action", required=True)
    for action, func, help_text in (
            ("render", _k8s_render, "print the overlay's manifests (kubectl kustomize)"),
            ("apply", _k8s_apply, "create the overlay's objects, or patch those that exist"),
            ("status", _k8s_status, "print the RayService's conditions and serve endpoints; exit 1 "
                                    "when it is not Ready within --timeout"),
            ("delete", _k8s_delete, "delete the RayService (the data volume and Secrets stay)")):
        cmd = k8s.add_parser(action, help=help_text)
        cmd.add_argument("overlay", help="an overlay in k8s/overlays: cpu-dev, gpu-prod, ...")
        cmd.add_argument("--k8s-dir", type=Path, default=Path("k8s"), help="the k8s directory (default: ./k8s)")
        if action == "render":
            cmd.add_argument("--update", action="store_true",
                             help="first regenerate the overlay's serveConfigV2 from serve_config.yaml")
        else:
            cmd.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
            cmd.add_argument("--context", help="kubeconfig context (default: the current one)")
        if action == "status":
            cmd.add_argument("--timeout", type=float, default=0.0,
                             help="seconds to wait for Ready (default 0: look once)")
            cmd.add_argument("--interval", type=float, default=5.0, help="seconds between polls")
        cmd.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.assets import AssetError
    from pipeline.audio import AudioDecodeError

    try:
        return args.func(args)
    except (AssetError, AudioDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
