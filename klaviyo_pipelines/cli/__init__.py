"""`klaviyo-pipelines`: demo, plan, sync, validate, status and the local Klaviyo sandbox.

Exit codes: 0 when every sync succeeded, 1 when any failed, 2 on a configuration error.

`--output json` prints one JSON object on stdout and nothing else; these keys are stable:

- any command stopped by an error: `error` (the message); for a config error (exit 2) also
  `errors`, a list of `{file, key, reason}`.
- `sync`: `syncs.<sync>` with `status` (success | failed), `error`, `added`, `updated`,
  `deleted`, `delivered`, `rejected`, `retryable`, `not_found`, `requests`, `retries`,
  `rate_limited`, `waited_seconds`, `duration_seconds`, `samples` (up to 20 of `{key, kind,
  field, reason}`); a sync run per day or per audience also has `partitions.<key>`, each
  run's report.
- `plan`: `syncs.<sync>` with `status` (planned), `action`, `added`, `updated`, `deleted`,
  `rejected`, `delivered` and `requests` (0), `found`, `held_invalid`, `key_rejected`,
  `samples`, `payload_samples` (request bodies).
- `demo`: `warehouse`, `customers`, `first_run` and `second_run` (each as `sync` prints),
  `changes`, `sandbox` (`profiles`, `vip_list_members`, `events`, `subscriptions`).
- `validate`: `valid`, `config`, `syncs` (names), `errors` (`{file, key, reason}`), `error`.
- `status`: `syncs.<sync>` with `last_run` (null, or the run's report plus `run_id`,
  `started_at`, `finished_at`), `delivered_rows`, `ledger` (`invalid`, `transient`: counts;
  `rows`: `{key, kind, field, reason, attempts, first_seen, last_seen}`).

Timestamps are ISO 8601 in UTC. Progress bars go to stderr, only when it is a terminal or
`--progress` is given, and never with `--output json`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from klaviyo_pipelines.cli.demo import DEMO_API_KEY, DEMO_PORT, demo, sandbox
from klaviyo_pipelines.cli.output import EXIT_CONFIG, add_output_option, print_error
from klaviyo_pipelines.cli.progress_bars import add_progress_option
from klaviyo_pipelines.cli.status import add_status_options, status
from klaviyo_pipelines.cli.syncs import plan, sync
from klaviyo_pipelines.cli.validate import validate
from klaviyo_pipelines.config import ConfigError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # httpx logs every URL at INFO, query string included: profile lookups carry emails there.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print_error(args, f"configuration error: {exc}", [exc])
        return EXIT_CONFIG


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klaviyo-pipelines",
        description="Reverse ETL from your warehouse into Klaviyo. Exit codes: 0 success, "
        "1 a sync failed, 2 a configuration error.",
    )
    parser.add_argument(
        "--config",
        help="config file (default: $KLAVIYO_PIPELINES_CONFIG, ./klaviyo_pipelines.yaml, "
        "else the bundled demo config)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    command = commands.add_parser("demo", help="demo data + local sandbox + every sync, no API key")
    command.add_argument("--customers", type=int, default=5000)
    command.add_argument("--port", type=int, default=DEMO_PORT)
    add_progress_option(command)
    add_output_option(command)
    command.set_defaults(handler=demo)

    for name, handler, text in (
        ("plan", plan, "show the change set and sample payloads; sends nothing"),
        ("sync", sync, "run the syncs through Dagster, in-process"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--select", action="append", metavar="SYNC", help="repeatable")
        command.add_argument(
            "--partition",
            action="append",
            default=[],
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
        add_output_option(command)
        command.set_defaults(handler=handler)

    command = commands.add_parser("validate", help="check the config against the warehouse")
    add_output_option(command)
    command.set_defaults(handler=validate)

    command = commands.add_parser("status", help="each sync's last run and rows awaiting retry")
    add_status_options(command)
    add_output_option(command)
    command.set_defaults(handler=status)

    command = commands.add_parser("sandbox", help="serve the Klaviyo sandbox on loopback")
    command.add_argument("--port", type=int, default=DEMO_PORT)
    command.add_argument("--api-key", default=DEMO_API_KEY, help="key the sandbox accepts")
    command.add_argument("--time-scale", type=float, default=1.0)
    command.set_defaults(handler=sandbox)
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
