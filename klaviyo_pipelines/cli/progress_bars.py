"""Progress bars on stderr for syncs run from the CLI: rows done, batches, requests, 429s, waits.

`ProgressBars` is the `SyncObserver` the CLI hands to the in-process Dagster run, so the
runner's per-batch callback reaches it from inside the run. One line per sync; a sync run
once per day or per audience adds each run's rows to its line. Drawn only when stderr is a
terminal or `--progress` forces it, and never in JSON mode.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from klaviyo_pipelines.progress import SyncObserver

if TYPE_CHECKING:  # annotations only: importing the runner would slow down `--help`
    from klaviyo_pipelines.klaviyo.client import ClientStats
    from klaviyo_pipelines.runner import SyncReport


def add_progress_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: when stderr is a terminal; never with "
        "--output json)",
    )


@dataclass
class RunCounts:
    """One run of a sync (one day, one audience, or the whole model), as last heard."""

    planned: int | None = None  # rows in its change set to send, once known
    delivered: int = 0
    rejected: int = 0
    retryable: int = 0
    batches: int = 0
    requests: int = 0
    rate_limited: int = 0
    waited_seconds: float = 0.0

    @classmethod
    def total(cls, runs: Iterable[RunCounts]) -> RunCounts:
        """The sum of several runs; planned is known once one run's is."""
        runs = list(runs)
        planned = [r.planned for r in runs if r.planned is not None]
        return cls(
            planned=sum(planned) if planned else None,
            delivered=sum(r.delivered for r in runs),
            rejected=sum(r.rejected for r in runs),
            retryable=sum(r.retryable for r in runs),
            batches=sum(r.batches for r in runs),
            requests=sum(r.requests for r in runs),
            rate_limited=sum(r.rate_limited for r in runs),
            waited_seconds=sum(r.waited_seconds for r in runs),
        )

    def update(self, report: SyncReport, requests: int, rate_limited: int, waited: float) -> None:
        self.planned = sum(report.planned.values())
        self.delivered = sum(report.delivered.values())
        self.rejected = sum(report.rejected.values())
        self.retryable = sum(report.retryable.values())
        self.requests, self.rate_limited, self.waited_seconds = requests, rate_limited, waited


class ProgressBars(SyncObserver):
    """Draws each sync's line from what its runs report; the counters are sums over runs."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}
        self._runs: dict[str, dict[str | None, RunCounts]] = {}

    def started(self, sync: str, partition: str | None) -> None:
        self._runs.setdefault(sync, {})[partition] = RunCounts()
        self._draw(sync, partition)

    def batch(self, report: SyncReport, stats: ClientStats) -> None:
        run = self._run(report)
        run.batches += 1
        run.update(report, stats.requests, stats.rate_limited, stats.waited_seconds)
        self._draw(report.sync, report.partition)

    def finished(self, report: SyncReport) -> None:
        run = self._run(report)
        run.update(report, report.requests, report.rate_limited, report.waited_seconds)
        self._draw(report.sync, report.partition)

    def _run(self, report: SyncReport) -> RunCounts:
        return self._runs.setdefault(report.sync, {}).setdefault(report.partition, RunCounts())

    def _draw(self, sync: str, partition: str | None) -> None:
        line = RunCounts.total(self._runs[sync].values())
        done = line.delivered + line.rejected + line.retryable
        detail = (
            f"{line.delivered} delivered · {line.rejected} rejected · {line.retryable} to retry"
            f" · {line.batches} batches · {line.requests} requests · 429s: {line.rate_limited}"
            f" · waited {line.waited_seconds:.1f}s"
        )
        where = f" [dim]{partition}[/dim]" if partition is not None else ""
        if sync not in self._tasks:
            self._tasks[sync] = self._progress.add_task(sync, total=line.planned, detail=detail)
        self._progress.update(
            self._tasks[sync],
            description=f"{sync}{where}",
            total=line.planned,  # None draws an indeterminate bar until a size is known
            completed=done,
            detail=detail,
        )


@contextmanager
def progress_observer(forced: bool | None, json_output: bool) -> Iterator[SyncObserver]:
    """Progress bars while the block runs when wanted (forced, or stderr is a terminal, and
    not JSON); otherwise the silent observer."""
    if json_output or forced is False or (forced is None and not sys.stderr.isatty()):
        yield SyncObserver()
        return
    console = Console(stderr=True, force_terminal=True if forced else None)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        yield ProgressBars(progress)
