"""`klaviyo-pipelines`: demo, plan, sync, validate, status and the local Klaviyo sandbox.

Exit codes: 0 when every sync succeeded, 1 when any failed, 2 on a configuration error.
`--output json` prints one JSON object whose keys scripts may rely on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from klaviyo_pipelines.config import Config, ConfigError, load_config

if TYPE_CHECKING:  # the heavy imports wait until a command needs them, so --help is instant
    from klaviyo_pipelines.warehouse.engine import Warehouse

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
DEMO_API_KEY = "pk_sandbox_demo"
DEMO_PORT = 8765

console = Console(width=None if sys.stdout.isatty() else 120)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # httpx logs every URL at INFO, query string included: profile lookups carry emails there.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except ConfigError as exc:
        _error(args, f"configuration error: {exc}")
        return EXIT_CONFIG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klaviyo-pipelines", description="Reverse ETL from your warehouse into Klaviyo."
    )
    parser.add_argument(
        "--config",
        help="config file (default: $KLAVIYO_PIPELINES_CONFIG, ./klaviyo_pipelines.yaml, "
        "else the bundled demo config)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="demo data + local sandbox + every sync, no API key")
    demo.add_argument("--customers", type=int, default=5000)
    demo.add_argument("--port", type=int, default=DEMO_PORT)
    demo.set_defaults(handler=_demo)

    for name, handler, text in (
        ("plan", _plan, "show the change set and sample payloads; sends nothing"),
        ("sync", _sync, "run the syncs through Dagster, in-process"),
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
        _output_option(command)
        command.set_defaults(handler=handler)

    validate = commands.add_parser("validate", help="check the config against the warehouse")
    _output_option(validate)
    validate.set_defaults(handler=_validate)

    status = commands.add_parser("status", help="each sync's last run and rows awaiting retry")
    _output_option(status)
    status.set_defaults(handler=_status)

    sandbox = commands.add_parser("sandbox", help="serve the Klaviyo sandbox on loopback")
    sandbox.add_argument("--port", type=int, default=DEMO_PORT)
    sandbox.add_argument("--api-key", default=DEMO_API_KEY, help="key the sandbox accepts")
    sandbox.add_argument("--time-scale", type=float, default=1.0)
    sandbox.set_defaults(handler=_sandbox)
    return parser


def _output_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--output", choices=("table", "json"), default="table")


def _error(args: argparse.Namespace, message: str) -> None:
    if getattr(args, "output", "table") == "json":
        print(json.dumps({"error": message}))
    else:
        Console(stderr=True).print(f"[red]{message}[/red]")


def _selected(config: Config, select: list[str] | None) -> list[str]:
    names = select or list(config.syncs)
    for name in names:
        if name not in config.syncs:
            raise ConfigError(
                config.path,
                "--select",
                f"no sync named {name!r} (syncs: {', '.join(config.syncs)})",
            )
    return names


def _warehouse(config: Config) -> Warehouse:
    from klaviyo_pipelines.warehouse.engine import Warehouse

    return Warehouse(config.warehouse.url, config.warehouse.state_schema)


def _plan(args: argparse.Namespace) -> int:
    from klaviyo_pipelines.runner import plan_sync
    from klaviyo_pipelines.warehouse.lock import SyncLocked
    from klaviyo_pipelines.warehouse.snapshot import take_snapshot

    config = load_config(args.config)
    names = _selected(config, args.select)
    wh = _warehouse(config)
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
        _error(args, str(exc))
        return EXIT_FAILED
    finally:
        wh.dispose()
    if args.output == "json":
        print(
            json.dumps(
                {
                    "syncs": {
                        name: {
                            **r.summary(),
                            "requests": 0,
                            "delivered": 0,
                            "samples": r.samples,
                            "payload_samples": r.payload_samples,
                            "found": r.found,
                            "held_invalid": r.held_invalid,
                        }
                        for name, r in reports.items()
                    }
                },
                default=str,
            )
        )
        return EXIT_OK
    table = Table(title="Plan (nothing sent)")
    for column in ("sync", "action", "added", "updated", "deleted", "held invalid", "key problems"):
        table.add_column(column, justify="right" if column not in ("sync", "action") else "left")
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
        for sample in r.samples[:5]:
            console.print(
                f"  [yellow]will reject[/yellow] {sample['key']}: {sample['field'] or ''} {sample['reason']}"
            )
    return EXIT_OK


def _sync(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    names = _selected(config, args.select)
    _check(config, names)
    reports = _run_syncs(
        config, names, retry_rejected=args.retry_rejected, partitions=args.partition
    )
    _print_reports(args, reports)
    return EXIT_OK if all(r["status"] == "success" for r in reports.values()) else EXIT_FAILED


def _check(config: Config, names: list[str]) -> None:
    """Every selected sync checked against the warehouse before any run starts."""
    from klaviyo_pipelines.runner import check_sync

    wh = _warehouse(config)
    try:
        for name in names:
            check_sync(config, name, wh)
    finally:
        wh.dispose()


def _run_syncs(
    config: Config, names: list[str], retry_rejected: bool = False, partitions: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    import dagster as dg

    from klaviyo_pipelines.dagster_defs.execution import materialize_syncs

    home = os.environ.get("DAGSTER_HOME")
    if home:  # a persistent instance, so `dagster dev` shows these runs
        os.makedirs(home, exist_ok=True)
    instance = dg.DagsterInstance.get() if home else None
    return materialize_syncs(
        config, names, instance=instance, retry_rejected=retry_rejected, partitions=partitions
    )


def _print_reports(args: argparse.Namespace, reports: dict[str, dict[str, Any]]) -> None:
    if getattr(args, "output", "table") == "json":
        print(json.dumps({"syncs": reports}, default=str))
        return
    table = Table(title="Sync results")
    for column in (
        "sync",
        "status",
        "added",
        "updated",
        "deleted",
        "delivered",
        "rejected",
        "requests",
        "seconds",
    ):
        table.add_column(column, justify="left" if column in ("sync", "status") else "right")
    for name, r in reports.items():
        color = "green" if r["status"] == "success" else "red"
        table.add_row(
            name,
            f"[{color}]{r['status']}[/{color}]",
            *(
                str(r.get(k, 0))
                for k in ("added", "updated", "deleted", "delivered", "rejected", "requests")
            ),
            f"{r.get('duration_seconds', 0):.1f}",
        )
    console.print(table)
    for name, r in reports.items():
        if r.get("error"):
            console.print(f"[red]{name}: {r['error']}[/red]")
        for sample in (r.get("samples") or [])[:5]:
            console.print(
                f"  [yellow]rejected[/yellow] {sample['key']}: {sample['field'] or ''} {sample['reason']}"
            )


def _validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _check(config, list(config.syncs))
    if args.output == "json":
        print(json.dumps({"valid": True, "config": config.path, "syncs": list(config.syncs)}))
    else:
        console.print(f"[green]{config.path}: {len(config.syncs)} sync(s) valid[/green]")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from klaviyo_pipelines.warehouse.state import delivered_count, ledger_entries, run_report

    config = load_config(args.config)
    wh = _warehouse(config)
    try:
        status = {}
        for name in config.syncs:
            ledger = ledger_entries(wh, name)
            status[name] = {
                "last_run": run_report(wh, name),
                "delivered_rows": delivered_count(wh, name),
                "awaiting_retry": sum(1 for e in ledger if e.kind.value == "transient"),
                "rejected_invalid": sum(1 for e in ledger if e.kind.value == "invalid"),
                "ledger_sample": [
                    {
                        "key": e.key,
                        "kind": e.kind.value,
                        "field": e.field,
                        "reason": e.reason,
                        "attempts": e.attempts,
                    }
                    for e in ledger[:10]
                ],
            }
    finally:
        wh.dispose()
    if args.output == "json":
        print(json.dumps({"syncs": status}, default=str))
        return EXIT_OK
    table = Table(title="Sync status")
    for column in ("sync", "last run", "delivered rows", "awaiting retry", "rejected (invalid)"):
        table.add_column(column)
    for name, s in status.items():
        last = s["last_run"]
        table.add_row(
            name,
            f"{last['status']} ({last['delivered']} delivered)" if last else "never",
            str(s["delivered_rows"]),
            str(s["awaiting_retry"]),
            str(s["rejected_invalid"]),
        )
    console.print(table)
    return EXIT_OK


def _sandbox(args: argparse.Namespace) -> int:
    from klaviyo_pipelines.demo import seed_sandbox
    from klaviyo_pipelines.sandbox.server import run_forever

    run_forever("127.0.0.1", args.port, args.api_key, args.time_scale, setup=seed_sandbox)
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from klaviyo_pipelines.demo import (
        DEMO_LIST_ID,
        create_demo_warehouse,
        demo_days,
        seed_sandbox,
        simulate_a_day,
    )
    from klaviyo_pipelines.sandbox import Sandbox

    if args.config:
        os.environ["KLAVIYO_PIPELINES_CONFIG"] = args.config
    with Sandbox(api_key=DEMO_API_KEY, port=_free_port(args.port)) as sandbox:
        seed_sandbox(sandbox)
        os.environ["KLAVIYO_API_KEY"] = DEMO_API_KEY
        os.environ["KLAVIYO_BASE_URL"] = sandbox.url
        config = load_config(args.config)
        rows = create_demo_warehouse(
            config.warehouse.url, config.warehouse.state_schema, args.customers
        )
        console.print(
            f"Demo warehouse: {rows} customers, newsletter opt-ins, product views and "
            f"{len(demo_days())} days of orders in {config.warehouse.url} (about 1% of customers "
            f"broken on purpose); Klaviyo sandbox at {sandbox.url}"
        )
        names = list(config.syncs)
        _check(config, names)
        console.rule("First sync: every row is new (orders backfilled day by day)")
        first = _run_syncs(config, names, partitions=demo_days())
        _print_reports(args, first)
        changes = simulate_a_day(config.warehouse.url)
        console.rule("A day of business later: only the changes travel")
        console.print(", ".join(f"{n} {what}" for what, n in changes.items()))
        second = _run_syncs(config, names)
        _print_reports(args, second)
        state = sandbox.state
        console.print(
            f"\nThe sandbox now holds [bold]{len(state.profiles)}[/bold] profiles, "
            f"[bold]{len(state.list_members(DEMO_LIST_ID))}[/bold] members of the VIP list, "
            f"[bold]{len(state.events)}[/bold] events and consent for "
            f"[bold]{len(state.subscriptions)}[/bold] profiles."
        )
    console.print(
        "Next: [bold]make ui[/bold] opens the Dagster UI on these assets "
        "(with a fresh sandbox); `klaviyo-pipelines status` shows each sync's ledger."
    )
    reports = [*first.values(), *second.values()]
    return EXIT_OK if all(r["status"] == "success" for r in reports) else EXIT_FAILED


def _free_port(preferred: int) -> int:
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return 0


if __name__ == "__main__":
    sys.exit(main())
