"""The service with `job_store` on Redis (as on KubeRay): the job actor keeps every job there,
and a restarted job actor runs the RUNNING job again from what Redis holds."""
from __future__ import annotations

import json

import pytest

from deployments.jobs import NAMESPACE, tracker_name
from tests.redis_server import RedisServer
from tests.service_support import serve_url, wait_for, wav_bytes  # noqa: F401
from tests.test_service_api import _app, _calls, _post, _wait_status


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"), "service-password")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def svc(tmp_path_factory, serve_url, redis_server):  # noqa: F811
    # The password rides in the URL here: Ray's workers were started before this module's env.
    url = f"redis://:{redis_server.password}@127.0.0.1:{redis_server.port}/0"
    yield from _app(tmp_path_factory, serve_url, "redisjobs", rate_limit_per_minute=1000, job_timeout_s=60, job_store=url)


def test_jobs_live_in_redis_and_survive_a_job_actor_restart(svc, redis_server):
    import ray

    redis = redis_server.client()
    job = _post(svc, {"modelId": "voice-slow", "indexRate": "0.5"}, wav_bytes()).json()
    record = redis.hgetall(f"rvc-serve:job:{job['inferenceId']}")
    assert record["status"] == "RUNNING" and record["model_id"] == "voice-slow"
    assert json.loads(record["params"])["index_rate"] == 0.5
    assert not (svc.data / "jobs.sqlite3").exists()

    wait_for(lambda: job["inferenceId"] in _calls(svc), 20)
    ray.kill(ray.get_actor(tracker_name(svc.name), namespace=NAMESPACE), no_restart=False)
    done = _wait_status(svc, job["inferenceId"], timeout_s=60)
    assert done["status"] == "SUCCESS"
    assert _calls(svc).count(job["inferenceId"]) == 2  # run again by the restarted actor, from Redis
    record = redis.hgetall(f"rvc-serve:job:{job['inferenceId']}")
    assert record["status"] == "SUCCESS" and record["attempts"] == "2"
    assert json.loads(record["results"]) == {"mp3": f"{job['inferenceId']}/output.mp3"}
    redis.close()
