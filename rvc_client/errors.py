"""What the client raises: the API's refusals (with its status code and body) and timeouts."""
from __future__ import annotations

from typing import Any


class RvcError(Exception):
    """Base of every error the client raises."""


class ApiError(RvcError):
    """The API answered with an error status; `body` is its JSON body (or text when not JSON)."""

    def __init__(self, status_code: int, body: Any, url: str = ""):
        self.status_code, self.body, self.url = status_code, body, url
        super().__init__(f"{status_code} {_summary(body)}" + (f" ({url})" if url else ""))


class Forbidden(ApiError):
    """403: missing or unknown API key (or an expired or altered result URL)."""


class InvalidFile(ApiError):
    """402: the upload is not a wav, mp3 or flac file the service can decode."""


class NotFound(ApiError):
    """404: no such job or model for this key."""


class PayloadTooLarge(ApiError):
    """413: the upload is larger than the service accepts (50 MiB)."""


class ValidationError(ApiError):
    """422: missing or malformed parameters; `body["detail"]` has one entry per problem."""


class RateLimited(ApiError):
    """429 that outlasted the client's retries."""


class Unavailable(ApiError):
    """503 that outlasted the client's retries."""


class RequestTimeout(RvcError, TimeoutError):
    """One HTTP request took longer than the client's timeout."""


class Unreachable(RvcError, ConnectionError):
    """The service could not be reached (connection refused or reset), after the retries."""


class JobFailed(RvcError):
    """The job ended FAILED (or is not finished) where a result was needed; `job.error` says why."""

    def __init__(self, job):
        self.job = job
        super().__init__(f"job {job.inference_id} {job.status}: {job.error or 'no result'}")


class WaitTimeout(RvcError, TimeoutError):
    """The job was still running when `wait` gave up; `job` is the last state seen."""

    def __init__(self, job, timeout_s: float):
        self.job = job
        super().__init__(f"job {job.inference_id} still {job.status} after {timeout_s:g} s")


BY_STATUS: dict[int, type[ApiError]] = {402: InvalidFile, 403: Forbidden, 404: NotFound, 413: PayloadTooLarge,
                                        422: ValidationError, 429: RateLimited, 503: Unavailable}


def _summary(body: Any) -> str:
    if isinstance(body, dict):
        for field in ("message", "error"):
            if isinstance(body.get(field), str):
                return body[field]
        if isinstance(body.get("detail"), list):
            return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg', '')}"
                             for d in body["detail"] if isinstance(d, dict))
    return str(body)[:300]
