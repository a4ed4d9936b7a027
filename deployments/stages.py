"""The model stages as separate deployments, and the `Conversion` orchestrator that runs a job.

Each stage is a thin adapter over one `pipeline.convert` stage function, so the service
computes exactly what `rvc-serve convert` computes (same chunks, same seeded noise per chunk,
same dither per frame, wherever each piece runs):

    ContentFeatures   HuBERT/ContentVec features of chunks             (chunk_features_batch)
    PitchEstimator    f0 tracks of whole padded inputs, or of 512-    (input_pitch_tracks_batch,
                      frame-aligned crepe pieces of long ones           crepe_piece_batch)
    HostPitch         f0 tracks of the methods without a network     (pipeline.pitch_methods.host_f0)
                      (pm, harvest): CPUs only, one input per CPU
    Synthesis         index blend + synthesizer for chunks of one      (chunk_synthesis,
                      voice (+ its index) cached per model id (LRU)     synthesize_chunks)
    Conversion        load → prepare → pitch ∥ features → synthesis per chunk → join → write
                      (at most chunks_in_flight calls of a job at each model stage; features
                      and f0 tracks of recent inputs kept by content: deployments.input_cache)

Each replica loads only the models its stage uses. The model stages batch concurrent calls
(`@serve.batch`, sized by each stage's max_batch_size / batch_wait_timeout_s, up to
max_concurrent_batches at once): chunks of any jobs share one forward pass, and each result is
the one the call would get alone.
"""
from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from ray import serve

from .input_cache import InputCache
from .logs import get_logger
from .ray_env import by_reference
from .registry import get_voice
from .results import LocalResultStore
from .routing import UPLOAD_KEY_FIELD
from .settings import MODEL_STAGES, AppSettings, StageSettings


def _batched(handler: Callable, stage: StageSettings) -> Callable:
    """A replica's batch method (lists of the calls' arguments in, a list of results out) as the
    `@serve.batch` method its stage's settings size, made at start-up where they are known."""
    return serve.batch(max_batch_size=stage.max_batch_size, batch_wait_timeout_s=stage.batch_wait_timeout_s,
                       max_concurrent_batches=stage.max_concurrent_batches)(handler)


@dataclass(frozen=True)
class BatchRun:
    """The batch a model-stage call ran in: how many calls it held (of any jobs) and its seconds
    of compute (the call's latency less this is its queueing and transfers)."""

    size: int
    seconds: float


async def _run_batch(compute: Callable[[], list]) -> list[tuple[object, BatchRun]]:
    """A `@serve.batch` method's compute (or a lone call's), off the event loop: each call's
    result with its batch."""
    started = time.perf_counter()
    results = await asyncio.to_thread(compute)
    run = BatchRun(len(results), time.perf_counter() - started)
    return [(result, run) for result in results]


def set_cpu_priority(priority: str) -> None:
    """Put this replica's process under `priority` (StageSettings.cpu_priority). Linux keeps a
    policy per thread and a new thread takes its creator's, so every thread running now is
    moved: Ray's, the event loop's, and through them those started later (torch's, to_thread's)."""
    if priority == "normal" or not hasattr(os, "SCHED_IDLE"):  # not Linux: left as started
        return
    for tid in (int(task.name) for task in Path("/proc/self/task").iterdir()):
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except ProcessLookupError:  # the thread has ended
            pass
        except OSError as exc:  # a sandbox that forbids it: slower answers under load, not a failed start
            get_logger().warning("cpu_priority not applied", extra={"priority": priority, "error": str(exc)})
            return


def _device() -> str:
    """The replica's torch device (Ray hides GPUs from replicas that did not ask for one), with
    torch's CPU threads matched to the CPUs the replica reserved and large activations served
    from reused memory (pipeline.memory)."""
    import torch

    from pipeline.memory import reuse_freed_memory

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    torch.set_num_threads(max(1, int(cpus)))
    reuse_freed_memory()
    return "cuda" if torch.cuda.is_available() else "cpu"


