"""The service's typed settings: the application builder's args plus the operator's secrets.

Builder args come from `serve_config.yaml` (`applications[].args`) or `serve run ... key=value`
(where every value arrives as a string, hence the coercing pydantic model). Unknown keys are
errors: Ray itself would silently ignore a misspelt option.

Secrets never travel in the args: API keys come from `RVC_API_KEYS` (comma-separated) and/or
the file named by `RVC_API_KEYS_FILE` (one per line) and are held only as SHA-256 hashes; the
URL-signing secret comes from `RVC_URL_SECRET` or is generated once into the data directory;
the job store's Redis password (when `job_store` is a Redis URL) from `RVC_REDIS_PASSWORD`.
"""
from __future__ import annotations

import hashlib
import hmac
import importlib.util
import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.pitch_methods import HOST_METHOD_MODULES, PITCH_METHODS

from .results import URL_LIFETIME_S

ENV_DATA_DIR = "RVC_DATA_DIR"
ENV_API_KEYS = "RVC_API_KEYS"
ENV_API_KEYS_FILE = "RVC_API_KEYS_FILE"
ENV_RATE_LIMIT = "RVC_RATE_LIMIT_PER_MINUTE"
ENV_URL_SECRET = "RVC_URL_SECRET"
ENV_PUBLIC_URL = "RVC_PUBLIC_URL"
ENV_JOB_STORE = "RVC_JOB_STORE"
ENV_REDIS_PASSWORD = "RVC_REDIS_PASSWORD"

URL_SECRET_FILE = "url-secret"
DEMO_KEY_FILE = "demo-api-key"
# GPU share each model stage asks for when the cluster has GPUs and the stage says "auto":
# the three stages of one job fit on one GPU.
AUTO_GPU_SHARE = {"features": 0.25, "pitch": 0.25, "synthesis": 0.5}
MODEL_STAGES = tuple(AUTO_GPU_SHARE)  # the stages a conversion calls per chunk


