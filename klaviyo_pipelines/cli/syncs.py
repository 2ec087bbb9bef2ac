"""`plan` and `sync`: what the syncs would send, and sending it through Dagster in-process."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
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
    from klaviyo_pipelines.warehouse.engine import Warehouse

    return Warehouse(config.warehouse.url, config.warehouse.state_schema)


def check(config: Config, names: Sequence[str]) -> None:
    """Every selected sync checked against the warehouse before any run starts."""
    from klaviyo_pipelines.runner import check_sync

    wh = open_warehouse(config)
    try:
        for name in names:
            check_sync(config, name, wh)
    finally:
        wh.dispose()


def plan(args: argparse.Namespace) -> int:
    from klaviyo_pipelines.runner import plan_sync
    from klaviyo_pipelines.warehouse.lock import SyncLocked
    from klaviyo_pipelines.warehouse.snapshot import take_snapshot

    config = load_config(args.config)
    names = selected(config, args.select)
    wh = open_warehouse(config)
    partition = args.partition[0] if args.partition else None
    try:
        for model in {
            m for n in names for m in (config.syncs[n].model, *config.syncs[n].extra_models)
        }:
            spec = config.models[model]
            take_snapshot(wh, spec, config.path, partition if spec.partition else None)
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
    config = load_config(args.config)
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
    config.klaviyo.api_key.resolve(config.path)  # a missing key is exit 2, not a traceback
    check(config, names)
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
        print_json({"syncs": reports})
    else:
        print_summary(reports)
    return EXIT_OK if all(r["status"] == "success" for r in reports.values()) else EXIT_FAILED


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
    with progress_observer(args.progress, wants_json(args)) as observer:
        return materialize_syncs(config, names, instance=instance, observer=observer, **options)


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
            console.print(f"[red]{name} failed: {escape(r['error'])}[/red]", highlight=False)
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
