"""The job store contract on both stores, and the Redis store against a real redis-server:
atomic idempotent creates, prune, its own key prefix, configuration, and a Redis restart (SIGKILL)
with jobs in flight that loses no acknowledged write."""
from __future__ import annotations

import logging
import threading
import time
import uuid

import pydantic
import pytest
import redis

from deployments.logs import get_logger
from deployments.redis_store import RedisJobStore
from deployments.settings import ENV_JOB_STORE, ENV_REDIS_PASSWORD, AppSettings
from deployments.store import FAILED, RUNNING, SUCCESS, Job, SQLiteJobStore, now_us, open_job_store
from tests.redis_server import RedisServer

PASSWORD = "test-password"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"), PASSWORD)
    server.start()
    yield server
    server.stop()


def _redis_store(server: RedisServer, prefix: str | None = None) -> RedisJobStore:
    return RedisJobStore.from_url(server.url, password=PASSWORD, prefix=prefix or f"test-{uuid.uuid4().hex[:8]}:")


@pytest.fixture(params=["redis", "sqlite"])
def store(request, tmp_path):
    if request.param == "sqlite":
        if not hasattr(SQLiteJobStore, "prune"):
            pytest.skip("the SQLite store has no idempotency keys or prune yet")
        opened = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    else:
        opened = _redis_store(request.getfixturevalue("redis_server"))
    yield opened
    opened.close()


def _job(i: str, tenant: str = "t1", key: str | None = None, created_us: int | None = None) -> Job:
    job = Job(inference_id=i, tenant=tenant, model_id="demo", params={"index_rate": 0.5, "f0_method": "crepe"},
              upload_path=f"/data/uploads/{i}.wav", idempotency_key=key)
    if created_us is not None:
        job.created_us = created_us
    return job


def _ids(jobs: list[Job]) -> list[str]:
    return [job.inference_id for job in jobs]


def test_roundtrip_keeps_every_field(store):
    job = _job("a", key="client-key-1")
    job.upload_sha256 = "0f" * 32
    assert store.create(job) == job
    assert store.get("a") == job
    plain = _job("b")
    store.create(plain)
    assert store.get("b") == plain and store.get("b").idempotency_key is None and plain.upload_sha256 is None
    assert store.get("missing") is None


def test_same_id_returns_the_stored_job(store):
    first = store.create(_job("a", tenant="t1"))
    again = store.create(_job("a", tenant="someone-else"))
    assert again == first and again.tenant == "t1"


def test_idempotency_key_returns_the_first_job_and_stores_nothing(store):
    first = store.create(_job("a", tenant="t1", key="k"))
    retry = _job("b", tenant="t1", key="k")
    retry.params = {"index_rate": 0.9}
    assert store.create(retry) == first
    assert store.get("b") is None
    # Keys belong to a tenant; a job without a key never matches one.
    assert store.create(_job("c", tenant="t2", key="k")).inference_id == "c"
    assert store.create(_job("d", tenant="t1")).inference_id == "d"
    assert sorted(_ids(store.running())) == ["a", "c", "d"]


def test_concurrent_creates_with_one_key_yield_one_job(store):
    barrier = threading.Barrier(12)
    returned: list[Job] = []

    def create(i: int) -> None:
        barrier.wait()
        returned.append(store.create(_job(f"j{i}", key="same")))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(returned) == 12 and len({job.inference_id for job in returned}) == 1
    assert _ids(store.running()) == [returned[0].inference_id]


def test_finish_once_and_only_from_running(store):
    store.create(_job("a"))
    store.create(_job("b"))
    assert store.finish("a", SUCCESS, results={"mp3": "a/output.mp3", "flac": "a/output.flac"})
    assert not store.finish("a", FAILED, error="late")
    job = store.get("a")
    assert job.status == SUCCESS and job.results == {"mp3": "a/output.mp3", "flac": "a/output.flac"}
    assert job.error is None and job.ended_us >= job.created_us
    # Cancelling is finishing a RUNNING job as FAILED.
    assert store.finish("b", FAILED, error="cancelled")
    assert not store.finish("b", FAILED, error="cancelled")
    assert store.get("b").error == "cancelled" and store.get("b").results is None
    assert not store.finish("missing", FAILED, error="x")
    with pytest.raises(ValueError):
        store.finish("a", RUNNING)
    assert store.running() == []


def test_attempts_count_and_running_is_oldest_first(store):
    store.create(_job("late", created_us=2_000_000))
    store.create(_job("early", created_us=1_000_000))
    store.create(_job("done", created_us=500_000))
    store.finish("done", FAILED, error="bad input")
    assert store.start_attempt("early") == 1
    assert store.start_attempt("early") == 2
    assert _ids(store.running()) == ["early", "late"]
    assert store.get("early").attempts == 2
    with pytest.raises(KeyError):
        store.start_attempt("missing")


def _tick() -> None:
    """Let the microsecond clock move on, so `ended_us` values fall strictly on one side of a cutoff."""
    start = now_us()
    while now_us() <= start:
        time.sleep(0.001)


