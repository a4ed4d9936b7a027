"""Durable job records: the `JobStore` interface and its embedded SQLite implementation.

The job actor is the only writer. SQLite runs in WAL mode with `synchronous=FULL`, so a job
is on disk when `create` returns: a crash of any process after that cannot lose it.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .settings import AppSettings

RUNNING, SUCCESS, FAILED = "RUNNING", "SUCCESS", "FAILED"


def now_us() -> int:
    """Wall-clock time in integer microseconds since the epoch (exact in SQLite, unlike floats)."""
    return time.time_ns() // 1000


def format_timestamp(us: int) -> str:
    """The contract's timestamp: UTC, `YYYY-MM-DD HH:MM:SS.ffffff +00:00`."""
    moment = datetime.fromtimestamp(us // 1_000_000, tz=timezone.utc).replace(microsecond=us % 1_000_000)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f +00:00")


# The tenant of jobs created through the application's Serve handle (`Ingress.convert_audio`):
# no API key hashes to it (keys hash to hex), so no key sees them.
HANDLE_TENANT = "serve-handle"


@dataclass
class Job:
    inference_id: str
    tenant: str  # SHA-256 of the API key that created the job
    model_id: str
    params: dict[str, Any]  # ConversionParams fields
    upload_path: str
    created_us: int = field(default_factory=now_us)
    status: str = RUNNING
    ended_us: int | None = None
    error: str | None = None
    results: dict[str, str] | None = None  # format → result-store key
    attempts: int = 0
    idempotency_key: str | None = None  # the client's Idempotency-Key, unique per tenant
    upload_sha256: str | None = None  # hex digest of the upload's bytes (None: a job stored before it was kept)


class JobStore(Protocol):
    def create(self, job: Job) -> Job:
        """Store a new RUNNING job durably and return it. Nothing is stored, and the stored job is
        returned instead, when a job with the same id exists, or one of the same tenant with the
        same idempotency key (atomic: of two concurrent creates with one key, one job results)."""

    def get(self, inference_id: str) -> Job | None: ...

    def start_attempt(self, inference_id: str) -> int:
        """Count one more attempt at running the job; returns the new count."""

    def finish(self, inference_id: str, status: str, *, error: str | None = None,
               results: dict[str, str] | None = None) -> bool:
        """Move a RUNNING job to SUCCESS or FAILED (sets the end time); False if it was not RUNNING."""

    def running(self) -> list[Job]:
        """Every RUNNING job, oldest first."""

    def prune(self, ended_before_us: int) -> list[Job]:
        """Delete every finished job that ended before the cutoff (its idempotency key with it) and
        return the deleted jobs, whose files the caller then deletes. RUNNING jobs are kept."""

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    inference_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    model_id TEXT NOT NULL,
    params TEXT NOT NULL,
    upload_path TEXT NOT NULL,
    status TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    ended_us INTEGER,
    error TEXT,
    results TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    upload_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_us);
CREATE INDEX IF NOT EXISTS jobs_ended ON jobs (ended_us);
"""
# After the column exists (stores created before it get it added on open).
_IDEMPOTENCY_INDEX = ("CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (tenant, idempotency_key) "
                      "WHERE idempotency_key IS NOT NULL")
_COLUMNS = ("inference_id", "tenant", "model_id", "params", "upload_path", "status", "created_us",
            "ended_us", "error", "results", "attempts", "idempotency_key", "upload_sha256")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"


class SQLiteJobStore:
    """A JobStore in one SQLite file. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column in ("idempotency_key", "upload_sha256"):  # stores created before the column
            if column not in columns:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")
        self._db.execute(_IDEMPOTENCY_INDEX)

    def create(self, job: Job) -> Job:
        row = (job.inference_id, job.tenant, job.model_id, json.dumps(job.params), job.upload_path, job.status,
               job.created_us, job.ended_us, job.error,
               None if job.results is None else json.dumps(job.results), job.attempts, job.idempotency_key,
               job.upload_sha256)
        with self._lock:
            # Either unique constraint (id, or tenant + key) makes the insert a no-op.
            self._db.execute(f"INSERT OR IGNORE INTO jobs ({', '.join(_COLUMNS)}) "
                             f"VALUES ({', '.join('?' * len(_COLUMNS))})", row)
            stored = self._get(job.inference_id)
            if stored is None:
                stored = _job(self._db.execute(f"{_SELECT} WHERE tenant = ? AND idempotency_key = ?",
                                               (job.tenant, job.idempotency_key)).fetchone())
            return stored

    def get(self, inference_id: str) -> Job | None:
        with self._lock:
            return self._get(inference_id)

    def start_attempt(self, inference_id: str) -> int:
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET attempts = attempts + 1 WHERE inference_id = ? "
                                   "RETURNING attempts", (inference_id,))
            row = cur.fetchone()
        if row is None:
            raise KeyError(inference_id)
        return row[0]

    def finish(self, inference_id: str, status: str, *, error: str | None = None,
               results: dict[str, str] | None = None) -> bool:
        if status not in (SUCCESS, FAILED):
            raise ValueError(f"a job finishes as {SUCCESS} or {FAILED}, not {status!r}")
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = ?, ended_us = ?, error = ?, results = ? "
                "WHERE inference_id = ? AND status = ?",
                (status, now_us(), error, None if results is None else json.dumps(results), inference_id, RUNNING))
            return cur.rowcount == 1

    def running(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute(f"{_SELECT} WHERE status = ? ORDER BY created_us", (RUNNING,)).fetchall()
        return [_job(row) for row in rows]

    def prune(self, ended_before_us: int) -> list[Job]:
        with self._lock:
            rows = self._db.execute(f"DELETE FROM jobs WHERE status IN (?, ?) AND ended_us < ? "
                                    f"RETURNING {', '.join(_COLUMNS)}", (SUCCESS, FAILED, ended_before_us)).fetchall()
        return [_job(row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _get(self, inference_id: str) -> Job | None:
        row = self._db.execute(f"{_SELECT} WHERE inference_id = ?", (inference_id,)).fetchone()
        return None if row is None else _job(row)


def _job(row: tuple) -> Job:
    values = dict(zip(_COLUMNS, row))
    values["params"] = json.loads(values["params"])
    values["results"] = None if values["results"] is None else json.loads(values["results"])
    return Job(**values)


def open_job_store(settings: AppSettings) -> JobStore:
    """The configured store: Redis when `settings.job_store` names one, else SQLite in the data directory."""
    if settings.job_store is None:
        return SQLiteJobStore(settings.db_path)
    from .redis_store import RedisJobStore
    from .settings import redis_password

    return RedisJobStore.from_url(settings.job_store, password=redis_password())
