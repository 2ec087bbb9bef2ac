"""`status`: each sync's last run and its ledger, the rows awaiting a fix or a retry.

Read-only: it reads the run log, the delivery state and the ledger in the state schema.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from rich import box
from rich.table import Table
from rich.text import Text

from klaviyo_pipelines.cli.output import EXIT_OK, console, print_json, wants_json
from klaviyo_pipelines.cli.syncs import load, open_warehouse, selected, step

if TYPE_CHECKING:
    from klaviyo_pipelines.warehouse.engine import Warehouse

DEFAULT_ROWS = 10  # ledger rows shown per sync unless --rows or --all


def add_status_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--select", action="append", metavar="SYNC", help="repeatable")
    rows = command.add_mutually_exclusive_group()
    rows.add_argument(
        "--rows",
        type=int,
        default=DEFAULT_ROWS,
        metavar="N",
        help=f"ledger rows listed per sync, most recently seen first (default {DEFAULT_ROWS})",
    )
    rows.add_argument("--all", action="store_true", help="list every ledger row")


def status(args: argparse.Namespace) -> int:
    config = load(args)
    names = selected(config, args.select)
    limit = None if args.all else max(0, args.rows)
    wh = open_warehouse(config)
    try:
        with step(args, "read"):
            syncs = _read(wh, names, limit)
    finally:
        wh.dispose()
    if wants_json(args):
        print_json({"syncs": syncs})
    else:
        _print_status(syncs)
    return EXIT_OK


def _read(wh: Warehouse, names: list[str], limit: int | None) -> dict[str, dict[str, Any]]:
    """Each sync's last run, delivered rows and ledger, as `--output json` shows them."""
    from klaviyo_pipelines.warehouse.state import (
        delivered_count,
        latest_run,
        ledger_counts,
        ledger_entries,
    )

    syncs: dict[str, dict[str, Any]] = {}
    for name in names:
        run = latest_run(wh, name)
        counts = ledger_counts(wh, name)
        rows = ledger_entries(wh, name, limit=limit) if limit != 0 else []
        syncs[name] = {
            "last_run": None
            if run is None
            else {
                **run.report,
                "run_id": run.run_id,
                "started_at": run.started_at,
                "finished_at": run.finished_at,
            },
            "delivered_rows": delivered_count(wh, name),
            "ledger": {
                **{kind.value: n for kind, n in counts.items()},
                "rows": [
                    {
                        "key": e.key,
                        "kind": e.kind.value,
                        "field": e.field,
                        "reason": e.reason,
                        "attempts": e.attempts,
                        "first_seen": e.first_seen,
                        "last_seen": e.last_seen,
                    }
                    for e in rows
                ],
            },
        }
    return syncs


def _print_status(syncs: dict[str, dict[str, Any]]) -> None:
    table = Table(title="Sync status", box=box.SIMPLE_HEAD, collapse_padding=True)
    table.add_column("sync")
    table.add_column("last run")
    table.add_column("finished (UTC)")
    for header in ("delivered", "rejected", "synced rows", "invalid", "transient"):
        table.add_column(header, justify="right")
    for name, s in syncs.items():
        last, ledger = s["last_run"], s["ledger"]
        color = "green" if last and last["status"] == "success" else "red"
        table.add_row(
            name,
            f"[{color}]{last['status']}[/{color}]" if last else "never",
            f"{last['finished_at']:%Y-%m-%d %H:%M:%S}" if last else "",
            str(last.get("delivered", 0)) if last else "",
            str(last.get("rejected", 0)) if last else "",
            str(s["delivered_rows"]),
            str(ledger["invalid"]),
            str(ledger["transient"]),
        )
    console.print(table)
    console.print(
        "[dim]delivered, rejected: in the last run. synced rows: rows Klaviyo has confirmed. "
        "invalid: rows refused, sent again once they change. transient: rows not confirmed, "
        "sent again by every run.[/dim]"
    )
    for name, s in syncs.items():
        ledger = s["ledger"]
        if not ledger["rows"]:
            continue
        waiting = ledger["invalid"] + ledger["transient"]
        rows = Table(
            title=f"{name}: {waiting} rows in the ledger, {len(ledger['rows'])} shown",
            box=box.SIMPLE_HEAD,
            collapse_padding=True,
        )
        for header in ("key", "kind", "field", "reason", "attempts", "last seen (UTC)"):
            rows.add_column(header, justify="right" if header == "attempts" else "left")
        for row in ledger["rows"]:
            rows.add_row(  # keys and reasons are data: Text, never read as rich markup
                Text(row["key"]),
                row["kind"],
                Text(row["field"] or ""),
                Text(row["reason"]),
                str(row["attempts"]),
                f"{row['last_seen']:%Y-%m-%d %H:%M:%S}",
            )
        console.print(rows)
