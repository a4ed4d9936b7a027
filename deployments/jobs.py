"""The job actor: owns every job's state through the JobStore and runs jobs to an end.

`JobTracker` runs as an async, named, detached Ray actor (restarted by Ray when it dies). On
start it reloads the store and runs every job still RUNNING again, so an accepted job is never
lost. Each job goes through the `Conversion` deployment with a per-attempt timeout; it ends
SUCCESS with its result keys or FAILED with a one-line error. A job whose attempt died with a
process (job actor, replica) or met a full queue is tried again, up to `job_attempts` times.
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import math
import time
from collections import deque
from pathlib import Path

import ray
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from pipeline.audio import duration_s

from .logs import get_logger
from .results import LocalResultStore, result_formats
from .retention import prune_once
from .routing import UPLOAD_KEY_FIELD, upload_key
from .settings import AppSettings
from .store import FAILED, RUNNING, SUCCESS, Job, open_job_store

NAMESPACE = "rvc"
# Failures of the machinery, not of the job: the same job may well succeed on another try.
RETRYABLE = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError, BackPressureError,
             DeploymentUnavailableError, ReplicaUnavailableError)
RETRY_DELAY_S = 1.0
CANCELLED = "cancelled"


def tracker_name(app_name: str) -> str:
    return f"rvc-jobs-{app_name}"


def limiter_name(app_name: str) -> str:
    return f"rvc-ratelimit-{app_name}"


def get_or_create(cls: type, name: str, *args) -> ray.actor.ActorHandle:
    """The named detached actor, created with `args` if it does not exist yet. Ray restarts it
    when it dies and retries calls that were in flight."""
    return ray.remote(cls).options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                                   max_restarts=-1, max_task_retries=-1, num_cpus=0).remote(*args)


async def job_tracker(app_name: str, settings: AppSettings, conversion) -> ray.actor.ActorHandle:
    """The application's job actor, replaced by a fresh one if it runs with other settings (a
    redeploy changed them). Its RUNNING jobs are not lost: the new actor runs them again."""
    for _ in range(5):
        handle = get_or_create(JobTracker, tracker_name(app_name), settings, conversion)
        try:
            if await handle.configured_with.remote() == settings:
                return handle
            ray.kill(handle, no_restart=True)
        except RayActorError:
            pass  # another replica replaced it just now
        await asyncio.sleep(0.2)
    raise RuntimeError("could not start the job actor")


def kill_actors(app_name: str) -> None:
    """Remove an application's job and rate-limit actors (they outlive `serve.delete`)."""
    for name in (tracker_name(app_name), limiter_name(app_name)):
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass


