"""The HTTP contract over real HTTP, against the ingress and job actor on a real local Ray Serve.

The conversion itself is a stand-in (tests/fake_conversion.py), so these tests need no models;
tests/test_service_e2e.py runs the real stages.
"""
from __future__ import annotations

import http.client
import json
import re
import sqlite3
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from deployments.results import signature
from deployments.settings import URL_SECRET_FILE, AppSettings
from deployments.uploads import MAX_FILE_BYTES
from tests.service_support import (TEST_STAGES, delete_app, register_fake_voice, run_app, serve_url,  # noqa: F401
                                   streamed_multipart, wait_for, wav_bytes, write_keys)

KEY_A, KEY_B = "key-alpha-0123456789", "key-beta-0123456789"
VOICES = ("voice-a", "voice-b", "voice-fail", "voice-hang", "voice-slow")
FORBIDDEN = {"message": "Forbidden"}
INVALID_FILE = {"message": "Invalid file type, use: ['audio/x-wav', 'audio/mpeg', 'audio/flac']"}
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} \+00:00")
JOB_KEYS = {"inferenceId", "modelId", "status", "type", "inferenceUrl", "jobStartTime", "jobEndTime"}


def _app(tmp_path_factory, base_url: str, name: str, **overrides) -> Iterator[SimpleNamespace]:
    """An ingress app on the stand-in conversion, for a fixture to `yield from`: deleted after."""
    from deployments.app import ingress_app
    from tests.fake_conversion import FakeConversion

    data = tmp_path_factory.mktemp(name)
    for voice in VOICES:
        register_fake_voice(data, voice)
    stages = {**TEST_STAGES, **overrides.pop("stages", {})}
    settings = AppSettings(data_dir=data, api_keys_file=write_keys(data / "keys.txt", KEY_A, KEY_B),
                           stages=stages, **overrides)
    run_app(ingress_app(settings, FakeConversion.options(ray_actor_options={"num_cpus": 0}).bind(settings)), name)
    client = httpx.Client(base_url=f"{base_url}/{name}", timeout=60)
    yield SimpleNamespace(name=name, base=f"{base_url}/{name}", data=data, client=client, settings=settings)
    client.close()
    delete_app(name)


@pytest.fixture(scope="module")
def svc(tmp_path_factory, serve_url):
    # A killed conversion replica is replaced (and the call retried by Serve) within the timeout.
    yield from _app(tmp_path_factory, serve_url, "api", rate_limit_per_minute=1000, job_timeout_s=60)


def _post(svc, query: dict | None, audio: bytes | None = None, key: str | None = KEY_A, filename: str = "in.wav",
          content_type: str = "audio/wav", headers: dict | None = None) -> httpx.Response:
    headers = {**({"x-api-key": key} if key else {}), **(headers or {})}
    files = {"audioInfer": (filename, audio, content_type)} if audio is not None else None
    if files is None:  # still a multipart request, just without the file part
        files = {"other": ("x.txt", b"x", "text/plain")}
    return svc.client.post("/v1/inferences-vc", params=query, files=files, headers=headers)


def _job(svc, inference_id: str, key: str = KEY_A) -> httpx.Response:
    return svc.client.get(f"/v1/inferences-vc/{inference_id}", headers={"x-api-key": key})


def _wait_status(svc, inference_id: str, timeout_s: float = 30) -> dict:
    def finished():
        body = _job(svc, inference_id).json()
        return body if body["status"] != "RUNNING" else None
    return wait_for(finished, timeout_s)


def _calls(svc) -> list[str]:
    log = svc.data / "calls.log"
    return log.read_text().split() if log.exists() else []


