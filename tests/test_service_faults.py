"""Faults on a real local Ray Serve, and what must hold after each one: every accepted job ends
SUCCESS or FAILED with a one-line reason, within its timeout; a result URL only ever serves a
whole file; no upload, partial file or result of a failed job is left behind.

The conversion is the stand-in (tests/fake_conversion.py), whose voice picks the outcome;
tests/test_service_e2e.py kills a synthesis replica under the real stages.
"""
from __future__ import annotations

import asyncio
import http.client
import io
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
import soundfile as sf

from rvc_client.files import PARTIAL_MARK
from tests.fake_conversion import TONE_SECONDS
from tests.service_support import run_app, serve_url, wait_for, wav_bytes  # noqa: F401
from tests.test_service_api import KEY_A, _app, _calls, _job, _post

JOB_TIMEOUT_S = 12  # a `-slow` job takes 3 s, unless something is wrong
# A voice's outcome: SUCCESS, or FAILED with this error.
OUTCOMES = {"voice-a": None, "voice-slow": None, "voice-fail": "synthetic failure: the input could not be converted",
            "voice-hang": f"timed out after {JOB_TIMEOUT_S} s"}


def _accept(app, voices: list[str]) -> dict[str, str]:
    """Create one job per voice (concurrently); {inference id: voice}."""
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda voice: _post(app, {"modelId": voice}, wav_bytes()), voices))
    assert [r.status_code for r in responses] == [200] * len(voices), [r.text for r in responses]
    return {r.json()["inferenceId"]: voice for r, voice in zip(responses, voices)}


def _settle(app, ids, timeout_s: float) -> dict[str, dict]:
    """Every job's final view, once none is RUNNING (fails after `timeout_s`); a SUCCESS view
    carries what its URL served when first seen (`served`: retention may delete it later)."""
    ended: dict[str, dict] = {}

    def all_ended() -> bool:
        for inference_id in set(ids) - set(ended):
            body = _job(app, inference_id).json()
            if body["status"] == "SUCCESS":
                body["served"] = httpx.get(body["inferenceUrl"], timeout=30)
            if body["status"] != "RUNNING":
                ended[inference_id] = body
        return len(ended) == len(ids)

    wait_for(all_ended, timeout_s, interval_s=0.5)
    return ended


def _whole_tone(data: bytes) -> bool:
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    return abs(audio.shape[0] / rate - TONE_SECONDS) < 0.06


def _assert_ended_cleanly(app, ended: dict[str, dict], expected: dict[str, str | None]) -> None:
    """Each job ended as `expected` (its error; None: SUCCESS): SUCCESS with a whole result
    behind its URL, or FAILED with that one-line error and no result. No job's upload or
    partial file is left."""
    results, uploads = app.data / "results", app.data / "uploads"
    for inference_id, body in ended.items():
        error = expected[inference_id]
        assert (body["status"], body.get("error")) == (("SUCCESS", None) if error is None else ("FAILED", error)), body
        if body["status"] == "SUCCESS":
            assert body["served"].status_code == 200 and _whole_tone(body["served"].content)
        else:
            assert "\n" not in body["error"] and not (results / inference_id).exists()
        assert not list(uploads.glob(f"{inference_id}.*"))
    assert not [p for p in results.rglob("*") if PARTIAL_MARK in p.name]


