"""The 50 MiB upload limit on a real Ray Serve, and the memory a refused body costs.

Ray Serve 2.60 on its own holds a fast client's body whole, twice: its HTTP proxy drains the
socket into an unbounded queue and the replica pulls every queued batch into another one
(measured before deployments/backpressure.py: +36..88 MiB in the ingress replica and up to
+104 MiB in the proxy for a 50 MiB + 1 byte upload at loopback speed). With both queues bounded
(the proxy's through its start-up hook, which service_support sets like scripts/serve.sh), the
body flows at the pace the ingress streams it to disk, so neither process grows by more than
~12 MiB, whether the client sends at 25 MiB/s or as fast as loopback allows.

Private memory is RssAnon from /proc/<pid>/status, sampled every 2 ms during the request:
the object store's shared pages that Ray maps into the replica are not the replica's own.
"""
from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from deployments.ray_env import RAY_NODE_ENV
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


def test_the_proxy_runs_with_the_ray_node_environment(svc):
    """What these tests measure is the shipped path: the proxy has every RAY_NODE_ENV setting."""
    assert RAY_NODE_ENV.items() <= ray_process("ray::ProxyActor").environ().items()


def test_declared_length_over_the_limit_is_refused_before_any_body_byte(svc):
    base, data = svc
    content_type, _, _ = streamed_multipart(MAX_FILE_BYTES * 2)
    status, body = _post(base, content_type, None, MAX_BODY_BYTES + 1)  # headers only: the body never comes
    assert status == 413 and json.loads(body) == TOO_LARGE
    assert not list((data / "uploads").iterdir())


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("pause_s", [0.04, 0.0], ids=["25MiB/s", "full-speed"])
def test_50_mib_and_one_byte_is_413_without_the_body_being_buffered(svc, declared, pause_s):
    base, data = svc
    ingress, proxy = ray_process(f"ray::ServeReplica:{APP}:Ingress"), ray_process("ray::ProxyActor")
    content_type, length, chunks = streamed_multipart(MAX_FILE_BYTES + 1)
    assert length <= MAX_BODY_BYTES  # within the declared-length allowance: only the streamed count refuses it
    started = time.monotonic()
    with peak_memory_growth(ingress) as ingress_growth, peak_memory_growth(proxy) as proxy_growth:
        status, body = _post(base, content_type, _paced(chunks, pause_s), length if declared else None)
    seconds = time.monotonic() - started
    assert status == 413 and json.loads(body) == TOO_LARGE
    assert not list((data / "uploads").iterdir())  # the partial upload is gone
    print(f"\n50 MiB + 1 ({'paced' if pause_s else 'full speed'}, {length / MiB / seconds:.0f} MiB/s): "
          f"private memory peak growth: ingress replica {ingress_growth.peak / MiB:.1f} MiB, "
          f"Serve proxy {proxy_growth.peak / MiB:.1f} MiB")
    # Holding the body anywhere shows as >= 50 MiB; up to ~12 MiB are the 2 MiB queues, the batch in
    # flight and its unpickled copy, the parser's buffers and allocator slack.
    assert ingress_growth.peak < 20 * MiB
    assert proxy_growth.peak < 20 * MiB
