"""The CLI's error matrix: every command x every failure a user can cause x both output modes.

Each case asserts what a new user's first hour needs: no traceback on stderr, one message
naming what failed and where (file and key, option, warehouse and step, endpoint and status),
the documented exit code (2 configuration, 1 run failure, 130 interrupted), and under
`--output json` exactly one JSON object on stdout, with `error`. A new command or failure is
one row of `CASES`; docs/troubleshooting.md lists each row's message (test_docs keeps it so).

Global options go after the command here (before it, in the other CLI tests), so both places
are exercised. Combinations that cannot differ are left out: `sandbox` reads no config, `plan`
and `status` need no API key, `demo` brings its own key and sandbox.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from klaviyo_pipelines.demo import create_demo_warehouse
from klaviyo_pipelines.sandbox import Fault, Sandbox
from klaviyo_pipelines_tests.cli_runs import REPO, run_text, write_config
from klaviyo_pipelines_tests.conftest import TEST_API_KEY

ONE = ("--select", "customers_to_klaviyo")
IMPORTS = "/api/profile-bulk-import-jobs"
PASSWORD = "s3cret-pw-7731"
CLOSED_PORT = 1  # nothing listens on loopback port 1
TRACEBACK = "Traceback (most recent call last)"
WAREHOUSE_VARIABLE = "KP_MATRIX_WAREHOUSE_URL"


@dataclass
class World:
    """What the cases build on: a sound demo warehouse and config, and a running sandbox."""

    tmp: Path
    config: str
    sandbox: Sandbox
    request: pytest.FixtureRequest
    env: dict[str, str | None] = field(default_factory=dict)

    def variant(self, name: str, old: str, new: str) -> str:
        """The sound config with `old` replaced by `new`, as a new file."""
        text = Path(self.config).read_text()
        assert old in text, old
        path = self.tmp / f"{name}.yaml"
        path.write_text(text.replace(old, new))
        return str(path)

    def with_warehouse(self, name: str, url: str) -> str:
        """The sound config on another warehouse, its URL (and password) in a variable."""
        self.env[WAREHOUSE_VARIABLE] = url
        return self.variant(
            name,
            f"url: duckdb:///{self.tmp / 'warehouse.duckdb'}",
            f"url: ${{{WAREHOUSE_VARIABLE}}}",
        )


@dataclass(frozen=True)
class Case:
    """One failure: the commands it applies to, how to cause it (extra arguments, given the
    command), the exit code, and what the message must name."""

    name: str
    commands: tuple[str, ...]
    cause: Callable[[World, str], list[str]]
    code: int
    says: Callable[[World], list[str]]
    code_for: dict[str, int] = field(default_factory=dict)  # where a command differs
    selects: bool = True  # run the command on one sync (COMMAND_ARGS); else on what it names
    hidden: tuple[str, ...] = (PASSWORD,)  # never shown


def _config(path: Callable[[World], str]) -> Callable[[World, str], list[str]]:
    return lambda world, _command: ["--config", path(world)]


def _missing(world: World) -> str:
    return str(world.tmp / "missing.yaml")


def _directory(world: World) -> str:
    (world.tmp / "a_directory.yaml").mkdir(exist_ok=True)
    return str(world.tmp / "a_directory.yaml")


def _bad_yaml(world: World) -> str:
    return world.variant("bad_yaml", "models:", "models: [")


def _unknown_key(world: World) -> str:
    return world.variant("unknown_key", "  state_schema:", "  zz_state_shema: x\n  state_schema:")


def _missing_table(world: World) -> str:
    return world.variant(
        "missing_table", "select * from analytics.customers\n", "select * from analytics.nope\n"
    )


def _no_key(world: World, _command: str) -> list[str]:
    world.env["KLAVIYO_API_KEY"] = None
    return ["--config", world.config]


def _on_warehouse(name: str, url: str) -> Callable[[World, str], list[str]]:
    return lambda world, _command: ["--config", world.with_warehouse(name, url)]


def _wrong_password(world: World, _command: str) -> list[str]:
    server = world.request.getfixturevalue("mariadb_url")  # skips where MariaDB is absent
    host = server.split("@", 1)[1]
    url = f"mysql+pymysql://root:{PASSWORD}@{host}"
    return ["--config", world.with_warehouse("wrong_password", url)]


def _unreachable_klaviyo(world: World) -> str:
    return world.variant("no_klaviyo", world.sandbox.url, f"http://127.0.0.1:{CLOSED_PORT}")


def _refused_key(world: World, _command: str) -> list[str]:
    world.env["KLAVIYO_API_KEY"] = "pk_not_the_sandbox_key_0000000000000"
    return ["--config", world.config]


MISSING_SCOPE = json.dumps(
    {
        "errors": [
            {
                "id": "4f1c0c6e",
                "status": 403,
                "code": "permission_denied",
                "title": "You do not have permission to perform this action.",
                "detail": "The API key is missing the required scopes: profiles:write",
            }
        ]
    }
)


def _klaviyo_answers(status: int, body: str | None = None) -> Callable[[World, str], list[str]]:
    """Every bulk import answered `status` (the matrix's client makes one attempt)."""

    def cause(world: World, _command: str) -> list[str]:
        fault = Fault("status", status=status, count=None, path_prefix=IMPORTS, body=body)
        world.sandbox.faults.add(fault)
        world.request.addfinalizer(world.sandbox.faults.clear)
        return ["--config", world.config]

    return cause


def _interrupt(world: World, _command: str) -> list[str]:
    world.env["_interrupt"] = "1"
    return ["--config", world.config]


def _busy_port(world: World, _command: str) -> list[str]:
    return ["--port", world.sandbox.url.rsplit(":", 1)[1]]


def _with_option(*option: str) -> Callable[[World, str], list[str]]:
    return lambda world, _command: ["--config", world.config, *option]


CASES = [
    Case(
        "no config file",
        ("demo", "plan", "sync", "validate", "status"),
        _config(_missing),
        2,
        lambda w: [_missing(w), "(file)", "cannot read: No such file or directory"],
    ),
    Case(
        "unreadable config",
        ("plan", "sync", "validate", "status"),
        _config(_directory),
        2,
        lambda w: [_directory(w), "cannot read: Is a directory"],
    ),
    Case(
        "invalid YAML",
        ("demo", "plan", "sync", "validate", "status"),
        _config(_bad_yaml),
        2,
        lambda w: [_bad_yaml(w), "line ", "invalid YAML"],
    ),
    Case(
        "unknown key",
        ("plan", "sync", "validate", "status"),
        _config(_unknown_key),
        2,
        lambda w: [_unknown_key(w), "warehouse.zz_state_shema"],
    ),
    Case(
        "missing API key",
        ("sync", "validate"),
        _no_key,
        2,
        lambda w: [w.config, "klaviyo.api_key", "KLAVIYO_API_KEY is not set"],
    ),
    Case(
        "unknown --select",
        ("plan", "sync", "status"),
        _with_option("--select", "nope"),
        2,
        lambda w: [w.config, "--select", "no sync named 'nope'"],
    ),
    Case(
        "malformed --partition",
        ("plan", "sync"),
        _with_option("--partition", "2026-01-01'; drop table x; --"),
        2,
        lambda w: ["--partition", "is not a day: expected YYYY-MM-DD"],
    ),
    Case(
        "--partition outside the model's days",
        ("plan", "sync"),
        _with_option("--select", "orders_to_klaviyo", "--partition", "1999-01-01"),
        2,
        lambda w: [w.config, "--partition", "1999-01-01 is not a day of model 'orders'"],
    ),
    Case(
        "unknown --audience",
        ("sync",),
        _with_option("--audience", "nope"),
        2,
        lambda w: [w.config, "--audience", "no audience 'nope'"],
        selects=False,
    ),
    Case(
        "warehouse unreachable",
        ("demo", "plan", "sync", "validate", "status"),
        _on_warehouse(
            "unreachable", f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:{CLOSED_PORT}/shop"
        ),
        1,
        lambda w: [f"postgresql+psycopg://postgres:***@127.0.0.1:{CLOSED_PORT}/shop", "refused"],
        code_for={"validate": 2},  # validate: a config it cannot check (key warehouse.url)
    ),
    Case(
        "wrong warehouse password",
        ("plan", "sync", "validate", "status"),
        _wrong_password,
        1,
        lambda w: ["root:***@", "Access denied for user 'root'"],
        code_for={"validate": 2},
    ),
    Case(
        "missing table",
        ("plan", "sync", "validate"),
        _config(_missing_table),
        2,
        lambda w: [_missing_table(w), "models.customers", "analytics.nope"],
    ),
    Case(
        "Klaviyo unreachable",
        ("sync",),
        _config(_unreachable_klaviyo),
        1,
        lambda w: ["customers_to_klaviyo", "POST /api/profile-bulk-import-jobs", "connection"],
    ),
    Case(
        "key refused (401)",
        ("sync",),
        _refused_key,
        1,
        lambda w: ["customers_to_klaviyo", "POST /api/profile-bulk-import-jobs -> 401"],
        hidden=(PASSWORD, "pk_not_the_sandbox_key_0000000000000"),
    ),
    Case(
        "key lacks a scope (403)",
        ("sync",),
        _klaviyo_answers(403, MISSING_SCOPE),
        1,
        lambda w: ["customers_to_klaviyo", f"POST {IMPORTS} -> 403", "profiles:write"],
    ),
    Case(
        "Klaviyo 5xx after retries",
        ("sync",),
        _klaviyo_answers(503),
        1,
        lambda w: ["customers_to_klaviyo", f"POST {IMPORTS} -> 503"],
    ),
    Case(
        "interrupted (Ctrl-C)",
        ("demo", "plan", "sync", "validate", "status"),
        _interrupt,
        130,
        lambda w: ["interrupted by Ctrl-C"],
    ),
    Case(
        "sandbox port taken",
        ("sandbox",),
        _busy_port,
        1,
        lambda w: [f"cannot listen on 127.0.0.1:{w.sandbox.url.rsplit(':', 1)[1]}", "--port"],
    ),
]

COMMAND_ARGS = {
    "demo": ["--customers", "20", "--port", "0"],
    "plan": list(ONE),
    "sync": list(ONE),
    "validate": [],
    "status": list(ONE),
    "sandbox": [],
}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, Sandbox]]:
    """One sound warehouse, config and sandbox for the whole matrix (cases only break copies)."""
    tmp = tmp_path_factory.mktemp("matrix")
    url = f"duckdb:///{tmp / 'warehouse.duckdb'}"
    create_demo_warehouse(url, "klaviyo_sync", customers=20)
    with Sandbox(api_key=TEST_API_KEY, port=0) as sandbox:
        config = write_config(tmp, url, sandbox)
        # One attempt per request: an unreachable Klaviyo fails at once.
        text = Path(config).read_text()
        Path(config).write_text(
            text.replace('revision: "2026-07-15"', 'revision: "2026-07-15"\n  max_attempts: 1')
        )
        yield tmp, config, sandbox