def _asgi_get(response, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        raise AssertionError("not read under ASGI 2.4")

    scope = {"type": "http", "method": "GET", "headers": headers, "asgi": {"spec_version": "2.4"}}
    asyncio.run(response(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_a_result_deleted_as_its_url_answers_is_still_served_whole(tmp_path):
    from deployments.ingress import result_response

    data = os.urandom(300_000)
    path = tmp_path / "output.mp3"
    fds = len(os.listdir("/proc/self/fd"))
    for headers, expected in (([], data), ([(b"range", b"bytes=1000-1999")], data[1000:2000])):
        path.write_bytes(data)
        response = result_response(path, "job")
        path.unlink()  # retention or a failed job's cleanup, between the answer and its body
        status, sent_headers, body = _asgi_get(response, headers)
        assert status in (200, 206) and body == expected and int(sent_headers[b"content-length"]) == len(expected)
    assert len(os.listdir("/proc/self/fd")) == fds  # each response closed its file
    assert result_response(path, "job") is None


@pytest.fixture(scope="module")
def faults(tmp_path_factory, serve_url):
    yield from _app(tmp_path_factory, serve_url, "faults", rate_limit_per_minute=10000, job_timeout_s=JOB_TIMEOUT_S,
                    job_timeout_per_audio_s=0)


def test_job_actor_killed_with_20_jobs_in_flight(faults):
    import ray

    from deployments.jobs import NAMESPACE, tracker_name

    voices = ["voice-slow"] * 12 + ["voice-a"] * 4 + ["voice-hang"] * 2 + ["voice-fail"] * 2
    jobs = _accept(faults, voices)
    wait_for(lambda: len(set(_calls(faults)) & set(jobs)) >= 4, 20)
    ray.kill(ray.get_actor(tracker_name(faults.name), namespace=NAMESPACE), no_restart=False)
    # 20 jobs, 4 at a time, the slowest a timeout: well within this after the restart.
    ended = _settle(faults, jobs, timeout_s=20 * JOB_TIMEOUT_S)
    _assert_ended_cleanly(faults, ended, {i: OUTCOMES[voice] for i, voice in jobs.items()})


@pytest.fixture
def full_results(faults):
    """The results directory on a tmpfs of its own, to be filled up (needs root: mount)."""
    results = faults.data / "results"
    results.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(results)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield results
    subprocess.run(["umount", "--lazy", str(results)], check=True)


def _fill(directory, leave_bytes: int):
    import shutil

    filler = directory / "filler"
    filler.unlink(missing_ok=True)
    filler.write_bytes(b"\0" * (shutil.disk_usage(directory).free - leave_bytes))
    return filler


def test_result_store_disk_full(faults, full_results):
    filler = _fill(full_results, 0)
    full = _accept(faults, ["voice-a"] * 3)
    # Room for the MP3 (one 4 KiB page) but not the FLAC: the MP3 must not outlive the failure.
    _fill(full_results, 4096)
    half = _accept(faults, ["voice-a"] * 2)
    ended = _settle(faults, [*full, *half], timeout_s=10 * JOB_TIMEOUT_S)
    _assert_ended_cleanly(faults, ended, {i: "no space left in the result store" for i in [*full, *half]})
    filler.unlink()
    after = _accept(faults, ["voice-a"] * 2)
    _assert_ended_cleanly(faults, _settle(faults, after, timeout_s=10 * JOB_TIMEOUT_S), dict.fromkeys(after))


@pytest.fixture(scope="module")
def restarts(tmp_path_factory, serve_url):
    """An app with a job timeout longer than its restarts take, pruning every half second."""
    yield from _app(tmp_path_factory, serve_url, "faults-restarts", rate_limit_per_minute=10000,
                    job_timeout_s=120, retention_interval_s=0.5)


def test_whole_application_restarted_on_the_same_data_dir(restarts):
    """`serve.delete` and a new `serve.run` while jobs run: the job actor (detached) outlives
    the application and finishes every job on the new replicas."""
    from ray import serve

    from deployments.app import ingress_app
    from tests.fake_conversion import FakeConversion

    voices = ["voice-slow"] * 6 + ["voice-a"] * 2 + ["voice-fail"]
    jobs = _accept(restarts, voices)
    wait_for(lambda: len(set(_calls(restarts)) & set(jobs)) >= 4, 20)
    serve.delete(restarts.name)
    run_app(ingress_app(restarts.settings, FakeConversion.options(ray_actor_options={"num_cpus": 0})
                        .bind(restarts.settings)), restarts.name)
    ended = _settle(restarts, jobs, timeout_s=120)
    _assert_ended_cleanly(restarts, ended, {i: OUTCOMES[voice] for i, voice in jobs.items()})


def _replica(app, deployment: str):
    import ray

    (replica,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app.name}#{deployment}")]
    return ray.get_actor(replica["name"], namespace=replica["namespace"])


def _is_dead(actor) -> bool:
    import ray

    try:
        ray.get(actor.__ray_ready__.remote(), timeout=2)
    except ray.exceptions.RayActorError:
        return True
    except ray.exceptions.GetTimeoutError:
        pass
    return False


def test_ingress_replica_killed_during_an_upload(restarts):
    import ray

    calls = len(_calls(restarts))
    audio = wav_bytes(seconds=4.0)
    boundary = "faults-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audioInfer\"; filename=\"in.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode()
    body = head + audio + f"\r\n--{boundary}--\r\n".encode()
    url = urlsplit(restarts.base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.putrequest("POST", f"{url.path}/v1/inferences-vc?modelId=voice-a")
    for name, value in {"x-api-key": KEY_A, "Content-Type": f"multipart/form-data; boundary={boundary}",
                        "Content-Length": str(len(body))}.items():
        conn.putheader(name, value)
    conn.endheaders()
    half = len(head) + len(audio) // 2
    conn.send(body[:half])
    uploads = restarts.data / "uploads"
    (partial,) = wait_for(lambda: [p for p in uploads.iterdir() if p.name.startswith(".upload-")
                                   and p.stat().st_size], 20)
    replica = _replica(restarts, "Ingress")
    ray.kill(replica, no_restart=True)
    wait_for(lambda: _is_dead(replica), 20)  # the kill is asynchronous: the rest must reach no one
    try:
        conn.send(body[half:])
        status = conn.getresponse().status
    except (ConnectionError, http.client.HTTPException):
        status = None  # the connection went with the replica
    finally:
        conn.close()
    assert status is None or status >= 500
    # A new replica takes the next upload.
    job = wait_for(lambda: (r := _post(restarts, {"modelId": "voice-a"}, wav_bytes())).status_code == 200 and r.json(),
                   60, interval_s=1)
    ended = _settle(restarts, [job["inferenceId"]], timeout_s=30)
    _assert_ended_cleanly(restarts, ended, {job["inferenceId"]: None})
    # Left for retention: gone once as old as retention_s (here: made that old). (The job's own
    # upload goes just after its end is recorded.)
    wait_for(lambda: list(uploads.iterdir()) == [partial], 10)
    old = time.time() - restarts.settings.retention_s - 1
    os.utime(partial, (old, old))
    wait_for(lambda: not partial.exists(), 30)
    assert _calls(restarts)[calls:] == [job["inferenceId"], "voice-a"]  # the cut upload never became a job
