"""Ray mode of `rvc-serve batch`: each file through the application's Serve handle
(`Ingress.convert_audio`), from a driver in the cluster (Ray Jobs) or attached to it, so no
HTTP hop is paid and every result format of the store is reachable.
"""
from __future__ import annotations

import io
from pathlib import Path

import ray
import soundfile as sf
from ray import serve
from ray.exceptions import RayTaskError

from rvc_client.files import atomic_path

from .batch import BatchOptions
from .jobs import one_line_error
from .ray_env import by_reference


def connect(address: str) -> None:
    """Attach this process to the cluster at `address` (`auto`, `ray://host:10001`, a GCS
    address), unless it already is (a driver started by `ray job submit`, or the tests)."""
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)


class ServeHandleBackend:
    def __init__(self, app_name: str, options: BatchOptions, timeout_s: float):
        self.handle = by_reference(serve.get_app_handle(app_name))  # whole files in and out
        self.options, self.timeout_s = options, timeout_s
        # wav is the FLAC result decoded here: the same 16-bit samples, no third copy in the store.
        self.result_format = "flac" if options.fmt == "wav" else options.fmt

    def convert(self, source: Path, dest: Path, model_id: str) -> None:
        query = {"modelId": model_id, **self.options.params}
        response = self.handle.convert_audio.remote(source.read_bytes(), query, self.result_format)
        try:
            data = response.result(timeout_s=self.timeout_s)
        except TimeoutError:
            response.cancel()
            raise TimeoutError(f"no result within {self.timeout_s:g} s") from None
        except RayTaskError as exc:
            raise RuntimeError(one_line_error(exc)) from None
        with atomic_path(dest) as tmp:
            if self.options.fmt == "wav":
                audio, rate = sf.read(io.BytesIO(data), dtype="int16")
                sf.write(tmp, audio, rate, format="WAV", subtype="PCM_16")
            else:
                tmp.write_bytes(data)
