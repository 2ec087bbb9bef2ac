"""What the CLI gives back: an exit code, and either tables for people or JSON for scripts.

In JSON mode stdout carries exactly one JSON object and nothing else (progress bars and logs
go to stderr, and progress never in JSON mode), so a script can parse stdout whole.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import date
from typing import Any

from rich.console import Console
from rich.markup import escape

from klaviyo_pipelines.config import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130

console = Console(width=None if sys.stdout.isatty() else 120)
# Errors are never wrapped, so a path or a key in a message stays whole in a log.
error_console = Console(stderr=True, soft_wrap=True, highlight=False)


def add_output_option(command: argparse.ArgumentParser, default: Any = "table") -> None:
    command.add_argument(
        "--output",
        choices=("table", "json"),
        default=default,
        help="json: one JSON object on stdout and nothing else, with stable keys",
    )


def wants_json(args: argparse.Namespace) -> bool:
    return getattr(args, "output", "table") == "json"


def print_json(payload: dict[str, Any]) -> None:
    """The command's one JSON object: timestamps in ISO 8601 (UTC), other values as strings."""
    sys.stdout.write(json.dumps(payload, default=_json_value) + "\n")


def _json_value(value: object) -> str:
    return value.isoformat() if isinstance(value, date) else str(value)


def config_errors(problems: Sequence[ConfigError]) -> list[dict[str, str]]:
    """Config errors as JSON: the file, the dotted key and the reason, each on its own."""
    return [{"file": e.path, "key": e.key, "reason": e.reason} for e in problems]


def print_error(
    args: argparse.Namespace,
    message: str,
    problems: Sequence[ConfigError] = (),
    status: str = "failed",
) -> None:
    """A command that stopped: `{"error": ..., "status": ..., "errors": [...]}` on stdout in
    JSON mode (the list for config errors), else the message in red on stderr."""
    if wants_json(args):
        extra = {"errors": config_errors(problems)} if problems else {}
        print_json({"error": message, "status": status, **extra})
    else:
        error_console.print(f"[red]{escape(message)}[/red]")
