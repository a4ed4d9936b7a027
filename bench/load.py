"""Service load test: the job API on 127.0.0.1 under concurrent clients, with 1…N distinct voices.

    .venv/bin/python bench/load.py [--full] [--concurrency 1,4] [--voices 1,3] [--jobs N]
        [--audio-seconds 1 | --upload-mb 5] [--f0-method crepe-tiny|crepe|rmvpe|pm|harvest] [--mode jobs|posts]
        [--conversion real|fake] [--think-s 0] [--poll-s 0.5,2 | --hold-s 10] [--replicas synthesis=2,... | --autoscale]
        [--voices-per-replica 4] [--overlay gpu-prod] [--warm] [--upload-repeats 1] [--time-limit-s 240]
        [--out bench/results/load.json]

It starts its own local Ray and Serve (the app of serve_config.yaml through `build_app`, or with
`--overlay` the app args a Kubernetes overlay deploys, with fixed replica counts, on a free port,
with a fresh data directory holding the demo voice and its copies `voice-NN`, and random rmvpe
weights for `--f0-method rmvpe`, so the conversion stages are the real ones on random weights),
runs one cell per (voices, concurrency) and stops everything it started. Each cell runs closed-loop
clients, each picking a voice at random (seeded) per request:

    jobs   each client POSTs, polls its job until it ends (`--hold-s`: held polls), then POSTs
           again: POST latency, job latency (the service's own start/end times, and as the client
           saw it), polls per job, jobs per minute and audio-seconds converted per wall-second;
    posts  each client POSTs back to back (the jobs run afterwards): POST latency only.
           With `--conversion fake` the conversion is tests/fake_conversion.py, so the jobs
           cost no model time and the upload path is what is measured.

Per cell it also reads the service's /metrics before and after (voice-cache hits, misses,
evictions; cold voice loads, the `voice_load` stage; mean latency per stage) and the CPU
seconds every process of its Ray used per request (by actor: which does not depend on what
else runs on the machine, where latencies do). The peak RSS of each of those processes
(replicas, proxy, controller, job and rate-limit actors) is sampled throughout, and where
nvidia-smi runs their peak GPU memory and the GPUs' (`peak_gpu_mb`, `peak_gpus_used_mb`) and the
GPUs' busy share during each cell (`gpu_busy_pct`: is the GPU the bound?). `--warm`
converts once with every voice before the cells. The default is a quick run (a few minutes
on 2 cores); `--full` is the issue's matrix (concurrency 1/4/16/32 × 1/3/20 voices). Prints
a table and writes JSON; it asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from deployments.settings import AppSettings, StagesSettings

from deployments.ray_env import set_ray_node_env  # noqa: E402
from pipeline.pitch_methods import PITCH_METHODS  # noqa: E402

set_ray_node_env()  # as scripts/serve.sh
os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")  # as scripts/serve.sh

API_KEY = "bench-load-" + secrets.token_hex(8)
APP = "rvc"
FULL_CONCURRENCY, FULL_VOICES = (1, 4, 16, 32), (1, 3, 20)
# A client's job polls: the first after 0.5 s, then ×1.5 up to 2 s (`--poll-s`). Closed-loop
# clients learn of a job's end only at a poll, so jobs far shorter than that (GPUs) want shorter.
DEFAULT_POLL_S = (0.5, 2.0)
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S.%f %z"  # the contract's jobStartTime / jobEndTime
IDLE_SAMPLE_S = 3.0  # the service's own CPU use with no client, measured once after start


@dataclass
class CellResult:
    """What the clients of one cell saw; the service-side counters are added by `run_cell`."""

    post_s: list[float] = field(default_factory=list)  # latency of each accepted POST
    job_s: list[float] = field(default_factory=list)  # the service's jobStartTime → jobEndTime
    seen_s: list[float] = field(default_factory=list)  # the POST sent → the poll that saw the job end
    polls: int = 0
    statuses: Counter = field(default_factory=Counter)  # POST answers by HTTP status
    failed_jobs: int = 0
    unfinished_jobs: int = 0  # still RUNNING when the cell's time ran out


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation, as numpy), or None without values."""
    return float(np.percentile(values, q)) if values else None


