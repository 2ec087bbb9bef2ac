"""What a running sync tells an observer as it goes: the CLI draws its progress bars from it.

The runner calls `on_batch` after committing each batch; the Dagster sync asset hands those
calls, with the Klaviyo client's counters, to its `progress` resource. That resource is this
silent observer everywhere but in the CLI, which passes its own to the in-process run, so
the Dagster UI and schedules are unaffected. Dagster-free, like the runner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing the runner would slow down `--help`
    from klaviyo_pipelines.klaviyo.client import ClientStats
    from klaviyo_pipelines.runner import SyncReport


class SyncObserver:
    """Hears of a sync run's start, each batch it commits and its end; this one ignores all."""

    def started(self, sync: str, partition: str | None) -> None:
        """The run began: its change set is being computed, its size not yet known."""

    def batch(self, report: SyncReport, stats: ClientStats) -> None:
        """A batch was committed: `report` counts rows so far, `stats` the client's requests,
        429s and waits so far in this run."""

    def finished(self, report: SyncReport) -> None:
        """The run ended (success or failure): `report` holds its final counts."""
