"""The SQLite job store: durable, idempotent create, one-way finish, resumable RUNNING list."""
from __future__ import annotations

import re
import sqlite3
import threading

import pytest

from deployments.store import FAILED, RUNNING, SUCCESS, Job, SQLiteJobStore, format_timestamp


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


def test_finish_once_and_only_from_running(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    store.create(_job("a"))
    assert store.finish("a", SUCCESS, results={"mp3": "a/output.mp3", "flac": "a/output.flac"})
    assert not store.finish("a", FAILED, error="late")
    job = store.get("a")
    assert job.status == SUCCESS and job.results == {"mp3": "a/output.mp3", "flac": "a/output.flac"}
    assert job.error is None and job.ended_us >= job.created_us
    with pytest.raises(ValueError):
        store.finish("a", RUNNING)


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
