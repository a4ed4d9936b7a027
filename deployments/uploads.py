"""Receiving the `audioInfer` upload: streamed to disk, counted, cut off at the size limit.

The request body is never held in memory: python-multipart's streaming parser hands the file
part's bytes over as they arrive and they go straight into a file. The contract's limit is on
the file (50 × 1024 × 1024 bytes); the body as a whole may add a little multipart framing.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_FILE_BYTES = 50 * 1024 * 1024
# Boundaries, part headers and any small extra fields around the file.
MAX_BODY_BYTES = MAX_FILE_BYTES + 64 * 1024
FILE_FIELD = b"audioInfer"


class PayloadTooLarge(Exception):
    pass


def declared_length(content_length: str | None) -> int | None:
    """The bytes a Content-Length header declares; None when absent or malformed. Only ASCII
    digits count (str.isdigit also takes "²", which int() refuses); past 18 digits (which int()
    may refuse too) it is 10**18, far over any limit."""
    value = (content_length or "").strip()
    if not (value.isascii() and value.isdigit()):
        return None
    return int(value) if len(value) <= 18 else 10**18


def declared_too_large(content_length: str | None) -> bool:
    """Whether a Content-Length header declares a body over the limit (so it is refused unread)."""
    declared = declared_length(content_length)
    return declared is not None and declared > MAX_BODY_BYTES


def disk_short(directory: Path, content_length: str | None, reserve_bytes: int) -> bool:
    """Whether an upload (its declared length, else the largest allowed) would leave less than
    `reserve_bytes` free on `directory`'s file system."""
    declared = declared_length(content_length)
    upload = MAX_BODY_BYTES if declared is None else min(declared, MAX_BODY_BYTES)
    return shutil.disk_usage(directory).free < reserve_bytes + upload


@dataclass
class Upload:
    path: Path | None  # the complete file part on disk; None when the body had no such part
    size: int = 0
    sha256: str | None = None  # hex digest of the file's bytes (deployments/routing.py)


class _FilePart:
    """Multipart callbacks that write the first `audioInfer` part to `path`."""

    def __init__(self, path: Path):
        self.path = path
        self.file: BinaryIO | None = None
        self.writing = False
        self.complete = False
        self.size = 0
        self.digest = hashlib.sha256()
        self._headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end}

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._field).strip().lower()] = bytes(self._value).strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        if options.get(b"name") == FILE_FIELD and self.file is None:
            # Private to the service user; O_EXCL: never write through a planted file or link.
            self.file = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
            self.writing = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.writing:
            self.size += end - start
            if self.size > MAX_FILE_BYTES:
                raise PayloadTooLarge
            chunk = memoryview(data)[start:end]
            self.file.write(chunk)
            self.digest.update(chunk)

    def _part_end(self) -> None:
        if self.writing:
            self.writing = False
            self.complete = True

    def close(self, durable: bool = False) -> None:
        """Close the file (once; later calls do nothing), on disk first when `durable`."""
        file, self.file = self.file, None
        if file is not None:
            if durable:
                file.flush()
                os.fsync(file.fileno())
            file.close()


async def receive_upload(content_type: str | None, body: AsyncIterator[bytes], dest_dir: Path) -> Upload:
    """Stream a multipart body, writing its `audioInfer` part to a new file in `dest_dir`.

    Raises PayloadTooLarge as soon as the file part or the body passes its limit (the partial
    file is removed). A body that is not multipart, is malformed, or ends before the file part
    does gives `Upload(None)`. The caller owns (and removes) the returned file.
    """
    mime, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    part = _FilePart(dest_dir / f".upload-{secrets.token_hex(8)}")
    parser = None
    if mime == b"multipart/form-data" and boundary:
        try:
            parser = MultipartParser(boundary, part.callbacks())
        except FormParserError:
            parser = None
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > MAX_BODY_BYTES:
                raise PayloadTooLarge
            if parser is not None:
                try:
                    parser.write(chunk)
                except FormParserError:
                    # Keep counting: an oversized body is a 413 even when it is also malformed.
                    parser = None
        if parser is not None:
            try:
                parser.finalize()
            except FormParserError:
                parser = None
        if parser is None or not part.complete:
            part.close()
            part.path.unlink(missing_ok=True)
            return Upload(None)
        # fsync waits for the disk: in a thread, so the event loop serves other requests meanwhile.
        await asyncio.to_thread(part.close, True)
    except BaseException:
        part.close()
        part.path.unlink(missing_ok=True)
        raise
    return Upload(part.path, part.size, part.digest.hexdigest())
