"""End to end through the real stages: HTTP in, HuBERT ∥ crepe, per-chunk synthesis across
deployments, MP3 + FLAC out — equal to `Converter.convert` (what `rvc-serve convert` runs) for
the same input, parameters and seed.

Slow on CPU (the demo voice set has full-size random-weight models); marked `slow`.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.service_support import (TEST_STAGE, TEST_STAGES, delete_app, ray_process, run_app, serve_url,  # noqa: F401
                                   wait_for, write_keys)

pytestmark = pytest.mark.slow
pytest.importorskip("pipeline.pitch")
pytest.importorskip("pipeline.synthesizer")

KEY = "e2e-key-0123456789"
OTHER_KEY = "e2e-key-other-tenant"
# Small chunking constants (seconds) so a 7 s input is cut into 4 chunks that fan out.
CHUNKING = {"x_pad": 1, "x_query": 1, "x_center": 2, "x_max": 3}
# The chunks of a job arrive together: features and synthesis run them as batches.
BATCHING = {"max_ongoing_requests": 4, "max_batch_size": 4, "batch_wait_timeout_s": 0.05}
# Model-stage queues shorter than a job's chunk count (4): the conversion makes at most
# chunks_in_flight (2) calls of a job at once, so none is refused for a full queue.
CHUNKS_IN_FLIGHT, QUEUE = 2, {"max_queued_requests": 2}
STAGES = {**TEST_STAGES, "conversion": {**TEST_STAGE, "max_ongoing_requests": 1},
          "features": {**TEST_STAGE, **BATCHING, **QUEUE}, "pitch": {**TEST_STAGE, **QUEUE},
          "synthesis": {**TEST_STAGE, **BATCHING, **QUEUE}}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, serve_url):
    import torch

    from deployments.app import build_app
    from deployments.registry import add_model
    from pipeline.synthesizer import random_voice_checkpoint, save_voice

    data = tmp_path_factory.mktemp("e2e")
    app = build_app({"data_dir": str(data), "api_keys_file": str(write_keys(data / "keys", KEY, OTHER_KEY)),
                     "chunking": CHUNKING, "voices_per_replica": 1, "job_timeout_s": 600,
                     "pitch_piece_frames": 512,  # a 7 s input's crepe track comes in 2 pieces
                     "chunks_in_flight": CHUNKS_IN_FLIGHT,
                     "precision": "fp32",  # exact, as `rvc-serve convert` (the default is the fastest)
                     "lossless_results": True,  # the FLACs compared below with `Converter.convert`
                     "rate_limit_per_minute": 10000, "stages": STAGES})
    other = data / "other.pth"  # a second voice, registered after the builder wrote the demo
    save_voice(random_voice_checkpoint(7, version="v1", sample_rate=32000, f0=True), other)
    add_model(data, "other", other)
    run_app(app, "e2e")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the replicas, so the local reference run is bit-identical
    client = httpx.Client(base_url=f"{serve_url}/e2e", timeout=120, headers={"x-api-key": KEY})
    yield SimpleNamespace(data=data, client=client)
    client.close()
    delete_app("e2e")
    torch.set_num_threads(threads)


def _speech_wav(tmp_path, seconds: float, seed: int):
    from pipeline.demo import synthetic_speech

    path = tmp_path / f"speech-{seed}.wav"
    sf.write(path, synthetic_speech(seconds, seed=seed), 16000, subtype="PCM_16")
    return path


def _convert(e2e, wav, model_id: str, query: dict | None = None, key: str = KEY) -> dict:
    response = e2e.client.post("/v1/inferences-vc", params={"modelId": model_id, **(query or {})},
                               files={"audioInfer": ("in.wav", wav.read_bytes(), "audio/wav")},
                               headers={"x-api-key": key})
    assert response.status_code == 200, response.text
    job_id = response.json()["inferenceId"]

    def finished():
        body = e2e.client.get(f"/v1/inferences-vc/{job_id}", headers={"x-api-key": key}).json()
        return body if body["status"] != "RUNNING" else None

    done = wait_for(finished, 600, interval_s=1)
    assert done["status"] == "SUCCESS", done.get("error")
    return done


def _local_reference(e2e, wav, model_id: str, **params) -> tuple[np.ndarray, int]:
    """What `rvc-serve convert` writes (before encoding): int16 at the voice's rate."""
    from deployments.registry import get_voice
    from pipeline.audio import load_audio, to_int16
    from pipeline.convert import ChunkingConfig, ConversionParams, Converter
    from pipeline.index import load_index
    from pipeline.synthesizer import load_voice

    info = get_voice(e2e.data / "voices", model_id)
    voice = load_voice(info.model_path)
    index = load_index(info.index_path) if info.index_path else None
    converter = Converter.from_paths(e2e.data / "hubert_base.pt", chunking=ChunkingConfig(**CHUNKING))
    out = converter.convert(load_audio(wav), voice, index, ConversionParams(**params))
    return to_int16(out), voice.sample_rate


