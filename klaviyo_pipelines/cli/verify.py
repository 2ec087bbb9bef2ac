"""`verify`: read Klaviyo back and report where it drifted from what each sync delivered.

Reads only (Klaviyo's read endpoints, the delivery state), unless `--repair`: then the drifted
rows' delivery is forgotten, so the next sync sends them again, and extra members leave the
lists a sync owns. Exit 0 in step, 1 drift found, 2 a configuration error.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from klaviyo_pipelines.cli.output import EXIT_OK, console, error_console, print_json, wants_json
from klaviyo_pipelines.cli.syncs import load, open_warehouse, selected
from klaviyo_pipelines.verify import DEFAULT_SAMPLE, estimated_seconds, verify_sync

EXIT_DRIFT = 1


def add_verify_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--select", action="append", metavar="SYNC", help="repeatable")
    rows = command.add_mutually_exclusive_group()
    rows.add_argument(
        "--sample",
        type=int,
        default=DEFAULT_SAMPLE,
        metavar="N",
        help=f"delivered rows checked per sync, chosen by --seed (default {DEFAULT_SAMPLE:,})",
    )
    rows.add_argument("--all", action="store_true", help="check every delivered row")
    command.add_argument("--seed", type=int, default=0, help="which rows a sample takes")
    command.add_argument(
        "--repair",
        action="store_true",
        help="forget the drifted rows' delivery, so the next sync sends them again, and take "
        "extra members out of the lists a sync owns",
    )


def verify(args: argparse.Namespace) -> int:
    from klaviyo_pipelines.klaviyo.client import KlaviyoClient

    config = load(args)
    names = selected(config, args.select)
    api_key = config.klaviyo.api_key.resolve(config.path)
    sample = None if args.all else max(0, args.sample)
    wh = open_warehouse(config)
    reports: dict[str, dict[str, Any]] = {}
    try:
        with KlaviyoClient(
            api_key,
            base_url=config.klaviyo.base_url,
            revision=config.klaviyo.revision,
            timeout=config.klaviyo.timeout_seconds,
            max_attempts=config.klaviyo.max_attempts,
        ) as client:
            for name in names:
                if args.all and not wants_json(args):
                    seconds = estimated_seconds(config, wh, name)
                    error_console.print(f"{escape(name)}: about {seconds:,.0f} s of lookups")
                report = verify_sync(
                    config, name, wh, client, sample=sample, seed=args.seed, repair=args.repair
                )
                reports[name] = report.to_dict()
    finally:
        wh.dispose()
    drifted = any(report["drifted"] for report in reports.values())
    if wants_json(args):
        print_json({"status": "drift" if drifted else "in_step", "syncs": reports})
    else:
        _print(reports)
    return EXIT_DRIFT if drifted else EXIT_OK


def _print(reports: dict[str, dict[str, Any]]) -> None:
    table = Table(title="Verify", box=box.SIMPLE_HEAD)
    for column in ("sync", "checked", "in step", "drifted", "not checked", "repaired"):
        table.add_column(column, justify="left" if column == "sync" else "right")
    for name, report in reports.items():
        kinds = ", ".join(f"{n} {kind}" for kind, n in report["drifted_by_kind"].items())
        table.add_row(
            name,
            f"{report['checked']:,}",
            f"{report['in_step']:,}",
            f"{report['drifted']:,}" + (f" ({kinds})" if kinds else ""),
            f"{sum(report['unchecked'].values()):,}",
            f"{report['repaired']:,}",
        )
    console.print(table)
    for name, report in reports.items():
        for reason, count in report["unchecked"].items():
            console.print(f"{escape(name)}: {count:,} not checked: {escape(reason)}")
        for drift in report["samples"]:
            shown = drift["warehouse"] is not None or drift["klaviyo"] is not None
            values = (
                f": warehouse {drift['warehouse']!r}, Klaviyo {drift['klaviyo']!r}" if shown else ""
            )
            where = f" {drift['field']}" if drift["field"] else ""
            console.print(
                f"[yellow]{escape(name)} {escape(drift['key'])}: "
                f"{drift['kind']}{escape(where)}{escape(values)}[/yellow]"
            )