def _raw_post(base: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict, bytes]:
    """A POST that declares its own Content-Length and sends only `body` of it."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.putrequest("POST", url.path + path)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        if body:
            conn.send(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _rate_headers(response) -> bool:
    return {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= set(response.headers)


# --- 403 first ---------------------------------------------------------------------------------

def test_403_before_anything_else(svc):
    for key in (None, "wrong-key", KEY_A + "x"):
        for response in (
            _post(svc, {"indexRate": "bad"}, b"not audio", key=key),  # would be 422
            _post(svc, {"modelId": "voice-a"}, wav_bytes(), key=key),  # would be 200
            svc.client.get("/v1/inferences-vc/anything", headers={"x-api-key": key} if key else {}),
            svc.client.get("/v1/models-vc", params={"page": "0"}, headers={"x-api-key": key} if key else {}),
            svc.client.get("/v1/no-such-route", headers={"x-api-key": key} if key else {}),
        ):
            assert response.status_code == 403 and response.json() == FORBIDDEN
            assert not _rate_headers(response)  # nothing about the key's budget leaks either
    # Even a body declared far over the limit is refused for the key first, without being read.
    status, _, body = _raw_post(svc.base, "/v1/inferences-vc", {"Content-Length": str(200 * 1024 * 1024),
                                                                "Content-Type": "multipart/form-data; boundary=x"})
    assert status == 403 and json.loads(body) == FORBIDDEN


# --- 413 ---------------------------------------------------------------------------------------

def test_413_by_declared_length_without_reading_the_body(svc):
    started = time.monotonic()
    status, headers, body = _raw_post(svc.base, "/v1/inferences-vc?modelId=voice-a", {
        "x-api-key": KEY_A, "Content-Type": "multipart/form-data; boundary=x",
        "Content-Length": str(MAX_FILE_BYTES * 2)}, body=b"--x\r\n")
    assert status == 413 and json.loads(body) == {"message": "Payload Too Large"}
    assert "x-ratelimit-limit" in headers
    assert time.monotonic() - started < 10  # answered while 100 MB were still "to come"


def test_413_while_streaming(svc):
    headers, _, body = streamed_multipart(MAX_FILE_BYTES + 1)  # chunked: no Content-Length to refuse by
    response = svc.client.post("/v1/inferences-vc", params={"modelId": "voice-a"}, content=body,
                               headers={**headers, "x-api-key": KEY_A})
    assert response.status_code == 413 and response.json() == {"message": "Payload Too Large"}
    assert _rate_headers(response)
    assert not [p for p in (svc.data / "uploads").iterdir()]  # the partial upload is gone
    # Exactly at the limit the file is read whole (and then refused for its content).
    headers, _, body = streamed_multipart(MAX_FILE_BYTES)
    response = svc.client.post("/v1/inferences-vc", params={"modelId": "voice-a"}, content=body,
                               headers={**headers, "x-api-key": KEY_A})
    assert response.status_code == 402 and response.json() == INVALID_FILE
    # Memory: test_service_body_memory (the ingress replica's, measured) and
    # test_service_units.test_upload_reader_memory_is_bounded (the reader's).


# --- 422 ---------------------------------------------------------------------------------------

def test_422_missing_everything_is_the_contract_body(svc):
    response = _post(svc, None, None)
    assert response.status_code == 422 and _rate_headers(response)
    assert response.json() == {"detail": [
        {"loc": ["query", "modelId"], "msg": "field required", "type": "value_error.missing"},
        {"loc": ["body", "audioInfer"], "msg": "field required", "type": "value_error.missing"}]}


def test_422_not_multipart_at_all(svc):
    response = svc.client.post("/v1/inferences-vc", params={"modelId": "voice-a"}, json={"audioInfer": "x"},
                               headers={"x-api-key": KEY_A})
    assert response.status_code == 422
    assert response.json() == {"detail": [
        {"loc": ["body", "audioInfer"], "msg": "field required", "type": "value_error.missing"}]}


@pytest.mark.parametrize("query, expected", [
    ({"indexRate": "1.01"}, {"loc": ["query", "indexRate"], "msg": "ensure this value is less than or equal to 1",
                             "type": "value_error.number.not_le", "ctx": {"limit_value": 1}}),
    ({"indexRate": "-1"}, {"loc": ["query", "indexRate"], "msg": "ensure this value is greater than or equal to 0",
                           "type": "value_error.number.not_ge", "ctx": {"limit_value": 0}}),
    ({"rmsMixRate": "loud"}, {"loc": ["query", "rmsMixRate"], "msg": "value is not a valid float",
                              "type": "type_error.float"}),
    ({"filterRadius": "8"}, {"loc": ["query", "filterRadius"], "msg": "ensure this value is less than or equal to 7",
                             "type": "value_error.number.not_le", "ctx": {"limit_value": 7}}),
    ({"filterRadius": "3.0"}, {"loc": ["query", "filterRadius"], "msg": "value is not a valid integer",
                               "type": "type_error.integer"}),
    ({"f0UpKey": "25"}, {"loc": ["query", "f0UpKey"], "msg": "ensure this value is less than or equal to 24",
                         "type": "value_error.number.not_le", "ctx": {"limit_value": 24}}),
    ({"protect": "0.51"}, {"loc": ["query", "protect"], "msg": "ensure this value is less than or equal to 0.5",
                           "type": "value_error.number.not_le", "ctx": {"limit_value": 0.5}}),
    ({"f0Method": "rmvpe"}, {"loc": ["query", "f0Method"],  # no rmvpe.pt in this data dir
                             "msg": "value is not a valid enumeration member; permitted: 'crepe', 'crepe-tiny', "
                                    "'pm', 'harvest'",
                             "type": "type_error.enum",
                             "ctx": {"enum_values": ["crepe", "crepe-tiny", "pm", "harvest"]}}),
])
def test_422_each_parameter(svc, query, expected):
    response = _post(svc, {"modelId": "voice-a", **query}, b"not audio either")  # 422 comes before 402
    assert response.status_code == 422
    assert response.json() == {"detail": [expected]}


# --- 402, 404 ----------------------------------------------------------------------------------

def test_402_decided_by_content(svc, tmp_path):
    good = wav_bytes()
    header_only = good[:44] + good[44:1044]  # declares 0.5 s of samples, carries 1000 bytes
    for audio, name, ctype in (
        (b"This is a text file, not audio.\n" * 100, "speech.wav", "audio/wav"),
        (header_only, "speech.wav", "audio/wav"),
        (b"", "speech.wav", "audio/wav"),
        (b"ID3" + bytes(2000), "song.mp3", "audio/mpeg"),
        (b"\x89PNG\r\n\x1a\n" + bytes(500), "speech.flac", "audio/flac"),
    ):
        response = _post(svc, {"modelId": "nope"}, audio, filename=name, content_type=ctype)  # 402 before 404
        assert response.status_code == 402 and response.json() == INVALID_FILE, (name, len(audio))
        assert _rate_headers(response)
    # The name and declared type do not matter: a real wav called .txt is accepted.
    assert _post(svc, {"modelId": "voice-a"}, good, filename="notes.txt", content_type="text/plain").status_code == 200


def test_audio_longer_than_allowed_is_422_and_leaves_nothing(svc, tmp_path):
    import numpy as np
    import soundfile as sf

    path = tmp_path / "long.flac"  # 2 h of silence in ~0.2 MB: far under the byte limit
    with sf.SoundFile(path, "w", 8000, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(120):
            f.write(np.zeros(60 * 8000, np.int16))
    uploads = sorted((svc.data / "uploads").iterdir())
    response = _post(svc, {"modelId": "nope"}, path.read_bytes(), filename="long.flac")  # before the 404
    limit = svc.settings.max_audio_seconds
    assert response.status_code == 422 and _rate_headers(response)
    assert response.json() == {"detail": [{
        "loc": ["body", "audioInfer"], "msg": f"ensure this audio is at most {limit:g} seconds long",
        "type": "value_error.audio.too_long", "ctx": {"limit_value": limit}}]}
    assert set((svc.data / "uploads").iterdir()) <= set(uploads)  # nothing kept (an earlier job's may end)


def test_harvest_has_its_own_audio_limit(svc, tmp_path):
    """harvest holds ~7 MB per second of input: 11 min is refused with it, not with crepe."""
    import numpy as np
    import soundfile as sf

    path = tmp_path / "eleven-minutes.flac"
    with sf.SoundFile(path, "w", 8000, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(11):
            f.write(np.zeros(60 * 8000, np.int16))
    uploads = sorted((svc.data / "uploads").iterdir())
    limit = svc.settings.harvest_max_audio_seconds
    assert limit < 660 < svc.settings.max_audio_seconds
    response = _post(svc, {"modelId": "nope", "f0Method": "harvest"}, path.read_bytes(), filename="long.flac")
    assert response.status_code == 422 and response.json() == {"detail": [{
        "loc": ["body", "audioInfer"], "msg": f"ensure this audio is at most {limit:g} seconds long with f0Method "
        "harvest", "type": "value_error.audio.too_long", "ctx": {"limit_value": limit}}]}
    assert _post(svc, {"modelId": "nope"}, path.read_bytes(), filename="long.flac").status_code == 404  # crepe
    assert set((svc.data / "uploads").iterdir()) <= set(uploads)  # nothing kept (an earlier job's may end)


def test_404_unknown_model(svc):
    for model_id in ("nope", "../voices/voice-a", "voice-a/../voice-b", ""):
        response = _post(svc, {"modelId": model_id}, wav_bytes())
        assert response.status_code == 404 and response.json() == {"message": "Model not found"}, model_id


# --- 200, polling, results, tenancy ------------------------------------------------------------

def test_accept_poll_download_and_tenancy(svc):
    before = time.time()
    response = _post(svc, {"modelId": "voice-a", "f0UpKey": "-3", "indexRate": "0.5"}, wav_bytes())
    assert response.status_code == 200 and _rate_headers(response)
    job = response.json()
    assert set(job) == JOB_KEYS
    assert (job["modelId"], job["status"], job["type"], job["inferenceUrl"], job["jobEndTime"]) == (
        "voice-a", "RUNNING", "VC", None, None)
    assert TIMESTAMP.fullmatch(job["jobStartTime"])
    started = time.mktime(time.strptime(job["jobStartTime"][:19], "%Y-%m-%d %H:%M:%S")) - time.timezone
    assert before - 2 <= started <= time.time() + 1

    # Durable before the 200: the job row with its parameters is committed.
    row = sqlite3.connect(svc.data / "jobs.sqlite3").execute(
        "SELECT model_id, params FROM jobs WHERE inference_id = ?", (job["inferenceId"],)).fetchone()
    assert row[0] == "voice-a"
    assert json.loads(row[1]) == {"index_rate": 0.5, "rms_mix_rate": 1, "filter_radius": 3, "f0_up_key": -3,
                                  "protect": 0.33, "f0_method": "crepe", "seed": 0}

    done = _wait_status(svc, job["inferenceId"])
    assert done["status"] == "SUCCESS" and set(done) == JOB_KEYS
    assert TIMESTAMP.fullmatch(done["jobEndTime"]) and done["jobEndTime"] >= done["jobStartTime"]
    url = done["inferenceUrl"]
    assert url.startswith(f"{svc.base}/results/{job['inferenceId']}/output.mp3?expires=")
    expires = int(parse_qs(urlsplit(url).query)["expires"][0])
    assert abs(expires - (time.time() + 5 * 3600)) < 60

    download = httpx.get(url, timeout=30)  # no API key needed
    assert download.status_code == 200 and download.headers["content-type"] == "audio/mpeg"
    assert download.content == (svc.data / "results" / job["inferenceId"] / "output.mp3").read_bytes()
    # the API hands out the MP3 alone, and only it is kept (lossless_results is off)
    assert [p.name for p in (svc.data / "results" / job["inferenceId"]).iterdir()] == ["output.mp3"]
    assert not (svc.data / "uploads" / f"{job['inferenceId']}.wav").exists()  # cleaned up after the job

    # Tenancy: another key, or no such job, is the same 404.
    for response in (_job(svc, job["inferenceId"], key=KEY_B), _job(svc, "0" * 32)):
        assert response.status_code == 404 and response.json() == {"message": "Not found"}


def test_signed_url_forged_altered_or_expired_is_403(svc):
    job = _post(svc, {"modelId": "voice-b"}, wav_bytes()).json()
    url = _wait_status(svc, job["inferenceId"])["inferenceUrl"]
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    expires, sig = query["expires"][0], query["signature"][0]
    path = parts.path[len(f"/{svc.name}"):]
    secret = (svc.data / URL_SECRET_FILE).read_text().strip().encode()
    key = f"{job['inferenceId']}/output.flac"
    past = int(time.time()) - 1
    for bad in (
        {"expires": expires, "signature": sig[:-1] + ("0" if sig[-1] != "0" else "1")},  # forged
        {"expires": str(int(expires) + 3600), "signature": sig},  # extended
        {"expires": expires},  # unsigned
        {"expires": str(past), "signature": signature(secret, f"{job['inferenceId']}/output.mp3", past)},  # expired
    ):
        response = svc.client.get(path, params=bad)
        assert response.status_code == 403 and response.json() == FORBIDDEN, bad
    other_file = svc.client.get(f"/results/{key}", params={"expires": expires, "signature": sig})
    assert other_file.status_code == 403
    # A signature made with the service's secret for the lossless copy is valid, but the job
    # kept none (lossless_results is off): 404, as for any result that is not there.
    future = int(time.time()) + 60
    flac = svc.client.get(f"/results/{key}", params={"expires": future, "signature": signature(secret, key, future)})
    assert flac.status_code == 404


def test_failed_job_has_a_one_line_error(svc):
    job = _post(svc, {"modelId": "voice-fail"}, wav_bytes()).json()
    done = _wait_status(svc, job["inferenceId"])
    assert done["status"] == "FAILED" and done["inferenceUrl"] is None and TIMESTAMP.fullmatch(done["jobEndTime"])
    assert done["error"] == "synthetic failure: the input could not be converted"
    assert set(done) == JOB_KEYS | {"error"}


@pytest.fixture(scope="module")
def impatient(tmp_path_factory, serve_url):
    yield from _app(tmp_path_factory, serve_url, "impatient", job_timeout_s=1, job_timeout_per_audio_s=2)


def test_job_timeout_grows_with_the_input(impatient):
    jobs = {seconds: _post(impatient, {"modelId": "voice-hang"}, wav_bytes(seconds)).json()["inferenceId"]
            for seconds in (0.5, 1.5)}
    for seconds, job_id in jobs.items():
        done = _wait_status(impatient, job_id, timeout_s=30)
        assert done["status"] == "FAILED" and done["error"] == f"timed out after {1 + 2 * seconds:g} s"
        assert _calls(impatient).count(job_id) == 1  # a timeout is final, not retried


@pytest.fixture(scope="module")
def cramped(tmp_path_factory, serve_url):
    yield from _app(tmp_path_factory, serve_url, "cramped", min_free_disk_mb=1 << 40)  # never that much free


def test_create_on_a_nearly_full_disk_is_503_before_the_body_is_read(cramped):
    response = _post(cramped, {"modelId": "voice-a"}, wav_bytes())
    assert response.status_code == 503 and response.json() == {"message": "Service Unavailable"}
    assert response.headers["retry-after"] == "60" and _rate_headers(response)
    assert list((cramped.data / "uploads").iterdir()) == [] and _calls(cramped) == []
    # Key and size checks still come first; polls and the other routes are not affected.
    assert _post(cramped, {"modelId": "voice-a"}, wav_bytes(), key="wrong").status_code == 403
    assert _job(cramped, "0" * 32).status_code == 404


def test_job_actor_restart_reruns_running_job(svc):
    import ray

    from deployments.jobs import NAMESPACE, tracker_name

    job = _post(svc, {"modelId": "voice-slow"}, wav_bytes()).json()
    wait_for(lambda: job["inferenceId"] in _calls(svc), 20)
    ray.kill(ray.get_actor(tracker_name(svc.name), namespace=NAMESPACE), no_restart=False)
    done = _wait_status(svc, job["inferenceId"], timeout_s=60)
    assert done["status"] == "SUCCESS"
    assert _calls(svc).count(job["inferenceId"]) == 2  # run again by the restarted actor
    attempts = sqlite3.connect(svc.data / "jobs.sqlite3").execute(
        "SELECT attempts FROM jobs WHERE inference_id = ?", (job["inferenceId"],)).fetchone()[0]
    assert attempts == 2


def test_conversion_replica_killed_mid_job(svc):
    import ray

    job = _post(svc, {"modelId": "voice-slow"}, wav_bytes()).json()
    wait_for(lambda: job["inferenceId"] in _calls(svc), 20)
    (replica,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{svc.name}#FakeConversion")]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    done = _wait_status(svc, job["inferenceId"], timeout_s=90)
    # Never stuck RUNNING; here the retry on a fresh replica succeeds.
    assert done["status"] == "SUCCESS", done.get("error")
    assert _calls(svc).count(job["inferenceId"]) >= 2


# --- idempotency, cancel ------------------------------------------------------------------------

def _uploads(svc) -> set[str]:
    return {p.name for p in (svc.data / "uploads").iterdir()}


def test_idempotency_key_makes_a_retried_create_return_the_same_job(svc):
    key = f"create-{uuid.uuid4()}"
    before = _uploads(svc)
    first = _post(svc, {"modelId": "voice-slow"}, wav_bytes(), headers={"Idempotency-Key": key})
    assert first.status_code == 200
    job_id = first.json()["inferenceId"]
    # Retries, also concurrent ones, answer the same job and keep no second upload.
    with ThreadPoolExecutor(4) as pool:
        retries = list(pool.map(lambda _: _post(svc, {"modelId": "voice-slow"}, wav_bytes(),
                                                headers={"Idempotency-Key": key}), range(4)))
    assert [(r.status_code, r.json()["inferenceId"]) for r in retries] == [(200, job_id)] * 4
    assert _uploads(svc) - before <= {f"{job_id}.wav"}
    done = _wait_status(svc, job_id)
    assert done["status"] == "SUCCESS"
    assert _calls(svc).count(job_id) == 1  # run once
    # A retry after the end answers the finished job.
    late = _post(svc, {"modelId": "voice-slow"}, wav_bytes(), headers={"Idempotency-Key": key}).json()
    assert late["inferenceId"] == job_id and late["status"] == "SUCCESS" and late["inferenceUrl"]
    assert not _uploads(svc) - before
    # Keys are per API key: another tenant's same key is its own job.
    other = _post(svc, {"modelId": "voice-a"}, wav_bytes(), key=KEY_B, headers={"Idempotency-Key": key}).json()
    assert other["inferenceId"] != job_id
    # Without a key every create is a new job.
    ids = {_post(svc, {"modelId": "voice-a"}, wav_bytes()).json()["inferenceId"] for _ in range(2)}
    assert len(ids) == 2


@pytest.mark.parametrize("value", ["has space", "x" * 256, "ünïcode"])
def test_malformed_idempotency_key_is_422(svc, value):
    response = _post(svc, {"modelId": "voice-a"}, wav_bytes(), headers={"Idempotency-Key": value.encode()})
    assert response.status_code == 422
    pattern = "^[!-~]{1,255}$"
    assert response.json() == {"detail": [{"loc": ["header", "Idempotency-Key"],
                                           "msg": f'string does not match regex "{pattern}"',
                                           "type": "value_error.str.regex", "ctx": {"pattern": pattern}}]}


def _cancel(svc, inference_id: str, key: str | None = KEY_A) -> httpx.Response:
    return svc.client.delete(f"/v1/inferences-vc/{inference_id}", headers={"x-api-key": key} if key else {})


def _cancelled(svc) -> list[str]:
    log = svc.data / "cancelled.log"
    return log.read_text().split() if log.exists() else []


def test_cancel_running_job(svc):
    job = _post(svc, {"modelId": "voice-slow"}, wav_bytes()).json()
    job_id = job["inferenceId"]
    wait_for(lambda: job_id in _calls(svc), 20)  # its conversion is under way
    for response in (_cancel(svc, job_id, key=None), _cancel(svc, job_id, key="wrong")):
        assert response.status_code == 403 and response.json() == FORBIDDEN
    for response in (_cancel(svc, job_id, key=KEY_B), _cancel(svc, "0" * 32), _cancel(svc, "..%2F..%2Fjobs.sqlite3")):
        assert response.status_code == 404 and response.json() == {"message": "Not found"}

    response = _cancel(svc, job_id)
    assert response.status_code == 200 and _rate_headers(response)
    cancelled = response.json()
    assert set(cancelled) == JOB_KEYS | {"error"}
    assert (cancelled["status"], cancelled["error"], cancelled["inferenceUrl"]) == ("FAILED", "cancelled", None)
    assert TIMESTAMP.fullmatch(cancelled["jobEndTime"])
    assert _job(svc, job_id).json() == cancelled
    wait_for(lambda: job_id in _cancelled(svc), 20)  # the conversion call itself was cancelled
    assert not (svc.data / "uploads" / f"{job_id}.wav").exists()
    # Past the moment its conversion would have written the output: nothing appeared.
    time.sleep(3.5)
    assert not (svc.data / "results" / job_id).exists()
    assert _job(svc, job_id).json() == cancelled
    # Cancelling again changes nothing and says so.
    assert _cancel(svc, job_id).json() == cancelled
    assert _calls(svc).count(job_id) == 1


def test_cancel_of_a_finished_job_leaves_it_as_it_was(svc):
    job_id = _post(svc, {"modelId": "voice-a"}, wav_bytes()).json()["inferenceId"]
    done = _wait_status(svc, job_id)
    response = _cancel(svc, job_id)
    assert response.status_code == 200
    after = response.json()
    assert after["status"] == "SUCCESS" and after["jobEndTime"] == done["jobEndTime"]
    assert httpx.get(after["inferenceUrl"], timeout=30).status_code == 200


def _held_poll(svc, inference_id: str, prefer: str, key: str = KEY_A) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = svc.client.get(f"/v1/inferences-vc/{inference_id}", headers={"x-api-key": key, "Prefer": prefer})
    return response, time.monotonic() - started


def test_held_poll_answers_at_the_jobs_end(svc):
    job_id = _post(svc, {"modelId": "voice-slow"}, wav_bytes()).json()["inferenceId"]  # converts for 3 s
    # Another key learns nothing, not even when the job ends: refused at once.
    response, seconds = _held_poll(svc, job_id, "wait=10", key=KEY_B)
    assert response.status_code == 404 and seconds < 2 and "preference-applied" not in response.headers
    response, seconds = _held_poll(svc, job_id, "respond-async, wait=10")
    assert response.status_code == 200 and _rate_headers(response)
    assert response.headers["preference-applied"] == "wait=10"
    assert response.json()["status"] == "SUCCESS" and seconds < 8  # at the job's end, not after 10 s
    held, plain = response.json(), _job(svc, job_id).json()
    # Each answer signs its link afresh: its expiry may fall a second later.
    assert urlsplit(held.pop("inferenceUrl")).path == urlsplit(plain.pop("inferenceUrl")).path
    assert held == plain
    # Finished: answered at once. A malformed preference is ignored (a plain poll), never a 422.
    for prefer in ("wait=10", "wait=soon", "wait=0"):
        response, seconds = _held_poll(svc, job_id, prefer)
        assert response.status_code == 200 and response.json()["status"] == "SUCCESS" and seconds < 2
        assert ("preference-applied" in response.headers) == (prefer == "wait=10")
    metrics = svc.client.get("/metrics").text
    assert 'route="/v1/inferences-vc/{inferenceId} (held)"' in metrics  # held time kept apart


def test_a_held_poll_given_up_by_its_client_leaves_the_job_running(svc):
    job_id = _post(svc, {"modelId": "voice-slow"}, wav_bytes()).json()["inferenceId"]  # converts for 3 s
    with pytest.raises(httpx.ReadTimeout):  # the client hangs up while its poll is held
        svc.client.get(f"/v1/inferences-vc/{job_id}", headers={"x-api-key": KEY_A, "Prefer": "wait=10"},
                       timeout=0.5)
    done = _wait_status(svc, job_id)
    assert done["status"] == "SUCCESS" and _calls(svc).count(job_id) == 1


def test_held_polls_are_capped_and_give_up_after_their_wait(svc):
    job_id = _post(svc, {"modelId": "voice-hang"}, wav_bytes()).json()["inferenceId"]
    slots = svc.settings.stages.ingress.max_ongoing_requests // 2
    # One poll more than the replica holds at once: that one is answered at once, as a plain poll.
    with ThreadPoolExecutor(slots + 1) as pool:
        polls = list(pool.map(lambda _: _held_poll(svc, job_id, "wait=3"), range(slots + 1)))
    assert all(r.status_code == 200 and r.json()["status"] == "RUNNING" for r, _ in polls)
    held = [seconds for r, seconds in polls if r.headers.get("preference-applied") == "wait=3"]
    plain = [seconds for r, seconds in polls if "preference-applied" not in r.headers]
    assert len(held) == slots and len(plain) == 1
    assert min(held) >= 2.9 and plain[0] < 2.5  # the held ones gave up after their 3 s
    # An ask beyond the cap is held for the cap.
    assert _held_poll(svc, job_id, "wait=3600")[0].headers["preference-applied"] == "wait=10"
    assert _cancel(svc, job_id).json()["status"] == "FAILED"


@pytest.fixture(scope="module")
def forgetful(tmp_path_factory, serve_url):
    yield from _app(tmp_path_factory, serve_url, "forgetful", retention_s=3, retention_interval_s=0.5)


def test_retention_prunes_jobs_results_and_leftover_uploads(forgetful):
    leftover = forgetful.data / "uploads" / "0123456789abcdef.wav"  # an ingress died before handing it over
    leftover.write_bytes(wav_bytes())
    job_id = _post(forgetful, {"modelId": "voice-a"}, wav_bytes()).json()["inferenceId"]
    url = _wait_status(forgetful, job_id)["inferenceUrl"]
    wait_for(lambda: _job(forgetful, job_id).status_code == 404, 30)
    assert _job(forgetful, job_id).json() == {"message": "Not found"}
    assert not (forgetful.data / "results" / job_id).exists() and not leftover.exists()
    download = httpx.get(url, timeout=30)
    assert download.status_code == 404 and download.json() == {"message": "Not found"}


# --- models, operations ------------------------------------------------------------------------

def test_models_pagination(svc):
    headers = {"x-api-key": KEY_A}
    body = svc.client.get("/v1/models-vc", params={"perPage": 2, "page": 3}, headers=headers).json()
    assert [m["modelId"] for m in body["data"]] == ["voice-slow"]
    assert body["data"][0] == {"modelId": "voice-slow", "name": "voice-slow", "version": "v2", "sampleRate": 40000,
                               "f0": True, "hasIndex": False, "createdAt": "2024-01-01 00:00:00.000000 +00:00"}
    meta = body["meta"]
    assert (meta["total"], meta["perPage"], meta["currentPage"], meta["lastPage"], meta["firstPage"]) == (5, 2, 3, 3, 1)
    assert meta["nextPageUrl"] is None
    assert meta["previousPageUrl"] == f"{svc.base}/v1/models-vc?page=2&perPage=2"
    assert meta["firstPageUrl"] == f"{svc.base}/v1/models-vc?page=1&perPage=2"
    first = svc.client.get("/v1/models-vc", headers=headers).json()
    assert first["meta"]["perPage"] == 20 and len(first["data"]) == 5 and first["meta"]["previousPageUrl"] is None
    for query, loc, kind in (({"page": "0"}, "page", "value_error.number.not_ge"),
                             ({"perPage": "101"}, "perPage", "value_error.number.not_le"),
                             ({"perPage": "ten"}, "perPage", "type_error.integer")):
        response = svc.client.get("/v1/models-vc", params=query, headers=headers)
        assert response.status_code == 422
        (entry,) = response.json()["detail"]
        assert entry["loc"] == ["query", loc] and entry["type"] == kind


def test_operational_routes(svc):
    assert svc.client.get("/healthz").json() == {"status": "ok"}
    ready = svc.client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "voices": len(VOICES)}
    job = _post(svc, {"modelId": "voice-a"}, wav_bytes()).json()  # something to count
    _wait_status(svc, job["inferenceId"])
    metrics = svc.client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert re.search(r'rvc_http_requests_total\{code="200",method="POST",route="/v1/inferences-vc"\} [1-9]', text)
    for name in ("rvc_http_request_duration_seconds_bucket", "rvc_jobs_finished_total", "rvc_jobs_queued",
                 "rvc_job_duration_seconds_bucket", 'rvc_stage_latency_seconds_count{stage="synthesis"}',
                 'rvc_voice_cache_events_total{event="hit"}'):
        assert name in text, name
    converted = float(re.search(r"^rvc_audio_seconds_converted_total (\S+)$", text, re.M).group(1))
    assert converted >= 0.5  # this job's 0.5 s at least
    doc = svc.client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.") and set(doc["paths"]) == {
        "/v1/inferences-vc", "/v1/inferences-vc/{inferenceId}", "/v1/models-vc", "/results/{inferenceId}/{name}",
        "/healthz", "/readyz", "/metrics", "/openapi.json"}


# --- rate limit across two ingress replicas -----------------------------------------------------

@pytest.fixture(scope="module")
def limited(tmp_path_factory, serve_url):
    two = {**TEST_STAGES["ingress"], "min_replicas": 2, "max_replicas": 2}
    yield from _app(tmp_path_factory, serve_url, "rl", rate_limit_per_minute=5, stages={"ingress": two})


def test_rate_limit_is_shared_by_ingress_replicas(limited):
    from ray import serve

    ingress = serve.status().applications[limited.name].deployments["Ingress"]
    assert ingress.replica_states.get("RUNNING") == 2

    def call(_):
        return limited.client.get("/v1/models-vc", headers={"x-api-key": KEY_A})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(12)))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) == 5 and len(refused) == 7
    assert sorted(int(r.headers["x-ratelimit-remaining"]) for r in ok) == [0, 1, 2, 3, 4]
    for r in refused:
        assert r.json() == {"error": "Rate limit exceeded."}
        assert 1 <= int(r.headers["retry-after"]) <= 60 and r.headers["x-ratelimit-remaining"] == "0"
        assert r.headers["x-ratelimit-limit"] == "5" and int(r.headers["x-ratelimit-reset"]) > time.time()
    # 429 comes before the size check; another key has its own budget.
    status, headers, _ = _raw_post(limited.base, "/v1/inferences-vc", {
        "x-api-key": KEY_A, "Content-Length": str(MAX_FILE_BYTES * 2), "Content-Type": "multipart/form-data; b=x"})
    assert status == 429 and "retry-after" in headers
    other = limited.client.get("/v1/models-vc", headers={"x-api-key": KEY_B})
    assert other.status_code == 200 and other.headers["x-ratelimit-remaining"] == "4"


def test_every_scrape_counts_the_requests_of_both_ingress_replicas(limited):
    """A scrape reaches one of the two replicas; whichever it is, it counts what both answered."""
    from deployments.ingress import HTTP_FLUSH_S

    def healthz_count() -> float:
        metrics = limited.client.get("/metrics").text
        found = re.search(r'^rvc_http_requests_total\{code="200",method="GET",route="/healthz"\} (\S+)$', metrics, re.M)
        return float(found.group(1)) if found else 0.0

    time.sleep(HTTP_FLUSH_S + 0.5)  # earlier requests (the readiness checks) are all flushed
    before = healthz_count()
    with ThreadPoolExecutor(8) as pool:  # concurrent, so the proxy spreads them over both replicas
        assert all(r.status_code == 200 for r in pool.map(lambda _: limited.client.get("/healthz"), range(40)))
    time.sleep(HTTP_FLUSH_S + 0.5)
    assert [healthz_count() - before for _ in range(6)] == [40.0] * 6


def test_model_stage_batches_run_at_most_max_concurrent_batches_at_once(serve_url):
    """A stage's batch method, as its replicas build it from the settings: 6 calls, batches of 2;
    one batch at a time by default, two at once with max_concurrent_batches 2."""
    import asyncio

    from ray import serve

    from deployments.settings import StageSettings
    from deployments.stages import _batched

    @serve.deployment(max_ongoing_requests=8)
    class Stage:
        def __init__(self, concurrent: int) -> None:
            self.running = self.peak = 0
            self.sizes: list[int] = []
            self.double = _batched(self._double_batch, StageSettings(
                max_batch_size=2, max_concurrent_batches=concurrent, max_ongoing_requests=8,
                batch_wait_timeout_s=0.05))

        async def _double_batch(self, xs: list[int]) -> list[int]:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.sizes.append(len(xs))
            await asyncio.sleep(0.3)
            self.running -= 1
            return [2 * x for x in xs]

        async def __call__(self, x: int) -> int:
            return await self.double(x)

        def seen(self) -> tuple[int, list[int]]:
            return self.peak, self.sizes

    for concurrent in (1, 2):
        name = f"batches{concurrent}"
        handle = serve.run(Stage.bind(concurrent), name=name, route_prefix=None)
        try:
            assert [r.result(timeout_s=60) for r in [handle.remote(i) for i in range(6)]] == [0, 2, 4, 6, 8, 10]
            peak, sizes = handle.seen.remote().result(timeout_s=30)
            assert peak == concurrent and max(sizes) <= 2 and sum(sizes) == 6
        finally:
            serve.delete(name)


@pytest.mark.parametrize("cpus", [1, 2])
def test_host_pitch_runs_as_many_inputs_at_once_as_it_has_cpus(tmp_path, serve_url, cpus):
    """Three harvests sent at once to a HostPitch replica (the settings' num_cpus; the test actor
    reserves none): with 1 CPU their runs never overlap (their compute times add up to at most
    the wall time of all three), with 2 two run together (more than the wall time, at most twice)."""
    pytest.importorskip("pyworld")
    import numpy as np
    from ray import serve

    from deployments.stages import HostPitch

    settings = AppSettings(data_dir=tmp_path, stages={"host_pitch": {**TEST_STAGES["host_pitch"], "num_cpus": cpus}})
    name = f"hostpitch{cpus}"
    handle = serve.run(HostPitch.options(max_ongoing_requests=4, ray_actor_options={"num_cpus": 0}).bind(settings),
                       name=name, route_prefix=None)
    try:
        audio = np.random.default_rng(0).standard_normal(24000).astype(np.float32) * 0.1
        started = time.perf_counter()
        calls = [handle.estimate.remote(audio, len(audio) // 160, "harvest") for _ in range(3)]
        runs = [call.result(timeout_s=120)[1] for call in calls]
        wall = time.perf_counter() - started
        busy = sum(run.seconds for run in runs)
        if cpus == 1:
            assert busy <= wall, (busy, wall)
        else:
            assert wall < busy <= 2 * wall, (busy, wall)
    finally:
        serve.delete(name)


def test_long_inputs_take_turns_within_the_audio_budget(tmp_path_factory, serve_url):
    """Two seconds of audio in flight at most: of three 1.5 s jobs one converts at a time (the
    others queue in the job actor), whatever max_concurrent_jobs allows."""
    app = _app(tmp_path_factory, serve_url, "audiobudget", max_concurrent_jobs=4, max_concurrent_audio_s=2.0)
    svc = next(app)
    try:
        jobs = [_post(svc, {"modelId": "voice-slow"}, wav_bytes(seconds=1.5)).json()["inferenceId"] for _ in range(3)]
        wait_for(lambda: len(_calls(svc)) >= 2, 30)
        time.sleep(1.0)  # a second job allowed to start would have started by now
        assert len(_calls(svc)) == 2  # id and model of the one job converting
        metrics = svc.client.get("/metrics").text
        assert re.search(r"^rvc_audio_seconds_in_progress 1\.5$", metrics, re.M)
        assert re.search(r"^rvc_jobs_queued 2\.0$", metrics, re.M)
        for job in jobs:
            svc.client.delete(f"/v1/inferences-vc/{job}", headers={"x-api-key": KEY_A})
        wait_for(lambda: all(svc.client.get(f"/v1/inferences-vc/{job}", headers={"x-api-key": KEY_A})
                             .json()["status"] == "FAILED" for job in jobs), 30)
    finally:
        next(app, None)
