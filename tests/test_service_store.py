"""The SQLite job store: durable, idempotent create, one-way finish, resumable RUNNING list."""
from __future__ import annotations

import re
import sqlite3
import threading

import pytest

from deployments.store import FAILED, RUNNING, SUCCESS, Job, SQLiteJobStore, format_timestamp, now_us


def _job(i: str, tenant: str = "t1", created_us: int | None = None) -> Job:
    job = Job(inference_id=i, tenant=tenant, model_id="demo", params={"index_rate": 0.5, "f0_method": "crepe"},
              upload_path=f"/data/uploads/{i}.wav")
    if created_us is not None:
        job.created_us = created_us
    return job


def test_create_get_roundtrip(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    stored = store.create(_job("a"))
    assert stored.inference_id == "a" and stored.tenant == "t1"
    got = store.get("a")
    assert got.status == RUNNING and got.params == {"index_rate": 0.5, "f0_method": "crepe"}
    assert got.ended_us is None and got.error is None and got.results is None and got.attempts == 0
    assert store.get("missing") is None


def test_create_is_idempotent(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    first = store.create(_job("a", tenant="t1"))
    again = store.create(_job("a", tenant="someone-else"))
    assert again.tenant == "t1" and again.created_us == first.created_us


def test_state_survives_reopen_and_running_is_oldest_first(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = SQLiteJobStore(path)
    store.create(_job("late", created_us=2_000_000))
    store.create(_job("early", created_us=1_000_000))
    store.create(_job("done", created_us=500_000))
    store.finish("done", FAILED, error="bad input")
    assert store.start_attempt("early") == 1
    store.close()

    reopened = SQLiteJobStore(path)
    assert [j.inference_id for j in reopened.running()] == ["early", "late"]
    assert reopened.get("early").attempts == 1
    assert reopened.start_attempt("early") == 2
    assert reopened.get("done").error == "bad input"
    with pytest.raises(KeyError):
        reopened.start_attempt("missing")


def test_wal_and_full_sync(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    SQLiteJobStore(path).create(_job("a"))
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # The row is visible to another connection as soon as create returned: it was committed.
    assert db.execute("SELECT status FROM jobs WHERE inference_id='a'").fetchone() == ("RUNNING",)


def test_concurrent_creates_from_threads(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    threads = [threading.Thread(target=lambda i=i: store.create(_job(f"j{i}"))) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.running()) == 20


def test_timestamp_format():
    assert format_timestamp(1704140150428000) == "2024-01-01 20:15:50.428000 +00:00"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} \+00:00", format_timestamp(1))


def _keyed(i: str, key: str | None, tenant: str = "t1") -> Job:
    job = _job(i, tenant=tenant)
    job.idempotency_key = key
    return job


def test_idempotency_key_returns_the_first_job_per_tenant(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    first = store.create(_keyed("a", "retry-1"))
    again = store.create(_keyed("b", "retry-1"))
    assert again == first and store.get("b") is None  # nothing stored for the retry
    # Another tenant's identical key is its own job; no key never deduplicates.
    assert store.create(_keyed("c", "retry-1", tenant="t2")).inference_id == "c"
    assert store.create(_keyed("d", None)).inference_id == "d"
    assert store.create(_keyed("e", None)).inference_id == "e"
    assert {j.inference_id for j in store.running()} == {"a", "c", "d", "e"}
    assert store.get("a").idempotency_key == "retry-1" and store.get("d").idempotency_key is None


def test_concurrent_creates_with_one_key_make_one_job(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    SQLiteJobStore(path).close()
    # Separate connections (as separate processes would have) racing on the same key.
    stores = [SQLiteJobStore(path) for _ in range(8)]
    results: list[Job] = []
    barrier = threading.Barrier(len(stores))

    def create(i: int) -> None:
        barrier.wait()
        results.append(stores[i].create(_keyed(f"j{i}", "same")))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({j.inference_id for j in results}) == 1
    assert [j.inference_id for j in stores[0].running()] == [results[0].inference_id]


def test_prune_deletes_only_finished_jobs_before_the_cutoff(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    for name in ("old-ok", "old-failed", "new-ok", "running"):
        store.create(_keyed(name, f"key-{name}"))
    store.finish("old-ok", SUCCESS, results={"mp3": "old-ok/output.mp3"})
    store.finish("old-failed", FAILED, error="cancelled")
    cutoff = now_us() + 1
    while now_us() <= cutoff:  # "new-ok" ends strictly after the cutoff
        pass
    store.finish("new-ok", SUCCESS, results={"mp3": "new-ok/output.mp3"})

    pruned = store.prune(cutoff)
    assert sorted(j.inference_id for j in pruned) == ["old-failed", "old-ok"]
    assert {j.inference_id: j.results for j in pruned}["old-ok"] == {"mp3": "old-ok/output.mp3"}
    assert store.get("old-ok") is None and store.get("old-failed") is None
    assert store.get("new-ok").status == SUCCESS and store.get("running").status == RUNNING
    assert store.prune(cutoff) == []
    # A pruned job's idempotency key is forgotten: the same key makes a new job now.
    assert store.create(_keyed("fresh", "key-old-ok")).inference_id == "fresh"
    # Far in the future, still no RUNNING job goes.
    assert {j.inference_id for j in store.prune(now_us() + 10**12)} == {"new-ok"}
    assert [j.inference_id for j in store.running()] == ["running", "fresh"]


def test_store_from_before_idempotency_keys_and_upload_digests_is_upgraded(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE jobs (inference_id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
        model_id TEXT NOT NULL, params TEXT NOT NULL, upload_path TEXT NOT NULL, status TEXT NOT NULL,
        created_us INTEGER NOT NULL, ended_us INTEGER, error TEXT, results TEXT,
        attempts INTEGER NOT NULL DEFAULT 0);
        INSERT INTO jobs VALUES ('old', 't1', 'demo', '{}', '/u/old.wav', 'RUNNING', 1, NULL, NULL, NULL, 0);""")
    db.close()
    store = SQLiteJobStore(path)
    assert store.get("old").idempotency_key is None and store.get("old").upload_sha256 is None
    new = _keyed("new", "k")
    new.upload_sha256 = "0f" * 32
    assert store.create(new) == new and store.get("new") == new
    assert store.create(_keyed("newer", "k")).inference_id == "new"
