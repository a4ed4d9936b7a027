"""rvc_client against a scripted API (httpx.MockTransport) and a server that never answers."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import rvc_client.client as client_module
from deployments.params import CREATE_PARAMS
from rvc_client import (FAILED, RUNNING, SUCCESS, Client, InvalidFile, JobFailed, NotFound, PayloadTooLarge,
                        RateLimited, RequestTimeout, Unreachable, ValidationError, WaitTimeout, query_name)

KEY = "client-key-0123456789"
BASE = "http://rvc.test"
STARTED = "2024-01-01 20:15:50.428000 +00:00"
ENDED = "2024-01-01 20:16:02.000001 +00:00"
RESULT_URL = "http://results.test/results/job1/output.mp3?expires=1&signature=ab"


def job_json(status: str = RUNNING, **extra) -> dict:
    body = {"inferenceId": "job1", "modelId": "demo", "status": status, "type": "VC", "inferenceUrl": None,
            "jobStartTime": STARTED, "jobEndTime": None if status == RUNNING else ENDED}
    return {**body, **extra}


class Sleeps(list):
    """The client's sleeps, recorded instead of slept; its clock advances by them (and by
    `advance`, the time a scripted response takes)."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = 1000.0

    def sleep(self, seconds: float) -> None:
        self.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.clock += seconds


@pytest.fixture
def sleeps(monkeypatch) -> Sleeps:
    slept = Sleeps()
    monkeypatch.setattr(client_module, "sleep", slept.sleep)
    monkeypatch.setattr(client_module, "monotonic", lambda: slept.clock)
    return slept


def scripted(*responses, seen: list | None = None) -> Client:
    """A client whose requests get `responses` in order (a callable is called with the request)."""
    queue = list(responses)

    def handle(request: httpx.Request) -> httpx.Response:
        request.read()
        if seen is not None:
            seen.append(request)
        response = queue.pop(0)
        return response(request) if callable(response) else response

    return Client(BASE, KEY, transport=httpx.MockTransport(handle))


