"""Python client of the rvc-serve job API. Needs only httpx: no Ray, no torch.

    from rvc_client import Client

    with Client("http://127.0.0.1:8000", api_key) as api:
        job = api.wait(api.submit("in.wav", "demo", index_rate=0.5).inference_id)
        api.download(job, "out.mp3")
"""
from .client import Client, query_name
from .errors import (ApiError, Forbidden, InvalidFile, JobFailed, NotFound, PayloadTooLarge, RateLimited,
                     RequestTimeout, RvcError, Unavailable, Unreachable, ValidationError, WaitTimeout)
from .files import atomic_path
from .schema import FAILED, RUNNING, SUCCESS, Job, Model

__all__ = ["Client", "query_name", "ApiError", "Forbidden", "InvalidFile", "JobFailed", "NotFound",
           "PayloadTooLarge", "RateLimited", "RequestTimeout", "RvcError", "Unavailable", "Unreachable",
           "ValidationError", "WaitTimeout", "atomic_path", "FAILED", "RUNNING", "SUCCESS", "Job", "Model"]