def _rows() -> Iterator[object]:
    for case in CASES:
        for command in case.commands:
            for output in ("table", "json"):
                yield pytest.param(case, command, output, id=f"{case.name}-{command}-{output}")


@pytest.mark.parametrize(("case", "command", "output"), list(_rows()))
def test_error_matrix(case, command, output, shop, request, monkeypatch, capsys) -> None:
    tmp, config, sandbox = shop
    world = World(tmp, config, sandbox, request)
    monkeypatch.setenv("KLAVIYO_API_KEY", TEST_API_KEY)
    for name in ("KLAVIYO_PIPELINES_DEBUG", "KLAVIYO_PIPELINES_CONFIG", "KLAVIYO_BASE_URL"):
        monkeypatch.setenv(name, "")  # so that what `demo` exports is undone after the case
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp)  # the demo's own files stay in the test's directory
    extra = case.cause(world, command)
    for name, value in world.env.items():
        if name == "_interrupt":
            monkeypatch.setattr(
                "klaviyo_pipelines.cli.syncs.load_config", _raise(KeyboardInterrupt)
            )
        elif value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    argv = [command, *(COMMAND_ARGS[command] if case.selects else []), *extra, "--output", output]

    code, out, err = run_text(capsys, *argv)

    assert code == case.code_for.get(command, case.code), (out, err)
    assert TRACEBACK not in err and TRACEBACK not in out
    for secret in case.hidden:
        assert secret not in out + err
    if output == "json":
        assert out.count("\n") == 1 and out.endswith("\n"), out
        message = json.loads(out)["error"]
        assert message and isinstance(message, str)
    else:
        message = out + err
    for part in case.says(world):
        assert part in message, (part, message)


