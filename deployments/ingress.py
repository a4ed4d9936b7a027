"""The HTTP ingress: the job API of the contract, on Ray Serve. It owns HTTP only.

Create runs the contract's checks in its order — key (403), rate limit (429), size (413),
parameters (422), file type by content (402), model (404) — with two of its own: a data disk
too full for the upload (503, before the body is read) and more audio than max_audio_seconds
(422, once the type is known); then it stores the upload durably, hands the job to the job
actor and answers RUNNING. It never runs a model. A create with an `Idempotency-Key` the tenant
used before answers the job made then (the new upload is dropped); DELETE on a job cancels it
if it is still RUNNING; a poll with `Prefer: wait=N` is held until the job ends (N s at most).
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import secrets
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from pipeline.audio import AudioDecodeError, AudioTooLong, sniff_and_probe

from .backpressure import bound_direct_ingress_receive, bound_replica_receive
from .jobs import RETRYABLE, get_or_create, job_tracker, limiter_name, one_line_error
from .logs import get_logger
from .openapi import openapi_document
from .params import (CREATE_PARAMS, IDEMPOTENCY_HEADER, PAGE_PARAMS, PREFER_HEADER, audio_too_long,
                     check_idempotency_key, missing, parse_query, requested_wait_s)
from .ratelimit import RateLimiter
from .registry import get_voice, list_voices, models_page
from .results import RESULT_FORMATS, RESULT_ROUTE, URL_LIFETIME_S, LocalResultStore, check_key, signed_url, verify
from .settings import AppSettings, load_api_keys, url_secret
from .store import FAILED, HANDLE_TENANT, SUCCESS, Job, format_timestamp
from .uploads import MAX_FILE_BYTES, PayloadTooLarge, Upload, declared_too_large, disk_short, receive_upload

FORBIDDEN = {"message": "Forbidden"}
NOT_FOUND = {"message": "Not found"}
INVALID_FILE = {"message": "Invalid file type, use: ['audio/x-wav', 'audio/mpeg', 'audio/flac']"}
PAYLOAD_TOO_LARGE = {"message": "Payload Too Large"}
UNAVAILABLE = {"message": "Service Unavailable"}
# When a create refused for want of disk space may be sent again: retention frees space
# as jobs age out and running jobs end.
DISK_FULL_RETRY_AFTER_S = 60
HTTP_FLUSH_S = 2.0  # how often a replica sends its requests' metrics to the job actor
MEDIA_TYPES = {".mp3": "audio/mpeg", ".flac": "audio/flac", ".wav": "audio/x-wav"}


@serve.deployment
@serve.ingress()
class Ingress:
    async def __init__(self, settings: AppSettings, conversion) -> None:
        bound_replica_receive()
        bound_direct_ingress_receive()
        self.settings = settings
        self.conversion = conversion
        self.keys = load_api_keys(settings)
        self.secret = url_secret(settings)
        # Fixed at start, as in the pitch replicas: rmvpe is offered if rmvpe.pt was there then.
        self.f0_methods = settings.f0_methods
        self.results = LocalResultStore(settings.results_dir)
        settings.uploads_dir.mkdir(parents=True, exist_ok=True)
        settings.uploads_dir.chmod(0o700)  # uploads are the users' audio: the service user's only
        app_name = serve.get_replica_context().app_name
        self.limiter = get_or_create(RateLimiter, limiter_name(app_name))
        self.tracker = await job_tracker(app_name, settings, conversion)
        # Held polls (`Prefer: wait`) take at most half this replica's request slots, so creates
        # always find room; a poll past that is answered at once, as a plain poll.
        self.held_polls = asyncio.Semaphore(max(1, settings.stages.ingress.max_ongoing_requests // 2))
        self.log = get_logger()
        # (route, method, code, seconds) of the requests answered since the last flush to the job
        # actor, which keeps the HTTP metrics of every replica: a scrape reaches one replica, and
        # that replica's own counters would be its share only.
        self.http_requests: list[tuple[str, str, str, float]] = []
        self._http_flusher = asyncio.get_running_loop().create_task(self._flush_http_metrics_every(HTTP_FLUSH_S))

    def __serve_build_asgi_app__(self) -> Starlette:
        routes = [
            ("/v1/inferences-vc", self.create_job, ["POST"]),
            ("/v1/inferences-vc/{inferenceId}", self.get_job, ["GET"]),
            ("/v1/inferences-vc/{inferenceId}", self.cancel_job, ["DELETE"]),
            ("/v1/models-vc", self.list_models, ["GET"]),
            (RESULT_ROUTE + "/{inferenceId}/{name}", self.get_result, ["GET", "HEAD"]),
            ("/healthz", self.healthz, ["GET"]),
            ("/readyz", self.readyz, ["GET"]),
            ("/metrics", self.metrics, ["GET"]),
            ("/openapi.json", self.openapi, ["GET"]),
            # Unknown /v1 paths answer after the key check, so they reveal nothing either.
            ("/v1/{rest:path}", self.v1_not_found, ["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ]
        return Starlette(routes=[Route(path, self._measured(path, handler), methods=methods)
                                 for path, handler, methods in routes],
                         exception_handlers={Exception: _internal_error})

    def _measured(self, route: str, handler):
        async def endpoint(request: Request) -> Response:
            start = time.perf_counter()
            code = "500"
            label = route
            try:
                response = await handler(request)
                code = str(response.status_code)
                if "preference-applied" in response.headers:  # a held poll: its time is the job's
                    label = f"{route} (held)"
                return response
            finally:
                self.http_requests.append((label, request.method, code, time.perf_counter() - start))
        return endpoint

    async def flush_http_metrics(self) -> None:
        """Send the requests answered since the last flush to the job actor. Best effort: a batch
        the actor does not take is dropped (a retry could count it twice)."""
        batch, self.http_requests = self.http_requests, []
        if not batch:
            return
        try:
            await asyncio.wait_for(_resolve(self.tracker.record_http.remote(batch)), 5)
        except Exception as exc:  # noqa: BLE001 - metrics never fail a request
            self.log.warning("HTTP metrics not recorded", extra={"requests": len(batch), "error": one_line_error(exc)})

    async def _flush_http_metrics_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self.flush_http_metrics()

    async def _gate(self, request: Request) -> tuple[str, dict[str, str]] | Response:
        """Key check then rate limit: (tenant, rate-limit headers) or the refusal to send."""
        tenant = self.keys.tenant(request.headers.get("x-api-key"))
        if tenant is None:
            return JSONResponse(FORBIDDEN, 403)
        decision = await self.limiter.hit.remote(tenant, self.settings.rate_limit_per_minute)
        if not decision.allowed:
            return JSONResponse({"error": "Rate limit exceeded."}, 429, headers=decision.headers())
        return tenant, decision.headers()

    async def create_job(self, request: Request) -> Response:
        gate = await self._gate(request)
        if isinstance(gate, Response):
            return gate
        tenant, headers = gate
        if declared_too_large(request.headers.get("content-length")):
            return JSONResponse(PAYLOAD_TOO_LARGE, 413, headers=headers)
        if await asyncio.to_thread(disk_short, self.settings.uploads_dir, request.headers.get("content-length"),
                                   self.settings.min_free_disk_mb << 20):
            self.log.warning("create refused: data disk nearly full", extra={"path": str(self.settings.uploads_dir)})
            return _disk_full(headers)  # before the body is read: nothing of it is written
        try:
            upload = await receive_upload(request.headers.get("content-type"), request.stream(),
                                          self.settings.uploads_dir)
        except PayloadTooLarge:
            return JSONResponse(PAYLOAD_TOO_LARGE, 413, headers=headers)
        except ClientDisconnect:
            return Response(status_code=400)
        except OSError as exc:  # the disk filled up under this upload (its partial file is gone)
            if exc.errno != errno.ENOSPC:
                raise
            return _disk_full(headers)
        try:
            return await self._accept(request, tenant, headers, upload)
        finally:
            if upload.path is not None:
                upload.path.unlink(missing_ok=True)

    async def _accept(self, request: Request, tenant: str, headers: dict[str, str], upload: Upload) -> Response:
        admitted = await self._admit(tenant, request.query_params, upload, request.headers.get(IDEMPOTENCY_HEADER))
        if isinstance(admitted, Job):
            return JSONResponse(self._job_view(admitted, request), 200, headers=headers)
        status, body = admitted
        return JSONResponse(body, status, headers=headers)

    async def _admit(self, tenant: str, query: Mapping[str, str], upload: Upload,
                     idempotency_key: str | None = None) -> Job | tuple[int, dict]:
        """The create checks after key, rate limit and size (422, 402, 404), then the job stored
        and handed to the job actor: the job (an earlier one of the same idempotency key), or
        the refusal's (status, body)."""
        values, errors = parse_query(CREATE_PARAMS, query, self.f0_methods)
        if (error := check_idempotency_key(idempotency_key)) is not None:
            errors.append(error)
        if upload.path is None:
            errors.append(missing(["body", "audioInfer"]))
        if errors:
            return 422, {"detail": errors}
        f0_method = values["f0_method"]
        try:
            fmt = await asyncio.to_thread(sniff_and_probe, upload.path, self.settings.audio_limit(f0_method))
        except AudioTooLong as exc:
            by_method = exc.max_seconds < self.settings.max_audio_seconds
            return 422, {"detail": [audio_too_long(exc.max_seconds, f0_method if by_method else None)]}
        except AudioDecodeError:
            return 402, INVALID_FILE
        model_id = values.pop("model_id")
        voice = get_voice(self.settings.voices_dir, model_id)
        # Another tenant's voice is answered exactly like a missing one: no existence oracle.
        if voice is None or not (tenant == HANDLE_TENANT or voice.visible_to(tenant)):
            return 404, {"message": "Model not found"}

        inference_id = uuid.uuid4().hex
        stored_upload = self.settings.uploads_dir / f"{inference_id}.{fmt}"
        os.rename(upload.path, stored_upload)
        await asyncio.to_thread(_fsync_dir, self.settings.uploads_dir)
        job = Job(inference_id=inference_id, tenant=tenant, model_id=model_id,
                  params={**values, "seed": self.settings.seed}, upload_path=str(stored_upload),
                  idempotency_key=idempotency_key, upload_sha256=upload.sha256)
        size = stored_upload.stat().st_size
        try:
            job = await self.tracker.submit.remote(job)
        except Exception as exc:  # noqa: BLE001 - no job id was given out: drop the upload
            stored_upload.unlink(missing_ok=True)
            if isinstance(exc, RETRYABLE):
                return 503, UNAVAILABLE
            raise
        if job.inference_id != inference_id:  # a retry: the key's job exists, with its own upload
            stored_upload.unlink(missing_ok=True)
            self.log.info("idempotent create answered", extra={"inference_id": job.inference_id})
        else:
            self.log.info("job accepted", extra={"inference_id": inference_id, "model_id": model_id,
                                                 "tenant": tenant[:12], "format": fmt, "bytes": size})
        return job

    async def convert_audio(self, audio: bytes, query: dict[str, str], result_format: str = "mp3") -> bytes:
        """The create call for callers inside the cluster, through the application's Serve handle
        (`rvc-serve batch --ray-address`): the same checks and the same durable job as a POST,
        then the job's result (`mp3` or `flac`) once it has ended. No key, no rate limit, and
        every voice, public or owned: whoever can call a handle has the cluster (and the
        registry's files) already. Its jobs belong to HANDLE_TENANT, which no key sees. A refusal
        raises ValueError("<status> <body>"), a failed job RuntimeError(<its error>). Call it
        through `ray_env.by_reference(handle)`: under Ray's gRPC transport between deployments
        a file over 4 MiB would not arrive."""
        if result_format not in RESULT_FORMATS:
            raise ValueError(f"result_format must be one of {RESULT_FORMATS}")
        if len(audio) > MAX_FILE_BYTES:
            raise ValueError(f"413 {json.dumps(PAYLOAD_TOO_LARGE)}")
        upload = self.settings.uploads_dir / f".upload-{secrets.token_hex(8)}"
        try:
            await asyncio.to_thread(_write_durably, upload, audio)
            sha256 = await asyncio.to_thread(lambda: hashlib.sha256(audio).hexdigest())
            admitted = await self._admit(HANDLE_TENANT, query, Upload(upload, len(audio), sha256))
        finally:
            upload.unlink(missing_ok=True)
        if not isinstance(admitted, Job):
            status, body = admitted
            raise ValueError(f"{status} {json.dumps(body)}")
        job = await self.tracker.wait.remote(admitted.inference_id, HANDLE_TENANT)
        if job.status != SUCCESS:
            raise RuntimeError(job.error or f"job {job.inference_id} ended {job.status}")
        return await asyncio.to_thread(self.results.local_path(job.results[result_format]).read_bytes)

    async def get_job(self, request: Request) -> Response:
        """The job; with `Prefer: wait=N` held until it ends, N s at most (MAX_POLL_WAIT_S), and
        answered with `Preference-Applied: wait=N`."""
        wait_s = requested_wait_s(request.headers.get(PREFER_HEADER))
        if wait_s is None or self.held_polls.locked():
            return await self._job_answer(request, self.tracker.get.remote)
        async with self.held_polls:
            response = await self._job_answer(
                request, lambda inference_id, tenant: self.tracker.wait.remote(inference_id, tenant, wait_s))
        if response.status_code == 200:
            response.headers["Preference-Applied"] = f"wait={wait_s}"
        return response

    async def cancel_job(self, request: Request) -> Response:
        """Cancel a RUNNING job; answers the job as it stands after (a finished one unchanged)."""
        return await self._job_answer(request, self.tracker.cancel.remote)

    async def _job_answer(self, request: Request, tracker_call) -> Response:
        """The key's job named in the path, after `tracker_call(id, tenant)`; 404 if it has none."""
        gate = await self._gate(request)
        if isinstance(gate, Response):
            return gate
        tenant, headers = gate
        job = await tracker_call(request.path_params["inferenceId"], tenant)
        if job is None:
            return JSONResponse(NOT_FOUND, 404, headers=headers)
        return JSONResponse(self._job_view(job, request), 200, headers=headers)

    async def list_models(self, request: Request) -> Response:
        gate = await self._gate(request)
        if isinstance(gate, Response):
            return gate
        tenant, headers = gate
        values, errors = parse_query(PAGE_PARAMS, request.query_params)
        if errors:
            return JSONResponse({"detail": errors}, 422, headers=headers)
        voices = await asyncio.to_thread(list_voices, self.settings.voices_dir)
        voices = [v for v in voices if v.visible_to(tenant)]
        body = models_page(voices, values["page"], values["per_page"], self._base_url(request))
        return JSONResponse(body, 200, headers=headers)

    async def v1_not_found(self, request: Request) -> Response:
        gate = await self._gate(request)
        if isinstance(gate, Response):
            return gate
        return JSONResponse(NOT_FOUND, 404, headers=gate[1])

    async def get_result(self, request: Request) -> Response:
        """A signed result URL: no API key, 403 when forged, altered or expired."""
        inference_id, name = request.path_params["inferenceId"], request.path_params["name"]
        try:
            key = check_key(f"{inference_id}/{name}")
        except ValueError:
            return JSONResponse(FORBIDDEN, 403)
        if not verify(self.secret, key, request.query_params.get("expires"),
                      request.query_params.get("signature"), time.time()):
            return JSONResponse(FORBIDDEN, 403)
        path = self.results.local_path(key)
        response = None if path is None else await asyncio.to_thread(result_response, path, inference_id)
        return response or JSONResponse(NOT_FOUND, 404)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Ready when the job actor answers, every stage has a live replica with its models
        loaded, and at least one voice is registered."""
        try:
            await asyncio.wait_for(asyncio.gather(self.tracker.ping.remote(), self.conversion.ready.remote()), 10)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            return JSONResponse({"status": "not ready", "reason": one_line_error(exc) or "timeout"}, 503)
        voices = await asyncio.to_thread(list_voices, self.settings.voices_dir)
        if not voices:
            return JSONResponse({"status": "not ready", "reason": "no voice model registered"}, 503)
        return JSONResponse({"status": "ready", "voices": len(voices)})

    async def metrics(self, request: Request) -> Response:
        """The job actor's metrics: HTTP requests of every ingress replica (this one's flushed
        first; the others' are at most HTTP_FLUSH_S old), jobs, stages, voice cache."""
        await self.flush_http_metrics()
        try:
            text = await asyncio.wait_for(_resolve(self.tracker.metrics_text.remote()), 5)
        except Exception as exc:  # noqa: BLE001 - a clear 503, not a 500
            self.log.warning("metrics unavailable", extra={"error": one_line_error(exc)})
            return JSONResponse(UNAVAILABLE, 503)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(self.f0_methods, self.settings.max_audio_seconds,
                                             self.settings.audio_limit("harvest")))

    def _base_url(self, request: Request) -> str:
        return self.settings.public_base_url or str(request.base_url).rstrip("/")

    def _job_view(self, job: Job, request: Request) -> dict:
        view = {"inferenceId": job.inference_id, "modelId": job.model_id, "status": job.status, "type": "VC",
                "inferenceUrl": None, "jobStartTime": format_timestamp(job.created_us),
                "jobEndTime": None if job.ended_us is None else format_timestamp(job.ended_us)}
        if job.status == SUCCESS:
            key = job.results["mp3"]
            view["inferenceUrl"] = (self.results.external_url(key, URL_LIFETIME_S)
                                    or signed_url(self.secret, self._base_url(request), key, time.time()))
        elif job.status == FAILED:
            view["error"] = job.error
        return view


