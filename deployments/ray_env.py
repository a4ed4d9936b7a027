"""How the service uses Ray's transport: the environment every Ray node starts with, and the
transport of the service's own handles.

Ray Serve reads these variables when its processes start, so they cannot live in the Serve
config: scripts/serve.sh exports them, the Dockerfile bakes them into the image, every container
of the KubeRay manifests sets them, and the Ray that the tests and benchmarks start takes them
from here (tests/test_k8s_manifests.py checks that each of those places sets every one).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .backpressure import PROXY_CALLBACK, PROXY_CALLBACK_ENV

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

RAY_NODE_ENV: dict[str, str] = {
    # Request bodies flow at the pace the ingress reads them (deployments/backpressure.py).
    PROXY_CALLBACK_ENV: PROXY_CALLBACK,
    # The Serve proxy hands each request to the ingress replica over gRPC, not as a Ray actor
    # call: ~10 % less CPU per request over all processes (docs/performance.md, session 21).
    "RAY_SERVE_PROXY_USE_GRPC": "1",
}


def set_ray_node_env() -> None:
    """Put RAY_NODE_ENV into this process's environment where it does not set them already, before
    it starts a Ray (whose processes inherit it)."""
    for name, value in RAY_NODE_ENV.items():
        os.environ.setdefault(name, value)


def by_reference(handle: DeploymentHandle) -> DeploymentHandle:
    """`handle` passing arguments and results through Ray's object store, whatever Ray's default.

    With `RAY_SERVE_USE_GRPC_BY_DEFAULT=1` (part of `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`, which Ray's
    KubeRay high-throughput guide sets) handles send them over gRPC instead, in messages of at most
    `RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH` (4 MiB): a 30 s input's samples, features or
    converted audio are larger, and its conversion failed ("Received message larger than max")."""
    return handle.options(_by_reference=True)
