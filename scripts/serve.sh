#!/usr/bin/env bash
# Start the service on the embedded default: local Ray, data on local disk (./data), and the
# generated demo voice `demo` when no voice exists yet. Stop it with Ctrl-C (SIGTERM).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
# Request bodies flow at the pace the ingress reads them (deployments/backpressure.py).
export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.backpressure:install_in_proxy
exec .venv/bin/serve run serve_config.yaml "$@"