def summarize(cell: CellResult, wall_s: float, audio_seconds: float) -> dict:
    """The cell's figures: POST and job latency (p50/p99/max, seconds), jobs per minute and
    audio-seconds converted per wall-second over the cell's wall time."""
    done = len(cell.job_s)
    return {
        "posts_accepted": len(cell.post_s), "post_statuses": {str(k): v for k, v in sorted(cell.statuses.items())},
        "post_p50_s": percentile(cell.post_s, 50), "post_p99_s": percentile(cell.post_s, 99),
        "post_max_s": max(cell.post_s, default=None),
        "jobs_succeeded": done, "jobs_failed": cell.failed_jobs, "jobs_unfinished": cell.unfinished_jobs,
        "job_p50_s": percentile(cell.job_s, 50), "job_p99_s": percentile(cell.job_s, 99),
        "job_seen_p50_s": percentile(cell.seen_s, 50), "polls_per_job": cell.polls / done if done else None,
        "wall_s": wall_s,
        "jobs_per_minute": 60.0 * done / wall_s if wall_s > 0 else None,
        "audio_s_per_wall_s": done * audio_seconds / wall_s if wall_s > 0 else None,
    }


def service_delta(before: dict[str, float], after: dict[str, float]) -> dict:
    """What the service counted between two /metrics scrapes: voice-cache events and hit rate,
    the cold voice loads, the input cache's hits and misses, the mean latency of each stage call, and per model stage the mean size
    and compute seconds of the batch a call ran in."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    hits, misses, loads = d.get("cache:hit", 0.0), d.get("cache:miss", 0.0), d.get("count:voice_load", 0.0)

    def means(prefix: str) -> dict[str, float]:
        stages = sorted(k.split(":", 1)[1] for k in d if k.startswith(f"{prefix}count:") and d[k] > 0)
        return {stage: d[f"{prefix}sum:{stage}"] / d[f"{prefix}count:{stage}"] for stage in stages}

    return {"voice_cache": {"hits": hits, "misses": misses, "evictions": d.get("cache:eviction", 0.0),
                            "hit_rate": hits / (hits + misses) if hits + misses else None,
                            "cold_loads": loads,
                            "cold_load_mean_s": d.get("sum:voice_load", 0.0) / loads if loads else None,
                            "cold_loads_within_1s": d.get("le1:voice_load", 0.0)},
            "input_cache": {"hits": d.get("input_cache:hit", 0.0), "misses": d.get("input_cache:miss", 0.0)},
            "stage_mean_s": means(""), "batch_mean_size": means("batch_"), "batch_mean_s": means("batch_s_")}


# metric sample name -> the key prefix `service_delta` reads it under (the stage label follows)
_STAGE_SERIES = {"rvc_stage_latency_seconds_count": "count:", "rvc_stage_latency_seconds_sum": "sum:",
                 "rvc_stage_batch_size_count": "batch_count:", "rvc_stage_batch_size_sum": "batch_sum:",
                 "rvc_stage_batch_seconds_count": "batch_s_count:", "rvc_stage_batch_seconds_sum": "batch_s_sum:"}


def parse_service_metrics(text: str) -> dict[str, float]:
    """The counters `service_delta` compares, from the /metrics text: "cache:<event>" (voices) and
    "input_cache:<event>"; per stage "count:<stage>", "sum:<stage>" and "le1:<stage>" (calls within
    1 s) of its latency, and the count and sum of its batches' sizes ("batch_count:", "batch_sum:")
    and seconds ("batch_s_…")."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "rvc_voice_cache_events_total":
                values[f"cache:{labels['event']}"] = sample.value
            elif sample.name == "rvc_input_cache_events_total":
                values[f"input_cache:{labels['event']}"] = sample.value
            elif sample.name in _STAGE_SERIES:
                values[_STAGE_SERIES[sample.name] + labels["stage"]] = sample.value
            elif sample.name == "rvc_stage_latency_seconds_bucket" and float(labels["le"]) == 1.0:
                values[f"le1:{labels['stage']}"] = sample.value
    return values


