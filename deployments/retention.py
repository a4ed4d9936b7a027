"""The retention policy: what the service deletes once nobody can ask for it any more.

Finished jobs that ended more than `retention_s` ago go from the job store with their results
and uploads. Upload files that no RUNNING job holds (left by an ingress that died between
storing an upload and handing its job over, or mid-upload) go once they are as old.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .results import ResultStore
from .store import JobStore


@dataclass(frozen=True)
class Pruned:
    jobs: int
    uploads: int


def prune_once(store: JobStore, results: ResultStore, uploads_dir: Path, retention_s: float,
               now_s: float) -> Pruned:
    cutoff_s = now_s - retention_s
    jobs = store.prune(int(cutoff_s * 1_000_000))
    for job in jobs:
        results.remove(job.inference_id)
        Path(job.upload_path).unlink(missing_ok=True)
    held = {Path(job.upload_path).name for job in store.running()}
    leftovers = 0
    for path in uploads_dir.iterdir():
        try:
            stale = path.name not in held and path.is_file() and path.stat().st_mtime < cutoff_s
        except FileNotFoundError:  # its job just ended and removed it
            continue
        if stale:
            path.unlink(missing_ok=True)
            leftovers += 1
    return Pruned(jobs=len(jobs), uploads=leftovers)
