"""A stand-in for the `Conversion` deployment, for service tests that need no models.

Its behaviour is picked by the voice's model id, so one app serves every scenario:
`*-fail` raises, `*-slow` takes 3 s, `*-hang` outlives the job timeout; anything else writes
a short tone as the job's MP3 and FLAC at once. Every call is appended to `<data>/calls.log`
(replicas are other processes) so tests can count attempts, and with the replica that took it to
`<data>/replicas.log`; a call cancelled while it waits is appended to `<data>/cancelled.log`.
"""
from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from deployments.results import LocalResultStore
from deployments.settings import AppSettings
from pipeline.audio import write_audio

TONE_SECONDS = 0.5


# Room for the calls a killed job actor left running (a `-hang` one holds its slot) beside the
# new actor's: the fault tests expect the next attempts to run, not to queue into a timeout.
@serve.deployment(max_ongoing_requests=32)
class FakeConversion:
    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.results = LocalResultStore(settings.results_dir)

    async def ready(self) -> bool:
        return True

    async def convert(self, request: dict) -> dict:
        model_id, inference_id = request["model_id"], request["inference_id"]
        with open(self.settings.data_dir / "calls.log", "a") as log:
            log.write(f"{inference_id} {model_id}\n")
        with open(self.settings.data_dir / "replicas.log", "a") as log:
            log.write(f"{inference_id} {serve.get_replica_context().replica_id.unique_id}\n")
        if model_id.endswith("-fail"):
            raise ValueError("synthetic failure: the input could not be converted\nsecond line")
        try:
            if model_id.endswith("-slow"):
                await asyncio.sleep(3)
            if model_id.endswith("-hang"):
                await asyncio.sleep(600)
        except asyncio.CancelledError:
            with open(self.settings.data_dir / "cancelled.log", "a") as log:
                log.write(f"{inference_id}\n")
            raise
        rate = 44100
        tone = (0.2 * np.sin(2 * np.pi * 330 * np.arange(int(TONE_SECONDS * rate)) / rate)).astype(np.float32)
        keys = {}
        for fmt in request["formats"]:
            key = f"{inference_id}/output.{fmt}"
            with self.results.writer(key) as path:
                write_audio(path, tone, rate, fmt)
            keys[fmt] = key
        return {"results": keys,
                "stats": {"latency": {"load": [0.01], "synthesis": [0.02]},
                          "voice_cache": {"hit": 1, "miss": 0, "eviction": 0}}}
