"""A synchronous client of the job API (see the HTTP contract), on httpx.

Requests refused with 429 or 503, or that could not connect, are sent again after the
server's `Retry-After` (seconds) or, without one, an exponential backoff; every other error
status raises the `ApiError` subclass for it, carrying the API's body.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from time import monotonic, sleep
from typing import Any

import httpx

from .errors import BY_STATUS, ApiError, JobFailed, RequestTimeout, Unreachable, WaitTimeout
from .files import atomic_path
from .schema import SUCCESS, Job, Model

RETRY_STATUSES = (429, 503)
MAX_RETRY_AFTER_S = 300.0
# What `wait` asks the service to hold each poll for (`Prefer: wait=N`; the service caps it).
HELD_POLL_S = 10


def query_name(param: str) -> str:
    """The API's name of a conversion parameter given in Python style: index_rate → indexRate."""
    head, *rest = param.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


class Client:
    """`Client(url, api_key)`; `url` is the service's base URL (routes are below it)."""

    def __init__(self, url: str, api_key: str, *, timeout_s: float = 60.0, max_retries: int = 6,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self._api = httpx.Client(base_url=url.rstrip("/"), headers={"x-api-key": api_key}, timeout=timeout_s,
                                 transport=transport)
        # Result URLs are signed and may point at an object store: they never get the API key.
        self._downloads = httpx.Client(timeout=timeout_s, transport=transport, follow_redirects=True)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._api.close()
        self._downloads.close()

    def submit(self, path: str | Path, model_id: str, **params: Any) -> Job:
        """Upload a wav, mp3 or flac file (streamed) for conversion to `model_id`. Parameters in
        Python style (`index_rate=0.5`, `f0_up_key=2`) or as the API names them."""
        query = {"modelId": model_id, **{query_name(k): v for k, v in params.items()}}
        path = Path(path)
        with open(path, "rb") as audio:
            def body() -> dict:
                audio.seek(0)  # each attempt sends the whole file again
                return {"params": query, "files": {"audioInfer": (path.name, audio, "application/octet-stream")}}

            return Job.from_json(self._send("POST", "/v1/inferences-vc", body).json())

    def get(self, inference_id: str, hold_s: int = 0) -> Job:
        """The job; with `hold_s` ≥ 1 the service may hold the answer until the job ends, up to
        `hold_s` seconds (`Prefer: wait`)."""
        headers = {"Prefer": f"wait={hold_s}"} if hold_s >= 1 else {}
        return Job.from_json(self._send("GET", f"/v1/inferences-vc/{inference_id}",
                                        lambda: {"headers": headers}).json())

    def wait(self, inference_id: str, timeout_s: float = 900.0, *, poll_s: float = 0.25,
             max_poll_s: float = 5.0) -> Job:
        """The job once it has ended (SUCCESS or FAILED); raises WaitTimeout when it is still
        running after `timeout_s`. Each poll asks to be held until the job ends (HELD_POLL_S),
        so a service that holds polls answers at the job's end; one that answers at once is
        polled at growing intervals from `poll_s` to `max_poll_s`."""
        deadline = monotonic() + timeout_s
        while True:
            asked = monotonic()
            job = self.get(inference_id, hold_s=int(min(HELD_POLL_S, deadline - asked)))
            answered = monotonic()
            if job.finished:
                return job
            if answered >= deadline:
                raise WaitTimeout(job, timeout_s)
            pause = min(poll_s - (answered - asked), deadline - answered)  # none after a held poll
            if pause > 0:
                sleep(pause)
            poll_s = min(poll_s * 1.5, max_poll_s)

    def download(self, job: Job, dest: str | Path) -> Path:
        """Stream the job's result (the MP3 of `inferenceUrl`) to `dest`, which appears only
        once complete."""
        if job.status != SUCCESS or not job.inference_url:
            raise JobFailed(job)
        dest = Path(dest)
        with atomic_path(dest) as tmp:
            with self._downloads.stream("GET", job.inference_url) as response:
                if response.is_error:
                    response.read()
                    raise _api_error(response)
                with open(tmp, "wb") as out:
                    for block in response.iter_bytes(1 << 16):
                        out.write(block)
        return dest

    def list_models(self, per_page: int = 100) -> list[Model]:
        """Every voice model the key may use (all pages)."""
        models, page = [], 1
        while True:
            body = self._send("GET", "/v1/models-vc", lambda: {"params": {"page": page, "perPage": per_page}}).json()
            models += [Model.from_json(m) for m in body["data"]]
            if page >= body["meta"]["lastPage"]:
                return models
            page += 1

    def _send(self, method: str, url: str, body: Callable[[], dict] = dict) -> httpx.Response:
        delay = self.backoff_s
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = self._api.request(method, url, **body())
            except httpx.TimeoutException as exc:
                raise RequestTimeout(f"{method} {url}: no answer within the timeout ({exc})") from exc
            except httpx.ConnectError as exc:  # nothing was sent: safe to send again
                if last:
                    raise Unreachable(f"{method} {url}: {exc}") from exc
                response = None
            if response is not None and (response.status_code not in RETRY_STATUSES or last):
                break
            told = None if response is None else _retry_after(response)
            sleep(delay if told is None else told)
            delay = min(delay * 2, self.max_backoff_s)
        if response.is_error:
            raise _api_error(response)
        return response


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(max(float(response.headers["retry-after"]), 0.0), MAX_RETRY_AFTER_S)
    except (KeyError, ValueError):
        return None


def _api_error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return BY_STATUS.get(response.status_code, ApiError)(response.status_code, body, str(response.request.url))