def replica_precision(settings: AppSettings, device: str) -> str:
    """The precision a model replica on `device` runs in (`auto`: the fastest within the bound)."""
    from pipeline.convert import fastest_precision

    return fastest_precision(device) if settings.precision == "auto" else settings.precision


@serve.deployment
class ContentFeatures:
    def __init__(self, settings: AppSettings) -> None:
        from pipeline.hubert import load_hubert

        set_cpu_priority(settings.stages.features.cpu_priority)
        self.device = _device()
        self.precision = replica_precision(settings, self.device)
        self.hubert = load_hubert(settings.hubert, device=self.device)
        self._extract = _batched(self._extract_batch, settings.stages.features)

    async def extract(self, chunk_audio: np.ndarray, version: str) -> tuple[np.ndarray, BatchRun]:
        """Features [T50, C] float32 of one chunk of the padded input."""
        return await self._extract(chunk_audio, version)

    async def _extract_batch(self, chunks: list[np.ndarray],
                             versions: list[str]) -> list[tuple[np.ndarray, BatchRun]]:
        from pipeline.convert import chunk_features_batch, network_precision, per_group

        def run(version: str, mine: list[int]) -> list[np.ndarray]:
            with network_precision(self.device, self.precision):
                feats = chunk_features_batch(self.hubert, [chunks[i] for i in mine], version, len(mine))
            return [f.cpu().numpy() for f in feats]

        return await _run_batch(lambda: per_group(versions, run))

    async def ready(self) -> bool:
        return True


