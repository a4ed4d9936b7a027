"""The 50 MiB upload limit on a real Ray Serve, and the memory a refused body costs.

What Ray Serve 2.60 itself does with a body (measured, see README "Request bodies and memory"):
its HTTP proxy drains the client socket into an unbounded queue (proxy.py `proxy_asgi_receive`)
and the replica pulls every queued batch into another one (http_util.py
`ASGIReceiveProxy.fetch_until_disconnect`), batches over 100 KiB passing through the object
store. So at full loopback speed a 50 MiB body is held by Ray in the proxy and in the replica,
whatever the handler does. What the ingress controls, and these tests hold, is that its own code
keeps no copy: with a client that sends at 25 MiB/s (so Ray's queues stay short), the ingress
replica's private memory grows by far less than the body, where a handler that buffers the body
(`await request.body()`) grows by twice it.

Private memory is RssAnon from /proc/<pid>/status, sampled every few ms during the request:
the object store's shared pages that Ray maps into the replica are not the replica's own.
"""
from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from deployments.uploads import MAX_BODY_BYTES, MAX_FILE_BYTES
from tests.service_support import (TEST_STAGES, delete_app, peak_memory_growth, ray_process,  # noqa: F401
                                   register_fake_voice, run_app, serve_url, streamed_multipart, write_keys)

KEY = "body-memory-key-0123456789"
APP = "bodies"
TOO_LARGE = {"message": "Payload Too Large"}
MiB = 1024 * 1024


@pytest.fixture
def svc(tmp_path_factory, serve_url):
    """The ingress (with the stand-in conversion) on a fresh replica: memory freed by an earlier
    request would be reused without showing as growth."""
    from deployments.app import ingress_app
    from deployments.settings import AppSettings
    from tests.fake_conversion import FakeConversion

    data = tmp_path_factory.mktemp(APP)
    register_fake_voice(data, "voice")
    settings = AppSettings(data_dir=data, api_keys_file=write_keys(data / "keys.txt", KEY),
                           rate_limit_per_minute=1000, stages=TEST_STAGES)
    run_app(ingress_app(settings, FakeConversion.options(ray_actor_options={"num_cpus": 0}).bind(settings)), APP)
    yield f"{serve_url}/{APP}", data
    delete_app(APP)


def _paced(chunks: Iterator[bytes], pause_s: float) -> Iterator[bytes]:
    for chunk in chunks:
        yield chunk
        time.sleep(pause_s)


def _post(base: str, content_type: dict, body: Iterator[bytes] | None, content_length: int | None
          ) -> tuple[int, bytes]:
    """POST a create with `body` sent as it is iterated: with the declared `content_length`, or
    chunked when it is None. `body` None sends the headers only."""
    url = urlsplit(base)
    headers = {"x-api-key": KEY, **content_type}
    if content_length is not None:
        headers["Content-Length"] = str(content_length)
    # Well under Serve's request_timeout_s (120 s here): a server waiting for a body that never
    # comes fails this call instead of answering 408 later.
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.putrequest("POST", f"{url.path}/v1/inferences-vc?modelId=voice", skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if content_length is None:
            conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for chunk in body or ():
            conn.send(chunk if content_length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
        if body is not None and content_length is None:
            conn.send(b"0\r\n\r\n")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_declared_length_over_the_limit_is_refused_before_any_body_byte(svc):
    base, data = svc
    content_type, _, _ = streamed_multipart(MAX_FILE_BYTES * 2)
    status, body = _post(base, content_type, None, MAX_BODY_BYTES + 1)  # headers only: the body never comes
    assert status == 413 and json.loads(body) == TOO_LARGE
    assert not list((data / "uploads").iterdir())


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_50_mib_and_one_byte_is_413_without_the_ingress_holding_the_body(svc, declared):
    base, data = svc
    ingress, proxy = ray_process(f"ray::ServeReplica:{APP}:Ingress"), ray_process("ray::ProxyActor")
    content_type, length, chunks = streamed_multipart(MAX_FILE_BYTES + 1)
    assert length <= MAX_BODY_BYTES  # within the declared-length allowance: only the streamed count refuses it
    # 1 MiB every 40 ms: Ray's own queues keep up, so what grows is what the ingress holds.
    with peak_memory_growth(ingress) as ingress_growth, peak_memory_growth(proxy) as proxy_growth:
        status, body = _post(base, content_type, _paced(chunks, 0.04), length if declared else None)
    assert status == 413 and json.loads(body) == TOO_LARGE
    assert not list((data / "uploads").iterdir())  # the partial upload is gone
    print(f"\n50 MiB + 1 at 25 MiB/s: private memory peak growth: ingress replica "
          f"{ingress_growth.peak / MiB:.0f} MiB, Serve proxy {proxy_growth.peak / MiB:.0f} MiB")
    assert ingress_growth.peak < 40 * MiB  # holding the body costs 50 MiB on top of what Ray holds

    # At full speed the answer is the same; the memory is Ray's (measured, not asserted).
    content_type, length, chunks = streamed_multipart(MAX_FILE_BYTES + 1)
    with peak_memory_growth(ingress) as ingress_growth, peak_memory_growth(proxy) as proxy_growth:
        status, body = _post(base, content_type, chunks, length if declared else None)
    assert status == 413 and json.loads(body) == TOO_LARGE
    assert not list((data / "uploads").iterdir())
    print(f"50 MiB + 1 at full speed: private memory peak growth: ingress replica "
          f"{ingress_growth.peak / MiB:.0f} MiB, Serve proxy {proxy_growth.peak / MiB:.0f} MiB")
