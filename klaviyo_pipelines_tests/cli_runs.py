"""Running the CLI in tests: the demo config pointed at a test warehouse and sandbox, and
commands run in-process with their stdout checked to be one JSON object."""

from __future__ import annotations

import json
import re
from pathlib import Path

from klaviyo_pipelines.cli import main
from klaviyo_pipelines.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def write_config(tmp_path: Path, url: str, sandbox: Sandbox, extra: str = "") -> str:
    """The demo config on `url` and `sandbox`, without step retries (failures show at once)."""
    text = (REPO / "klaviyo_pipelines" / "demo_config.yaml").read_text()
    text = text.replace("${WAREHOUSE_URL:-duckdb:///klaviyo_demo.duckdb}", url)
    text = text.replace("${KLAVIYO_BASE_URL:-http://127.0.0.1:8765}", sandbox.url)
    text = text.replace("retry: {max_retries: 1, delay_seconds: 10}", "retry: {max_retries: 0}")
    path = tmp_path / "klaviyo_pipelines.yaml"
    path.write_text(text + extra)
    return str(path)


def run(capsys, *argv: str) -> tuple[int, dict]:
    """Run a command in JSON mode: stdout must be one JSON object and nothing else."""
    code, out, _ = run_text(capsys, *argv, "--output", "json")
    assert out.count("\n") == 1 and out.endswith("\n"), out
    return code, json.loads(out)


def run_text(capsys, *argv: str) -> tuple[int, str, str]:
    """Run a command: exit code, stdout, and stderr without terminal escape codes."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, ANSI.sub("", captured.err)