def test_demo_voice_created_and_ready(e2e):
    models = e2e.client.get("/v1/models-vc").json()
    by_id = {m["modelId"]: m for m in models["data"]}
    assert by_id["demo"]["hasIndex"] and by_id["demo"]["version"] == "v2" and by_id["demo"]["sampleRate"] == 40000
    assert by_id["other"] == {**by_id["other"], "version": "v1", "sampleRate": 32000, "f0": True, "hasIndex": False}
    ready = e2e.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def _service_counters(e2e) -> dict[str, float]:
    from bench.load import parse_service_metrics

    return parse_service_metrics(e2e.client.get("/metrics").text)


def test_chunked_job_equals_local_conversion(e2e, tmp_path):
    wav = _speech_wav(tmp_path, 7.0, seed=5)
    query = {"indexRate": "0.5", "rmsMixRate": "0.5", "f0UpKey": "2", "protect": "0.2"}
    before = _service_counters(e2e)
    done = _convert(e2e, wav, "demo", query)
    after = _service_counters(e2e)
    calls = {key: after[key] - before.get(key, 0.0) for key in after}
    # 4 chunks through features and synthesis, one crepe piece call per 512 frames (2), each call
    # counted with the batch it ran in: at most max_batch_size calls, some compute time
    assert {stage: calls[f"batch_count:{stage}"] for stage in ("features", "pitch", "synthesis")} == {
        "features": 4, "pitch": 2, "synthesis": 4}
    for stage, count in (("features", 4), ("pitch", 2), ("synthesis", 4)):
        assert count <= calls[f"batch_sum:{stage}"] <= count * BATCHING["max_batch_size"]
        assert calls[f"batch_s_count:{stage}"] == count and calls[f"batch_s_sum:{stage}"] > 0
    expected, rate = _local_reference(e2e, wav, "demo", index_rate=0.5, rms_mix_rate=0.5, f0_up_key=2, protect=0.2)

    job_id = done["inferenceId"]
    flac, flac_rate = sf.read(e2e.data / "results" / job_id / "output.flac", dtype="int16")
    # batched chunks (padded to the longest) differ from lone ones by float rounding only
    assert flac_rate == rate and flac.shape == expected.shape
    assert np.abs(flac.astype(np.int32) - expected).max() <= 1

    mp3 = httpx.get(done["inferenceUrl"], timeout=60)
    assert mp3.status_code == 200 and mp3.headers["content-type"] == "audio/mpeg"
    path = tmp_path / "out.mp3"
    path.write_bytes(mp3.content)
    info = sf.info(path)
    assert info.samplerate == 44100  # 40 kHz is resampled for MP3
    assert abs(info.duration - expected.shape[0] / rate) < 0.06
    assert abs(info.duration - 7.0) < 0.1


@pytest.mark.parametrize("method", ["pm", "harvest"])
def test_host_f0_method_job_equals_local_conversion(e2e, tmp_path, method):
    """pm and harvest run on the host pitch replica, not the pitch replica (whose request slots a
    long harvest would hold): one call of the whole input, a batch of one, the same output as
    `rvc-serve convert` (one chunk: no batch padding)."""
    wav = _speech_wav(tmp_path, 2.0, seed=21)
    before = _service_counters(e2e)
    done = _convert(e2e, wav, "other", {"f0Method": method, "f0UpKey": "-3"})
    after = _service_counters(e2e)
    assert after["batch_count:host_pitch"] - before.get("batch_count:host_pitch", 0) == 1
    assert after["batch_sum:host_pitch"] - before.get("batch_sum:host_pitch", 0) == 1
    assert after.get("batch_count:pitch", 0) == before.get("batch_count:pitch", 0)
    expected, rate = _local_reference(e2e, wav, "other", f0_method=method, f0_up_key=-3)
    flac, flac_rate = sf.read(e2e.data / "results" / done["inferenceId"] / "output.flac", dtype="int16")
    assert flac_rate == rate and np.array_equal(flac, expected)


def test_the_conversion_stages_run_below_the_request_path(e2e):
    """Every thread of the replicas that convert runs under SCHED_IDLE (their default
    cpu_priority); the ingress's do not."""
    def policies(title: str) -> set[int]:
        found = set()
        for thread in ray_process(title).threads():
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                found.add(os.sched_getscheduler(thread.id))
        return found

    for stage in ("Conversion", "ContentFeatures", "PitchEstimator", "HostPitch", "Synthesis"):
        assert policies(f"ray::ServeReplica:e2e:{stage}") == {os.SCHED_IDLE}, stage
    assert os.SCHED_IDLE not in policies("ray::ServeReplica:e2e:Ingress")


