"""What every action is: turn change rows into Klaviyo items, send batches, report per-row outcomes.

The runner owns the loop (pages, batches, state); an action only knows its payloads and calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from klaviyo_pipelines.actions.profile import InvalidRow
from klaviyo_pipelines.actions.registry import ActionInfo
from klaviyo_pipelines.config import ConfigError, SyncSpec
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.klaviyo.endpoints import EndpointClass
from klaviyo_pipelines.klaviyo.errors import KlaviyoError
from klaviyo_pipelines.warehouse.changes import ChangeRow, ChangeSet
from klaviyo_pipelines.warehouse.engine import Warehouse

if TYPE_CHECKING:
    from klaviyo_pipelines.actions.open_job import OpenJob


class Prepared(NamedTuple):
    """A row that passed validation, with the exact bytes it adds to a batch request.

    Immutable like the frozen dataclasses here, but made twice as fast: one per row sent."""

    row: ChangeRow
    item: dict[str, Any]
    body: bytes


@dataclass(frozen=True)
class Rejected:
    item: Prepared
    field: str | None
    reason: str


@dataclass
class BatchResult:
    """Per-row outcome of one batch. Rows in `unsent` were not confirmed and will be retried."""

    delivered: list[Prepared] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    unsent: list[Prepared] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    error: KlaviyoError | None = None  # set when the batch could not finish: the run stops
    # Delivered rows that had nothing to act on in Klaviyo (e.g. no profile has their
    # identifiers): also in `delivered`, listed so the report can show how many.
    not_found: list[Prepared] = field(default_factory=list)
    # Jobs Klaviyo accepted whose outcome is not known yet: `Action.settle` tells it.
    opened: list[OpenJob] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """Rows whose outcome this result carries (an opened job's rows are not among them)."""
        return len(self.delivered) + len(self.rejected) + len(self.unsent)

    def merge(self, other: BatchResult) -> None:
        self.opened += other.opened
        self.delivered += other.delivered
        self.not_found += other.not_found
        self.rejected += other.rejected
        self.unsent += other.unsent
        self.job_ids += other.job_ids
        self.error = self.error or other.error


class Action(ABC):
    """One Klaviyo (Actions) action bound to one sync's mapping and settings."""

    info: ClassVar[ActionInfo]
    # Settings that change how rows travel, not what they become: changing them re-sends nothing.
    transport_settings: ClassVar[frozenset[str]] = frozenset(
        {"batch", "batch_size", "job_timeout_seconds"}
    )

    def __init__(self, sync: SyncSpec) -> None:
        self.sync = sync

    @property
    @abstractmethod
    def columns(self) -> set[str]:
        """The model columns this action reads; only these are fetched and hashed."""

    @property
    @abstractmethod
    def endpoint(self) -> EndpointClass:
        """Where batches go, which fixes the item and byte limits of a batch."""

    @property
    @abstractmethod
    def batch_size(self) -> int: ...

    @abstractmethod
    def prepare(self, row: ChangeRow) -> Prepared:
        """Map and validate one row; raises InvalidRow naming the field and the reason."""

    @abstractmethod
    def request_body(self, batch: Sequence[Prepared]) -> bytes:
        """The request the batch becomes (used to send it, to measure it and by `plan`)."""

    @abstractmethod
    def send(self, client: KlaviyoClient, batch: Sequence[Prepared]) -> BatchResult:
        """Send one batch; Klaviyo's per-row rejections come back in the result."""

    def settle(self, client: KlaviyoClient, job: OpenJob) -> BatchResult:
        """Wait for a job `send` opened and say what became of each of its rows. Only actions
        whose Klaviyo call is an asynchronous job open any."""
        raise NotImplementedError(f"{type(self).__name__} opens no jobs")

    @property
    def default_mappings(self) -> Mapping[str, str]:
        """Field -> column for the fields mapped by default (a column named like the field),
        so `plan` can show what the mapping did not say."""
        return {}

    def preflight(self, client: KlaviyoClient) -> None:  # noqa: B027 - optional hook
        """Checks to run once before the first batch (e.g. that a configured list exists)."""

    def before_send(  # noqa: B027 - optional hook
        self,
        wh: Warehouse,
        client: KlaviyoClient,
        changes: ChangeSet,
        partition: str | None,
        *,
        override_exit_guard: bool = False,
    ) -> None:
        """Once a run has rows to send, before the first batch: resolve what depends on the
        partition (an audience's list), or refuse a change set that looks like an accident by
        raising a KlaviyoError, which fails the run with its message and sends nothing."""

    def enrich(self, wh: Warehouse, rows: list[ChangeRow]) -> list[ChangeRow]:
        """Add what a page of rows needs from other models (e.g. an order's line items)."""
        return rows

    def item_index(self, pointer: str | None) -> int | None:
        """Which item of a batch a Klaviyo error pointer names, when the endpoint says so."""
        return None

    def envelope_bytes(self) -> int:
        return len(self.request_body([]))

    def batches(self, items: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        """Pack items into the fewest batches within both the count and the byte limits."""
        max_items = min(self.batch_size, self.endpoint.max_items or self.batch_size)
        max_bytes = self.endpoint.max_bytes
        batch: list[Prepared] = []
        size = self.envelope_bytes()
        for item in items:
            added = len(item.body) + (1 if batch else 0)
            if batch and (len(batch) >= max_items or (max_bytes and size + added > max_bytes)):
                yield batch
                batch, size, added = [], self.envelope_bytes(), len(item.body)
            batch.append(item)
            size += added
        if batch:
            yield batch

    def check_size(self, body: bytes) -> None:
        limit = self.endpoint.max_item_bytes or self.endpoint.max_bytes
        if limit and len(body) > limit:
            raise InvalidRow(
                None, f"payload is {len(body):,} bytes; Klaviyo accepts at most {limit:,} per item"
            )


def pointer_index(pointer: str | None, collection: str) -> int | None:
    """Index N from a JSON pointer like `<collection>/N/...`."""
    if not pointer or not pointer.startswith(collection + "/"):
        return None
    head = pointer[len(collection) + 1 :].split("/", 1)[0]
    return int(head) if head.isdigit() else None


def field_of_pointer(pointer: str | None) -> str | None:
    """The field a Klaviyo error pointer ends in: `.../attributes/email` -> `email`."""
    if pointer and "/attributes/" in pointer:
        tail = pointer.rsplit("/attributes/", 1)[1].split("/")
        # `/data/attributes/profiles/data/3` names an item of a batch, not a field.
        if tail[0] and not any(part.isdigit() for part in tail):
            return ".".join(tail)
    return None


def check_settings(sync: SyncSpec, allowed: Iterable[str], config_path: str) -> None:
    """Refuse a setting the action does not know, naming it and the ones it does."""
    known = sorted(allowed)
    for key in sync.settings:
        if key not in known:
            raise ConfigError(
                config_path,
                f"syncs.{sync.name}.settings.{key}",
                f"unknown setting for {sync.action} (settings: {', '.join(known)})",
            )


def batch_size_setting(sync: SyncSpec, largest: int, config_path: str) -> int:
    """`settings.batch_size`: a whole number from 1 to the endpoint's limit, which is the default."""
    size = sync.settings.get("batch_size", largest)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= largest:
        raise ConfigError(
            config_path,
            f"syncs.{sync.name}.settings.batch_size",
            f"must be a whole number from 1 to {largest}, got {size!r}",
        )
    return size


def flag_setting(sync: SyncSpec, key: str, default: bool, config_path: str) -> bool:
    """A true/false setting: `batch: "false"` must not read as true."""
    value = sync.settings.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(
            config_path,
            f"syncs.{sync.name}.settings.{key}",
            f"must be true or false, got {value!r}",
        )
    return value


def seconds_setting(sync: SyncSpec, key: str, default: float, config_path: str) -> float:
    """A positive number of seconds."""
    value = sync.settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(
            config_path,
            f"syncs.{sync.name}.settings.{key}",
            f"must be a positive number of seconds, got {value!r}",
        )
    return float(value)