class StageSettings(BaseModel):
    """Replicas and resources of one deployment (Serve autoscaling between min and max)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    max_ongoing_requests: int = Field(4, ge=1)
    # Requests waiting for a replica beyond this are refused at once (-1: unbounded).
    max_queued_requests: int = Field(32, ge=-1)
    num_cpus: float = Field(0.1, ge=0)
    # "auto": AUTO_GPU_SHARE of a GPU for the model stages when the cluster has GPUs, else 0.
    num_gpus: float | Literal["auto"] = "auto"
    # How long a replica being stopped (downscale, redeploy) may finish its requests.
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    # Model stages: requests (chunks) run together as one batch of up to this many, waiting at
    # most batch_wait_timeout_s for a batch to fill (1 = no batching; GPUs want 8-16).
    max_batch_size: int = Field(1, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    # Model stages: batches a replica runs at once. Above 1, one batch's host work (its inputs,
    # kernel launches, outputs) overlaps another's GPU work; each holds its own activations.
    max_concurrent_batches: int = Field(1, ge=1)
    # "idle": the replica's process runs under Linux's SCHED_IDLE policy, i.e. only on CPU time
    # that the request path (ingress, job and rate-limit actors, Ray's proxy and daemons) leaves:
    # the default of the stages that run conversions, so that a create or a poll is answered
    # quickly while every core converts (docs/performance.md). "normal": as Ray started it.
    cpu_priority: Literal["normal", "idle"] = "normal"

    @model_validator(mode="after")
    def _replica_range(self) -> "StageSettings":
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        if self.max_batch_size * self.max_concurrent_batches > self.max_ongoing_requests:
            raise ValueError("max_batch_size x max_concurrent_batches must be <= max_ongoing_requests "
                             "(the batches never fill otherwise)")
        return self

    def deployment_options(self, stage: str, cluster_has_gpu: bool) -> dict:
        """Keyword arguments for `Deployment.options()`."""
        gpus = self.num_gpus
        if gpus == "auto":
            gpus = AUTO_GPU_SHARE.get(stage, 0.0) if cluster_has_gpu else 0.0
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            },
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": gpus},
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": max(0.1, min(0.5, self.graceful_shutdown_timeout_s)),
        }


# Per-stage defaults; a stage given in the args overrides only the keys it names.
IDLE = {"cpu_priority": "idle"}  # the stages that run conversions yield the CPU to the request path
STAGE_DEFAULTS: dict[str, dict] = {
    "ingress": {"target_ongoing_requests": 8, "max_ongoing_requests": 32, "max_queued_requests": 64,
                "num_gpus": 0},
    "conversion": {"max_queued_requests": 16, "num_gpus": 0, **IDLE},
    "features": {"num_cpus": 0.25, **IDLE},
    "pitch": {"num_cpus": 0.25, **IDLE},
    # pm and harvest (no network, CPUs only): one input per CPU of num_cpus (rounded up) at a time.
    "host_pitch": {"max_replicas": 1, "num_gpus": 0, **IDLE},
    "synthesis": {"num_cpus": 0.25, "max_ongoing_requests": 2, **IDLE},
}


class StagesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ingress: StageSettings = StageSettings(**STAGE_DEFAULTS["ingress"])
    conversion: StageSettings = StageSettings(**STAGE_DEFAULTS["conversion"])
    features: StageSettings = StageSettings(**STAGE_DEFAULTS["features"])
    pitch: StageSettings = StageSettings(**STAGE_DEFAULTS["pitch"])
    host_pitch: StageSettings = StageSettings(**STAGE_DEFAULTS["host_pitch"])
    synthesis: StageSettings = StageSettings(**STAGE_DEFAULTS["synthesis"])

    @model_validator(mode="before")
    @classmethod
    def _over_defaults(cls, data):
        if isinstance(data, dict):
            data = {name: {**STAGE_DEFAULTS[name], **value} if name in STAGE_DEFAULTS and isinstance(value, dict)
                    else value for name, value in data.items()}
        return data


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or default


class AppSettings(BaseModel):
    """Builder args of the application (see serve_config.yaml). Defaults read the environment."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)

    data_dir: Path = Field(default_factory=lambda: Path(_env(ENV_DATA_DIR, "./data")))
    api_keys_file: Path | None = Field(default_factory=lambda: _env(ENV_API_KEYS_FILE))
    rate_limit_per_minute: int = Field(default_factory=lambda: _env(ENV_RATE_LIMIT, "60"), ge=1)
    public_base_url: str | None = Field(default_factory=lambda: _env(ENV_PUBLIC_URL),
                                        pattern=r"^https?://[^\s]+$")
    # Where job records live: None → SQLite in data_dir (one node); redis[s]://host:port/db → Redis,
    # which every node reaches (KubeRay). Keep the password out of the URL: RVC_REDIS_PASSWORD.
    job_store: str | None = Field(default_factory=lambda: _env(ENV_JOB_STORE), pattern=r"^rediss?://[^\s]+$")
    # Content encoder and optional rmvpe weights; default: <data_dir>/hubert_base.pt, rmvpe.pt.
    hubert_path: Path | None = None
    rmvpe_path: Path | None = None
    # A conversion is failed as hung after job_timeout_s plus job_timeout_per_audio_s per second
    # of its input: a CPU runs crepe at ~3x real time alone, ~10x beside 3 other jobs on 2 cores,
    # so one fixed limit would either fail long inputs or wait long for a hung short one.
    job_timeout_s: float = Field(900.0, gt=0)
    job_timeout_per_audio_s: float = Field(20.0, ge=0)
    # A job interrupted this many times (job actor or replica crashes) is failed, not re-run.
    job_attempts: int = Field(3, ge=1)
    max_concurrent_jobs: int = Field(4, ge=1)
    # ... and at most this many seconds of input audio among them: a conversion holds ~2 GB per
    # hour of input (max_audio_seconds below), so many short jobs run at once and long ones take
    # turns. A job longer than this runs when no other does.
    max_concurrent_audio_s: float = Field(3600.0, gt=0)
    # Longest audio a job converts: refused at create (422) when the header says more, failed at
    # decode when it lied. A few MB of FLAC can hold days of silence, and memory grows with the
    # input: per hour ~2 GB in the conversion replica (the RMS mix runs in blocks), ~5 GB in an
    # rmvpe pitch pass (whole, as the reference runs it; docs/performance.md). 30 min by default;
    # gpu-prod allows an hour.
    max_audio_seconds: float = Field(1800.0, gt=0)
    # ... and with f0Method harvest: WORLD's harvest holds ~7 MB per second of input on the pitch
    # replica (its whole-input FFTs and candidates; in pieces its track would not be the
    # reference's), 4.2 GB for 10 min.
    harvest_max_audio_seconds: float = Field(600.0, gt=0)
    # Creates are refused (503, Retry-After) while the data directory's file system would have
    # less than this free after the upload: room kept for running jobs' results and the job
    # records, which a full disk would fail.
    min_free_disk_mb: int = Field(1024, ge=0)
    # Finished jobs and their results are deleted this long after they ended, and uploads no
    # RUNNING job holds this long after they were written. Default: the result URL's lifetime
    # plus a margin, so a URL fetched when the job ended works for its whole lifetime.
    retention_s: float = Field(URL_LIFETIME_S + 3600.0, gt=0)
    retention_interval_s: float = Field(600.0, gt=0)  # how often the job actor prunes
    # Keep every result as 16-bit FLAC beside the MP3 the API hands out (for operators who audit
    # or re-encode outputs). Off: the FLAC is 3-5x the MP3's bytes — at one H100's 231x real time,
    # 6 h of retention is 225-400 GB of FLAC beside ~85 GB of MP3. Jobs of the Serve handle
    # (`rvc-serve batch --ray-address`, which can ask for FLAC or WAV) keep it regardless.
    lossless_results: bool = False
    voices_per_replica: int = Field(4, ge=1)
    # MB per conversion replica of recent inputs' content features and f0 tracks, kept by the
    # audio's content (deployments.input_cache): the same upload converted with another voice or
    # key skips the features and pitch stages. ~1.8 MB per 10 s of input (v2 features); 0: off.
    input_cache_mb: int = Field(256, ge=0)
    # crepe f0 of inputs longer than this many frames (10 ms) is cut into pieces of it that run
    # on any pitch replicas (a multiple of crepe's 512-frame viterbi period: the joined track is
    # exact); rmvpe always runs whole.
    pitch_piece_frames: int = Field(4096, ge=512, multiple_of=512)
    # Calls one job has at once at each model stage (its chunks, its crepe pieces): a long job's
    # share of a stage, whose other calls wait in the job for a free one. Bounded so that a
    # conversion replica's calls (this × conversion.max_ongoing_requests) never overflow a
    # model stage's max_queued_requests, which Ray would refuse (BackPressureError).
    chunks_in_flight: int = Field(8, ge=1)
    # The networks' precision (pipeline.convert.network_precision; errors measured in
    # docs/performance.md, within 1e-2 relative of fp32): fp16 is for GPUs (rmvpe's network stays
    # float32; CPUs run fp16 as fp32), bf16 for CPUs with AMX/AVX512-BF16 (the
    # synthesizer's residual blocks in bfloat16: 2x faster synthesis); fp32 is exact (what
    # `rvc-serve convert` runs by default). auto: the fastest of them on each replica's hardware
    # (pipeline.convert.fastest_precision).
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    seed: int = 0
    # Overrides of pipeline.convert.ChunkingConfig (x_pad, x_query, x_center, x_max; seconds).
    # `rvc-serve convert` uses the defaults: change them and outputs differ from it.
    chunking: dict[str, int] = Field(default_factory=dict)
    stages: StagesSettings = StagesSettings()

    @model_validator(mode="after")
    def _stage_queues_hold_their_callers_calls(self) -> "AppSettings":
        jobs, chunks = self.stages.conversion.max_ongoing_requests, self.chunks_in_flight
        per_job = (f"stages.conversion.max_ongoing_requests x chunks_in_flight ({jobs} x {chunks} = {jobs * chunks})",
                   jobs * chunks, "a conversion replica's calls to it")
        # (stage, (the calls its callers may have queued at once, how many, who calls))
        callers = {**{name: per_job for name in MODEL_STAGES},
                   "host_pitch": (f"stages.conversion.max_ongoing_requests ({jobs})", jobs,
                                  "a conversion replica's calls to it (one per job)"),
                   "conversion": (f"max_concurrent_jobs ({self.max_concurrent_jobs})", self.max_concurrent_jobs,
                                  "the job actor's calls")}
        for name, (what, calls, who) in callers.items():
            queued = getattr(self.stages, name).max_queued_requests
            if queued != -1 and queued < calls:
                raise ValueError(f"stages.{name}.max_queued_requests ({queued}) must be -1 or at least {what}: "
                                 f"{who} would otherwise be refused")
        return self

    @field_validator("data_dir", "api_keys_file", "hubert_path", "rmvpe_path")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        # Replicas may start in another working directory than the builder.
        return None if path is None else path.expanduser().resolve()

    @field_validator("public_base_url")
    @classmethod
    def _no_trailing_slash(cls, url: str | None) -> str | None:
        return None if url is None else url.rstrip("/")

    @property
    def voices_dir(self) -> Path:
        return self.data_dir / "voices"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def hubert(self) -> Path:
        return self.hubert_path or self.data_dir / "hubert_base.pt"

    @property
    def rmvpe(self) -> Path | None:
        """The rmvpe weights if they exist: rmvpe is offered only when it is there."""
        path = self.rmvpe_path or self.data_dir / "rmvpe.pt"
        return path if path.is_file() else None

    def audio_limit(self, f0_method: str) -> float:
        """The longest audio a job of `f0_method` converts (seconds)."""
        if f0_method == "harvest":
            return min(self.max_audio_seconds, self.harvest_max_audio_seconds)
        return self.max_audio_seconds

    @property
    def f0_methods(self) -> tuple[str, ...]:
        """The pitch methods offered: rmvpe where its weights are, pm and harvest where their
        libraries import (praat-parselmouth, pyworld: dependencies, but not carried everywhere)."""
        def offered(method: str) -> bool:
            if method == "rmvpe":
                return self.rmvpe is not None
            module = HOST_METHOD_MODULES.get(method)
            return module is None or importlib.util.find_spec(module) is not None

        return tuple(filter(offered, PITCH_METHODS))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """The operator's API keys as SHA-256 hashes; the hash of a key is its tenant id."""

    def __init__(self, hashes: frozenset[str]):
        if not hashes:
            raise ValueError("no API keys configured")
        self._hashes = tuple(sorted(hashes))

    def tenant(self, presented: str | None) -> str | None:
        """The tenant of a presented key, or None. Compares against every hash in constant time."""
        if not presented:
            return None
        digest = hash_key(presented)
        found = None
        for stored in self._hashes:
            if hmac.compare_digest(digest, stored):
                found = stored
        return found


