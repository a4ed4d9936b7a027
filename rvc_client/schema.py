"""The API's JSON objects as typed, immutable values (field names as in the HTTP contract)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

RUNNING, SUCCESS, FAILED = "RUNNING", "SUCCESS", "FAILED"
_TIMESTAMP = "%Y-%m-%d %H:%M:%S.%f %z"  # "2024-01-01 20:15:50.428000 +00:00"


def parse_timestamp(text: str) -> datetime:
    return datetime.strptime(text, _TIMESTAMP)


@dataclass(frozen=True)
class Job:
    inference_id: str
    model_id: str
    status: str  # RUNNING | SUCCESS | FAILED
    type: str
    inference_url: str | None  # signed MP3 URL once SUCCESS (expires 5 h after it was issued)
    job_start_time: datetime
    job_end_time: datetime | None
    error: str | None = None  # why, when FAILED

    @property
    def finished(self) -> bool:
        return self.status != RUNNING

    @classmethod
    def from_json(cls, body: dict) -> "Job":
        end = body.get("jobEndTime")
        return cls(inference_id=body["inferenceId"], model_id=body["modelId"], status=body["status"],
                   type=body["type"], inference_url=body.get("inferenceUrl"),
                   job_start_time=parse_timestamp(body["jobStartTime"]),
                   job_end_time=parse_timestamp(end) if end else None, error=body.get("error"))


@dataclass(frozen=True)
class Model:
    model_id: str
    name: str
    version: str  # v1 | v2
    sample_rate: int
    f0: bool
    has_index: bool
    created_at: datetime

    @classmethod
    def from_json(cls, body: dict) -> "Model":
        return cls(model_id=body["modelId"], name=body["name"], version=body["version"],
                   sample_rate=int(body["sampleRate"]), f0=bool(body["f0"]), has_index=bool(body["hasIndex"]),
                   created_at=parse_timestamp(body["createdAt"]))
