"""`klaviyo-pipelines`: demo, plan, sync, validate, status, verify and the local Klaviyo sandbox.

Exit codes: 0 when every sync succeeded, 1 when any failed (or the command failed), 2 on a
configuration error (the file, an option, the API key's variable), 128 + the signal when
interrupted (130 for Ctrl-C, 143 for SIGTERM). No failure prints a traceback unless `--debug`
(or `KLAVIYO_PIPELINES_DEBUG=1`) is given: each is one message naming what failed and where.
The global options `--config`, `--output` and `--debug` go before or after the command.

`--output json` prints one JSON object on stdout and nothing else; these keys are stable:

- any command stopped by an error: `error` (the message) and `status` (failed |
  interrupted); for a config error (exit 2) also `errors`, a list of `{file, key, reason}`.
- `sync`: `status` (success | failed | interrupted: of all the runs), `error` (null, or each
  failed sync's `<sync>: <error>`), and `syncs.<sync>` with `status` (success | failed |
  interrupted), `error`, `added`, `updated`, `deleted`, `delivered`, `rejected`, `retryable`,
  `not_found`, `requests`, `retries`, `rate_limited`, `waited_seconds`, `duration_seconds`,
  `samples` (up to 20 of `{key, kind, field, reason}`); a sync run per day or per audience
  also has `partitions.<key>`, each run's report.
- `plan`: `syncs.<sync>` with `status` (planned), `action`, `added`, `updated`, `deleted`,
  `rejected`, `delivered` and `requests` (0), `found`, `held_invalid`, `key_rejected`,
  `samples`, `payload_samples` (request bodies).
- `demo`: `status` and `error` (as `sync`, over both runs), `warehouse`, `customers`,
  `first_run` and `second_run` (each as `sync` prints), `changes`, `sandbox` (`profiles`, `vip_list_members`, `events`, `subscriptions`).
- `validate`: `valid`, `config`, `syncs` (names), `warehouse_checked` (false with `--offline`
  on a warehouse server), `errors` (`{file, key, reason}`), `warnings`, `error`.
- `status`: `syncs.<sync>` with `last_run` (null, or the run's report plus `run_id`,
  `started_at`, `finished_at`), `delivered_rows`, `ledger` (`invalid`, `transient`: counts;
  `rows`: `{key, kind, field, reason, attempts, first_seen, last_seen}`).
- `verify`: `status` (in_step | drift) and `syncs.<sync>` with `delivered`, `checked`,
  `in_step`, `drifted`, `drifted_by_kind`, `unchecked` (reason: rows), `repaired`, `samples`
  (up to 20 of `{key, kind, field, warehouse, klaviyo}`); exit 1 when drift was found.

Timestamps are ISO 8601 in UTC. Progress bars go to stderr, only when it is a terminal or
`--progress` is given, and never with `--output json`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from klaviyo_pipelines.cli.demo import DEMO_API_KEY, DEMO_PORT, demo, sandbox
from klaviyo_pipelines.cli.output import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    add_output_option,
    print_error,
)
from klaviyo_pipelines.cli.progress_bars import add_progress_option
from klaviyo_pipelines.cli.status import add_status_options, status
from klaviyo_pipelines.cli.syncs import failure_message, partition_day, plan, sync
from klaviyo_pipelines.cli.validate import validate
from klaviyo_pipelines.cli.verify import add_verify_options, verify
from klaviyo_pipelines.config import ConfigError

__all__ = ["main"]

DEBUG_VARIABLE = "KLAVIYO_PIPELINES_DEBUG"
DEBUG_HINT = f" (run again with --debug, or {DEBUG_VARIABLE}=1, for the traceback)"


class UsageError(Exception):
    """A command line argparse refused; raised instead of exiting so that `--output json`
    still gets its one JSON object."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        self.parser = parser
        super().__init__(f"{parser.prog}: error: {message}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure becomes one message and an exit code, never a
    traceback (unless --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        as_json = _json_requested(argv)
        if not as_json:
            exc.parser.print_usage(sys.stderr)
        print_error(argparse.Namespace(output="json" if as_json else "table"), str(exc))
        return EXIT_CONFIG
    args.debug = debug = args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    # httpx logs every URL at INFO, query string included: profile lookups carry emails there.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with private_files():
        try:
            return args.handler(args)
        except (Exception, KeyboardInterrupt) as exc:  # the boundary: one message, an exit code
            if debug:
                traceback.print_exc()
            return _stopped(args, exc)


def _stopped(args: argparse.Namespace, exc: BaseException) -> int:
    """Say why the command stopped, once; the exit code: 2 for the user's configuration, 130
    for Ctrl-C, else 1, with how to get the traceback."""
    if isinstance(exc, ConfigError):
        print_error(args, f"configuration error: {exc}", [exc])
        return EXIT_CONFIG
    if isinstance(exc, KeyboardInterrupt):
        print_error(args, f"{args.command}: interrupted by Ctrl-C", status="interrupted")
        return EXIT_INTERRUPTED
    print_error(args, failure_message(args, exc) + ("" if args.debug else DEBUG_HINT))
    return EXIT_FAILED


def _json_requested(argv: Sequence[str]) -> bool:
    """Whether a command line argparse refused asked for `--output json` anywhere."""
    pairs = zip(argv, [*argv[1:], ""], strict=True)
    return any(a == "--output=json" or (a == "--output" and b == "json") for a, b in pairs)


@contextmanager
def private_files() -> Iterator[None]:
    """Files and directories the command creates readable by the user only (0600 / 0700):
    DAGSTER_HOME holds run logs and rejected rows, personal data among them."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def _add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """`--config`, `--output` and `--debug`, on the main parser and on each command, so they
    go before or after the command; a command's copy defaults to SUPPRESS so that it never
    overwrites a value given before the command."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--config",
        default=default(None),
        help="config file (default: $KLAVIYO_PIPELINES_CONFIG, ./klaviyo_pipelines.yaml, "
        "else the bundled demo config)",
    )
    add_output_option(parser, default=default("table"))
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help=f"print the traceback of a failure (also: {DEBUG_VARIABLE}=1)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="klaviyo-pipelines",
        description="Reverse ETL from your warehouse into Klaviyo. Exit codes: 0 success, "
        "1 a sync failed, 2 a configuration error, 130 interrupted.",
    )
    _add_global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, handler: Any, text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=text)
        _add_global_options(command, suppress=True)
        command.set_defaults(handler=handler)
        return command

    command = add_command("demo", demo, "demo data + local sandbox + every sync, no API key")
    command.add_argument("--customers", type=int, default=5000)
    command.add_argument("--port", type=int, default=DEMO_PORT)
    add_progress_option(command)

    for name, handler, text in (
        ("plan", plan, "show the change set and sample payloads; sends nothing"),
        ("sync", sync, "run the syncs through Dagster, in-process"),
    ):
        command = add_command(name, handler, text)
        command.add_argument("--select", action="append", metavar="SYNC", help="repeatable")
        command.add_argument(
            "--partition",
            action="append",
            default=[],
            type=partition_day,
            metavar="YYYY-MM-DD",
            help="day(s) of partitioned models (repeatable; sync default: today)",
        )
        command.add_argument(
            "--retry-rejected",
            action="store_true",
            help="also re-send unchanged rows that were rejected as invalid before",
        )
        if name == "sync":
            _add_audience_options(command)
            add_progress_option(command)

    command = add_command("validate", validate, "check the config against the warehouse")
    command.add_argument(
        "--offline",
        action="store_true",
        help="only what needs neither the API key nor the network: the file, its keys and "
        "types, and each model and mapping against a local warehouse",
    )

    add_status_options(
        add_command("status", status, "each sync's last run and rows awaiting retry")
    )
    add_verify_options(
        add_command("verify", verify, "read Klaviyo back and report where it drifted")
    )

    command = add_command("sandbox", sandbox, "serve the Klaviyo sandbox on loopback")
    command.add_argument("--port", type=int, default=DEMO_PORT)
    command.add_argument("--api-key", default=DEMO_API_KEY, help="key the sandbox accepts")
    command.add_argument("--time-scale", type=float, default=1.0)
    return parser


def _add_audience_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--audience",
        action="append",
        default=[],
        metavar="KEY",
        help="run these audiences of the audience syncs, changed or not, instead of every "
        "audience whose members changed (repeatable; alone, selects the audience syncs)",
    )
    command.add_argument(
        "--override-exit-guard",
        action="store_true",
        help="let Remove Profile from List remove more of an audience than its max_exit_share",
    )
