"""The environment every Ray node of the service starts with.

Ray Serve reads these variables when its processes start, so they cannot live in the Serve
config: scripts/serve.sh exports them, the Dockerfile bakes them into the image, every container
of the KubeRay manifests sets them, and the Ray that the tests and benchmarks start takes them
from here (tests/test_k8s_manifests.py checks that each of those places sets every one).
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

from .backpressure import PROXY_CALLBACK, PROXY_CALLBACK_ENV

RAY_NODE_ENV: dict[str, str] = {
    # Request bodies flow at the pace the ingress reads them (deployments/backpressure.py).
    PROXY_CALLBACK_ENV: PROXY_CALLBACK,
    # The Serve proxy hands each request to the ingress replica over gRPC, not as a Ray actor
    # call: ~10 % less CPU per request over all processes (docs/performance.md, session 21).
    "RAY_SERVE_PROXY_USE_GRPC": "1",
}


def set_ray_node_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Put RAY_NODE_ENV into `environ` where it does not set them already (before Ray starts)."""
    for name, value in RAY_NODE_ENV.items():
        environ.setdefault(name, value)