@serve.deployment
class PitchEstimator:
    def __init__(self, settings: AppSettings) -> None:
        from pipeline.pitch import PitchModels

        set_cpu_priority(settings.stages.pitch.cpu_priority)
        self.device = _device()
        self.precision = replica_precision(settings, self.device)
        self.models = PitchModels(device=self.device, rmvpe_path=settings.rmvpe)
        self.models.get("crepe")  # the default method is loaded before the replica reports ready
        self._estimate = _batched(self._estimate_batch, settings.stages.pitch)
        self._estimate_pieces = _batched(self._estimate_pieces_batch, settings.stages.pitch)

    async def estimate(self, prepared, params) -> tuple[np.ndarray, BatchRun]:
        """The f0 track of the whole padded input (dithered from the job's seed), before
        `finish_input_pitch` (the job's filter radius and key)."""
        return await self._estimate(prepared, params)

    async def estimate_piece(self, piece, method: str) -> tuple[tuple[np.ndarray, np.ndarray], BatchRun]:
        """Raw crepe (f0, periodicity) of one piece of a long input (pipeline.pitch.crepe_pieces)."""
        return await self._estimate_pieces(piece, method)

    async def _estimate_pieces_batch(self, pieces: list, methods: list[str]) -> list:
        from pipeline.convert import network_precision, per_group
        from pipeline.pitch import crepe_piece_batch

        def run(method: str, mine: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
            with network_precision(self.device, self.precision):
                return crepe_piece_batch([pieces[i] for i in mine], method, self.models)

        return await _run_batch(lambda: per_group(methods, run))

    async def _estimate_batch(self, prepared: list, params: list) -> list:
        from pipeline.convert import input_pitch_tracks_batch, network_precision

        def run() -> list[np.ndarray]:
            with network_precision(self.device, self.precision):
                return input_pitch_tracks_batch(list(zip(prepared, params)), self.models)

        return await _run_batch(run)

    async def ready(self) -> bool:
        return True


@serve.deployment
class HostPitch:
    """pm and harvest: no network, no device, no batch to share. A deployment of its own, on CPUs,
    so that slow harvests (~0.3 CPU s per audio second) scale with CPU workers and never hold the
    request slots of the (GPU) pitch replicas; it loads no torch. Each input runs in a thread, as
    many at once as the replica has CPUs (its `num_cpus`, rounded up)."""

    def __init__(self, settings: AppSettings) -> None:
        set_cpu_priority(settings.stages.host_pitch.cpu_priority)
        self._slots = asyncio.Semaphore(max(1, math.ceil(settings.stages.host_pitch.num_cpus)))

    async def estimate(self, audio_pad: np.ndarray, p_len: int, method: str) -> tuple[np.ndarray, BatchRun]:
        """The f0 track of a whole padded input, before `finish_input_pitch` (as `PitchEstimator.estimate`)."""
        from pipeline.pitch_methods import host_f0

        async with self._slots:
            [result] = await _run_batch(lambda: [host_f0(method, audio_pad, p_len)])
            return result

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
        from pipeline.memory import release_device_cache

        release_device_cache()


# The synthesis replica's log lines when its background compile ends (bench/load.py waits for them).
GLUE_COMPILED_LOG = "decoder glue compiled"
GLUE_EAGER_LOG = "decoder glue not compiled, running eagerly"


@serve.deployment
class Synthesis:
    def __init__(self, settings: AppSettings) -> None:
        from pipeline.convert import ChunkingConfig

        set_cpu_priority(settings.stages.synthesis.cpu_priority)
        self.settings = settings
        self.device = _device()
        self.precision = replica_precision(settings, self.device)
        self.chunking = ChunkingConfig(**settings.chunking)
        self.evictions = 0
        self.log = get_logger()
        # seconds of compiling where it helps: in the background, so the replica is ready at
        # once and its first requests run the eager glue
        threading.Thread(target=self._compile_glue, name="compile-glue", daemon=True).start()
        # Serve runs the loader inside the calling request's task: a task found here loaded
        # its voice (a cache miss).
        self.loading_tasks: set[asyncio.Task] = set()

        async def load(model_id: str) -> _CachedVoice:
            return await self._load(model_id)

        self.cached_voice = serve.multiplexed(max_num_models_per_replica=settings.voices_per_replica)(load)
        self._synthesize = _batched(self._synthesize_batch, settings.stages.synthesis)

    def _compile_glue(self) -> None:
        from pipeline.convert import compile_decoder_glue

        started = time.perf_counter()
        try:
            compiled = compile_decoder_glue(self.device, self.precision)
        except Exception as exc:  # noqa: BLE001 - the eager glue stays: slower, as faithful
            self.log.warning(GLUE_EAGER_LOG, extra={"reason": str(exc)[:500]})
            return
        if compiled:
            self.log.info(GLUE_COMPILED_LOG, extra={"seconds": round(time.perf_counter() - started, 2)})

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
                         chunk_samples: int, preceding_chunks: list[int], params) -> tuple[dict, BatchRun]:
        """One chunk of the voice named by the call's multiplexed model id: float32 audio at the
        voice's rate, padding trimmed, plus this call's voice-cache events."""
        from pipeline.convert import chunk_synthesis
        from pipeline.memory import to_device

        task = asyncio.current_task()
        started = time.perf_counter()
        try:
            cached = await self.cached_voice(serve.get_multiplexed_model_id())
        finally:
            loaded = task in self.loading_tasks
            self.loading_tasks.discard(task)
        # A miss's wait is the cold load as a request sees it (queued behind other loads included).
        voice_load_s = time.perf_counter() - started if loaded else None
        # Off the event loop: the blend runs on the GPU, and the draws replay the earlier chunks'.
        item = await asyncio.to_thread(lambda: chunk_synthesis(
            cached.voice, cached.index, to_device(feats0, self.device), coarse, pitchf, chunk_samples,
            preceding_chunks, params))
        audio, batch = await self._synthesize(cached, item)
        evictions, self.evictions = self.evictions, 0
        return {"audio": audio, "voice_cache": {"hit": int(not loaded), "miss": int(loaded), "eviction": evictions},
                "voice_load_s": voice_load_s}, batch

    async def _synthesize_batch(self, voices: list[_CachedVoice],
                                items: list) -> list[tuple[np.ndarray, BatchRun]]:
        """Chunks of concurrent calls, one batch per voice (Serve splits batches by model id;
        grouping again keeps that an optimisation, not a correctness condition)."""
        from pipeline.convert import network_precision, per_group, synthesize_chunks

        def run(_key: int, mine: list[int]) -> list[np.ndarray]:
            voice = voices[mine[0]].voice
            with network_precision(self.device, self.precision):
                return synthesize_chunks(voice, [items[i] for i in mine], voice.sample_rate * self.chunking.x_pad)

        return await _run_batch(lambda: per_group([id(c.voice) for c in voices], run))

    async def ready(self) -> bool:
        return True