class ProcessSampler:
    """Peak RSS and CPU time of each Ray process below this one (the Ray it started), by pid and
    actor name, and where nvidia-smi runs the peak GPU memory of each process and of the GPUs
    (the model stages share a GPU with no fence between their memory). CPU seconds per request do
    not depend on what else runs on the machine; latency does."""

    GPU_EVERY = 4  # samples between nvidia-smi queries (each takes tens of ms)

    def __init__(self, interval_s: float = 0.25) -> None:
        import psutil

        self._me = psutil.Process()
        self._interval = interval_s
        self._nvidia_smi = shutil.which("nvidia-smi")
        self._samples = 0
        self.names: dict[int, str] = {}
        self.peak_rss: dict[int, int] = {}
        self.peak_gpu_mb: dict[int, float] = {}  # by pid (nvidia-smi's compute apps)
        self.peak_gpus_used_mb = 0.0  # all processes on all GPUs, whoever's
        self.gpu_busy: list[tuple[float, float]] = []  # (monotonic time, mean % of time a kernel ran)
        self.cpu_s: dict[int, float] = {}  # last seen user + system seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProcessSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        import psutil

        for proc in self._me.children(recursive=True):
            try:
                with proc.oneshot():
                    title = (proc.cmdline() or [proc.name()])[0]
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            with self._lock:
                # "ray::ServeReplica:rvc:Synthesis.synthesize" → "Synthesis", ".../raylet" → "raylet";
                # idle workers keep the name they had.
                name = (title.removeprefix("ray::").split(".")[0].split(":")[-1] if title.startswith("ray::")
                        else Path(title).name)
                if name != "IDLE":
                    self.names[proc.pid] = name
                self.peak_rss[proc.pid] = max(self.peak_rss.get(proc.pid, 0), rss)
                self.cpu_s[proc.pid] = times.user + times.system
        if self._nvidia_smi is not None and self._samples % self.GPU_EVERY == 0:
            self._sample_gpu_memory()
        self._samples += 1

    def _sample_gpu_memory(self) -> None:
        def query(*args: str) -> list[list[float]]:
            out = subprocess.run([self._nvidia_smi, *args, "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            rows = []
            for line in out.splitlines():
                try:
                    rows.append([float(v) for v in line.split(",")])
                except ValueError:  # "[N/A]" and the like
                    continue
            return rows

        try:
            apps = query("--query-compute-apps=pid,used_memory")
            gpus = [row for row in query("--query-gpu=memory.used,utilization.gpu") if len(row) == 2]
        except (OSError, subprocess.SubprocessError):
            return
        with self._lock:
            for pid, mb in (row for row in apps if len(row) == 2):
                self.peak_gpu_mb[int(pid)] = max(self.peak_gpu_mb.get(int(pid), 0.0), mb)
            if gpus:
                self.peak_gpus_used_mb = max(self.peak_gpus_used_mb, sum(mb for mb, _ in gpus))
                self.gpu_busy.append((time.monotonic(), sum(busy for _, busy in gpus) / len(gpus)))

    def gpu_busy_pct(self, since: float, until: float) -> float | None:
        """The GPUs' mean busy % (nvidia-smi's utilization.gpu: time some kernel ran) sampled
        between two time.monotonic() readings; None without samples."""
        with self._lock:
            seen = [busy for at, busy in self.gpu_busy if since <= at <= until]
        return sum(seen) / len(seen) if seen else None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def cpu_by_name(self) -> Counter:
        """CPU seconds so far, summed by actor or process name."""
        self.sample()
        with self._lock:
            totals: Counter = Counter()
            for pid, seconds in self.cpu_s.items():
                totals[self.names.get(pid, "process")] += seconds
            return totals

    def peak_rss_mb(self) -> dict[str, float]:
        """Peak RSS by "<actor or process> pid=<pid>" (replicas of one deployment are separate)."""
        with self._lock:
            return {f"{self.names.get(pid, 'process')} pid={pid}": round(rss / 2**20, 1)
                    for pid, rss in sorted(self.peak_rss.items(), key=lambda kv: self.names.get(kv[0], ""))}

    def peak_gpu_mb_by_process(self) -> dict[str, float]:
        """Peak GPU memory by "<actor or process> pid=<pid>" (a pid nvidia-smi reports from
        another pid namespace keeps the name "process")."""
        with self._lock:
            return {f"{self.names.get(pid, 'process')} pid={pid}": mb
                    for pid, mb in sorted(self.peak_gpu_mb.items(), key=lambda kv: self.names.get(kv[0], ""))}


def multipart_body(audio: bytes) -> tuple[bytes, str]:
    """The POST body, encoded once (so the clients spend no CPU on it) and its content type."""
    boundary = secrets.token_hex(16)
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audioInfer\"; filename=\"in.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode()
    return head + audio + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Uploads:
    """The body of each POST: each a distinct upload (4 bytes in the middle of the audio number
    it), as users send, since the service keeps inputs' features and f0 tracks by content and
    repeats of one upload skip those stages; with `repeats` N > 1 each upload goes N times in a row
    (a client converting each file in N voices), with 0 every POST is the same bytes (what that
    cache is worth at most). Numbered across cells, so no cell repeats an earlier one's upload."""

    def __init__(self, body: bytes, repeats: int = 1) -> None:
        self.body, self.repeats = body, repeats
        self._posts = itertools.count(0)

    def next(self) -> bytes:
        if self.repeats == 0:
            return self.body
        number = 1 + next(self._posts) // self.repeats
        middle = len(self.body) // 2
        return self.body[:middle] + number.to_bytes(4, "little") + self.body[middle + 4:]


async def run_clients(base_url: str, uploads: Uploads, content_type: str, voices: list[str], *, concurrency: int,
                      requests: int, mode: str, query: dict[str, str], deadline: float, seed: int,
                      think_s: float = 0.0, poll_s: tuple[float, float] = DEFAULT_POLL_S,
                      hold_s: int = 0) -> CellResult:
    """`concurrency` closed-loop clients sending `requests` creates in all (or until `deadline`),
    each pausing a random (exponential) time of mean `think_s` before each create. A job's
    latency is the service's own (its start and end times), so polling may be sparse: every
    poll costs the service an HTTP request, and polling fast would load what is measured.
    With `hold_s` each poll asks the service to hold it until the job ends (`Prefer: wait`);
    the `poll_s` schedule then applies only to polls it answered at once."""
    import httpx

    result = CellResult()
    rng = random.Random(seed)
    budget = iter(range(requests))
    headers = {"x-api-key": API_KEY, "content-type": content_type}
    poll_headers = {"x-api-key": API_KEY, **({"Prefer": f"wait={hold_s}"} if hold_s else {})}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async def client(http: httpx.AsyncClient) -> None:
        while next(budget, None) is not None and time.monotonic() < deadline:
            if think_s:
                await asyncio.sleep(rng.expovariate(1 / think_s))
            voice = rng.choice(voices)
            started = time.perf_counter()
            response = await http.post("/v1/inferences-vc", params={**query, "modelId": voice},
                                       content=uploads.next(), headers=headers)
            result.statuses[response.status_code] += 1
            if response.status_code != 200:
                continue
            result.post_s.append(time.perf_counter() - started)
            if mode == "posts":
                continue
            job_url = f"/v1/inferences-vc/{response.json()['inferenceId']}"
            pause_s = 0.0 if hold_s else poll_s[0]
            while True:
                await asyncio.sleep(pause_s)
                if time.monotonic() > deadline:
                    result.unfinished_jobs += 1
                    return
                answer = await http.get(job_url, headers=poll_headers)
                result.polls += 1
                job = answer.json()
                if "preference-applied" in answer.headers:
                    pause_s = 0.0
                else:  # answered at once: the schedule, from its start after a held poll
                    pause_s = min(poll_s[1], 1.5 * pause_s) if pause_s else poll_s[0]
                if job["status"] == "SUCCESS":
                    result.job_s.append(job_seconds(job))
                    result.seen_s.append(time.perf_counter() - started)
                    break
                if job["status"] == "FAILED":
                    result.failed_jobs += 1
                    break

    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return result


def job_seconds(job: dict) -> float:
    """A finished job's time from acceptance to its end, from the contract's timestamps."""
    start, end = (datetime.strptime(job[k], TIMESTAMP_FORMAT) for k in ("jobStartTime", "jobEndTime"))
    return (end - start).total_seconds()


def scrape(base_url: str) -> dict[str, float]:
    import httpx

    return parse_service_metrics(httpx.get(f"{base_url}/metrics", timeout=30).text)


def make_audio(seconds: float, work: Path) -> Path:
    """A 44.1 kHz mono PCM16 wav of speech-like sound (what users upload: decode resamples)."""
    import soundfile as sf

    from pipeline.demo import synthetic_speech

    path = work / f"input_{seconds:g}s.wav"
    sf.write(path, synthetic_speech(seconds, sample_rate=44100, seed=0), 44100, subtype="PCM_16")
    return path


def register_voices(data_dir: Path, count: int) -> list[str]:
    """`voice-00`… : copies of the demo voice (its weights and index), registered as an operator
    does (`rvc-serve models add`, which loads each to validate it). Each copy is its own cache entry."""
    from deployments.app import DEMO_VOICE
    from deployments.registry import add_model, get_voice

    demo = get_voice(data_dir / "voices", DEMO_VOICE)
    ids = [f"voice-{i:02d}" for i in range(count)]
    for model_id in ids:
        if get_voice(data_dir / "voices", model_id) is None:
            add_model(data_dir, model_id, demo.model_path, demo.index_path)
    return ids


def app_args(args: argparse.Namespace, data_dir: Path) -> dict:
    """serve_config.yaml's application args (or `--overlay`'s, less its paths into the image)
    with this run's data directory, keys, a limit no client reaches, and fixed replica counts
    (autoscaling would blur the cells: `--replicas`, else each stage's minimum), or with
    `--autoscale` the config's own replica ranges (what the app does under sustained load)."""
    from deployments.k8s_manifests import Overlay
    from deployments.serve_config import load_serve_config

    if args.overlay:
        config = Overlay(ROOT / "k8s", args.overlay).serve_config()
    else:
        config = load_serve_config(ROOT / "serve_config.yaml")
    base = next(a for a in config["applications"] if a["name"] == APP)["args"]
    base = {k: v for k, v in base.items() if k not in ("hubert_path", "rmvpe_path")}
    for flag, named in (("--replicas", args.replicas), ("--stage-set", args.stage_set)):
        unknown = set(named) - set(base["stages"])
        if unknown:
            raise ValueError(f"{flag}: no stage {', '.join(sorted(unknown))} (stages: {', '.join(base['stages'])})")
    stages = {}
    for name, stage in base["stages"].items():
        replicas = args.replicas.get(name, stage["min_replicas"])
        scaling = {} if args.autoscale else {"min_replicas": replicas, "max_replicas": replicas}
        stages[name] = {**stage, **args.stage_set.get(name, {}), **scaling, "graceful_shutdown_timeout_s": 1}
    keys = data_dir / "api-keys"
    keys.write_text(API_KEY + "\n")
    return {**base, "data_dir": str(data_dir), "api_keys_file": str(keys), "rate_limit_per_minute": 10**9,
            "voices_per_replica": args.voices_per_replica or base["voices_per_replica"], "stages": stages}


def write_random_rmvpe(data_dir: Path) -> None:
    """Random rmvpe weights in the published layout where the service looks by default, once."""
    from pipeline.rmvpe import random_rmvpe_state_dict, save_rmvpe

    if not (data_dir / "rmvpe.pt").is_file():
        save_rmvpe(random_rmvpe_state_dict(seed=0), data_dir / "rmvpe.pt")


def resources_needed(stages: StagesSettings, cluster_has_gpu: bool) -> dict[str, float]:
    """CPUs and GPUs the stages' replicas reserve at their minimum counts, as deployed."""
    need = {"CPU": 0.0, "GPU": 0.0}
    for name in type(stages).model_fields:
        stage = getattr(stages, name)
        actor = stage.deployment_options(name, cluster_has_gpu)["ray_actor_options"]
        need["CPU"] += actor["num_cpus"] * stage.min_replicas
        need["GPU"] += actor["num_gpus"] * stage.min_replicas
    return need


def start_service(args: argparse.Namespace, settings_args: dict) -> str:
    """Local Ray + Serve on a free port with the app (real stages, or the fake conversion)."""
    import ray
    from ray import serve

    from deployments.app import build_app, ingress_app
    from deployments.settings import AppSettings

    settings = AppSettings.model_validate(settings_args)
    ray.init(num_cpus=args.ray_cpus, num_gpus=args.ray_gpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=512 * 1024 * 1024)
    have = ray.cluster_resources()
    need = resources_needed(settings.stages, have.get("GPU", 0) > 0)
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if short:  # Serve would wait for ever for replicas Ray cannot place
        raise SystemExit("the replicas need more than this Ray has: " + ", ".join(
            f"{k} {v:g} (Ray has {h:g}: --ray-{k.lower()}s)" for k, (v, h) in short.items()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 300})
    if args.conversion == "fake":
        from tests.fake_conversion import FakeConversion

        app = ingress_app(settings, FakeConversion.options(ray_actor_options={"num_cpus": 0}).bind(settings))
    else:
        app = build_app(settings_args)
    serve.run(app, name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def glue_compiles_ended(logs: Path) -> int:
    """How many replicas logged the end of their decoder-glue compile, in Ray's log folder."""
    from deployments.stages import GLUE_COMPILED_LOG, GLUE_EAGER_LOG

    ended = 0
    for log in logs.glob("worker-*.err"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and (GLUE_COMPILED_LOG in line or GLUE_EAGER_LOG in line):
                try:
                    ended += json.loads(line).get("msg") in (GLUE_COMPILED_LOG, GLUE_EAGER_LOG)
                except json.JSONDecodeError:
                    continue
    return ended


def wait_for_glue_compile(settings: AppSettings, timeout_s: float = 240.0) -> float | None:
    """Seconds waited until every synthesis replica logged the end of its decoder-glue compile
    (deployments/stages.py compiles it in the background at start), or None where it compiles
    none (not bf16 on a CPU with bfloat16 arithmetic). A cell measured during the compile would
    count the compiler's CPU and the eager glue's time; with both cores busy loading the other
    replicas it took 44 s on one 2-core machine (6 s alone)."""
    import ray

    from deployments.stages import replica_precision
    from pipeline.convert import runs_decoder_glue

    if not runs_decoder_glue("cpu", replica_precision(settings, "cpu")):
        return None
    replicas = settings.stages.synthesis.min_replicas
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    started = time.monotonic()
    while glue_compiles_ended(logs) < replicas:
        if time.monotonic() - started > timeout_s:
            print(f"warning: no end of the decoder-glue compile logged in {timeout_s:.0f} s; measuring anyway")
            break
        time.sleep(0.5)
    return time.monotonic() - started


def run_cell(base_url: str, procs: ProcessSampler, idle_cpu: float, uploads: Uploads, content_type: str,
             voices: list[str], concurrency: int, deadline: float, query: dict[str, str], audio_seconds: float,
             args: argparse.Namespace) -> dict:
    """One (voices, concurrency) cell: the clients' figures, the service's CPU per request and
    its voice-cache counters over the cell."""
    before = scrape(base_url)
    cpu0, driver_cpu0 = procs.cpu_by_name(), time.process_time()
    started, started_monotonic = time.perf_counter(), time.monotonic()
    cell = asyncio.run(run_clients(
        base_url, uploads, content_type, voices, concurrency=concurrency,
        requests=args.jobs or (2 * concurrency if args.full else max(3, concurrency)), mode=args.mode, query=query,
        deadline=deadline, seed=args.seed + 1000 * len(voices) + concurrency, think_s=args.think_s,
        poll_s=args.poll_s, hold_s=args.hold_s))
    wall = time.perf_counter() - started
    sent = max(1, sum(cell.statuses.values()))
    cpu = procs.cpu_by_name()
    cpu.subtract(cpu0)
    return {"voices": len(voices), "concurrency": concurrency, **summarize(cell, wall, audio_seconds),
            "service_cpu_s_per_request": sum(cpu.values()) / sent,
            "service_cpu_s_per_request_above_idle": (sum(cpu.values()) - idle_cpu * wall) / sent,
            "cpu_s_per_request_by_process": {k: round(v / sent, 4) for k, v in cpu.most_common() if v > 0},
            "driver_cpu_s_per_request": (time.process_time() - driver_cpu0) / sent,
            "load_avg": os.getloadavg()[0], "replicas_at_end": running_replicas(),
            "gpu_busy_pct": procs.gpu_busy_pct(started_monotonic, time.monotonic()),
            **service_delta(before, scrape(base_url))}


def running_replicas() -> dict[str, int]:
    """Running replicas of each deployment of the app now (they change with `--autoscale`)."""
    from ray import serve

    app = serve.status().applications[APP]
    return {name: d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items()}


def stop_service() -> None:
    """Stop the Serve and the Ray this run started (the detached job actors go with the Ray)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def print_table(cells: list[dict]) -> None:
    cols = [("voices", "{:>6}"), ("concurrency", "{:>4}"), ("jobs_succeeded", "{:>5}"), ("post_p50_s", "{:>8}"),
            ("post_p99_s", "{:>8}"), ("job_p50_s", "{:>8}"), ("job_seen_p50_s", "{:>8}"), ("polls_per_job", "{:>6}"),
            ("jobs_per_minute", "{:>8}"), ("audio_s_per_wall_s", "{:>8}"), ("service_cpu_s_per_request", "{:>7}"),
            ("hit_rate", "{:>6}"), ("cold_load_mean_s", "{:>8}"), ("input_hits", "{:>6}"), ("gpu_busy_pct", "{:>7}")]
    heads = ["voices", "conc", "jobs", "POSTp50", "POSTp99", "job p50", "seen p50", "polls", "jobs/min", "audio/s",
             "CPU s", "hit", "cold s", "in hit", "GPU %"]
    print(" ".join(fmt.format(h) for (_, fmt), h in zip(cols, heads)))
    for cell in cells:
        row = {**cell, **cell["voice_cache"], "input_hits": cell.get("input_cache", {}).get("hits")}
        print(" ".join(fmt.format("-" if row.get(k) is None else
                                  (f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k])))
                       for k, fmt in cols))
    print("per model stage: mean call latency s / mean batch size / mean batch compute s")
    for cell in cells:
        stages = [f"{stage} {cell['stage_mean_s'][stage]:.3f}/{size:.1f}/{cell['batch_mean_s'].get(stage, 0):.3f}"
                  for stage, size in cell.get("batch_mean_size", {}).items() if stage in cell["stage_mean_s"]]
        print(f"  {cell['voices']:>3} voices c{cell['concurrency']:<3} " + "  ".join(stages))


def poll_schedule(text: str) -> tuple[float, float]:
    """'0.2,0.5' → (0.2, 0.5): the first poll's delay and the longest between polls."""
    try:
        first, longest = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIRST,MAX seconds") from None
    if not 0 < first <= longest:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 < FIRST <= MAX")
    return first, longest


def replica_counts(text: str) -> dict[str, int]:
    """'synthesis=2,conversion=4' → {'synthesis': 2, 'conversion': 4}."""
    counts = {}
    for item in filter(None, text.split(",")):
        name, sep, count = item.partition("=")
        if not sep or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: expected STAGE=N with N >= 1")
        counts[name.strip()] = int(count)
    return counts


def stage_overrides(text: str) -> dict[str, dict]:
    """'synthesis.num_gpus=0.25,pitch.max_batch_size=8' → {'synthesis': {'num_gpus': 0.25}, ...}
    (values as YAML reads them; the app's settings check names and values)."""
    import yaml

    overrides: dict[str, dict] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        stage, dot, field = key.strip().partition(".")
        if not sep or not dot or not stage or not field:
            raise argparse.ArgumentTypeError(f"{item!r}: expected STAGE.FIELD=VALUE")
        overrides.setdefault(stage, {})[field] = yaml.safe_load(value)
    return overrides


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the full matrix: concurrency 1,4,16,32 × voices 1,3,20")
    ap.add_argument("--concurrency", default="1,4", help="comma-separated client counts")
    ap.add_argument("--voices", default="1,3", help="comma-separated distinct-voice counts")
    ap.add_argument("--jobs", type=int, default=0,
                    help="creates per cell (default: one per client, at least 3; --full: two per client)")
    ap.add_argument("--mode", choices=["jobs", "posts"], default="jobs")
    ap.add_argument("--conversion", choices=["real", "fake"], default="real")
    ap.add_argument("--poll-s", type=poll_schedule, default=DEFAULT_POLL_S,
                    help="FIRST,MAX: a job's first poll after FIRST s, then every 1.5x as long up to MAX s (0.5,2)")
    ap.add_argument("--hold-s", type=int, default=0,
                    help="each poll asks the service to hold it until the job ends, up to this many s "
                         "(Prefer: wait); 0: plain polls on the --poll-s schedule")
    ap.add_argument("--think-s", type=float, default=0.0,
                    help="mean pause of each client before each create (0: back to back)")
    ap.add_argument("--audio-seconds", type=float, default=1.0, help="length of the uploaded speech")
    ap.add_argument("--upload-mb", type=float, default=0.0,
                    help="instead of --audio-seconds: an upload of this size (44.1 kHz mono PCM16 wav)")
    ap.add_argument("--f0-method", default="crepe-tiny", choices=PITCH_METHODS)
    scaling = ap.add_mutually_exclusive_group()
    scaling.add_argument("--replicas", type=replica_counts, default={},
                         help="fixed replicas of some stages, e.g. synthesis=2,conversion=4 (others: their minimum)")
    scaling.add_argument("--autoscale", action="store_true",
                         help="replicas autoscale in the config's ranges (default: fixed at each stage's minimum)")
    ap.add_argument("--stage-set", type=stage_overrides, default={},
                    help="stage settings over the config's, e.g. synthesis.num_gpus=0.25,pitch.num_gpus=0.125")
    ap.add_argument("--voices-per-replica", type=int, help="default: the config's")
    ap.add_argument("--overlay", help="the app args of this k8s overlay (e.g. gpu-prod) instead of serve_config.yaml's")
    ap.add_argument("--warm", action="store_true", help="convert once with every voice before the cells")
    ap.add_argument("--upload-repeats", type=int, default=1,
                    help="POSTs of each distinct upload, in a row (a file in N voices: the service's input cache "
                         "spares the repeats' features and pitch); 0: every POST the same bytes")
    ap.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--ray-gpus", type=int, help="default: the GPUs Ray finds")
    ap.add_argument("--cell-time-limit-s", type=float, help="default 120 (--full: 900)")
    ap.add_argument("--time-limit-s", type=float, help="for the whole run after start-up; default 240 (--full: 7200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="data directory to use (default: a fresh temporary one, removed after)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.json"))
    args = ap.parse_args(argv)
    if args.full:
        args.concurrency = ",".join(map(str, FULL_CONCURRENCY))
        args.voices = ",".join(map(str, FULL_VOICES))
    args.cell_time_limit_s = args.cell_time_limit_s or (900.0 if args.full else 120.0)
    args.time_limit_s = args.time_limit_s or (7200.0 if args.full else 240.0)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    voice_counts = [int(v) for v in args.voices.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="rvc-load-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    result: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                "load_avg_at_start": os.getloadavg()},
                    "config": {k: v for k, v in vars(args).items() if k not in ("work", "out")}, "cells": []}
    try:
        from deployments.app import prepare_data_dir
        from deployments.settings import AppSettings

        data_dir = work / "data"
        data_dir.mkdir(exist_ok=True)
        settings_args = app_args(args, data_dir.resolve())
        settings = AppSettings.model_validate(settings_args)
        prepare_data_dir(settings)
        if args.f0_method == "rmvpe":
            write_random_rmvpe(data_dir)
        voices = register_voices(data_dir, max(voice_counts))
        audio_path = (make_audio(args.upload_mb * 2**20 / (2 * 44100), work) if args.upload_mb
                      else make_audio(args.audio_seconds, work))
        audio = audio_path.read_bytes()
        audio_seconds = (len(audio) - 44) / (2 * 44100)
        body, content_type = multipart_body(audio)
        uploads = Uploads(body, repeats=args.upload_repeats)
        result["config"]["upload_bytes"] = len(audio)
        query = {"f0Method": args.f0_method}

        with ProcessSampler() as procs:
            try:
                started = time.perf_counter()
                base_url = start_service(args, settings_args)
                result["service_start_s"] = time.perf_counter() - started
                print(f"service up at {base_url} in {result['service_start_s']:.1f} s; upload {len(audio)} bytes "
                      f"({audio_seconds:.2f} s of audio)", flush=True)
                if args.conversion == "real":
                    waited = result["glue_compile_wait_s"] = wait_for_glue_compile(settings)
                    if waited is not None:
                        print(f"synthesis replicas compiled their decoder glue {waited:.1f} s after start-up")
                idle0 = procs.cpu_by_name()
                time.sleep(IDLE_SAMPLE_S)
                idle = procs.cpu_by_name()
                idle.subtract(idle0)
                idle_cpu = sum(idle.values()) / IDLE_SAMPLE_S
                result["idle_cpu_s_per_s"] = idle_cpu
                run_deadline = time.monotonic() + args.time_limit_s
                if args.warm:  # one job per voice, one after another, before any cell
                    before = scrape(base_url)
                    for voice in voices:
                        asyncio.run(run_clients(base_url, uploads, content_type, [voice], concurrency=1, requests=1,
                                                mode="jobs", query=query, deadline=run_deadline, seed=args.seed,
                                                poll_s=args.poll_s, hold_s=args.hold_s))
                    result["warm_up"] = service_delta(before, scrape(base_url))
                for n_voices in voice_counts:
                    for concurrency in concurrencies:
                        deadline = min(run_deadline, time.monotonic() + args.cell_time_limit_s)
                        if time.monotonic() >= deadline:
                            print(f"time limit reached: cell voices={n_voices} concurrency={concurrency} skipped")
                            continue
                        summary = run_cell(base_url, procs, idle_cpu, uploads, content_type, voices[:n_voices],
                                           concurrency, deadline, query, audio_seconds, args)
                        result["cells"].append(summary)
                        print(json.dumps(summary), flush=True)
            finally:
                stop_service()
        result["peak_rss_mb"] = procs.peak_rss_mb()
        if procs.peak_gpus_used_mb:
            result["peak_gpu_mb"] = procs.peak_gpu_mb_by_process()
            result["peak_gpus_used_mb"] = procs.peak_gpus_used_mb
        result["audio_seconds_per_job"] = audio_seconds
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(result["cells"])
    for name, mb in result.get("peak_rss_mb", {}).items():
        print(f"peak RSS {mb:8.1f} MB  {name}")
    for name, mb in result.get("peak_gpu_mb", {}).items():
        print(f"peak GPU {mb:8.1f} MB  {name}")
    if "peak_gpus_used_mb" in result:
        print(f"peak GPU memory used, all processes: {result['peak_gpus_used_mb']:.0f} MB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
