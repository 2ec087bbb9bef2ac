#!/usr/bin/env bash
# Open the Dagster UI on the demo: the Klaviyo sandbox in the background, then `dagster dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
port="${SANDBOX_PORT:-8765}"
klaviyo-pipelines sandbox --port "$port" &
sandbox=$!
trap 'kill $sandbox 2>/dev/null || true' EXIT
export KLAVIYO_API_KEY="${KLAVIYO_API_KEY:-pk_sandbox_demo}"
export KLAVIYO_BASE_URL="http://127.0.0.1:$port"
dagster dev -w workspace.yaml -p "${DAGSTER_PORT:-3000}"
