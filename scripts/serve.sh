#!/usr/bin/env bash
# Start the service on the embedded default: local Ray, data on local disk (./data), and the
# generated demo voice `demo` when no voice exists yet. Stop it with Ctrl-C (SIGTERM).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
# Request bodies flow at the pace the ingress reads them (deployments/backpressure.py).
export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.backpressure:install_in_proxy
# The proxy hands each request to the ingress over gRPC, not a Ray actor call (less CPU per request).
export RAY_SERVE_PROXY_USE_GRPC=1
# Serve's controller loop every 0.5 s, not 0.1 s: an idle app's Ray uses 0.22 cores, not 0.31
# (a small machine's share); replicas still start, scale and recover, at most 0.4 s later.
export RAY_SERVE_CONTROL_LOOP_INTERVAL_S=${RAY_SERVE_CONTROL_LOOP_INTERVAL_S:-0.5}
exec .venv/bin/serve run serve_config.yaml "$@"