def _raise(exc: type[BaseException]) -> Callable[..., None]:
    def fail(*_args: object, **_kwargs: object) -> None:
        raise exc

    return fail


# ---- beyond the matrix: what the error paths share ---------------------------------------------


def test_global_options_go_before_or_after_the_command(shop, monkeypatch, capsys) -> None:
    _tmp, config, _sandbox = shop
    monkeypatch.setenv("KLAVIYO_API_KEY", TEST_API_KEY)
    for argv in (
        ["--config", config, "--output", "json", "status", *ONE],
        ["status", *ONE, "--config", config, "--output", "json"],
        ["--output", "json", "status", "--config", config, *ONE],
    ):
        code, out, err = run_text(capsys, *argv)
        assert code == 0, err
        assert set(json.loads(out)["syncs"]) == {"customers_to_klaviyo"}
    # Given twice, the one after the command wins.
    code, out, _ = run_text(
        capsys, "--output", "json", "status", *ONE, "--config", config, "--output", "table"
    )
    assert code == 0 and "Sync status" in out and not out.startswith("{")


def test_an_unexpected_error_is_one_message_and_debug_shows_its_traceback(
    shop, monkeypatch, capsys
) -> None:
    _tmp, config, _sandbox = shop
    monkeypatch.setattr("klaviyo_pipelines.cli.syncs.load_config", _raise(RuntimeError))
    code, out, err = run_text(capsys, "status", "--config", config)
    assert code == 1 and out == "" and TRACEBACK not in err
    assert "status failed: RuntimeError" in err
    assert err.rstrip().endswith(
        "(run again with --debug, or KLAVIYO_PIPELINES_DEBUG=1, for the traceback)"
    )

    code, out, _ = run_text(capsys, "status", "--config", config, "--output", "json")
    assert code == 1 and json.loads(out)["status"] == "failed"

    for argv, env in ((["--debug"], None), ([], "1")):
        if env:
            monkeypatch.setenv("KLAVIYO_PIPELINES_DEBUG", env)
        code, out, err = run_text(capsys, "status", "--config", config, *argv)
        assert code == 1 and TRACEBACK in err and "status failed: RuntimeError" in err


