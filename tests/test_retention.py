"""The retention policy on a real SQLite store, result directory and uploads directory."""
from __future__ import annotations

import os
import time

from deployments.results import LocalResultStore
from deployments.retention import Pruned, prune_once
from deployments.store import FAILED, SUCCESS, Job, SQLiteJobStore


def test_prune_once_deletes_ended_jobs_their_files_and_leftover_uploads(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    results = LocalResultStore(tmp_path / "results")
    uploads = tmp_path / "uploads"
    uploads.mkdir()

    def job(inference_id: str) -> Job:
        upload = uploads / f"{inference_id}.wav"
        upload.write_bytes(b"RIFF")
        return store.create(Job(inference_id, "tenant", "demo", {}, str(upload)))

    def result(inference_id: str) -> str:
        key = f"{inference_id}/output.mp3"
        with results.writer(key) as path:
            path.write_bytes(b"ID3")
        return key

    job("done")
    store.finish("done", SUCCESS, results={"mp3": result("done")})  # upload kept, as after a crash
    job("cancelled")
    result("cancelled")  # written by a conversion that outran its cancel
    store.finish("cancelled", FAILED, error="cancelled")
    job("running")
    for name in ("running.wav", "lost.wav", ".upload-0123abcd"):  # old, but only two are leftovers
        (uploads / name).touch()
        os.utime(uploads / name, (time.time() - 60, time.time() - 60))

    assert prune_once(store, results, uploads, retention_s=3600, now_s=time.time()) == Pruned(jobs=0, uploads=0)
    assert store.get("done").status == SUCCESS and results.local_path("done/output.mp3") is not None

    time.sleep(0.3)
    (uploads / "fresh.wav").write_bytes(b"being stored right now")
    pruned = prune_once(store, results, uploads, retention_s=0.2, now_s=time.time())
    assert pruned == Pruned(jobs=2, uploads=2)
    assert store.get("done") is None and store.get("cancelled") is None
    assert not (tmp_path / "results" / "done").exists() and not (tmp_path / "results" / "cancelled").exists()
    assert sorted(p.name for p in uploads.iterdir()) == ["fresh.wav", "running.wav"]
    assert [j.inference_id for j in store.running()] == ["running"]
    assert prune_once(store, results, uploads, retention_s=0.2, now_s=time.time()) == Pruned(jobs=0, uploads=0)