def test_more_voices_than_slots_each_output_is_its_voice(e2e, tmp_path):
    wav = _speech_wav(tmp_path, 1.5, seed=9)
    expected = {m: _local_reference(e2e, wav, m)[0] for m in ("demo", "other")}
    before = _service_counters(e2e)
    for model_id in ("demo", "other", "demo"):  # one slot per replica: every switch reloads
        done = _convert(e2e, wav, model_id)
        flac, _ = sf.read(e2e.data / "results" / done["inferenceId"] / "output.flac", dtype="int16")
        assert np.abs(flac.astype(np.int32) - expected[model_id]).max() <= 1, model_id
    def input_cache_events():
        after = _service_counters(e2e)
        return {event: after[f"input_cache:{event}"] - before[f"input_cache:{event}"] for event in ("hit", "miss")}

    # One chunk: the input's f0 track computed once (then kept by content), its features once
    # per HuBERT version (demo is v2, other v1); the last job computed neither.
    assert input_cache_events() == {"hit": 3, "miss": 3}
    # Another API key's job of the same upload computes its own: the cache is per tenant.
    done = _convert(e2e, wav, "demo", key=OTHER_KEY)
    flac, _ = sf.read(e2e.data / "results" / done["inferenceId"] / "output.flac", dtype="int16")
    assert np.abs(flac.astype(np.int32) - expected["demo"]).max() <= 1
    assert input_cache_events() == {"hit": 3, "miss": 5}
    # the pitch stage's latency counts the two tracks computed, not the jobs spared one
    assert _service_counters(e2e)["count:pitch"] - before.get("count:pitch", 0) == 2
    metrics = e2e.client.get("/metrics").text
    misses = float(re.search(r'rvc_voice_cache_events_total\{event="miss"\} (\S+)', metrics).group(1))
    evictions = float(re.search(r'rvc_voice_cache_events_total\{event="eviction"\} (\S+)', metrics).group(1))
    assert misses >= 3 and evictions >= 2
    # Every miss loaded its voice, and the load's time is on the stage histogram.
    loads = float(re.search(r'rvc_stage_latency_seconds_count\{stage="voice_load"\} (\S+)', metrics).group(1))
    assert loads == misses


def test_synthesis_replica_killed_mid_chunk(e2e, tmp_path):
    """The job is run again on the replacement replica, and what it serves is the whole,
    exact conversion, nothing of the interrupted attempt."""
    import sqlite3

    import ray

    wav = _speech_wav(tmp_path, 2.0, seed=11)
    response = e2e.client.post("/v1/inferences-vc", params={"modelId": "other", "f0Method": "crepe-tiny"},
                               files={"audioInfer": ("in.wav", wav.read_bytes(), "audio/wav")})
    assert response.status_code == 200, response.text
    job_id = response.json()["inferenceId"]
    (replica,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::e2e#Synthesis")]
    synthesis = ray.get_actor(replica["name"], namespace=replica["namespace"])
    # Answered beside the replica's requests (its own concurrency group): > 0 while a chunk runs.
    def ongoing() -> int:
        return ray.get(synthesis.get_num_ongoing_requests.remote())

    wait_for(lambda: ongoing() > 0, 600, interval_s=0.05)
    # A replica that dies before its acceptance of a call reaches the caller's router has the call
    # routed again, unseen by the job: kill once the call has been in the replica a while (the
    # chunk's voice load and synthesis take 1-2 s here).
    time.sleep(0.3)
    assert ongoing() > 0, "the chunk ended before the replica could be killed"
    ray.kill(synthesis, no_restart=True)

    def finished():
        body = e2e.client.get(f"/v1/inferences-vc/{job_id}").json()
        return body if body["status"] != "RUNNING" else None

    done = wait_for(finished, 600, interval_s=1)
    assert done["status"] == "SUCCESS", done.get("error")
    attempts = sqlite3.connect(e2e.data / "jobs.sqlite3").execute(
        "SELECT attempts FROM jobs WHERE inference_id = ?", (job_id,)).fetchone()[0]
    assert attempts == 2
    expected, rate = _local_reference(e2e, wav, "other", f0_method="crepe-tiny")
    flac, flac_rate = sf.read(e2e.data / "results" / job_id / "output.flac", dtype="int16")
    assert flac_rate == rate and np.array_equal(flac, expected)
    mp3 = httpx.get(done["inferenceUrl"], timeout=60)
    assert mp3.status_code == 200
    (tmp_path / "out.mp3").write_bytes(mp3.content)
    assert abs(sf.info(tmp_path / "out.mp3").duration - expected.shape[0] / rate) < 0.06
    assert not [p for p in (e2e.data / "results" / job_id).iterdir() if p.name.startswith(".")]
    assert not list((e2e.data / "uploads").iterdir())