def test_validate_offline_needs_neither_the_key_nor_a_warehouse_server(
    shop, monkeypatch, capsys
) -> None:
    tmp, config, _sandbox = shop
    monkeypatch.delenv("KLAVIYO_API_KEY", raising=False)
    code, out, err = run_text(capsys, "validate", "--offline", "--config", config)
    assert code == 0 and "valid" in out, err  # a DuckDB file is read: mappings checked too

    broken = Path(config).read_text().replace("email: email", "email: e_mail", 1)
    (tmp / "offline_broken.yaml").write_text(broken)
    code, out, _ = run_text(
        capsys,
        "validate",
        "--offline",
        "--config",
        str(tmp / "offline_broken.yaml"),
        "--output",
        "json",
    )
    result = json.loads(out)
    assert code == 2 and result["warehouse_checked"] is True
    assert [e["key"] for e in result["errors"]] == ["syncs.customers_to_klaviyo.mapping.email"]

    server = tmp / "offline_server.yaml"
    server.write_text(
        Path(config)
        .read_text()
        .replace(f"duckdb:///{tmp / 'warehouse.duckdb'}", "postgresql+psycopg://u@127.0.0.1:1/x")
    )
    code, out, _ = run_text(
        capsys, "validate", "--offline", "--config", str(server), "--output", "json"
    )
    result = json.loads(out)
    assert code == 0 and result["valid"] is True and result["warehouse_checked"] is False

    code, out, _ = run_text(capsys, "validate", "--config", config, "--output", "json")
    assert code == 2  # without --offline the key's variable is still required
    assert [e["key"] for e in json.loads(out)["errors"]] == ["klaviyo.api_key"]


def test_files_the_cli_creates_are_yours_only(shop, monkeypatch, capsys) -> None:
    tmp, config, _sandbox = shop
    home = tmp / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("KLAVIYO_API_KEY", TEST_API_KEY)
    before = os.umask(0o022)
    try:
        code, _out, err = run_text(capsys, "sync", *ONE, "--config", config)
    finally:
        os.umask(before)
    assert code in (0, 1), err
    made = [home, *home.rglob("*")]
    assert len(made) > 3
    for path in made:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


# ---- the real entry point, in a process of its own ---------------------------------------------