def configured_api_keys(settings: AppSettings, environ: dict[str, str] | None = None) -> list[str]:
    """The raw keys from `RVC_API_KEYS` and `settings.api_keys_file` (blank lines and # comments
    skipped). Empty when the operator configured none."""
    environ = os.environ if environ is None else environ
    keys = [k for k in (k.strip() for k in environ.get(ENV_API_KEYS, "").split(",")) if k]
    if settings.api_keys_file is not None:
        keys += read_keys_file(settings.api_keys_file)
    return keys


def read_keys_file(path: Path) -> list[str]:
    """The keys in a key file: one a line, blank lines and # comments skipped."""
    keys = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [k for k in keys if k]


def load_api_keys(settings: AppSettings, environ: dict[str, str] | None = None) -> ApiKeys:
    """The operator's keys, or when there are none, the demo key kept in the data directory."""
    keys = configured_api_keys(settings, environ) or [demo_api_key(settings.data_dir)]
    return ApiKeys(frozenset(hash_key(k) for k in keys))


def demo_api_key(data_dir: Path) -> str:
    """A key generated once for a local run without configured keys (file mode 0600)."""
    return read_or_create_secret(data_dir / DEMO_KEY_FILE, lambda: "rvc-demo-" + secrets.token_urlsafe(24))


def url_secret(settings: AppSettings, environ: dict[str, str] | None = None) -> bytes:
    environ = os.environ if environ is None else environ
    value = environ.get(ENV_URL_SECRET, "").strip()
    if not value:
        value = read_or_create_secret(settings.data_dir / URL_SECRET_FILE, lambda: secrets.token_hex(32))
    return value.encode()


def redis_password(environ: dict[str, str] | None = None) -> str | None:
    environ = os.environ if environ is None else environ
    return environ.get(ENV_REDIS_PASSWORD, "").strip() or None


def read_or_create_secret(path: Path, make) -> str:
    """Read a one-line secret file, creating it (0600) if missing. Several replicas may race to
    create it: the file is written aside and linked into place, so exactly one value wins."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()
