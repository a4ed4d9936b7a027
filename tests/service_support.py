"""Shared pieces of the service tests: one local Ray + Serve per test session, apps on it.

Ray is started once per pytest process (2 CPUs, no dashboard, small object store) however
many test modules ask for it, and stopped at the end of the session. Each app gets its own
name and route prefix and is deleted (with its job actors) after use.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf

from deployments.ray_env import set_ray_node_env
from deployments.settings import STAGE_DEFAULTS

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Set before Ray starts: the Serve proxy reads them at its start (as scripts/serve.sh sets them).
set_ray_node_env()

_state: dict = {}

# Every stage of a test app: one replica, no CPU reserved (2 cores are shared), fast stop.
TEST_STAGE = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0, "num_gpus": 0,
              "graceful_shutdown_timeout_s": 0.5}
TEST_STAGES = {name: dict(TEST_STAGE) for name in STAGE_DEFAULTS}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_url():
    """Base URL of the Serve HTTP proxy on 127.0.0.1 (Ray started on first use)."""
    import ray
    from ray import serve

    if "url" not in _state:
        # The GCS keeps the events of the last N tasks for the state API (Ray's default: 100,000,
        # ~14 MB more GCS memory per 1,000 soak jobs until then); a small N makes long runs (the soak)
        # reach that bound at once instead of reading as growth.
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=192 * 1024 * 1024,
                 log_to_driver=False, ignore_reinit_error=True,
                 _system_config={"task_events_max_num_task_in_gcs": 1000})
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
        _state["url"] = f"http://127.0.0.1:{port}"
    yield _state["url"]
    if _state.pop("url", None) is not None:
        serve.shutdown()
        ray.shutdown()


def run_app(app, name: str) -> None:
    from ray import serve

    serve.run(app, name=name, route_prefix=f"/{name}")


def delete_app(name: str) -> None:
    from ray import serve

    from deployments.jobs import kill_actors

    serve.delete(name)
    kill_actors(name)


def write_keys(path: Path, *keys: str) -> Path:
    path.write_text("# test keys\n" + "\n".join(keys) + "\n")
    return path


def register_fake_voice(data_dir: Path, model_id: str, created_at: str = "2024-01-01 00:00:00.000000 +00:00",
                        owner: str | None = None) -> None:
    """A registry entry without real weights: the ingress and fake conversions only read meta.
    `owner`: the owning tenant id (public when None)."""
    d = data_dir / "voices" / model_id
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.pth").write_bytes(b"not loaded by these tests")
    meta = {"modelId": model_id, "name": model_id, "version": "v2", "sampleRate": 40000, "f0": True,
            "createdAt": created_at}
    (d / "meta.json").write_text(json.dumps(meta if owner is None else {**meta, "owner": owner}))


def streamed_multipart(file_bytes: int, boundary: str = "rvc-test-boundary") -> tuple[dict, int, Iterator[bytes]]:
    """A multipart body whose `audioInfer` part holds `file_bytes` zero bytes, made 1 MiB at a
    time as it is sent: (its Content-Type header, its length, its chunks)."""
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audioInfer\"; filename=\"big.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        block = bytes(1024 * 1024)
        left = file_bytes
        while left:
            n = min(left, len(block))
            yield block[:n]
            left -= n
        yield tail
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, len(head) + file_bytes + len(tail), chunks()


def wav_bytes(seconds: float = 0.5, rate: int = 16000, path: Path | None = None) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    audio = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    target = path or Path(os.environ.get("TMPDIR", "/tmp")) / f"rvc-test-{os.getpid()}-{time.time_ns()}.wav"
    sf.write(target, audio, rate, subtype="PCM_16")
    data = target.read_bytes()
    if path is None:
        target.unlink()
    return data


def wait_for(predicate, timeout_s: float, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def ray_processes() -> list[psutil.Process]:
    """Every process of this test session's Ray: all run below this pytest process, so other
    Ray instances on the machine are never picked."""
    return psutil.Process().children(recursive=True)


def ray_process(title: str) -> psutil.Process:
    """The process of this session's Ray whose title (argv[0], set by Ray) is `title`."""
    titles = {p: _title(p) for p in ray_processes()}
    found = [p for p, t in titles.items() if t is not None and (t == title or t.startswith(title + "."))]
    assert len(found) == 1, f"{len(found)} processes titled {title!r} among {sorted(map(str, titles.values()))}"
    return found[0]


def _title(process: psutil.Process) -> str | None:
    try:
        cmdline = process.cmdline()
    except psutil.Error:
        return None
    return cmdline[0].strip() if cmdline else None


def private_memory_bytes(pid: int) -> int:
    """RssAnon: the process's own resident memory, without the object store's shared pages
    that Ray maps into it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise KeyError("RssAnon")


class MemoryGrowth:
    """Private memory of one process above its value at `start()`: the highest of samples
    taken every 2 ms until `stop()` (`peak`), and the value at `stop()` (`final`)."""

    def __init__(self, process: psutil.Process) -> None:
        self.pid, self.peak, self.final = process.pid, 0, 0
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> MemoryGrowth:
        self._before = private_memory_bytes(self.pid)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, private_memory_bytes(self.pid) - self._before)
            time.sleep(0.002)

    def stop(self) -> MemoryGrowth:
        self._done.set()
        self._sampler.join()
        self.final = private_memory_bytes(self.pid) - self._before
        self.peak = max(self.peak, self.final)
        return self


@contextmanager
def peak_memory_growth(process: psutil.Process) -> Iterator[MemoryGrowth]:
    """`MemoryGrowth` of the process while the block runs."""
    growth = MemoryGrowth(process).start()
    try:
        yield growth
        time.sleep(0.05)  # the replica may still be freeing (or holding) what it read
    finally:
        growth.stop()
