"""The model stages as separate deployments, and the `Conversion` orchestrator that runs a job.

Each stage is a thin adapter over one `pipeline.convert` stage function, so the service
computes exactly what `rvc-serve convert` computes (same chunks, same seeded noise per chunk,
same dither per frame, wherever each piece runs):

    ContentFeatures   HuBERT/ContentVec features of one chunk          (chunk_features)
    PitchEstimator    f0 of the whole padded input                     (estimate_input_pitch)
    Synthesis         index blend + synthesizer for one chunk, one     (retrieve, chunk_noise,
                      voice (+ its index) cached per model id (LRU)     synthesize_chunk)
    Conversion        load → prepare → pitch ∥ features → synthesis per chunk → join → write

Each replica loads only the models its stage uses.
"""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import numpy as np
import ray
from ray import serve

from .logs import get_logger
from .registry import get_voice
from .results import LocalResultStore
from .settings import AppSettings

RESULT_FORMATS = ("mp3", "flac")  # lossy (the inferenceUrl) and the lossless copy


def _device() -> str:
    """The replica's torch device (Ray hides GPUs from replicas that did not ask for one), with
    torch's CPU threads matched to the CPUs the replica reserved."""
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    torch.set_num_threads(max(1, int(cpus)))
    return "cuda" if torch.cuda.is_available() else "cpu"


@serve.deployment
class ContentFeatures:
    def __init__(self, settings: AppSettings) -> None:
        from pipeline.hubert import load_hubert

        self.hubert = load_hubert(settings.hubert, device=_device())

    async def extract(self, chunk_audio: np.ndarray, version: str) -> np.ndarray:
        """Features [T50, C] float32 of one chunk of the padded input."""
        from pipeline.convert import chunk_features

        feats = await asyncio.to_thread(chunk_features, self.hubert, chunk_audio, version)
        return feats.cpu().numpy()

    async def ready(self) -> bool:
        return True


@serve.deployment
class PitchEstimator:
    def __init__(self, settings: AppSettings) -> None:
        from pipeline.pitch import PitchModels

        self.models = PitchModels(device=_device(), rmvpe_path=settings.rmvpe)
        self.models.get("crepe")  # the default method is loaded before the replica reports ready

    async def estimate(self, prepared, params) -> tuple[np.ndarray, np.ndarray]:
        """(coarse, pitchf) over the whole padded input, dithered from the job's seed."""
        from pipeline.convert import estimate_input_pitch

        return await asyncio.to_thread(estimate_input_pitch, prepared, params, self.models)

    async def ready(self) -> bool:
        return True


class _CachedVoice:
    """A voice and its index, cached together. Serve calls `__del__` when it evicts the voice;
    a call still holding the voice keeps its own references, so dropping ours is safe."""

    def __init__(self, voice, index, on_evict) -> None:
        self.voice, self.index, self._on_evict = voice, index, on_evict

    def __del__(self) -> None:
        if self.voice is None:
            return
        self.voice = self.index = None
        self._on_evict()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@serve.deployment
class Synthesis:
    def __init__(self, settings: AppSettings) -> None:
        from pipeline.convert import ChunkingConfig

        self.settings = settings
        self.device = _device()
        self.chunking = ChunkingConfig(**settings.chunking)
        self.evictions = 0
        # Serve runs the loader inside the calling request's task: a task found here loaded
        # its voice (a cache miss).
        self.loading_tasks: set[asyncio.Task] = set()
        self.log = get_logger()

        async def load(model_id: str) -> _CachedVoice:
            return await self._load(model_id)

        self.cached_voice = serve.multiplexed(max_num_models_per_replica=settings.voices_per_replica)(load)

    async def _load(self, model_id: str) -> _CachedVoice:
        from pipeline.index import load_index
        from pipeline.synthesizer import load_voice

        self.loading_tasks.add(asyncio.current_task())
        info = get_voice(self.settings.voices_dir, model_id)
        if info is None:
            raise ValueError(f"model {model_id!r} is not registered")
        voice = await asyncio.to_thread(load_voice, info.model_path, self.device)
        index = await asyncio.to_thread(load_index, info.index_path) if info.index_path else None
        if index is not None and index.dim != voice.feature_dim:
            raise ValueError(f"index has {index.dim}-d vectors, the {voice.version} voice uses {voice.feature_dim}")
        self.log.info("voice loaded", extra={"model_id": model_id, "device": self.device})
        return _CachedVoice(voice, index, self._count_eviction)

    def _count_eviction(self) -> None:
        self.evictions += 1

    async def synthesize(self, feats0: np.ndarray, coarse: np.ndarray | None, pitchf: np.ndarray | None,
                         chunk_samples: int, preceding_chunks: list[int], params) -> dict:
        """One chunk of the voice named by the call's multiplexed model id: float32 audio at the
        voice's rate, padding trimmed, plus this call's voice-cache events."""
        import torch

        from pipeline.convert import chunk_noise, retrieve, synthesize_chunk

        task = asyncio.current_task()
        started = time.perf_counter()
        try:
            cached = await self.cached_voice(serve.get_multiplexed_model_id())
        finally:
            loaded = task in self.loading_tasks
            self.loading_tasks.discard(task)
        # A miss's wait is the cold load as a request sees it (queued behind other loads included).
        voice_load_s = time.perf_counter() - started if loaded else None
        voice, index = cached.voice, cached.index
        # Arrays from the object store are read-only; torch wants writable memory.
        feats0 = torch.from_numpy(np.array(feats0)).to(self.device)
        coarse = None if coarse is None else np.array(coarse)
        pitchf = None if pitchf is None else np.array(pitchf)
        trim = voice.sample_rate * self.chunking.x_pad

        def run() -> np.ndarray:
            feats = retrieve(feats0, index, params)
            return synthesize_chunk(voice, feats, feats0, coarse, pitchf, chunk_samples, params,
                                    chunk_noise(params.seed, preceding_chunks, voice), trim)

        audio = await asyncio.to_thread(run)
        evictions, self.evictions = self.evictions, 0
        return {"audio": audio, "voice_cache": {"hit": int(not loaded), "miss": int(loaded), "eviction": evictions},
                "voice_load_s": voice_load_s}

    async def ready(self) -> bool:
        return True


