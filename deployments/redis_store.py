"""A `JobStore` on Redis: the store for a cluster (KubeRay), where the job actor may restart on any
node and SQLite on a shared volume is not safe.

Every write is one Lua script, so each is atomic (an idempotent create cannot race itself).
Durability is the server's: run Redis with `appendonly yes` and `appendfsync always`, so a job
is on disk before `create` returns; the store logs a warning when the server says otherwise.

Keys, all under one prefix so the store can share the Redis that holds Ray's GCS state:
  <prefix>job:<id>       hash of the job's fields (a None field is absent)
  <prefix>running        sorted set of RUNNING ids, scored by created_us
  <prefix>ended          sorted set of finished ids, scored by ended_us (for prune)
  <prefix>idempotency    hash "<tenant>:<idempotency key>" → id
Microsecond timestamps are below 2**53, so the sorted-set scores (doubles) hold them exactly.
"""
from __future__ import annotations

import json

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .logs import get_logger
from .store import FAILED, RUNNING, SUCCESS, Job, now_us

DEFAULT_PREFIX = "rvc-serve:"
PRUNE_BATCH = 500
_INT_FIELDS = ("created_us", "ended_us", "attempts")
_JSON_FIELDS = ("params", "results")

# KEYS: job, running, ended, idempotency. ARGV: prefix, id, idempotency field ('' for none), score
# set ('running' or 'ended' or ''), score, then the job's field/value pairs.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HGETALL', KEYS[1]) end
if ARGV[3] ~= '' then
  local other = redis.call('HGET', KEYS[4], ARGV[3])
  if other then return redis.call('HGETALL', ARGV[1] .. 'job:' .. other) end
  redis.call('HSET', KEYS[4], ARGV[3], ARGV[2])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
if ARGV[4] == 'running' then redis.call('ZADD', KEYS[2], ARGV[5], ARGV[2])
elseif ARGV[4] == 'ended' then redis.call('ZADD', KEYS[3], ARGV[5], ARGV[2]) end
return redis.call('HGETALL', KEYS[1])
"""
# KEYS: job. Returns nil for a missing job.
_START_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
"""
# KEYS: job, running, ended. ARGV: id, ended_us, then field/value pairs (status, error, results).
_FINISH = """
if redis.call('HGET', KEYS[1], 'status') ~= 'RUNNING' then return 0 end
redis.call('HDEL', KEYS[1], 'error', 'results')
redis.call('HSET', KEYS[1], 'ended_us', ARGV[2], unpack(ARGV, 3))
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""
# KEYS: ended, idempotency. ARGV: prefix, cutoff (exclusive), batch size. Returns the deleted jobs.
_PRUNE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local jobs = {}
for _, id in ipairs(ids) do
  local key = ARGV[1] .. 'job:' .. id
  local owner = redis.call('HMGET', key, 'tenant', 'idempotency_key')
  if owner[2] then redis.call('HDEL', KEYS[2], owner[1] .. ':' .. owner[2]) end
  jobs[#jobs + 1] = redis.call('HGETALL', key)
  redis.call('DEL', key)
end
if #ids > 0 then redis.call('ZREM', KEYS[1], unpack(ids)) end
return jobs
"""


