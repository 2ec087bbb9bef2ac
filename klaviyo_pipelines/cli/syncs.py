"""`plan` and `sync`: what the syncs would send, and sending it through Dagster in-process."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from klaviyo_pipelines.cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    console,
    print_error,
    print_json,
    wants_json,
)
from klaviyo_pipelines.cli.progress_bars import progress_observer
from klaviyo_pipelines.config import Config, ConfigError, load_config

if TYPE_CHECKING:  # the heavy imports wait until a command needs them, so --help is instant
    from klaviyo_pipelines.warehouse.engine import Warehouse

SAMPLES_SHOWN = 5  # rejected rows listed under the summary table, per sync


def load(args: argparse.Namespace) -> Config:
    """The config file; the warehouse it names (password masked) and the secrets it reads are
    kept on `args`, so a failure can name the warehouse and never show a secret."""
    import sqlalchemy as sa

    config = load_config(args.config)
    try:
        url = sa.engine.make_url(config.warehouse.url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(config.path, "warehouse.url", f"not a SQLAlchemy URL: {exc}") from None
    args.warehouse = url.render_as_string(hide_password=True)
    args.secrets = [s for s in (url.password, os.environ.get(config.klaviyo.api_key.env_var)) if s]
    return config


@contextmanager
def step(args: argparse.Namespace, name: str) -> Iterator[None]:
    """A warehouse error inside names this step (snapshot, change set, read...)."""
    from klaviyo_pipelines.warehouse.errors import warehouse_step

    with warehouse_step(getattr(args, "warehouse", "(unknown)"), name):
        yield


def failure_message(args: argparse.Namespace, exc: BaseException) -> str:
    """One line for a command that failed: a warehouse failure names the warehouse (password
    masked), the step and the engine's words; any other error the command and the error.
    Secrets the config read are masked in whatever the error itself says."""
    import sqlalchemy as sa

    from klaviyo_pipelines.warehouse.errors import WarehouseError, engine_message

    def masked(text: str) -> str:
        for secret in getattr(args, "secrets", ()):
            text = text.replace(secret, "***")
        return text

    if isinstance(exc, WarehouseError):
        return str(WarehouseError(exc.warehouse, exc.step, masked(exc.detail)))
    if isinstance(exc, sa.exc.SQLAlchemyError):  # one the warehouse code did not name a step of
        warehouse = getattr(args, "warehouse", "(unknown)")
        return str(WarehouseError(warehouse, args.command, masked(engine_message(exc))))
    if type(exc).__module__.startswith("klaviyo_pipelines"):
        return f"{args.command} failed: {masked(str(exc))}"
    return f"{args.command} failed: {type(exc).__name__}: {masked(str(exc))}"


def partition_day(text: str) -> str:
    """`--partition`'s form, checked as argparse reads it: a real day written YYYY-MM-DD."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            date.fromisoformat(text)
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not a day: expected YYYY-MM-DD, e.g. 2026-01-31")


def check_days(config: Config, names: Sequence[str], days: Sequence[str]) -> None:
    """Each `--partition` day is one of the days of every selected daily-partitioned model:
    from its `partition.start` to today (UTC), as Dagster's partitions are."""
    today = datetime.now(UTC).date()
    for name in names:
        model = config.models[config.syncs[name].model]
        if model.partition is None:
            continue
        start = date.fromisoformat(model.partition.start)
        for day in days:
            if not start <= date.fromisoformat(day) <= today:
                raise ConfigError(
                    config.path,
                    "--partition",
                    f"{day} is not a day of model {model.name!r} (sync {name!r}): its days "
                    f"run from models.{model.name}.partition.start {start} to today, {today}",
                )


