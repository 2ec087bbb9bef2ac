"""Bulk consent jobs, shared by Subscribe and Unsubscribe Profile.

Both endpoints take profiles (email and/or E.164 phone, each with the consent of its channels)
and apply one list (and, to subscribe, one custom_source and historical_import) to the whole
request. Rows are therefore grouped by those values, each group packed into the fewest requests
the endpoint allows (Segment fails a batch with more than 9 groups, and subscribes 100 a request
where Klaviyo takes 1,000). Klaviyo answers 202 with no job to poll, so a 2xx confirms the rows;
a refused request is split by its error pointers (`/data/attributes/profiles/data/<n>/...`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

from klaviyo_pipelines.actions.base import (
    Action,
    BatchResult,
    Prepared,
    Rejected,
    batch_size_setting,
    check_settings,
    field_of_pointer,
    flag_setting,
    pointer_index,
)
from klaviyo_pipelines.actions.lists import list_exists, require_list
from klaviyo_pipelines.actions.lookup import (
    Identifiers,
    default_country,
    mapped_columns,
    read_identifiers,
)
from klaviyo_pipelines.actions.values import dumps, json_value
from klaviyo_pipelines.config import ConfigError, SyncSpec
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.klaviyo.endpoints import EndpointClass
from klaviyo_pipelines.klaviyo.errors import (
    AuthError,
    ConflictError,
    KlaviyoError,
    PermanentError,
)
from klaviyo_pipelines.warehouse.changes import ChangeRow

PROFILES_POINTER = "/data/attributes/profiles/data"
CHANNEL_IDENTIFIERS = ("email", "phone_number")  # the consent endpoints know no external_id
PAGE_ROWS = 1_000  # rows read and grouped at once in batch mode
SINGLE_PAGE = 100  # rows handed to one `send` in single mode (each still its own request)
BASE_MAPPING = (*CHANNEL_IDENTIFIERS, "country_code", "list_id")
BASE_SETTINGS = frozenset({"list_id", "country_code", "batch", "batch_size"})


class ConsentAction(Action):
    """A bulk subscription job endpoint; subclasses say which consent and which channels."""

    job_type: ClassVar[str]
    path: ClassVar[str]
    job_endpoint: ClassVar[EndpointClass]
    mapping_keys: ClassVar[tuple[str, ...]] = BASE_MAPPING
    setting_keys: ClassVar[frozenset[str]] = BASE_SETTINGS

    def __init__(self, sync: SyncSpec, columns: Sequence[str], config_path: str) -> None:
        super().__init__(sync)
        self.config_path = config_path
        check_settings(sync, self.setting_keys, config_path)
        if "external_id" in sync.mapping:
            raise ConfigError(
                config_path,
                f"syncs.{sync.name}.mapping.external_id",
                "Klaviyo's subscription endpoints identify profiles by email or phone_number only",
            )
        self.mapping = mapped_columns(sync, columns, config_path, self.mapping_keys)
        if not any(key in self.mapping for key in CHANNEL_IDENTIFIERS):
            raise ConfigError(
                config_path,
                f"syncs.{sync.name}.mapping",
                "no identifier is mapped: map email, phone_number or both",
            )
        self.country = default_country(sync, config_path)
        self.list_id = self.text_setting("list_id")
        self.batch_mode = self.bool_setting("batch", True)
        self.request_size = batch_size_setting(sync, self.job_endpoint.max_items or 1, config_path)
        self._lists: dict[str, bool] = {}  # list id -> exists, checked once per run

    # -- settings and values -----------------------------------------------------------------

    def setting_path(self, key: str) -> str:
        return f"syncs.{self.sync.name}.settings.{key}"

    def text_setting(self, key: str, default: str | None = None) -> str | None:
        value = self.sync.settings.get(key)
        if value is None:
            return default
        if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
            raise ConfigError(self.config_path, self.setting_path(key), "must be a non-empty text")
        return str(value).strip()

    def bool_setting(self, key: str, default: bool) -> bool:
        return flag_setting(self.sync, key, default, self.config_path)

    def column_value(self, values: Mapping[str, Any], key: str) -> Any:
        """The row's value for mapping key `key` (None when unmapped, NULL or blank)."""
        column = self.mapping.get(key)
        value = json_value(values.get(column)) if column else None
        return None if value is None or str(value).strip() == "" else value

    # -- what subclasses define --------------------------------------------------------------

    def group(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The request-level values of this row: rows that share them share a request."""
        value = self.column_value(values, "list_id")
        return {"list_id": str(value).strip() if value is not None else self.list_id}

    def job_attributes(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """Request attributes besides the profiles (Subscribe's custom_source, ...)."""
        return {}

    @abstractmethod
    def subscriptions(
        self, identifiers: Identifiers, values: Mapping[str, Any], group: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The `subscriptions` object of one profile; InvalidRow if the row cannot have one."""

    # -- the Action interface ----------------------------------------------------------------

    @property
    def columns(self) -> set[str]:
        return set(self.mapping.values())

    @property
    def default_mappings(self) -> Mapping[str, str]:
        return {k: c for k, c in self.mapping.items() if k not in self.sync.mapping}

    @property
    def endpoint(self) -> EndpointClass:
        return self.job_endpoint

    @property
    def batch_size(self) -> int:
        return PAGE_ROWS if self.batch_mode else SINGLE_PAGE

    def prepare(self, row: ChangeRow) -> Prepared:
        identifiers = read_identifiers(row.values, self.mapping, self.country, CHANNEL_IDENTIFIERS)
        group = self.group(row.values)
        attributes = {
            **identifiers.present(),
            "subscriptions": self.subscriptions(identifiers, row.values, group),
        }
        profile = {"type": "profile", "attributes": attributes}
        return Prepared(row=row, item={"profile": profile, **group}, body=dumps(profile))

    def batches(self, items: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        """Per group of request-level values, the fewest requests of `batch_size` profiles."""
        if not self.batch_mode:
            listed = list(items)
            for start in range(0, len(listed), SINGLE_PAGE):
                yield listed[start : start + SINGLE_PAGE]
            return
        groups: dict[tuple[Any, ...], list[Prepared]] = {}
        for item in items:
            groups.setdefault(_group_key(item), []).append(item)
        for members in groups.values():
            for start in range(0, len(members), self.request_size):
                yield members[start : start + self.request_size]

    def request_body(self, batch: Sequence[Prepared]) -> bytes:
        group = dict(_group_key(batch[0])) if batch else self.group({})
        attributes = {
            **self.job_attributes(group),
            "profiles": {"data": [item.item["profile"] for item in batch]},
        }
        data: dict[str, Any] = {"type": self.job_type, "attributes": attributes}
        if group["list_id"]:
            data["relationships"] = {"list": {"data": {"type": "list", "id": group["list_id"]}}}
        return dumps({"data": data})

    def item_index(self, pointer: str | None) -> int | None:
        return pointer_index(pointer, PROFILES_POINTER) if self.batch_mode else None

    def preflight(self, client: KlaviyoClient) -> None:
        if self.list_id:
            require_list(client, self.list_id, self.setting_path("list_id"))
            self._lists[self.list_id] = True  # checked: the batches need not fetch it again

    def send(self, client: KlaviyoClient, batch: Sequence[Prepared]) -> BatchResult:
        if not self.batch_mode:
            return self._send_single(client, batch)
        list_id = batch[0].item["list_id"]
        if list_id and not self._list_exists(client, list_id):
            return BatchResult(rejected=[self._no_list(item) for item in batch])
        try:
            client.post(self.path, content=self.request_body(batch))
        except ConflictError as exc:
            return self._split_conflict(client, batch, exc)
        return BatchResult(delivered=list(batch))

    # -- helpers -------------------------------------------------------------------------------

    def _send_single(self, client: KlaviyoClient, batch: Sequence[Prepared]) -> BatchResult:
        result = BatchResult()
        for index, item in enumerate(batch):
            list_id = item.item["list_id"]
            try:
                if list_id and not self._list_exists(client, list_id):
                    result.rejected.append(self._no_list(item))
                    continue
                client.post(self.path, content=self.request_body([item]))
            except AuthError as exc:
                result.unsent += list(batch[index:])
                result.error = exc
                break
            except PermanentError as exc:
                detail = exc.errors[0] if exc.errors else None
                reason = (detail and (detail.detail or detail.title)) or str(exc)
                field = field_of_pointer(detail.pointer if detail else None)
                result.rejected.append(Rejected(item, field, f"Klaviyo: {reason}"))
                continue
            except KlaviyoError as exc:
                result.unsent += list(batch[index:])
                result.error = exc
                break
            result.delivered.append(item)
        return result

    def _split_conflict(
        self, client: KlaviyoClient, batch: Sequence[Prepared], exc: ConflictError
    ) -> BatchResult:
        """A 409: some profile's email and phone belong to two different Klaviyo profiles.
        Reject the rows its pointers name and send the others again; without pointers, find
        them by halving, as the runner does for a 400."""
        named = {
            index: detail
            for detail in exc.errors
            if (index := self.item_index(detail.pointer)) is not None and index < len(batch)
        }
        if not named:
            if len(batch) == 1:
                detail = exc.errors[0] if exc.errors else None
                reason = (detail and (detail.detail or detail.title)) or str(exc)
                return BatchResult(rejected=[Rejected(batch[0], None, f"Klaviyo: {reason}")])
            half = len(batch) // 2
            result = self.send(client, batch[:half])
            result.merge(self.send(client, batch[half:]))
            return result
        result = BatchResult(
            rejected=[
                Rejected(batch[i], None, f"Klaviyo: {d.detail or d.title or 'conflict'}")
                for i, d in named.items()
            ]
        )
        rest = [item for i, item in enumerate(batch) if i not in named]
        if rest:
            result.merge(self.send(client, rest))
        return result

    def _list_exists(self, client: KlaviyoClient, list_id: str) -> bool:
        if list_id not in self._lists:
            self._lists[list_id] = list_exists(client, list_id)
        return self._lists[list_id]

    def _no_list(self, item: Prepared) -> Rejected:
        return Rejected(
            item,
            "list_id",
            f"list {item.item['list_id']!r} does not exist in this Klaviyo account",
        )


def _group_key(item: Prepared) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in item.item.items() if k != "profile")