def one_line_error(exc: BaseException, data_dir: Path | None = None) -> str:
    """The reason a job failed, for the client: the root cause's first line, no server paths."""
    cause = getattr(exc, "cause", None) or exc
    lines = str(cause).strip().splitlines()
    text = lines[0] if lines else type(cause).__name__
    if data_dir is not None:
        text = text.replace(f"{data_dir}/", "")
    return text[:300]


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, RETRYABLE) or isinstance(getattr(exc, "cause", None), RETRYABLE)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.finished = Counter("rvc_jobs_finished_total", "Jobs ended, by final status.", ["status"], registry=r)
        self.duration = Histogram("rvc_job_duration_seconds", "Job time from acceptance to its end.", ["status"],
                                  buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800), registry=r)
        self.waiting = Gauge("rvc_jobs_queued", "Jobs accepted and waiting for a conversion slot.", registry=r)
        self.running = Gauge("rvc_jobs_in_progress", "Jobs being converted now.", registry=r)
        self.running_audio = Gauge("rvc_audio_seconds_in_progress",
                                   "Seconds of input audio in the jobs being converted now "
                                   "(at most max_concurrent_audio_s, or one longer job alone).", registry=r)
        self.retries = Counter("rvc_job_retries_total", "Job attempts run again after a machinery failure.",
                               registry=r)
        self.stage = Histogram("rvc_stage_latency_seconds", "Latency of one stage call, as the conversion saw it.",
                               ["stage"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
                               registry=r)
        # Observed once per call, so each is the distribution over calls (what share ran in batches
        # of 8 or more); the two together tell max_batch_size and batch_wait_timeout_s apart.
        self.batch_size = Histogram("rvc_stage_batch_size", "Calls in the batch each model-stage call ran in.",
                                    ["stage"], buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_seconds = Histogram("rvc_stage_batch_seconds",
                                       "Compute seconds of the batch each model-stage call ran in.", ["stage"],
                                       buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=r)
        self.voice_cache = Counter("rvc_voice_cache_events_total", "Voice cache lookups on synthesis replicas.",
                                   ["event"], registry=r)
        for event in ("hit", "miss", "eviction"):
            self.voice_cache.labels(event)
        self.input_cache = Counter("rvc_input_cache_events_total",
                                   "Lookups of inputs' features and f0 tracks on conversion replicas "
                                   "(hit: a model-stage computation spared).", ["event"], registry=r)
        for event in ("hit", "miss"):
            self.input_cache.labels(event)
        # Every ingress replica's requests, sent here in batches (Ingress.flush_http_metrics), so a
        # scrape that any one replica answers counts them all.
        self.http_requests = Counter("rvc_http_requests_total", "HTTP requests by route, method and status code.",
                                     ["route", "method", "code"], registry=r)
        self.http_latency = Histogram("rvc_http_request_duration_seconds", "HTTP request latency by route.",
                                      ["route"], registry=r)
        # rate() of it is the service's real-time factor: audio seconds converted per second
        self.audio_seconds = Counter("rvc_audio_seconds_converted_total",
                                     "Seconds of input audio in the jobs that succeeded.", registry=r)
        for status in (SUCCESS, FAILED):
            self.finished.labels(status)


class FairSlots:
    """`capacity` conversion slots and `audio_capacity_s` seconds of input audio converting at
    once, shared between tenants: a freed slot goes to the waiting job of the tenant holding the
    fewest slots (the longest waiting among equals), so one tenant's backlog of thousands of jobs
    does not hold every other tenant's jobs behind it, and a lone tenant still gets every slot.
    The job next in turn waits for the audio it needs rather than letting later, shorter ones
    past (which could starve it); one longer than `audio_capacity_s` runs when nothing else does."""

    def __init__(self, capacity: int, audio_capacity_s: float = math.inf) -> None:
        self.free = capacity
        self.audio_capacity_s = audio_capacity_s
        self.audio_running_s = 0.0  # input seconds of the jobs holding slots
        self.running: dict[str, int] = {}  # slots held, by tenant
        self.waiting: dict[str, deque[tuple[int, float, asyncio.Future]]] = {}
        self._arrivals = itertools.count()

    async def acquire(self, tenant: str, audio_s: float = 0.0) -> None:
        if not self.waiting and self._fits(audio_s):
            self._take(tenant, audio_s)
            return
        granted = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(tenant, deque()).append((next(self._arrivals), audio_s, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(tenant, audio_s)  # granted just as it was cancelled: pass the slot on
            else:
                self._grant()  # it may have been the job the others waited behind
            raise

    def release(self, tenant: str, audio_s: float = 0.0) -> None:
        self.running[tenant] -= 1
        if not self.running[tenant]:
            del self.running[tenant]  # a tenant's entry lives while it holds a slot
        self.free += 1
        # (back to exactly 0 when idle: sums of floats need not return to it)
        self.audio_running_s = self.audio_running_s - audio_s if self.running else 0.0
        self._grant()

    def _fits(self, audio_s: float) -> bool:
        return self.free > 0 and (not self.running or self.audio_running_s + audio_s <= self.audio_capacity_s)

    def _grant(self) -> None:
        while self.free > 0 and self.waiting:
            tenant = min(self.waiting, key=lambda t: (self.running.get(t, 0), self.waiting[t][0][0]))
            queue = self.waiting[tenant]
            _, audio_s, granted = queue[0]
            if not granted.cancelled() and not self._fits(audio_s):
                return
            queue.popleft()
            if not queue:
                del self.waiting[tenant]
            if not granted.cancelled():
                self._take(tenant, audio_s)
                granted.set_result(None)

    def _take(self, tenant: str, audio_s: float) -> None:
        self.free -= 1
        self.audio_running_s += audio_s
        self.running[tenant] = self.running.get(tenant, 0) + 1


class JobTracker:
    """Run with `get_or_create(JobTracker, tracker_name(app), settings, conversion_handle)`."""

    def __init__(self, settings: AppSettings, conversion) -> None:
        self.settings = settings
        self.conversion = conversion
        self.store = open_job_store(settings)
        self.results = LocalResultStore(settings.results_dir)
        self.log = get_logger()
        self.metrics = _Metrics()
        self.slots = FairSlots(settings.max_concurrent_jobs, settings.max_concurrent_audio_s)
        self.metrics.running_audio.set_function(lambda: self.slots.audio_running_s)
        self.tasks: dict[str, asyncio.Task] = {}
        resumed = self.store.running()
        for job in resumed:
            self._schedule(job.inference_id, job.tenant)
        self.retention = asyncio.get_running_loop().create_task(self._prune_periodically())
        self.log.info("job tracker started", extra={"resumed_jobs": len(resumed)})

    async def configured_with(self) -> AppSettings:
        return self.settings

    async def ping(self) -> bool:
        return True

    async def submit(self, job: Job) -> Job:
        """Store the job durably and start it; returns the stored job (an earlier one with the
        same id if this call is a retry)."""
        stored = await asyncio.to_thread(self.store.create, job)
        if stored.status == RUNNING:
            self._schedule(stored.inference_id, stored.tenant)
        return stored

    async def get(self, inference_id: str, tenant: str) -> Job | None:
        """The job if it exists and belongs to `tenant`."""
        job = await asyncio.to_thread(self.store.get, inference_id)
        if job is None or not hmac.compare_digest(job.tenant, tenant):
            return None
        return job

    async def wait(self, inference_id: str, tenant: str, timeout_s: float | None = None) -> Job | None:
        """`get` once the job has ended, or after `timeout_s` if it runs longer: its run is
        awaited, not polled. (After a restart of this actor Ray sends the call again, and the new
        actor has resumed the job.)"""
        if await self.get(inference_id, tenant) is None:
            return None  # another tenant's job: not even its end may be observed
        task = self.tasks.get(inference_id)
        if task is not None:
            # Neither cancels the job when a caller gives up nor raises its outcome.
            await asyncio.wait({task}, timeout=timeout_s)
        return await self.get(inference_id, tenant)

    async def cancel(self, inference_id: str, tenant: str) -> Job | None:
        """Cancel the job if it is RUNNING (it ends FAILED, "cancelled"); the job as it stands
        now, or None if `tenant` has no such job. A finished job is returned unchanged."""
        if await self.get(inference_id, tenant) is None:
            return None
        if await self._finish(inference_id, FAILED, error=CANCELLED):
            task = self.tasks.get(inference_id)
            if task is not None:
                task.cancel()  # its attempt cancels the conversion call (see _attempt)
        return await asyncio.to_thread(self.store.get, inference_id)

    async def metrics_text(self) -> bytes:
        return generate_latest(self.metrics.registry)

    async def record_http(self, requests: list[tuple[str, str, str, float]]) -> None:
        """Count an ingress replica's requests: (route, method, status code, seconds) each."""
        for route, method, code, seconds in requests:
            self.metrics.http_requests.labels(route, method, code).inc()
            self.metrics.http_latency.labels(route).observe(seconds)

    def _schedule(self, inference_id: str, tenant: str) -> None:
        if inference_id in self.tasks:
            return
        task = asyncio.get_running_loop().create_task(self._run(inference_id, tenant))
        self.tasks[inference_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(inference_id, None))

    async def _run(self, inference_id: str, tenant: str) -> None:
        job = await asyncio.to_thread(self.store.get, inference_id)
        # what the header declares (0 if unreadable: the attempt then fails with the reason)
        audio_s = 0.0 if job is None else await asyncio.to_thread(duration_s, job.upload_path)
        with self.metrics.waiting.track_inprogress():
            await self.slots.acquire(tenant, audio_s)
        try:
            with self.metrics.running.track_inprogress():
                while await self._attempt(inference_id, audio_s):
                    self.metrics.retries.inc()
                    await asyncio.sleep(RETRY_DELAY_S)
        except Exception:  # noqa: BLE001 - a bug here must not leave the job RUNNING forever
            self.log.exception("job runner failed", extra={"inference_id": inference_id})
            await self._finish(inference_id, FAILED, error="internal error")
        finally:
            self.slots.release(tenant, audio_s)

    async def _attempt(self, inference_id: str, audio_s: float) -> bool:
        """Run one attempt of a job of `audio_s` seconds of input; True when it should be tried again."""
        extra = {"inference_id": inference_id}
        job = await asyncio.to_thread(self.store.get, inference_id)
        if job is None or job.status != RUNNING:
            return False
        attempt = await asyncio.to_thread(self.store.start_attempt, inference_id)
        if attempt > self.settings.job_attempts:
            await self._finish(inference_id, FAILED,
                               error=f"interrupted {attempt - 1} times (service restarts or crashes)")
            return False
        self.log.info("job attempt started", extra={**extra, "attempt": attempt, "model_id": job.model_id})
        request = {"inference_id": job.inference_id, "tenant": job.tenant, "model_id": job.model_id,
                   "upload_path": job.upload_path, "params": job.params,
                   "formats": result_formats(job.tenant, self.settings.lossless_results),
                   UPLOAD_KEY_FIELD: upload_key(job.tenant, job.upload_sha256)}
        timeout_s = self.settings.job_timeout_s + self.settings.job_timeout_per_audio_s * audio_s
        response = self.conversion.convert.remote(request)
        try:
            result = await asyncio.wait_for(_resolve(response), timeout_s)
        except asyncio.CancelledError:  # the job was cancelled: stop its conversion too
            response.cancel()
            raise
        except asyncio.TimeoutError:
            response.cancel()
            await self._finish(inference_id, FAILED, error=f"timed out after {timeout_s:g} s")
            return False
        except Exception as exc:  # noqa: BLE001 - every failure becomes the job's one-line error
            if _retryable(exc) and attempt < self.settings.job_attempts:
                self.log.warning("job attempt interrupted, will retry",
                                 extra={**extra, "attempt": attempt, "error": one_line_error(exc)})
                return True
            self.log.warning("job failed", extra={**extra, "error": one_line_error(exc)})
            await self._finish(inference_id, FAILED, error=one_line_error(exc, self.settings.data_dir))
            return False
        self._record_stats(result.get("stats", {}))
        if await self._finish(inference_id, SUCCESS, results=result["results"]):
            self.metrics.audio_seconds.inc(audio_s)
        return False

    async def _finish(self, inference_id: str, status: str, *, error: str | None = None,
                      results: dict[str, str] | None = None) -> bool:
        """End a RUNNING job; False if it had ended already (then `results` are nobody's and go)."""
        if not await asyncio.to_thread(self.store.finish, inference_id, status, error=error, results=results):
            if results:
                await asyncio.to_thread(self.results.remove, inference_id)
            return False
        if status == FAILED:
            # Whatever an attempt wrote before it failed (an MP3 when the disk filled up during
            # the FLAC, a cancelled one's output): the job will never point at it.
            await asyncio.to_thread(self.results.remove, inference_id)
        job = await asyncio.to_thread(self.store.get, inference_id)
        self.metrics.finished.labels(status).inc()
        self.metrics.duration.labels(status).observe((job.ended_us - job.created_us) / 1e6)
        Path(job.upload_path).unlink(missing_ok=True)
        self.log.info("job finished", extra={"inference_id": inference_id, "status": status, "error": error,
                                             "seconds": round((job.ended_us - job.created_us) / 1e6, 3)})
        return True

    async def _prune_periodically(self) -> None:
        while True:
            try:
                pruned = await asyncio.to_thread(prune_once, self.store, self.results, self.settings.uploads_dir,
                                                 self.settings.retention_s, time.time())
                if pruned.jobs or pruned.uploads:
                    self.log.info("retention pruned", extra={"jobs": pruned.jobs, "uploads": pruned.uploads})
            except Exception as exc:  # noqa: BLE001 - try again next round; never stop pruning
                self.log.warning("retention pruning failed", extra={"error": one_line_error(exc)})
            await asyncio.sleep(self.settings.retention_interval_s)

    def _record_stats(self, stats: dict) -> None:
        for stage, latencies in stats.get("latency", {}).items():
            for seconds in latencies:
                self.metrics.stage.labels(stage).observe(seconds)
        for cache, counter in (("voice_cache", self.metrics.voice_cache), ("input_cache", self.metrics.input_cache)):
            for event, count in stats.get(cache, {}).items():
                if count:
                    counter.labels(event).inc(count)
        for stage, runs in stats.get("batches", {}).items():
            for size, seconds in runs:
                self.metrics.batch_size.labels(stage).observe(size)
                self.metrics.batch_seconds.labels(stage).observe(seconds)


async def _resolve(response):
    return await response
