"""Where conversion outputs live, and the signed URLs that hand them out.

`ResultStore` is the interface an object store can implement later (it would return its own
presigned URLs from `external_url`). The default `LocalResultStore` keeps files under one
directory; the ingress streams them on a route whose URL is signed with HMAC-SHA256 over the
result key and the expiry time, so the URL needs no API key and cannot be altered or extended.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol
from urllib.parse import urlencode

from rvc_client.files import atomic_path

from .store import HANDLE_TENANT

URL_LIFETIME_S = 5 * 3600
# The MP3 is what the API hands out (inferenceUrl); the FLAC is the lossless copy.
RESULT_FORMATS = ("mp3", "flac")
RESULT_ROUTE = "/results"
# A write that failed with less than this free beside it failed for want of space.
FULL_BELOW_BYTES = 1 << 20
# A key is "<inferenceId>/<file name>": two safe path segments, never "..", never absolute.
_ID = r"[A-Za-z0-9_-]{1,64}"
_ID_RE = re.compile(_ID)
_KEY_RE = re.compile(_ID + r"/[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def result_formats(tenant: str, lossless_results: bool) -> tuple[str, ...]:
    """The files a job's conversion writes: the MP3, and the FLAC too for jobs of the Serve
    handle (`rvc-serve batch --ray-address`, which may ask for either) or where the settings keep
    lossless results (`AppSettings.lossless_results`)."""
    return RESULT_FORMATS if lossless_results or tenant == HANDLE_TENANT else ("mp3",)


def check_key(key: str) -> str:
    if not _KEY_RE.fullmatch(key) or ".." in key:
        raise ValueError(f"invalid result key {key!r}")
    return key


def check_id(inference_id: str) -> str:
    if not _ID_RE.fullmatch(inference_id):
        raise ValueError(f"invalid inference id {inference_id!r}")
    return inference_id


class ResultStoreFull(OSError):
    pass


class ResultStore(Protocol):
    def writer(self, key: str) -> AbstractContextManager[Path]:
        """A context manager yielding a local path to write the result to; the result appears
        under `key` atomically when the block exits without error, and not at all otherwise."""

    def local_path(self, key: str) -> Path | None:
        """The file of a stored result, if this store keeps results on the local disk."""

    def external_url(self, key: str, expires_in_s: int) -> str | None:
        """A URL the store itself signs (object stores), or None: the service signs its own."""

    def remove(self, inference_id: str) -> None:
        """Delete every result of a job (nothing if there is none)."""


class LocalResultStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @contextmanager
    def writer(self, key: str) -> Iterator[Path]:
        # only the service (which streams it) reads a result
        with atomic_path(self.root / check_key(key), mode=0o600) as path:
            try:
                yield path
            except Exception as exc:
                # libsndfile reports a full disk as "System error."; say what it was. Checked
                # before the partial file goes, while the space it took is still taken.
                if shutil.disk_usage(path.parent).free < FULL_BELOW_BYTES:
                    raise ResultStoreFull("no space left in the result store") from exc
                raise

    def local_path(self, key: str) -> Path | None:
        path = self.root / check_key(key)
        return path if path.is_file() else None

    def external_url(self, key: str, expires_in_s: int) -> str | None:
        return None

    def remove(self, inference_id: str) -> None:
        shutil.rmtree(self.root / check_id(inference_id), ignore_errors=True)


def signature(secret: bytes, key: str, expires: int) -> str:
    return hmac.new(secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


def signed_url(secret: bytes, base_url: str, key: str, now: float, lifetime_s: int = URL_LIFETIME_S) -> str:
    """`<base_url>/results/<key>?expires=<unix s>&signature=<hex>`, valid for `lifetime_s`."""
    expires = int(now) + lifetime_s
    query = urlencode({"expires": expires, "signature": signature(secret, check_key(key), expires)})
    return f"{base_url.rstrip('/')}{RESULT_ROUTE}/{key}?{query}"


def verify(secret: bytes, key: str, expires: str | None, sig: str | None, now: float) -> bool:
    """True when the signature matches the key and expiry and the expiry is in the future."""
    # ASCII digits only, and few: int() refuses "²" and numbers of over 4300 digits.
    if not expires or not sig or not re.fullmatch(r"[0-9]{1,15}", expires):
        return False
    expected = signature(secret, key, int(expires))
    return hmac.compare_digest(expected, sig) and int(expires) > now