def test_prune_deletes_finished_jobs_ended_before_the_cutoff(store):
    for i in ("old-ok", "old-failed", "new-ok", "running"):
        store.create(_job(i, key=f"key-{i}"))
    store.finish("old-ok", SUCCESS, results={"wav": "old-ok/output.wav"})
    store.finish("old-failed", FAILED, error="bad input")
    _tick()
    cutoff = now_us()
    _tick()
    store.finish("new-ok", SUCCESS, results={"wav": "new-ok/output.wav"})

    pruned = store.prune(cutoff)
    assert sorted(_ids(pruned)) == ["old-failed", "old-ok"]
    by_id = {job.inference_id: job for job in pruned}
    assert by_id["old-ok"].results == {"wav": "old-ok/output.wav"} and by_id["old-failed"].error == "bad input"
    assert store.get("old-ok") is None and store.get("old-failed") is None
    assert store.get("new-ok").status == SUCCESS and _ids(store.running()) == ["running"]
    assert store.prune(cutoff) == []
    # A RUNNING job is never pruned, however old.
    assert _ids(store.prune(now_us() + 10**9)) == ["new-ok"] and _ids(store.running()) == ["running"]


def test_prune_forgets_idempotency_keys(store):
    store.create(_job("a", key="k"))
    store.finish("a", SUCCESS, results={})
    _tick()
    store.prune(now_us())
    again = store.create(_job("b", key="k"))
    assert again.inference_id == "b" and store.get("b") is not None


def test_keys_stay_under_the_prefix(redis_server):
    one, two = _redis_store(redis_server, "one:"), _redis_store(redis_server, "two:")
    try:
        one.create(_job("a", tenant="t1", key="k"))
        two.create(_job("a", tenant="t2", key="k"))
        one.finish("a", SUCCESS, results={})
        assert one.get("a").tenant == "t1" and two.get("a").tenant == "t2"
        assert _ids(two.running()) == ["a"] and one.running() == []
        client = redis_server.client()
        keys = set(client.scan_iter("one:*")) | set(client.scan_iter("two:*"))
        assert keys == {"one:job:a", "one:ended", "one:idempotency", "two:job:a", "two:running", "two:idempotency"}
        client.close()
    finally:
        one.close()
        two.close()


def test_settings_select_the_store(redis_server, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_JOB_STORE, raising=False)
    sqlite = open_job_store(AppSettings(data_dir=tmp_path))
    assert isinstance(sqlite, SQLiteJobStore)
    sqlite.close()

    monkeypatch.setenv(ENV_JOB_STORE, redis_server.url)
    monkeypatch.setenv(ENV_REDIS_PASSWORD, PASSWORD)
    settings = AppSettings(data_dir=tmp_path)
    assert settings.job_store == redis_server.url
    store = open_job_store(settings)
    assert isinstance(store, RedisJobStore)
    # The server requires a password: the one from RVC_REDIS_PASSWORD got the job stored.
    store.create(_job("from-settings"))
    assert redis_server.client().exists("rvc-serve:job:from-settings")
    store.close()
    with pytest.raises(pydantic.ValidationError):
        AppSettings(data_dir=tmp_path, job_store="http://127.0.0.1:6379")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_warns_when_redis_does_not_fsync_every_write(redis_server):
    records = _Records()
    logger = get_logger()  # the service logger does not propagate to pytest's capture
    logger.addHandler(records)
    client = redis_server.client()
    try:
        client.config_set("appendfsync", "everysec")
        _redis_store(redis_server).close()
        assert any("does not fsync every write" in m for m in records.messages)
        records.messages.clear()
        client.config_set("appendfsync", "always")
        _redis_store(redis_server).close()
        assert records.messages == []
    finally:
        client.config_set("appendfsync", "always")
        client.close()
        logger.removeHandler(records)


def test_redis_restart_with_jobs_in_flight_loses_nothing(tmp_path):
    server = RedisServer(tmp_path, PASSWORD)
    server.start()
    store = _redis_store(server)
    acknowledged: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            try:
                acknowledged.append(store.create(_job(f"w{i}")).inference_id)
                i += 1
            except redis.RedisError as exc:  # retries exhausted: the write was not acknowledged
                failures.append(exc)

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 30
        while len(acknowledged) < count:
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.01)

    try:
        store.create(_job("in-flight"))
        store.start_attempt("in-flight")
        store.create(_job("done", key="client-key"))
        store.finish("done", SUCCESS, results={"wav": "done/output.wav"})
        thread = threading.Thread(target=writer)
        thread.start()
        try:
            wait_for(20)
            server.kill()
            before_restart = len(acknowledged)
            server.start()
            wait_for(before_restart + 20)
        finally:
            stop.set()
            thread.join(timeout=60)

        assert server.client().config_get("appendfsync") == {"appendfsync": "always"}
        assert failures == []  # the store rode through the restart on its retries
        missing = [i for i in acknowledged if store.get(i) is None]
        assert missing == []
        assert set(_ids(store.running())) == {"in-flight", *acknowledged}
        assert store.get("in-flight").attempts == 1 and store.start_attempt("in-flight") == 2
        assert store.get("done").results == {"wav": "done/output.wav"}
        assert store.create(_job("retried", key="client-key")).inference_id == "done"
        assert store.finish("in-flight", SUCCESS, results={})
    finally:
        store.close()
        server.stop()