def _cli(*argv: str, env: dict[str, str] | None = None, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "klaviyo_pipelines.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "KLAVIYO_PIPELINES_DEBUG": "", **(env or {})},
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("output", ["table", "json"])
def test_a_missing_config_in_a_process_of_its_own(tmp_path, output) -> None:
    """The first bug of issue 13: the table path crashed in `print_error` itself."""
    missing = str(tmp_path / "missing.yaml")
    for command in ("status", "plan", "sync"):
        process = _cli(command, "--config", missing, "--output", output)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 2 and TRACEBACK not in err
        assert missing in (out if output == "json" else err)
        if output == "json":
            assert json.loads(out)["errors"][0]["key"] == "(file)"


def test_a_warehouse_failure_in_a_process_of_its_own(tmp_path, sandbox) -> None:
    url = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:{CLOSED_PORT}/shop"
    config = write_config(tmp_path, f"${{{WAREHOUSE_VARIABLE}}}", sandbox)
    process = _cli("--output", "json", "status", "--config", config, env={WAREHOUSE_VARIABLE: url})
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1 and TRACEBACK not in err and PASSWORD not in out + err
    result = json.loads(out)
    assert result["status"] == "failed"
    assert result["error"].startswith(
        "warehouse postgresql+psycopg://postgres:***@127.0.0.1:1/shop:"
    )


def test_ctrl_c_stops_the_sandbox_cleanly() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = _cli("sandbox", "--port", str(port))
    assert process.stdout is not None
    assert "listening" in process.stdout.readline()
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 0 and TRACEBACK not in err


def test_a_missing_table_on_each_warehouse(tmp_path, warehouse_url, sandbox, capsys) -> None:
    create_demo_warehouse(warehouse_url, "klaviyo_sync", customers=10)
    config = write_config(tmp_path, warehouse_url, sandbox)
    text = Path(config).read_text()
    Path(config).write_text(text.replace("from analytics.customers\n", "from analytics.nope\n", 1))
    for command in ("plan", "sync", "validate"):
        argv = [command, *COMMAND_ARGS[command], "--config", config, "--output", "json"]
        code, out, err = run_text(capsys, *argv)
        assert code == 2 and TRACEBACK not in err
        [error] = [e for e in json.loads(out)["errors"] if e["key"].startswith("models.")]
        assert error["key"] == "models.customers.sql" and "nope" in error["reason"]


def test_the_config_named_is_the_only_one_read(tmp_path, duckdb_url, sandbox) -> None:
    """A broken default config ($KLAVIYO_PIPELINES_CONFIG) must not fail a sync given --config:
    the Dagster layer loads the default config as it is imported."""
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=10)
    config = write_config(tmp_path, duckdb_url, sandbox)
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [\n")
    process = _cli(
        "sync", *ONE, "--config", config, "--output", "json",
        env={"KLAVIYO_PIPELINES_CONFIG": str(broken)},
    )  # fmt: skip
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, (out, err)
    assert json.loads(out)["syncs"]["customers_to_klaviyo"]["status"] == "success"


def test_an_interrupted_sync_exits_130_and_says_so(shop, monkeypatch, capsys) -> None:
    """A sync the signal handlers stopped reports `interrupted`: exit 128 + the signal."""
    _tmp, config, _sandbox = shop
    monkeypatch.setenv("KLAVIYO_API_KEY", TEST_API_KEY)
    monkeypatch.setattr("klaviyo_pipelines.interrupt.requested", lambda: True)
    for output in ("json", "table"):
        code, out, err = run_text(capsys, "sync", *ONE, "--config", config, "--output", output)
        assert code == 130 and TRACEBACK not in err
        if output == "json":
            result = json.loads(out)
            assert result["status"] == "interrupted" and "interrupted by" in result["error"]
        else:
            assert "customers_to_klaviyo interrupted: interrupted by" in out


def test_a_masked_password_leaves_the_rest_of_the_message_whole(shop, monkeypatch, capsys) -> None:
    """Secrets are masked in what the error says, not in the words around it: a password
    `postgres` must not turn the warehouse's `postgresql+psycopg://postgres:` into `***ql`."""
    tmp, config, sandbox = shop
    url = f"postgresql+psycopg://postgres:postgres@127.0.0.1:{CLOSED_PORT}/shop"
    world = World(tmp, config, sandbox, None)  # type: ignore[arg-type]
    path = world.with_warehouse("postgres_password", url)
    monkeypatch.setenv(WAREHOUSE_VARIABLE, url)
    code, out, _ = run_text(capsys, "status", "--config", path, "--output", "json")
    assert code == 1
    error = json.loads(out)["error"]
    assert error.startswith(
        f"warehouse postgresql+psycopg://postgres:***@127.0.0.1:{CLOSED_PORT}/shop: read the run log failed: "
    )
    assert "refused" in error