@serve.deployment
class Conversion:
    """Runs one job through the stages and writes its results; returns their keys and stats."""

    def __init__(self, settings: AppSettings, features, pitch, synthesis) -> None:
        import pipeline.convert  # noqa: F401 - import torch and the pipeline now, not in the first job

        self.settings = settings
        self.features, self.pitch, self.synthesis = features, pitch, synthesis
        self.results = LocalResultStore(settings.results_dir)
        self.log = get_logger()

    async def ready(self) -> bool:
        await asyncio.gather(self.features.ready.remote(), self.pitch.ready.remote(),
                             self.synthesis.ready.remote())
        return True

    async def convert(self, request: dict) -> dict:
        from pipeline.audio import load_audio, to_int16, write_audio
        from pipeline.convert import ChunkingConfig, ConversionParams, finish_output, prepare_input

        inference_id, model_id = request["inference_id"], request["model_id"]
        extra = {"inference_id": inference_id, "model_id": model_id}
        info = get_voice(self.settings.voices_dir, model_id)
        if info is None:
            raise ValueError(f"model {model_id!r} no longer exists")
        params = ConversionParams(**request["params"])
        latency: dict[str, list[float]] = defaultdict(list)

        async def timed(stage: str, awaitable):
            started = time.perf_counter()
            result = await awaitable
            latency[stage].append(time.perf_counter() - started)
            return result

        prepared = await timed("load", asyncio.to_thread(
            lambda: prepare_input(load_audio(request["upload_path"]), ChunkingConfig(**self.settings.chunking))))
        self.log.info("conversion started", extra={**extra, "chunks": len(prepared.chunks),
                                                   "seconds": round(prepared.audio_hp.shape[0] / 16000, 3)})
        pitch = (asyncio.ensure_future(timed("pitch", self.pitch.estimate.remote(prepared, params)))
                 if info.f0 else None)
        synthesis = self.synthesis.options(multiplexed_model_id=model_id)

        async def chunk_audio(i: int, chunk) -> dict:
            samples = prepared.audio_pad[chunk.start:chunk.end]
            feats0 = await timed("features", self.features.extract.remote(samples, info.version))
            coarse = pitchf = None
            if pitch is not None:
                coarse, pitchf = await pitch
                f0_slice = slice(chunk.f0_start, chunk.f0_end)
                coarse, pitchf = coarse[f0_slice], pitchf[f0_slice]
            preceding = [prepared.audio_pad[c.start:c.end].shape[0] for c in prepared.chunks[:i]]
            return await timed("synthesis", synthesis.synthesize.remote(
                feats0, coarse, pitchf, samples.shape[0], preceding, params))

        pieces = await _all_or_cancel([chunk_audio(i, c) for i, c in enumerate(prepared.chunks)]
                                      + ([pitch] if pitch is not None else []))
        pieces = pieces[:len(prepared.chunks)]
        latency["voice_load"] += [p["voice_load_s"] for p in pieces if p["voice_load_s"] is not None]
        out = to_int16(finish_output([p["audio"] for p in pieces], prepared, params, info.sample_rate))

        def write() -> dict[str, str]:
            keys = {}
            for fmt in RESULT_FORMATS:
                key = f"{inference_id}/output.{fmt}"
                with self.results.writer(key) as path:
                    write_audio(path, out, info.sample_rate, fmt)
                keys[fmt] = key
            return keys

        keys = await timed("write", asyncio.to_thread(write))
        cache = {event: sum(p["voice_cache"][event] for p in pieces) for event in ("hit", "miss", "eviction")}
        self.log.info("conversion done", extra={**extra, "output_seconds": round(out.shape[0] / info.sample_rate, 3)})
        return {"results": keys, "stats": {"latency": dict(latency), "voice_cache": cache}}


async def _all_or_cancel(awaitables: list) -> list:
    """Results in order; on the first failure the others are cancelled (with their stage calls)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise

