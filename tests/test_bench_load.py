"""The load benchmark's arithmetic and its reading of the service's /metrics (no service runs)."""
import asyncio
import os
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from bench.load import (CellResult, Uploads, job_seconds, multipart_body, parse_service_metrics, percentile,
                        service_delta, summarize)
from deployments.jobs import _Metrics
from deployments.uploads import receive_upload


def test_percentiles_and_rates():
    cell = CellResult(post_s=[0.01 * i for i in range(1, 101)], job_s=[2.0, 4.0, 6.0], seen_s=[2.5, 4.5, 9.0],
                      polls=7, statuses=Counter({200: 100, 503: 2}), failed_jobs=1)
    summary = summarize(cell, wall_s=30.0, audio_seconds=5.0)
    assert summary["post_p50_s"] == pytest.approx(0.505)
    assert summary["post_p99_s"] == pytest.approx(0.9901)
    assert summary["post_max_s"] == pytest.approx(1.0)
    assert summary["job_p50_s"] == pytest.approx(4.0)
    assert summary["job_seen_p50_s"] == pytest.approx(4.5) and summary["polls_per_job"] == pytest.approx(7 / 3)
    assert summary["jobs_per_minute"] == pytest.approx(6.0)  # 3 jobs in 30 s
    assert summary["audio_s_per_wall_s"] == pytest.approx(0.5)  # 15 audio seconds in 30 s
    assert summary["post_statuses"] == {"200": 100, "503": 2} and summary["jobs_failed"] == 1
    assert percentile([], 99) is None
    assert summarize(CellResult(), 10.0, 5.0)["post_p99_s"] is None


def test_job_latency_from_the_contract_timestamps():
    job = {"jobStartTime": "2024-05-01 23:59:58.750000 +00:00", "jobEndTime": "2024-05-02 00:00:01.000000 +00:00"}
    assert job_seconds(job) == pytest.approx(2.25)


def test_voice_cache_figures_from_the_job_actors_metrics():
    metrics = _Metrics()
    before = parse_service_metrics(generate_latest(metrics.registry).decode())
    metrics.voice_cache.labels("hit").inc(19)
    metrics.voice_cache.labels("miss").inc(1)
    metrics.voice_cache.labels("eviction").inc(2)
    metrics.input_cache.labels("hit").inc(9)
    metrics.input_cache.labels("miss").inc(3)
    for seconds in (0.4, 1.5):
        metrics.stage.labels("voice_load").observe(seconds)
    metrics.stage.labels("synthesis").observe(0.2)  # another stage: not a voice load
    for size, seconds in ((4, 0.1), (8, 0.3)):  # two synthesis calls, in batches of 4 and 8
        metrics.batch_size.labels("synthesis").observe(size)
        metrics.batch_seconds.labels("synthesis").observe(seconds)
    after = parse_service_metrics(generate_latest(metrics.registry).decode())
    delta = service_delta(before, after)
    cache = delta["voice_cache"]
    assert cache["hits"] == 19 and cache["misses"] == 1 and cache["evictions"] == 2
    assert cache["hit_rate"] == pytest.approx(0.95)
    assert cache["cold_loads"] == 2 and cache["cold_load_mean_s"] == pytest.approx(0.95)
    assert cache["cold_loads_within_1s"] == 1
    assert delta["input_cache"] == {"hits": 9, "misses": 3}
    assert delta["stage_mean_s"] == pytest.approx({"voice_load": 0.95, "synthesis": 0.2})
    assert delta["batch_mean_size"] == pytest.approx({"synthesis": 6})
    assert delta["batch_mean_s"] == pytest.approx({"synthesis": 0.2})
    assert service_delta(after, after) == {"voice_cache": {**cache, "hits": 0, "misses": 0, "evictions": 0,
                                                           "hit_rate": None, "cold_loads": 0, "cold_load_mean_s": None,
                                                           "cold_loads_within_1s": 0},
                                           "input_cache": {"hits": 0, "misses": 0},
                                           "stage_mean_s": {}, "batch_mean_size": {}, "batch_mean_s": {}}

def test_prebuilt_body_is_the_upload_the_service_receives(tmp_path):
    audio = bytes(range(256)) * 1000
    body, content_type = multipart_body(audio)

    async def chunks():
        for i in range(0, len(body), 4096):
            yield body[i:i + 4096]

    upload = asyncio.run(receive_upload(content_type, chunks(), tmp_path))
    assert upload.path.read_bytes() == audio


def test_each_post_is_a_distinct_upload_unless_asked_for_repeats(tmp_path):
    audio = bytes(range(256)) * 1000
    body, content_type = multipart_body(audio)
    uploads = Uploads(body)
    received = []
    for _ in range(3):
        posted = uploads.next()

        async def chunks():
            yield posted

        received.append(asyncio.run(receive_upload(content_type, chunks(), tmp_path)).path.read_bytes())
    assert len(set(received)) == 3
    for upload in received:  # the same audio but for 4 bytes in its middle
        assert len(upload) == len(audio) and sum(a != b for a, b in zip(upload, audio)) <= 4
    same = Uploads(body, repeats=0)
    assert same.next() == same.next() == body
    threes = Uploads(body, repeats=3)
    posted = [threes.next() for _ in range(7)]
    assert posted[0] == posted[1] == posted[2] != posted[3] == posted[4] == posted[5] != posted[6]
    assert len(set(posted)) == 3 and body not in posted


def test_glue_compile_ends_are_counted_from_the_replicas_json_log_lines(tmp_path):
    """bench/load.py waits for each synthesis replica's "compile ended" line before measuring;
    the lines are the replica's own JSON log records (deployments/logs.py)."""
    import logging

    from bench.load import glue_compiles_ended
    from deployments.logs import JsonFormatter
    from deployments.stages import GLUE_COMPILED_LOG, GLUE_EAGER_LOG

    def record(msg: str, **extra) -> str:
        rec = logging.LogRecord("rvc", logging.INFO, __file__, 1, msg, None, None)
        rec.__dict__.update(extra)
        return JsonFormatter().format(rec)

    (tmp_path / "worker-a.err").write_text("\n".join([
        "plain stderr mentioning decoder glue compiled", record("voice loaded", model_id="demo"),
        record(GLUE_COMPILED_LOG, seconds=6.1)]) + "\n")
    assert glue_compiles_ended(tmp_path) == 1
    (tmp_path / "worker-b.err").write_text(record(GLUE_EAGER_LOG, reason="no compiler") + "\n{broken\n")
    (tmp_path / "raylet.err").write_text(record(GLUE_COMPILED_LOG) + "\n")  # not a worker's log
    assert glue_compiles_ended(tmp_path) == 2


def test_replica_counts_are_fixed_unless_autoscaling(tmp_path):
    """Cells compare like with like at fixed replica counts; `--autoscale` keeps the shipped
    config's ranges, so the run shows what the default app does under sustained load."""
    import yaml

    from bench.load import APP, ROOT, app_args, parse_args

    shipped = next(a for a in yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"]
                   if a["name"] == APP)["args"]["stages"]
    fixed = app_args(parse_args(["--replicas", "synthesis=3,conversion=2"]), tmp_path)["stages"]
    assert fixed["synthesis"]["min_replicas"] == fixed["synthesis"]["max_replicas"] == 3
    assert fixed["conversion"]["min_replicas"] == fixed["conversion"]["max_replicas"] == 2
    assert fixed["features"]["min_replicas"] == fixed["features"]["max_replicas"] == shipped["features"]["min_replicas"]
    scaling = app_args(parse_args(["--autoscale"]), tmp_path)["stages"]
    for name, stage in shipped.items():
        assert (scaling[name]["min_replicas"], scaling[name]["max_replicas"]) == \
            (stage["min_replicas"], stage["max_replicas"])
        assert scaling[name]["graceful_shutdown_timeout_s"] == 1
    assert any(s["max_replicas"] > s["min_replicas"] for s in shipped.values())  # something can scale
    with pytest.raises(ValueError, match="no stage synth"):
        app_args(parse_args(["--replicas", "synth=2"]), tmp_path)
    for bad in (["--replicas", "synthesis"], ["--replicas", "synthesis=0"],
                ["--replicas", "synthesis=2", "--autoscale"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_stage_settings_set_over_the_config_and_checked(tmp_path):
    from bench.load import app_args, parse_args
    from deployments.settings import AppSettings

    args = parse_args(["--overlay", "gpu-prod", "--replicas", "synthesis=2",
                       "--stage-set", "synthesis.num_gpus=0.25,pitch.max_batch_size=8"])
    stages = app_args(args, tmp_path)["stages"]
    assert stages["synthesis"]["num_gpus"] == 0.25 and stages["synthesis"]["min_replicas"] == 2
    assert stages["pitch"]["max_batch_size"] == 8 and stages["features"]["num_gpus"] == 0.25  # the overlay's
    with pytest.raises(ValueError, match="--stage-set: no stage synth"):
        app_args(parse_args(["--stage-set", "synth.num_gpus=1"]), tmp_path)
    for bad in ("synthesis=1", "num_gpus=1", ".num_gpus=1"):
        with pytest.raises(SystemExit):
            parse_args(["--stage-set", bad])
    with pytest.raises(ValueError, match="num_gpu"):  # the app's settings refuse unknown fields
        AppSettings.model_validate(app_args(parse_args(["--stage-set", "pitch.num_gpu=1"]), tmp_path))


def test_overlay_app_args_are_what_the_overlay_deploys_less_its_image_paths(tmp_path):
    """`--overlay gpu-prod` runs the GPU deployment's settings (fp16, batches of 16, GPU shares,
    8 voices per replica) on this run's data directory: the overlay's weight paths point into
    the container image, so the data directory's demo weights are used instead."""
    from bench.load import APP, ROOT, app_args, parse_args
    from deployments.k8s_manifests import Overlay
    from deployments.settings import AppSettings

    deployed = next(a for a in Overlay(ROOT / "k8s", "gpu-prod").serve_config()["applications"]
                    if a["name"] == APP)["args"]
    assert "hubert_path" in deployed and "rmvpe_path" in deployed
    args = app_args(parse_args(["--overlay", "gpu-prod"]), tmp_path)
    assert "hubert_path" not in args and "rmvpe_path" not in args and args["data_dir"] == str(tmp_path)
    assert args["precision"] == deployed["precision"] == "fp16"
    assert args["voices_per_replica"] == deployed["voices_per_replica"] == 8
    for name, stage in deployed["stages"].items():
        assert {k: v for k, v in args["stages"][name].items() if k in stage} == \
            {**stage, "max_replicas": stage["min_replicas"]}
    assert args["stages"]["synthesis"]["num_gpus"] == 0.5 and args["stages"]["features"]["max_batch_size"] == 16
    settings = AppSettings.model_validate(args)
    assert settings.hubert == tmp_path / "hubert_base.pt"
    assert app_args(parse_args(["--overlay", "gpu-prod", "--voices-per-replica", "3"]), tmp_path)[
        "voices_per_replica"] == 3
    with pytest.raises(ValueError, match="no overlay"):
        app_args(parse_args(["--overlay", "nonesuch"]), tmp_path)


def test_poll_schedule_argument():
    from bench.load import DEFAULT_POLL_S, parse_args

    assert parse_args([]).poll_s == DEFAULT_POLL_S == (0.5, 2.0)
    assert parse_args(["--poll-s", "0.2,0.5"]).poll_s == (0.2, 0.5)
    for bad in ("0.5", "1,0.5", "0,1", "a,b"):
        with pytest.raises(SystemExit):
            parse_args(["--poll-s", bad])


def test_resources_the_fixed_replicas_reserve(tmp_path):
    """What `start_service` checks against Ray before deploying: replicas Ray cannot place would
    keep Serve waiting for ever (the gpu-prod overlay on a machine without a GPU, say)."""
    from bench.load import app_args, parse_args, resources_needed
    from deployments.settings import AppSettings

    gpu_prod = app_args(parse_args(["--overlay", "gpu-prod", "--replicas", "conversion=4,ingress=2"]), tmp_path)
    gpu_prod_stages = AppSettings.model_validate(gpu_prod).stages
    # explicit GPU shares: 0.25 features + 0.25 pitch + 0.5 synthesis, with or without a GPU in the cluster
    assert resources_needed(gpu_prod_stages, cluster_has_gpu=False)["GPU"] == pytest.approx(1.0)
    stages = gpu_prod["stages"]
    assert resources_needed(gpu_prod_stages, cluster_has_gpu=True)["CPU"] == pytest.approx(
        sum(s["num_cpus"] * s["min_replicas"] for s in stages.values()))
    assert stages["conversion"]["min_replicas"] == 4
    shipped = AppSettings.model_validate(app_args(parse_args([]), tmp_path)).stages  # "auto": none without a GPU
    assert resources_needed(shipped, cluster_has_gpu=False)["GPU"] == 0
    assert resources_needed(shipped, cluster_has_gpu=True)["GPU"] > 0


def test_gpu_memory_is_sampled_per_process_where_nvidia_smi_runs(tmp_path, monkeypatch):
    """A stand-in nvidia-smi reports a child process at 1,234 MB, then 1,000 MB, and the GPU at
    2,048 MB and 37 % busy: the peaks are kept, by the process's name, and the busy share by time;
    without nvidia-smi nothing is sampled."""
    import subprocess
    import sys
    import time

    from bench.load import ProcessSampler

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        reading = tmp_path / "app_mb"
        reading.write_text("1234")
        fake = tmp_path / "nvidia-smi"
        fake.write_text("#!/bin/sh\n"
                        'case "$1" in\n'
                        f'  --query-compute-apps=*) echo "{child.pid}, $(cat {reading})"; echo "[N/A], [N/A]" ;;\n'
                        '  --query-gpu=*) echo "2048, 37" ;;\n'
                        "esac\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
        sampler = ProcessSampler()
        time.sleep(0.2)  # the child's command line is in place
        started = time.monotonic()
        sampler.sample()
        reading.write_text("1000")
        for _ in range(ProcessSampler.GPU_EVERY):
            sampler.sample()
        assert sampler.peak_gpu_mb_by_process() == {f"{Path(sys.executable).name} pid={child.pid}": 1234.0}
        assert sampler.peak_gpus_used_mb == 2048.0
        assert sampler.gpu_busy_pct(started, time.monotonic()) == 37.0
        assert sampler.gpu_busy_pct(time.monotonic() + 1, time.monotonic() + 2) is None
        monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
        assert ProcessSampler()._nvidia_smi is None
    finally:
        child.kill()
        child.wait()
