"""A Kubernetes API emulator on loopback (kmock's KubernetesEmulator: objects kept in memory,
real HTTP), run on its own event loop in a thread so the synchronous `kubernetes` client and
`rvc-serve k8s` can talk to it from a plain test."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import kmock
import yaml
from kubernetes import client


class Emulator:
    def __init__(self) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._handler: kmock.KubernetesEmulator | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self.url = ""

    async def _serve(self) -> None:
        async with kmock.KubernetesEmulator() as handler, kmock.Server(handler) as server:
            self._handler, self.url = handler, str(server.url).rstrip("/")
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> Emulator:
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("the Kubernetes emulator did not start")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {"token": "test-token"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}]}))
        return path

    def api(self) -> client.ApiClient:
        return client.ApiClient(client.Configuration(host=self.url))

    def count_requests(self, method: str, plural: str) -> int:
        """Requests the emulator has served with this HTTP method on this resource."""
        async def count() -> int:
            return sum(1 for r in self._handler if r.method == method and r.resource is not None
                       and r.resource.plural == plural)

        return asyncio.run_coroutine_threadsafe(count(), self._loop).result(timeout=10)
