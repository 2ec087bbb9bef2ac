"""`validate`: the config file, then every model and sync against the warehouse, all errors at once.

Reads the warehouse, writes nothing and calls no API: it checks what a run would check before
sending (the file, the API key's variable, every model's query and key, each sync's mapping
and settings against its model's columns), but reports every problem, not just the first.

`--offline` checks only what needs neither the API key nor the network, so a CI lint of the
config runs without the secret: the file (YAML, keys, types, actions, change kinds), and the
models and mappings against the warehouse's columns when the warehouse is a local file
(DuckDB); a warehouse on a server is then left unchecked, and the output says so.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rich.markup import escape

from klaviyo_pipelines.cli.output import (
    EXIT_CONFIG,
    EXIT_OK,
    config_errors,
    console,
    error_console,
    print_json,
    wants_json,
)
from klaviyo_pipelines.cli.syncs import load, open_warehouse
from klaviyo_pipelines.config import Config, ConfigError
from klaviyo_pipelines.warehouse.dialects import level_warning

if TYPE_CHECKING:
    from klaviyo_pipelines.warehouse.engine import Warehouse


def validate(args: argparse.Namespace) -> int:
    try:
        config = load(args)
    except ConfigError as exc:  # the file itself: nothing more can be checked
        return _report(args, exc.path, [], [exc])
    offline = args.offline and not _local(config.warehouse.url)
    problems = config_problems(config, key=not args.offline, warehouse=not offline)
    warning = level_warning(config.warehouse.url)
    warnings = [f"warehouse.url: {warning}"] if warning else []
    if not offline and not problems:
        warnings += rename_warnings(config)
    return _report(args, config.path, list(config.syncs), problems, offline, warnings)


def config_problems(
    config: Config, *, key: bool = True, warehouse: bool = True
) -> list[ConfigError]:
    """Every problem a run would stop on before sending, in file order; without `key` the
    API key's variable is not looked at, without `warehouse` the warehouse is not read."""
    problems: list[ConfigError] = []
    if key:
        try:
            config.klaviyo.api_key.resolve(config.path)  # only whether it is set; never shown
        except ConfigError as exc:
            problems.append(exc)
    if not warehouse:
        return problems
    try:
        wh = open_warehouse(config)
    except ConfigError as exc:
        return [*problems, exc]
    try:
        problems += _warehouse_problems(config, wh)
    finally:
        wh.dispose()
    return problems


def rename_warnings(config: Config) -> list[str]:
    """A sync that delivered rows and left the file while a sync without delivery state reads
    the same model with the same action: most likely a rename, which re-sends every row and,
    unless `namespace` keeps the old name, changes derived event ids and the consent source."""
    import sqlalchemy as sa

    from klaviyo_pipelines.warehouse.state import RUNS, delivered_count, run_report, state_table

    wh = open_warehouse(config)
    try:
        with wh.engine.connect() as conn:
            if not wh.table_exists(conn, RUNS):
                return []
            ran = [
                r[0] for r in conn.execute(sa.text(f"SELECT DISTINCT sync FROM {wh.table(RUNS)}"))
            ]
            fresh = [  # syncs without delivery state that chose no namespace yet
                s
                for s in config.syncs.values()
                if s.namespace is None and not wh.table_exists(conn, state_table(s.name))
            ]
        warnings = []
        for old in sorted(name for name in ran if name not in config.syncs):
            report = run_report(wh, old) or {}
            delivered = delivered_count(wh, old)
            for new in fresh:
                if delivered and (report.get("model"), report.get("action")) == (
                    new.model,
                    new.action,
                ):
                    warnings.append(
                        f"syncs.{new.name}: sync {old!r}, which delivered {delivered} rows of model "
                        f"{new.model!r} with {new.action}, is gone from the file. If {new.name!r} "
                        f"is it renamed, it will send every row again under its new name: set "
                        f"syncs.{new.name}.namespace to {old!r} (or to the namespace {old!r} had) "
                        "so its derived event unique_ids and consent source stay the same"
                    )
    finally:
        wh.dispose()
    return warnings


def _local(url: str) -> bool:
    """Whether the warehouse is read without the network: an embedded engine's file."""
    import sqlalchemy as sa

    return sa.engine.make_url(url).get_backend_name() in ("duckdb", "sqlite")


def _warehouse_problems(config: Config, wh: Warehouse) -> list[ConfigError]:
    import sqlalchemy as sa

    from klaviyo_pipelines.actions.factory import build_action
    from klaviyo_pipelines.actions.order_completed import OrderCompleted
    from klaviyo_pipelines.warehouse.audiences import audience_select
    from klaviyo_pipelines.warehouse.snapshot import model_columns, resolve_column

    try:
        with wh.engine.connect():
            pass
    except sa.exc.SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        reason = f"cannot connect: {detail} (warehouse {wh.name})"
        return [ConfigError(config.path, "warehouse.url", reason)]
    problems: list[ConfigError] = []
    columns: dict[str, list[str]] = {}
    for model in config.models.values():
        try:
            with wh.engine.connect() as conn:  # one connection each: a failed query spoils it
                found = model_columns(wh, conn, model, config.path)
            if model.partition and resolve_column(found, model.partition.column) is None:
                raise ConfigError(
                    config.path,
                    f"models.{model.name}.partition.column",
                    f"column {model.partition.column!r} is not in the model",
                )
            if model.audience is not None:
                audience_select(wh, model, found, config.path)  # names its missing columns
            columns[model.name] = found
        except ConfigError as exc:
            problems.append(exc)
    for sync in config.syncs.values():
        if sync.model not in columns:
            continue  # its model's problem is reported once, above
        try:
            action = build_action(sync, columns[sync.model], config.path)
        except ConfigError as exc:
            problems.append(exc)
            continue
        line_items = action.line_items if isinstance(action, OrderCompleted) else None
        if line_items is not None and line_items.model in columns:
            for key, column in (
                ("order_key", line_items.order_key),
                ("order_by", line_items.order_by),
            ):
                if column and resolve_column(columns[line_items.model], column) is None:
                    problems.append(
                        ConfigError(
                            config.path,
                            f"syncs.{sync.name}.settings.line_items.{key}",
                            f"column {column!r} is not in model {line_items.model!r}",
                        )
                    )
    return problems


def _report(
    args: argparse.Namespace,
    path: str,
    syncs: list[str],
    problems: list[ConfigError],
    skipped: bool = False,
    warnings: list[str] | None = None,
) -> int:
    if wants_json(args):
        print_json(
            {
                "valid": not problems,
                "config": path,
                "syncs": syncs,
                "warehouse_checked": not skipped and bool(syncs),
                "errors": config_errors(problems),
                "warnings": warnings or [],
                **({"error": "; ".join(map(str, problems))} if problems else {}),
            }
        )
    elif problems:
        for problem in problems:
            error_console.print(
                f"[red]{escape(problem.path)}[/red]: [bold]{escape(problem.key)}[/bold]: "
                f"{escape(problem.reason)}"
            )
        error_console.print(f"[red]{len(problems)} problem(s) in {escape(path)}[/red]")
    else:
        console.print(f"[green]{escape(path)}: {len(syncs)} sync(s) valid[/green]")
    if not wants_json(args):
        for warning in warnings or []:
            console.print(f"[yellow]{escape(path)}: {escape(warning)}[/yellow]")
    if skipped and not wants_json(args):
        console.print(
            f"[yellow]--offline: the warehouse {escape(args.warehouse)} was not read, so the "
            "models and mappings against its columns were not checked[/yellow]"
        )
    return EXIT_CONFIG if problems else EXIT_OK
