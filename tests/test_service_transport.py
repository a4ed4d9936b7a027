"""The service under Ray's gRPC transport between deployments (`RAY_SERVE_USE_GRPC_BY_DEFAULT=1`,
which `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` turns on): a long input still converts, because the
service's own handles keep passing samples, features and audio through the object store
(`deployments.ray_env.by_reference`); over gRPC, messages past 4 MiB fail.

Ray reads the variable when it starts, so the service runs in a Ray of its own, in a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
APP = "grpc"
VOICE = "v2-48k-nof0"  # no pitch track: the fastest real conversion of the fixture set
SECONDS, RATE = 35.0, 48000  # one chunk; 6.7 MB of stereo PCM16 in, 6.7 MB of float32 out of synthesis


def test_a_long_input_converts_with_grpc_between_deployments(tmp_path, fixture_set):
    from deployments.registry import add_model

    data = tmp_path / "data"
    voice = fixture_set["voices"][VOICE]
    add_model(data, "voice", voice["pth"], voice["index"])
    t = np.arange(int(SECONDS * RATE)) / RATE
    tone = 0.3 * np.sin(2 * np.pi * (150 + 30 * np.sin(2 * np.pi * 0.5 * t)) * t)
    source, dest = tmp_path / "long.wav", tmp_path / "long.flac"
    sf.write(source, np.stack([tone, 0.5 * tone], axis=1), RATE, subtype="PCM_16")
    assert source.stat().st_size > 6 * 2**20
    config = {"data_dir": str(data), "hubert_path": fixture_set["hubert"], "source": str(source), "dest": str(dest)}
    env = {**os.environ, "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}
    done = subprocess.run([sys.executable, __file__, json.dumps(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    audio, rate = sf.read(dest)
    assert rate == 48000 and abs(len(audio) / rate - SECONDS) < 0.08 and np.abs(audio).max() > 0


def _serve_and_convert(config: dict) -> None:
    """In the subprocess: a new local Ray and Serve, the application, one file through its handle."""
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.batch import BatchOptions
    from deployments.batch_ray import ServeHandleBackend
    from tests.service_support import TEST_STAGES, _free_port, write_keys

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=192 * 1024 * 1024,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
        data = Path(config["data_dir"])
        serve.run(build_app({"data_dir": str(data), "hubert_path": config["hubert_path"],
                             "api_keys_file": str(write_keys(data / "keys", "transport-key-0123456789")),
                             "job_timeout_s": 600, "stages": TEST_STAGES}), name=APP, route_prefix=f"/{APP}")
        backend = ServeHandleBackend(APP, BatchOptions(model_ids=("voice",), fmt="flac"), timeout_s=600)
        backend.convert(Path(config["source"]), Path(config["dest"]), "voice")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _serve_and_convert(json.loads(sys.argv[1]))