class RedisJobStore:
    """A JobStore in Redis under `prefix`. Thread-safe (redis-py's connection pool).

    Calls retry with backoff through a dropped connection (a Redis restart or failover); a write
    whose reply was lost is then run again: harmless for create and finish (both idempotent),
    while start_attempt may count that attempt twice.
    """

    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX):
        self._redis = client
        self._prefix = prefix
        self._running = prefix + "running"
        self._ended = prefix + "ended"
        self._idempotency = prefix + "idempotency"
        self._create = client.register_script(_CREATE)
        self._start_attempt = client.register_script(_START_ATTEMPT)
        self._finish = client.register_script(_FINISH)
        self._prune = client.register_script(_PRUNE)
        self._warn_unless_durable()

    @classmethod
    def from_url(cls, url: str, *, password: str | None = None, prefix: str = DEFAULT_PREFIX) -> RedisJobStore:
        """A store on the Redis at `url`; `password` applies when the URL carries none."""
        client = redis.Redis.from_url(
            url, password=password, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
            health_check_interval=30, retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=12))
        return cls(client, prefix)

    def create(self, job: Job) -> Job:
        idempotency = f"{job.tenant}:{job.idempotency_key}" if job.idempotency_key is not None else ""
        if job.status == RUNNING:
            score_set, score = "running", job.created_us
        elif job.ended_us is not None:
            score_set, score = "ended", job.ended_us
        else:
            score_set, score = "", 0
        fields = _encode(job)
        stored = self._create(keys=[self._key(job.inference_id), self._running, self._ended, self._idempotency],
                              args=[self._prefix, job.inference_id, idempotency, score_set, score,
                                    *[part for item in fields.items() for part in item]])
        return _decode(stored)

    def get(self, inference_id: str) -> Job | None:
        fields = self._redis.hgetall(self._key(inference_id))
        return _decode(fields) if fields else None

    def start_attempt(self, inference_id: str) -> int:
        attempts = self._start_attempt(keys=[self._key(inference_id)])
        if attempts is None:
            raise KeyError(inference_id)
        return int(attempts)

    def finish(self, inference_id: str, status: str, *, error: str | None = None,
               results: dict[str, str] | None = None) -> bool:
        if status not in (SUCCESS, FAILED):
            raise ValueError(f"a job finishes as {SUCCESS} or {FAILED}, not {status!r}")
        pairs = ["status", status]
        if error is not None:
            pairs += ["error", error]
        if results is not None:
            pairs += ["results", json.dumps(results)]
        done = self._finish(keys=[self._key(inference_id), self._running, self._ended],
                            args=[inference_id, now_us(), *pairs])
        return done == 1

    def running(self) -> list[Job]:
        ids = self._redis.zrange(self._running, 0, -1)
        pipe = self._redis.pipeline(transaction=False)
        for inference_id in ids:
            pipe.hgetall(self._key(inference_id))
        jobs = [_decode(fields) for fields in pipe.execute() if fields]
        return [job for job in jobs if job.status == RUNNING]

    def prune(self, ended_before_us: int) -> list[Job]:
        pruned: list[Job] = []
        while True:
            batch = self._prune(keys=[self._ended, self._idempotency],
                                args=[self._prefix, ended_before_us, PRUNE_BATCH])
            pruned += [_decode(fields) for fields in batch]
            if len(batch) < PRUNE_BATCH:
                return pruned

    def close(self) -> None:
        self._redis.close()

    def _key(self, inference_id: str) -> str:
        return f"{self._prefix}job:{inference_id}"

    def _warn_unless_durable(self) -> None:
        try:
            config = self._redis.config_get("append*")
        except redis.ResponseError:
            return  # managed Redis services often refuse CONFIG; their persistence is theirs to set
        if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
            get_logger().warning("the job store's Redis does not fsync every write: accepted jobs can be lost "
                                 "in a crash (set appendonly yes, appendfsync always)",
                                 extra={"appendonly": config.get("appendonly"),
                                        "appendfsync": config.get("appendfsync")})


def _encode(job: Job) -> dict[str, str | int]:
    fields: dict[str, str | int] = {}
    for name, value in vars(job).items():
        if value is None:
            continue
        fields[name] = json.dumps(value) if name in _JSON_FIELDS else value
    return fields


def _decode(fields: dict[str, str] | list[str]) -> Job:
    if isinstance(fields, list):  # HGETALL inside a script: a flat [field, value, ...] list
        fields = dict(zip(fields[::2], fields[1::2]))
    values: dict = dict(fields)
    for name in _INT_FIELDS:
        if name in values:
            values[name] = int(values[name])
    for name in _JSON_FIELDS:
        if name in values:
            values[name] = json.loads(values[name])
    return Job(**values)