async def _resolve(awaitable):
    return await awaitable


def _fsync_dir(path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class _OpenedFileResponse(FileResponse):
    """A FileResponse over a file opened before it was made. FileResponse opens its path only
    after sending the headers: a result deleted (retention, a failed job's cleanup) in between
    would go out as headers with a full Content-Length and no body. An open descriptor keeps
    the file readable; FileResponse reopens it through /proc (Linux), ranges and all."""

    def __init__(self, fd: int, **kwargs) -> None:
        super().__init__(f"/proc/self/fd/{fd}", stat_result=os.fstat(fd), **kwargs)
        self.fd = fd

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            os.close(self.fd)


def result_response(path: Path, inference_id: str) -> Response | None:
    """The result file at `path`, whole however long its download takes; None if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    return _OpenedFileResponse(fd, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
                               filename=f"{inference_id}{path.suffix}")


def _disk_full(headers: dict[str, str]) -> Response:
    return JSONResponse(UNAVAILABLE, 503, headers={**headers, "Retry-After": str(DISK_FULL_RETRY_AFTER_S)})


async def _internal_error(request: Request, exc: Exception) -> Response:
    get_logger().error("request failed", exc_info=exc, extra={"path": request.url.path})
    return JSONResponse({"message": "Internal Server Error"}, 500)