def outcome(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The runs in one word and, when any did not succeed, each one's error:
    `{"status": success | failed | interrupted, "error": None | "<sync>: <error>; ..."}`."""
    statuses = {r["status"] for r in reports.values()}
    failed = [f"{n}: {r.get('error')}" for n, r in reports.items() if r["status"] != "success"]
    status = "interrupted" if "interrupted" in statuses else "failed" if failed else "success"
    return {"status": status, "error": "; ".join(failed) or None}


def exit_code(reports: Sequence[dict[str, Any]]) -> int:
    """0 when every run succeeded; 128 + the signal when one was interrupted; else 1."""
    from klaviyo_pipelines import interrupt

    if any(r["status"] == "interrupted" for r in reports):
        return 128 + (interrupt.signal_number() or signal.SIGINT)
    return EXIT_OK if all(r["status"] == "success" for r in reports) else EXIT_FAILED


def selected(config: Config, select: Sequence[str] | None) -> list[str]:
    """The syncs `--select` names (all when none), each checked to exist."""
    names = list(select or config.syncs)
    for name in names:
        if name not in config.syncs:
            raise ConfigError(
                config.path,
                "--select",
                f"no sync named {name!r} (syncs: {', '.join(config.syncs)})",
            )
    return names


def open_warehouse(config: Config) -> Warehouse:
    """The warehouse; an engine we do not support (or whose driver is missing) is a
    configuration error naming `warehouse.url`."""
    from klaviyo_pipelines.warehouse.dialects import UnsupportedWarehouse, check_url
    from klaviyo_pipelines.warehouse.engine import Warehouse

    try:
        check_url(config.warehouse.url)
    except UnsupportedWarehouse as exc:
        raise ConfigError(config.path, "warehouse.url", str(exc)) from None
    return Warehouse(config.warehouse.url, config.warehouse.state_schema)


def check(config: Config, names: Sequence[str], args: argparse.Namespace) -> None:
    """Every selected sync checked against the warehouse before any run starts."""
    from klaviyo_pipelines.runner import check_sync

    wh = open_warehouse(config)
    try:
        with step(args, "read"):
            for name in names:
                check_sync(config, name, wh)
    finally:
        wh.dispose()


def plan(args: argparse.Namespace) -> int:
    from klaviyo_pipelines.runner import plan_sync
    from klaviyo_pipelines.warehouse.lock import SyncLocked
    from klaviyo_pipelines.warehouse.snapshot import take_snapshot

    config = load(args)
    names = selected(config, args.select)
    check_days(config, names, args.partition)
    wh = open_warehouse(config)
    partition = args.partition[0] if args.partition else None
    try:
        with step(args, "snapshot"):
            for model in {
                m for n in names for m in (config.syncs[n].model, *config.syncs[n].extra_models)
            }:
                spec = config.models[model]
                take_snapshot(wh, spec, config.path, partition if spec.partition else None)
        with step(args, "change set"):
            reports = {
                n: plan_sync(
                    config,
                    n,
                    wh,
                    retry_rejected=args.retry_rejected,
                    partition=partition if config.models[config.syncs[n].model].partition else None,
                )
                for n in names
            }
    except SyncLocked as exc:  # a plan would rewrite the change set the running sync reads
        print_error(args, str(exc))
        return EXIT_FAILED
    finally:
        wh.dispose()
    if wants_json(args):
        print_json(
            {
                "syncs": {
                    name: {
                        **r.summary(),
                        "action": r.action,
                        "requests": 0,
                        "delivered": 0,
                        "found": r.found,
                        "held_invalid": r.held_invalid,
                        "key_rejected": r.key_rejected,
                        "samples": r.samples,
                        "payload_samples": r.payload_samples,
                    }
                    for name, r in reports.items()
                }
            }
        )
        return EXIT_OK
    table = Table(title="Plan (nothing sent)")
    for column in ("sync", "action", "added", "updated", "deleted", "held invalid", "key problems"):
        table.add_column(column, justify="left" if column in ("sync", "action") else "right")
    for name, r in reports.items():
        table.add_row(
            name,
            r.action,
            *(str(r.planned.get(k, 0)) for k in ("added", "updated", "deleted")),
            str(r.held_invalid),
            str(r.key_rejected),
        )
    console.print(table)
    for name, r in reports.items():
        for payload in r.payload_samples[:1]:
            console.print(f"[bold]{name}[/bold] sample request body:")
            console.print_json(json.dumps(payload, default=str)[:4000])
        for sample in r.samples[:SAMPLES_SHOWN]:
            console.print(
                f"  [yellow]will reject[/yellow] {escape(sample['key'])}: "
                f"{escape(sample['field'] or '')} {escape(sample['reason'])}",
                highlight=False,
            )
    return EXIT_OK


def sync(args: argparse.Namespace) -> int:
    config = load(args)
    audience_syncs = [
        n for n, s in config.syncs.items() if config.models[s.model].audience is not None
    ]
    # `--audience x` alone selects the audience syncs.
    names = audience_syncs if args.audience and not args.select else selected(config, args.select)
    if args.audience:
        for name in names:
            if name not in audience_syncs:
                raise ConfigError(
                    config.path,
                    "--audience",
                    f"sync {name!r} is not an audience sync (audience syncs: "
                    f"{', '.join(audience_syncs) or 'none'})",
                )
    check_days(config, names, args.partition)
    config.klaviyo.api_key.resolve(config.path)  # a missing key is exit 2, not a traceback
    check(config, names, args)
    reports = run_syncs(
        config,
        names,
        args,
        partitions=args.partition,
        audiences=args.audience,
        retry_rejected=args.retry_rejected,
        override_exit_guard=args.override_exit_guard,
    )
    if wants_json(args):
        print_json({**outcome(reports), "syncs": reports})
    else:
        print_summary(reports)
    return exit_code(list(reports.values()))


def run_syncs(
    config: Config, names: Sequence[str], args: argparse.Namespace, **options: Any
) -> dict[str, dict[str, Any]]:
    """Run the syncs through Dagster in-process, with progress bars when wanted; `options`
    go to `materialize_syncs` (partitions, audiences, retry_rejected, override_exit_guard)."""
    import dagster as dg

    from klaviyo_pipelines.dagster_defs.execution import materialize_syncs

    home = os.environ.get("DAGSTER_HOME")
    if home:  # a persistent instance, so `dagster dev` shows these runs
        os.makedirs(home, exist_ok=True)
    instance = dg.DagsterInstance.get() if home else None
    # Dagster logs a failed step with its stack trace; the CLI shows each sync's error instead.
    log_level = "WARNING" if args.debug else "CRITICAL"
    with progress_observer(args.progress, wants_json(args)) as observer:
        return materialize_syncs(
            config, names, instance=instance, observer=observer, log_level=log_level, **options
        )


SUMMARY_COLUMNS = (
    ("added", "added"),
    ("updated", "updated"),
    ("deleted", "deleted"),
    ("delivered", "delivered"),
    ("rejected", "rejected"),
    ("retryable", "retry"),
    ("requests", "requests"),
    ("rate_limited", "429s"),
)


def print_summary(reports: dict[str, dict[str, Any]], title: str = "Sync results") -> None:
    """One row per sync and a total row; then each failure's reason and a few rejected rows."""
    table = Table(
        title=title, box=box.SIMPLE_HEAD, collapse_padding=True, show_footer=len(reports) > 1
    )
    table.add_column("sync", footer="total", no_wrap=True)
    table.add_column("status")
    for key, header in SUMMARY_COLUMNS:
        total = sum(r.get(key, 0) for r in reports.values())
        table.add_column(header, justify="right", footer=str(total))
    table.add_column("waited", justify="right")
    table.add_column("took", justify="right")
    for name, r in reports.items():
        color = "green" if r["status"] == "success" else "red"
        table.add_row(
            name,
            f"[{color}]{r['status']}[/{color}]",
            *(str(r.get(key, 0)) for key, _ in SUMMARY_COLUMNS),
            f"{r.get('waited_seconds', 0):.1f}s",
            f"{r.get('duration_seconds', 0):.1f}s",
        )
    console.print(table)
    for name, r in reports.items():
        if r.get("error"):
            console.print(f"[red]{name} {r['status']}: {escape(r['error'])}[/red]", highlight=False)
    samples = [
        (name, s) for name, r in reports.items() for s in (r.get("samples") or [])[:SAMPLES_SHOWN]
    ]
    if samples:
        rejected = Table(
            title=f"Rejected rows (at most {SAMPLES_SHOWN} per sync; `status` lists them all)",
            box=box.SIMPLE_HEAD,
            collapse_padding=True,
        )
        for header in ("sync", "key", "field", "reason"):
            rejected.add_column(header)
        for name, sample in samples:  # keys and reasons are data: Text, never rich markup
            rejected.add_row(
                name, Text(sample["key"]), Text(sample["field"] or ""), Text(sample["reason"])
            )
        console.print(rejected)