@serve.deployment
class Conversion:
    """Runs one job through the stages and writes its results; returns their keys and stats."""

    def __init__(self, settings: AppSettings, features, pitch, host_pitch, synthesis) -> None:
        import pipeline.convert  # noqa: F401 - import torch and the pipeline now, not in the first job

        set_cpu_priority(settings.stages.conversion.cpu_priority)
        self.settings = settings
        # Samples, features and audio travel between the stages through the object store (shared
        # memory on one node), as measured, whatever Ray's default transport.
        self.features, self.pitch, self.host_pitch, self.synthesis = (
            by_reference(stage) for stage in (features, pitch, host_pitch, synthesis))
        self.results = LocalResultStore(settings.results_dir)
        self.input_cache = InputCache(settings.input_cache_mb * 2**20)
        self.log = get_logger()

    async def ready(self) -> bool:
        await asyncio.gather(self.features.ready.remote(), self.pitch.ready.remote(),
                             self.host_pitch.ready.remote(), self.synthesis.ready.remote())
        return True

    async def convert(self, request: dict) -> dict:
        from pipeline.audio import load_audio, to_int16, write_audio
        from pipeline.convert import ChunkingConfig, ConversionParams, finish_input_pitch, finish_output, prepare_input

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

        # This job's calls at each model stage (settings.chunks_in_flight): a call is made only
        # when it has a slot, so the stages' queues hold every call that is made.
        slots = {stage: asyncio.Semaphore(self.settings.chunks_in_flight) for stage in MODEL_STAGES}

        # (size, seconds) of the batch each model-stage call ran in (they answer (result, BatchRun)).
        batches: dict[str, list[tuple[int, float]]] = defaultdict(list)

        async def batched(stage: str, call: Awaitable):
            result, batch = await call
            batches[stage].append((batch.size, batch.seconds))
            return result

        async def stage_call(stage: str, call: Callable[[], Awaitable]):
            async with slots[stage]:
                return await timed(stage, batched(stage, call()))

        # Lookups in the input cache: a hit is a model-stage computation this job was spared. Its
        # entries are by upload key (deployments/routing.py), the tenant's own: a job's speed tells
        # nobody what another key uploaded.
        reuse = {"hit": 0, "miss": 0}
        upload = request.get(UPLOAD_KEY_FIELD)

        async def cached(key: tuple, compute: Callable[[], Awaitable[np.ndarray]]) -> np.ndarray:
            if upload is None:  # a job stored before uploads had digests
                array, spared = await compute(), False
            else:
                array, spared = await self.input_cache.get((upload, *key), compute)
            reuse["hit" if spared else "miss"] += 1
            return array

        def load():
            audio = load_audio(request["upload_path"], max_seconds=self.settings.audio_limit(params.f0_method))
            return prepare_input(audio, ChunkingConfig(**self.settings.chunking))

        prepared = await timed("load", asyncio.to_thread(load))
        self.log.info("conversion started", extra={**extra, "chunks": len(prepared.chunks),
                                                   "seconds": round(prepared.audio_hp.shape[0] / 16000, 3)})

        async def input_pitch() -> tuple[np.ndarray, np.ndarray]:
            """(coarse, pitchf): the input's f0 track (computed, or the input cache's) with this
            job's filter radius and key."""
            track = await cached(("pitch", params.f0_method, params.seed), lambda: timed(
                "pitch", self._pitch_track(prepared, params, slots["pitch"], batched)))
            return await asyncio.to_thread(finish_input_pitch, track, prepared, params)

        pitch = asyncio.ensure_future(input_pitch()) if info.f0 else None
        synthesis = self.synthesis.options(multiplexed_model_id=model_id)

        async def chunk_audio(i: int, chunk) -> dict:
            samples = prepared.audio_pad[chunk.start:chunk.end]
            feats0 = await cached(("features", chunk.start, chunk.end, info.version), lambda: stage_call(
                "features", lambda: self.features.extract.remote(samples, info.version)))
            coarse = pitchf = None
            if pitch is not None:
                coarse, pitchf = await pitch
                f0_slice = slice(chunk.f0_start, chunk.f0_end)
                coarse, pitchf = coarse[f0_slice], pitchf[f0_slice]
            preceding = [prepared.audio_pad[c.start:c.end].shape[0] for c in prepared.chunks[:i]]
            return await stage_call("synthesis", lambda: synthesis.synthesize.remote(
                feats0, coarse, pitchf, samples.shape[0], preceding, params))

        pieces = await _all_or_cancel([chunk_audio(i, c) for i, c in enumerate(prepared.chunks)]
                                      + ([pitch] if pitch is not None else []))
        pieces = pieces[:len(prepared.chunks)]
        latency["voice_load"] += [p["voice_load_s"] for p in pieces if p["voice_load_s"] is not None]
        out = to_int16(finish_output([p["audio"] for p in pieces], prepared, params, info.sample_rate))

        def write() -> dict[str, str]:
            keys = {}
            for fmt in request["formats"]:
                key = f"{inference_id}/output.{fmt}"
                with self.results.writer(key) as path:
                    write_audio(path, out, info.sample_rate, fmt)
                keys[fmt] = key
            return keys

        keys = await timed("write", asyncio.to_thread(write))
        cache = {event: sum(p["voice_cache"][event] for p in pieces) for event in ("hit", "miss", "eviction")}
        self.log.info("conversion done", extra={**extra, "output_seconds": round(out.shape[0] / info.sample_rate, 3)})
        return {"results": keys, "stats": {"latency": dict(latency), "voice_cache": cache, "batches": dict(batches),
                                           "input_cache": reuse}}

    async def _pitch_track(self, prepared, params, slots: asyncio.Semaphore,
                           batched: Callable[[str, Awaitable], Awaitable]) -> np.ndarray:
        """The input's f0 track: whole on one pitch replica (pm and harvest: a host pitch replica),
        or for a long crepe input in 512-frame-aligned pieces spread over the replicas (`slots`
        of them at once) and joined here (the same track). `batched` unpacks each call's result
        and keeps its batch."""
        from pipeline.convert import input_pitch_request
        from pipeline.pitch import CREPE_METHODS, HOST_METHODS, crepe_pieces, crepe_track

        if params.f0_method in HOST_METHODS:
            return await batched("host_pitch", self.host_pitch.estimate.remote(
                prepared.audio_pad, prepared.p_len, params.f0_method))
        piece_frames = self.settings.pitch_piece_frames
        if params.f0_method not in CREPE_METHODS or prepared.p_len < piece_frames:
            return await batched("pitch", self.pitch.estimate.remote(prepared, params))
        request = input_pitch_request(prepared, params)
        pieces = crepe_pieces(request.audio_pad, request.dither, piece_frames)

        async def piece_f0(piece):
            async with slots:
                return await batched("pitch", self.pitch.estimate_piece.remote(piece, params.f0_method))

        raw = await _all_or_cancel([piece_f0(p) for p in pieces])
        return await asyncio.to_thread(
            lambda: crepe_track(np.concatenate([f for f, _ in raw]), np.concatenate([p for _, p in raw])))


async def _all_or_cancel(awaitables: list) -> list:
    """Results in order; on the first failure the others are cancelled (with their stage calls)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise

