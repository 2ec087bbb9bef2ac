#!/usr/bin/env bash
# Open the Dagster UI on the demo: the Klaviyo sandbox in the background, then `dagster dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
port="${SANDBOX_PORT:-8765}"
# The demo warehouse is a DuckDB file, which one process at a time may open: queue runs one
# at a time (docs/operations.md). Written once; edit it freely afterwards.
if [ ! -f "$DAGSTER_HOME/dagster.yaml" ]; then
  cat >"$DAGSTER_HOME/dagster.yaml" <<'YAML'
concurrency:
  runs:
    max_concurrent_runs: 1
telemetry:
  enabled: false
YAML
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
