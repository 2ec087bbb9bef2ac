#!/usr/bin/env bash
# Open the Dagster UI on the demo: the Klaviyo sandbox in the background, then `dagster dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
port="${SANDBOX_PORT:-8765}"
# The demo's instance (one run at a time on the DuckDB file), written once, yours only.
if [ ! -f "$DAGSTER_HOME/dagster.yaml" ]; then
  mkdir -p "$DAGSTER_HOME" && chmod 700 "$DAGSTER_HOME"
  install -m 600 scripts/dagster_demo.yaml "$DAGSTER_HOME/dagster.yaml"
fi
# With the bundled demo config and no demo warehouse yet, make one: the sensors read it.
if [ -z "${KLAVIYO_PIPELINES_CONFIG:-}" ] && [ ! -f klaviyo_pipelines.yaml ] \
  && [ -z "${WAREHOUSE_URL:-}" ] && [ ! -f klaviyo_demo.duckdb ]; then
  klaviyo-pipelines demo
fi
klaviyo-pipelines sandbox --port "$port" &
sandbox=$!
trap 'kill $sandbox 2>/dev/null || true' EXIT
# The demo's sandbox key, whatever the shell exports: a real key must never reach the sandbox.
export KLAVIYO_API_KEY=pk_sandbox_demo
export KLAVIYO_BASE_URL="http://127.0.0.1:$port"
dagster dev -w workspace.yaml -p "${DAGSTER_PORT:-3000}"
