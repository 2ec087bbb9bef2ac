"""A real `dagster dev` (webserver, daemon, code server) for the end-to-end UI tests.

It runs in its own process group (webserver, daemon, code servers and run workers stay in
it), with its own DAGSTER_HOME and TMPDIR, so that stopping it can be checked: no process
left in that group, nothing left on disk once the directory is removed. Tests drive it
through the webserver's GraphQL API, the API the UI itself uses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
LOG_TAIL_LINES = 200
# The code location `workspace.yaml` loads: a python_module target is named after the module.
LOCATION = "klaviyo_pipelines.definitions"
REPOSITORY = "__repository__"

WORKSPACE_QUERY = """
{ workspaceOrError { ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""


# One run at a time (DuckDB), dequeued every second rather than every 5 s.
DAGSTER_YAML = """\
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: 1
    dequeue_interval_seconds: 1
telemetry:
  enabled: false
"""
START_SENSOR = """
mutation ($selector: SensorSelector!) { startSensor(sensorSelector: $selector) { __typename
  ... on Sensor { sensorState { status } } ... on Error { message } } }
"""
LAUNCH_RUN = """
mutation ($params: ExecutionParams!) { launchRun(executionParams: $params) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on Error { message }
  ... on RunConfigValidationInvalid { errors { message } } } }
"""


def sensor_selector(location: str, sensor: str) -> dict[str, str]:
    """GraphQL's SensorSelector for a sensor of a code location's only repository."""
    return {"repositoryLocationName": location, "repositoryName": REPOSITORY, "sensorName": sensor}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.5) -> T:
    """Poll `check` until it returns something other than None or False; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def artifacts_dir() -> Path:
    """Where tests leave files for people to look at: $KLAVIYO_PIPELINES_ARTIFACTS, else
    `test-artifacts/` in the repo (gitignored)."""
    path = Path(os.environ.get("KLAVIYO_PIPELINES_ARTIFACTS") or REPO / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def processes_in_group(group: int) -> list[str]:
    """Live processes of process group `group` ("pid: command line"): what a stop left behind."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, ...
        state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == group and state != "Z":
            found.append(f"{proc.name}: {cmdline[:160]}")
    return found


class DagsterDev:
    """`dagster dev -w workspace.yaml` on a free loopback port, logging to `home/dagster-dev.log`.

    `workspace` is the project's own by default; a test serving a user's project gives its own."""

    def __init__(
        self, home: Path, env: dict[str, str], workspace: Path = REPO / "workspace.yaml"
    ) -> None:
        self.home = home
        self.workspace = workspace
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "dagster-dev.log"
        self.env = {
            **os.environ,
            **env,
            "DAGSTER_HOME": str(home),
            "TMPDIR": str(home / "tmp"),  # dagster dev's sockets and files, removed with home
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def start(self, timeout: float = 90) -> None:
        (self.home / "tmp").mkdir(exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "dagster", "dev"),
                    *("-w", str(self.workspace), "-h", "127.0.0.1", "-p", str(self.port)),
                ],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, to stop it whole
            )
        try:
            wait_for(self._location_loaded, timeout, "dagster dev to load the code location")
        except BaseException:
            self.stop()
            raise

    def _location_loaded(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"dagster dev exited ({self.process.returncode}):\n{self.log()}")
        try:
            entries = self.graphql(WORKSPACE_QUERY)["workspaceOrError"]["locationEntries"]
        except httpx.TransportError:
            return False  # the webserver is not listening yet
        for entry in entries:
            if entry["locationOrLoadError"]["__typename"] == "PythonError":
                raise RuntimeError(f"the code location failed to load:\n{entry}")
        return bool(entries) and all(e["loadStatus"] == "LOADED" for e in entries)

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        response = self.http.post("/graphql", json={"query": query, "variables": variables})
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def log(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30) -> list[str]:
        """Stop dagster dev as Ctrl-C would, then kill whatever of its group is still alive.

        Returns the processes that outlived the graceful stop (empty when it shut down
        cleanly); none are left running either way."""
        self.http.close()
        if self.process is None:
            return []
        group = self.process.pid  # start_new_session: the leader's pid names the group
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        try:  # its children may take a moment longer to exit
            wait_for(lambda: not processes_in_group(group), 10, "dagster dev's children to exit")
            left: list[str] = []
        except TimeoutError:
            left = processes_in_group(group)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.process.wait(5)
        return left
