"""The threat model's claims (docs/security.md) as tests: private files, no secrets in metrics
or logs, signed URLs bound to one path and one expiry, no traversal through any id."""
from __future__ import annotations

import asyncio
import stat
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from deployments import uploads
from deployments.results import LocalResultStore, signature, signed_url
from deployments.settings import URL_SECRET_FILE, hash_key
from tests.service_support import serve_url, wait_for, wav_bytes  # noqa: F401
from tests.test_service_api import KEY_A, KEY_B, _app, _job, _post

FORBIDDEN = {"message": "Forbidden"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_upload_files_are_private_while_and_after_being_written(tmp_path):
    seen: list[int] = []

    async def body():
        yield b'--XyZ\r\nContent-Disposition: form-data; name="audioInfer"; filename="a.wav"\r\n\r\n'
        yield b"\0" * 1000
        # Mid-upload: the partial file exists, readable by the service user only.
        (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith(".upload-")]
        seen.append(_mode(partial))
        yield b"\r\n--XyZ--\r\n"

    upload = asyncio.run(uploads.receive_upload("multipart/form-data; boundary=XyZ", body(), tmp_path))
    assert seen == [0o600] and _mode(upload.path) == 0o600


def test_result_files_are_private(tmp_path):
    store = LocalResultStore(tmp_path)
    with store.writer("job1/output.mp3") as path:
        path.write_bytes(b"ID3")
    assert _mode(tmp_path / "job1" / "output.mp3") == 0o600


@pytest.fixture(scope="module")
def sec(tmp_path_factory, serve_url):
    yield from _app(tmp_path_factory, serve_url, "sec", rate_limit_per_minute=1000)


def _done(sec, key: str = KEY_A) -> dict:
    job_id = _post(sec, {"modelId": "voice-a"}, wav_bytes(), key=key).json()["inferenceId"]
    return wait_for(lambda: (body := _job(sec, job_id, key=key).json())["status"] != "RUNNING" and body, 30)


def test_uploads_directory_is_private(sec):
    assert _mode(sec.data / "uploads") == 0o700


def test_metrics_and_logs_carry_no_keys_or_job_ids(sec):
    import ray

    wrong_key = f"wrong-key-{uuid.uuid4()}"
    ids = [_done(sec, KEY_A)["inferenceId"], _done(sec, KEY_B)["inferenceId"]]
    assert _post(sec, {"modelId": "voice-a"}, wav_bytes(), key=wrong_key).status_code == 403
    assert sec.client.get(f"/v1/inferences-vc/{ids[0]}", headers={"x-api-key": KEY_B}).status_code == 404
    metrics = sec.client.get("/metrics").text
    assert "rvc_http_requests_total" in metrics and "rvc_jobs_finished_total" in metrics
    for secret in (KEY_A, KEY_B, wrong_key, hash_key(KEY_A), hash_key(KEY_A)[:12], hash_key(KEY_B)[:12], *ids):
        assert secret not in metrics
    # No process of this Ray session wrote an API key to its logs (the job lines carry ids).
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    texts = [p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 50 << 20]
    assert any(ids[0] in text for text in texts)  # the logs were found and are complete
    for secret in (KEY_A, KEY_B, wrong_key):
        assert not [t for t in texts if secret in t]


def test_signed_url_is_bound_to_its_path_and_expiry(sec):
    first, second = _done(sec), _done(sec)
    url = urlsplit(first["inferenceUrl"])
    query = parse_qs(url.query)
    expires, sig = query["expires"][0], query["signature"][0]
    # The first job's signature opens the first job's file only.
    assert sec.client.get(url.path[len(f"/{sec.name}"):], params=query).status_code == 200
    for path in (f"/results/{second['inferenceId']}/output.mp3", f"/results/{first['inferenceId']}/output.flac"):
        response = sec.client.get(path, params={"expires": expires, "signature": sig})
        assert (response.status_code, response.json()) == (403, FORBIDDEN), path
    # Expiries that are not plain ASCII digits are refused, never a 5xx.
    for bad in ("²", "9" * 5000, "-1", "1e10", ""):
        response = sec.client.get(url.path[len(f"/{sec.name}"):], params={"expires": bad, "signature": sig})
        assert (response.status_code, response.json()) == (403, FORBIDDEN), bad


def test_replay_after_expiry_is_refused(sec):
    job = _done(sec)
    secret = (sec.data / URL_SECRET_FILE).read_text().strip().encode()
    key = f"{job['inferenceId']}/output.mp3"
    short_lived = signed_url(secret, sec.base, key, time.time(), lifetime_s=2)
    assert httpx.get(short_lived, timeout=30).status_code == 200
    expires = int(parse_qs(urlsplit(short_lived).query)["expires"][0])
    wait_for(lambda: time.time() > expires + 0.5, 10)
    replay = httpx.get(short_lived, timeout=30)
    assert (replay.status_code, replay.json()) == (403, FORBIDDEN)
    # Re-signing needs the server's secret: a signature made with another one is refused.
    forged = signature(b"guessed-secret", key, expires + 3600)
    response = sec.client.get(f"/results/{key}", params={"expires": expires + 3600, "signature": forged})
    assert (response.status_code, response.json()) == (403, FORBIDDEN)


def test_no_traversal_through_any_id(sec):
    keys_file = (sec.data / "keys.txt").read_text()
    job = _done(sec)
    headers = {"x-api-key": KEY_A}
    for inference_id in ("..%2F..%2Fkeys.txt", "..%2Fjobs.sqlite3", "%00", job["inferenceId"] + "%2F.."):
        for response in (sec.client.get(f"/v1/inferences-vc/{inference_id}", headers=headers),
                         sec.client.delete(f"/v1/inferences-vc/{inference_id}", headers=headers)):
            assert (response.status_code, response.json()) == (404, {"message": "Not found"}), inference_id
    future = int(time.time()) + 60
    secret = (sec.data / URL_SECRET_FILE).read_text().strip().encode()
    for key in ("..%2Fkeys.txt", f"{job['inferenceId']}/..%2F..%2Fkeys.txt", "..%2F../keys.txt",
                f"{job['inferenceId']}/.output.mp3", f"{job['inferenceId']}/%2E%2E"):
        # Even correctly signed (as if the secret leaked), a key outside the result tree is refused.
        response = sec.client.get(f"/results/{key}", params={"expires": future,
                                                             "signature": signature(secret, key, future)})
        assert response.status_code in (403, 404) and keys_file not in response.text, key
    assert _job(sec, job["inferenceId"]).json()["status"] == "SUCCESS"
