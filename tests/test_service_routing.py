"""An upload's conversions go to one conversion replica (deployments/routing.py), so its input
cache serves them; other uploads spread over the replicas, and a full replica is passed over.

Two stand-in conversion replicas (tests/fake_conversion.py logs which replica took each job)
behind the real ingress, job actor and router.
"""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from deployments.settings import AppSettings
from tests.service_support import (TEST_STAGES, delete_app, register_fake_voice, run_app, serve_url,  # noqa: F401
                                   wait_for, wav_bytes, write_keys)

KEY = "routing-key-0123456789"
REPLICAS, ROOM = 2, 2  # conversion replicas, and the calls each takes at once


@pytest.fixture(scope="module")
def svc(tmp_path_factory, serve_url):
    from deployments.app import conversion_options, ingress_app
    from tests.fake_conversion import FakeConversion

    data = tmp_path_factory.mktemp("routing")
    for voice in ("voice", "voice-slow"):
        register_fake_voice(data, voice)
    conversion = {**TEST_STAGES["conversion"], "min_replicas": REPLICAS, "max_replicas": REPLICAS,
                  "max_ongoing_requests": ROOM, "target_ongoing_requests": ROOM}
    settings = AppSettings(data_dir=data, api_keys_file=write_keys(data / "keys.txt", KEY),
                           rate_limit_per_minute=10000, max_concurrent_jobs=2 * REPLICAS * ROOM,
                           stages={**TEST_STAGES, "conversion": conversion})
    run_app(ingress_app(settings, FakeConversion.options(**conversion_options(settings)).bind(settings)), "routing")
    client = httpx.Client(base_url=f"{serve_url}/routing", timeout=60, headers={"x-api-key": KEY})
    yield client, data
    client.close()
    delete_app("routing")


def _convert(client: httpx.Client, audio: bytes, model_id: str) -> str:
    response = client.post("/v1/inferences-vc", params={"modelId": model_id},
                           files={"audioInfer": ("in.wav", audio, "audio/wav")})
    assert response.status_code == 200, response.text
    job_id = response.json()["inferenceId"]

    def finished():
        body = client.get(f"/v1/inferences-vc/{job_id}").json()
        return body if body["status"] != "RUNNING" else None

    done = wait_for(finished, 30)
    assert done["status"] == "SUCCESS", done
    return job_id


def _replica_of(data) -> dict[str, str]:
    return dict(line.split() for line in (data / "replicas.log").read_text().splitlines())


def test_an_uploads_conversions_go_to_one_replica(svc):
    client, data = svc
    upload = wav_bytes(0.5)  # one upload, converted again and again
    jobs = [_convert(client, upload, "voice") for _ in range(6)]
    replicas = _replica_of(data)
    # by chance alone (the less busy of two idle replicas) all six would agree 1 time in 32
    assert len({replicas[job] for job in jobs}) == 1


def test_other_uploads_spread_and_a_full_replica_is_passed_over(svc):
    client, data = svc
    upload = wav_bytes(0.7)
    holder_job = _convert(client, upload, "voice")
    with ThreadPoolExecutor(ROOM + 1) as pool:  # one more than the holder takes at once
        started = time.monotonic()
        slow = list(pool.map(lambda _: _convert(client, upload, "voice-slow"), range(ROOM + 1)))
        seconds = time.monotonic() - started
    replicas = _replica_of(data)
    holder = replicas[holder_job]
    assert Counter(replicas[job] == holder for job in slow) == {True: ROOM, False: 1}
    assert seconds < 2 * 3  # all at once (3 s each), none waited for the holder to have room
    # distinct uploads of 3 s each, more at once than one replica takes: both replicas ran them
    with ThreadPoolExecutor(REPLICAS * ROOM) as pool:
        others = list(pool.map(lambda i: _convert(client, wav_bytes(1.0 + 0.1 * i), "voice-slow"),
                               range(REPLICAS * ROOM)))
    replicas = _replica_of(data)
    assert len({replicas[job] for job in others}) == REPLICAS


def test_the_router_remembers_a_bounded_number_of_uploads():
    from types import SimpleNamespace

    from deployments.routing import UPLOAD_KEY_FIELD, UploadAffinityRouter, upload_key

    router = UploadAffinityRouter.__new__(UploadAffinityRouter)  # its memory alone, no Serve around it
    router.initialize_state(remembered_uploads=2)

    def routed(key: str | None, replica: str) -> None:
        router.on_request_routed(SimpleNamespace(args=[{UPLOAD_KEY_FIELD: key}]), replica, None)

    routed("a", "r1")
    routed("b", "r2")
    routed("a", "r2")  # a's latest replica, and now the most recent
    routed("c", "r1")  # b, the least recent, is forgotten
    routed(None, "r1")  # a job without a digest leaves no trace
    assert dict(router._holders) == {"a": "r2", "c": "r1"}
    assert upload_key("tenant", None) is None
    assert upload_key("t1", "00" * 32) != upload_key("t2", "00" * 32)