def test_importing_the_client_and_batch_needs_neither_ray_nor_torch():
    code = ("import sys\n"
            "sys.modules['ray'] = sys.modules['torch'] = None  # any import of them now fails\n"
            "import rvc_client, deployments.batch\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch') and sys.modules[m]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_query_names_are_the_apis():
    for param in CREATE_PARAMS:
        assert query_name(param.field) == param.name
        assert query_name(param.name) == param.name


def test_submit_wait_download(tmp_path, sleeps):
    audio = tmp_path / "in.wav"
    audio.write_bytes(b"RIFF....WAVE" + bytes(range(256)) * 40)
    seen: list[httpx.Request] = []
    api = scripted(httpx.Response(200, json=job_json()), httpx.Response(200, json=job_json()),
                   httpx.Response(200, json=job_json()),
                   httpx.Response(200, json=job_json(SUCCESS, inferenceUrl=RESULT_URL)),
                   httpx.Response(200, content=b"ID3-the-mp3-bytes"), seen=seen)
    job = api.submit(audio, "demo", index_rate=0.5, f0_up_key=2, protect=0.2)
    assert (job.inference_id, job.status, job.type, job.inference_url) == ("job1", RUNNING, "VC", None)
    assert job.job_start_time.isoformat() == "2024-01-01T20:15:50.428000+00:00" and job.job_end_time is None
    post = seen[0]
    assert post.method == "POST" and post.url.path == "/v1/inferences-vc"
    assert dict(post.url.params) == {"modelId": "demo", "indexRate": "0.5", "f0UpKey": "2", "protect": "0.2"}
    assert post.headers["x-api-key"] == KEY
    assert b'name="audioInfer"; filename="in.wav"' in post.content and audio.read_bytes() in post.content

    done = api.wait("job1", timeout_s=60)
    assert done.status == SUCCESS and done.job_end_time.microsecond == 1
    assert sleeps == [0.25, 0.375]  # polled at growing intervals
    out = api.download(done, tmp_path / "sub" / "out.mp3")
    assert out.read_bytes() == b"ID3-the-mp3-bytes"
    download = seen[-1]
    assert str(download.url) == RESULT_URL and "x-api-key" not in download.headers  # signed URL, no key
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["out.mp3"]


def test_wait_asks_for_held_polls_and_does_not_sleep_after_them(sleeps):
    def held(request: httpx.Request) -> httpx.Response:  # the service holds the poll its full wait
        sleeps.advance(int(request.headers["prefer"].removeprefix("wait=")))
        return httpx.Response(200, json=job_json(), headers={"Preference-Applied": request.headers["prefer"]})

    seen: list[httpx.Request] = []
    api = scripted(held, held, httpx.Response(200, json=job_json(SUCCESS, inferenceUrl=RESULT_URL)), seen=seen)
    assert api.wait("job1", timeout_s=25).status == SUCCESS
    assert [r.headers["prefer"] for r in seen] == ["wait=10", "wait=10", "wait=5"]  # never past the deadline
    assert sleeps == []


def test_429_and_503_are_retried_after_retry_after_or_a_backoff(tmp_path, sleeps):
    audio = tmp_path / "in.flac"
    audio.write_bytes(b"fLaC" + b"x" * 5000)
    limited = httpx.Response(429, json={"error": "Rate limit exceeded."},
                             headers={"Retry-After": "7", "X-RateLimit-Remaining": "0"})
    seen: list[httpx.Request] = []
    api = scripted(limited, limited, httpx.Response(503, json={"message": "Service Unavailable"}),
                   httpx.Response(503, text="no healthy upstream"), httpx.Response(200, json=job_json()), seen=seen)
    assert api.submit(audio, "demo").inference_id == "job1"
    # Retry-After when given; else 0.5 s doubling (the backoff keeps growing across responses).
    assert sleeps == [7.0, 7.0, 2.0, 4.0]
    assert all(audio.read_bytes() in r.content for r in seen)  # each attempt sent the whole file

    sleeps.clear()
    api = scripted(*[limited] * 7)
    with pytest.raises(RateLimited) as caught:
        api.get("job1")
    assert caught.value.status_code == 429 and caught.value.body == {"error": "Rate limit exceeded."}
    assert sleeps == [7.0] * 6  # max_retries, then the 429 itself


def test_errors_carry_the_apis_status_and_body(tmp_path, sleeps):
    audio = tmp_path / "in.wav"
    audio.write_bytes(b"data")
    not_found = {"message": "Not found"}
    with pytest.raises(NotFound) as caught:
        scripted(httpx.Response(404, json=not_found)).get("nope")
    assert caught.value.status_code == 404 and caught.value.body == not_found
    assert str(caught.value) == f"404 Not found ({BASE}/v1/inferences-vc/nope)"

    too_large = {"message": "Payload Too Large"}
    with pytest.raises(PayloadTooLarge) as caught:
        scripted(httpx.Response(413, json=too_large)).submit(audio, "demo")
    assert caught.value.status_code == 413 and caught.value.body == too_large

    with pytest.raises(NotFound) as caught:
        scripted(httpx.Response(404, json={"message": "Model not found"})).submit(audio, "ghost")
    assert "Model not found" in str(caught.value)

    detail = {"detail": [{"loc": ["query", "indexRate"], "msg": "ensure this value is less than or equal to 1",
                          "type": "value_error.number.not_le", "ctx": {"limit_value": 1}}]}
    with pytest.raises(ValidationError) as caught:
        scripted(httpx.Response(422, json=detail)).submit(audio, "demo", index_rate=2)
    assert caught.value.body == detail and "query.indexRate: ensure this value" in str(caught.value)

    with pytest.raises(InvalidFile):
        scripted(httpx.Response(402, json={"message": "Invalid file type"})).submit(audio, "demo")
    assert sleeps == []  # none of these is retried


def test_download_refuses_failed_jobs_and_leaves_nothing_on_error(tmp_path):
    failed = scripted(httpx.Response(200, json=job_json(FAILED, error="synthetic failure"))).get("job1")
    assert failed.error == "synthetic failure"
    with pytest.raises(JobFailed, match="synthetic failure"):
        scripted().download(failed, tmp_path / "out.mp3")
    succeeded = scripted(httpx.Response(200, json=job_json(SUCCESS, inferenceUrl=RESULT_URL))).get("job1")
    with pytest.raises(client_module.ApiError) as caught:
        scripted(httpx.Response(403, json={"message": "Forbidden"})).download(succeeded, tmp_path / "out.mp3")
    assert caught.value.status_code == 403 and caught.value.body == {"message": "Forbidden"}
    assert list(tmp_path.iterdir()) == []


def test_wait_gives_up_after_its_timeout(sleeps):
    api = scripted(*[httpx.Response(200, json=job_json())] * 50)
    with pytest.raises(WaitTimeout) as caught:
        api.wait("job1", timeout_s=20, max_poll_s=4)
    assert caught.value.job.status == RUNNING and "after 20 s" in str(caught.value)
    assert sum(sleeps) == pytest.approx(20) and max(sleeps) == 4  # backoff capped, deadline kept


def test_a_server_that_never_answers_is_a_request_timeout():
    with socket.socket() as listener:  # accepts connections (kernel backlog) and never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        api = Client(f"http://127.0.0.1:{listener.getsockname()[1]}", KEY, timeout_s=0.3)
        with pytest.raises(RequestTimeout):
            api.get("job1")


def test_a_closed_port_is_retried_then_unreachable(sleeps):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    with pytest.raises(Unreachable):
        Client(f"http://127.0.0.1:{port}", KEY, max_retries=3).list_models()
    assert sleeps == [0.5, 1.0, 2.0]


def test_list_models_reads_every_page():
    def page(request: httpx.Request) -> httpx.Response:
        n, per = int(request.url.params["page"]), int(request.url.params["perPage"])
        ids = [f"v{i}" for i in range(5)][(n - 1) * per:n * per]
        data = [{"modelId": i, "name": i.upper(), "version": "v2", "sampleRate": 40000, "f0": True,
                 "hasIndex": i == "v0", "createdAt": STARTED} for i in ids]
        return httpx.Response(200, json={"meta": {"lastPage": 3, "currentPage": n}, "data": data})

    models = scripted(page, page, page).list_models(per_page=2)
    assert [m.model_id for m in models] == ["v0", "v1", "v2", "v3", "v4"]
    assert (models[0].has_index, models[1].has_index, models[0].sample_rate, models[0].name) == (True, False, 40000, "V0")

