"""The application builder named in serve_config.yaml: `deployments.app:build_app`.

    Ingress ─▶ (job actor) ─▶ Conversion ─┬▶ ContentFeatures   (per chunk)
                                          ├▶ PitchEstimator    (whole input)
                                          ├▶ HostPitch         (whole input: pm, harvest)
                                          └▶ Synthesis         (per chunk, multiplexed per voice)
"""
from __future__ import annotations

import os
import shutil

import ray
from ray.serve import Application

from .ingress import Ingress
from .registry import list_voices, write_meta
from .routing import upload_affinity_routing
from .settings import AppSettings, configured_api_keys, demo_api_key
from .stages import Conversion, ContentFeatures, HostPitch, PitchEstimator, Synthesis

DEMO_VOICE = "demo"


def build_app(args: dict) -> Application:
    """Validate the args (unknown keys are errors), prepare the data directory, bind the graph."""
    from pipeline.convert import ChunkingConfig

    settings = AppSettings.model_validate(args or {})
    ChunkingConfig(**settings.chunking)  # refuse bad chunking here, not in every replica
    prepare_data_dir(settings)
    stages = settings.stages
    gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    features = ContentFeatures.options(**stages.features.deployment_options("features", gpu)).bind(settings)
    pitch = PitchEstimator.options(**stages.pitch.deployment_options("pitch", gpu)).bind(settings)
    host_pitch = HostPitch.options(**stages.host_pitch.deployment_options("host_pitch", gpu)).bind(settings)
    synthesis = Synthesis.options(**stages.synthesis.deployment_options("synthesis", gpu)).bind(settings)
    conversion = Conversion.options(**conversion_options(settings, gpu)).bind(settings, features, pitch, host_pitch,
                                                                              synthesis)
    return ingress_app(settings, conversion, gpu)


def conversion_options(settings: AppSettings, gpu: bool = False) -> dict:
    """The conversion deployment's options (the tests give a stand-in the same): its stage
    settings, and the router that sends an upload's conversions to one replica."""
    return {**settings.stages.conversion.deployment_options("conversion", gpu), **upload_affinity_routing()}


def ingress_app(settings: AppSettings, conversion: Application, gpu: bool = False) -> Application:
    """The ingress in front of a conversion deployment (the tests put a stand-in there)."""
    return Ingress.options(**settings.stages.ingress.deployment_options("ingress", gpu)).bind(settings, conversion)


def prepare_data_dir(settings: AppSettings) -> None:
    """Create the directories; write the demo voice (and a demo HuBERT if there is none) when no
    voice is registered; print the demo API key when the operator configured no key."""
    for directory in (settings.voices_dir, settings.uploads_dir, settings.results_dir):
        directory.mkdir(parents=True, exist_ok=True)
    if not list_voices(settings.voices_dir):
        install_demo_voice(settings)
    if not settings.hubert.is_file():
        raise FileNotFoundError(f"{settings.hubert}: no HuBERT/ContentVec weights; put hubert_base.pt there "
                                "or set hubert_path")
    if not configured_api_keys(settings):
        print(f"rvc-serve: no RVC_API_KEYS configured; demo API key: {demo_api_key(settings.data_dir)}",
              flush=True)


def install_demo_voice(settings: AppSettings) -> None:
    """The demo voice `demo` (random weights: noise-like output). Generated aside and moved into
    place, so an interrupted start leaves no half voice; an existing HuBERT file is kept."""
    from pipeline.demo import write_demo_assets

    staging = settings.data_dir / ".demo-assets"
    shutil.rmtree(staging, ignore_errors=True)
    paths = write_demo_assets(staging)
    voice_dir = paths["model"].parent
    write_meta(voice_dir, DEMO_VOICE, name="demo (random weights, noise-like output)")
    if not settings.hubert.is_file():
        settings.hubert.parent.mkdir(parents=True, exist_ok=True)
        os.replace(paths["hubert"], settings.hubert)
    target = settings.voices_dir / DEMO_VOICE
    shutil.rmtree(target, ignore_errors=True)  # an unregistered leftover (no meta.json)
    os.rename(voice_dir, target)
    shutil.rmtree(staging, ignore_errors=True)
