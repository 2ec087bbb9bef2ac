"""Order Completed: per added order, an order event plus one "Ordered Product" event per product.

Products come from a column holding a JSON array of objects (`mapping.products`) or from a
line-items model joined on the order's primary key (`settings.line_items`). Unlike Segment:

- the product list is not copied into event properties (the order event carried it);
- product unique ids are deterministic, `<order unique_id>:<n>` where n is the product's
  1-based position in the list (a JSON array keeps its order; line items are sorted by
  `line_items.order_by`, else by their content). Positions, not SKUs: a SKU can repeat within
  an order or be missing, a position cannot;
- an order's events travel together: one bulk entry holds all of them, so a request accepts or
  refuses the whole order and a retry resends all of it, which Klaviyo deduplicates by unique_id.
  In single mode, an order whose product event did not go through stays unsent and is resent
  whole on the next run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from klaviyo_pipelines.actions.events import (
    MAPPING_KEYS,
    SETTING_KEYS,
    EventAction,
    SyncKeys,
    bulk_entry,
    event_profile,
    event_properties,
    new_event,
    resolve_event_mapping,
    row_unique_id,
)
from klaviyo_pipelines.actions.profile import InvalidRow
from klaviyo_pipelines.actions.registry import ACTIONS
from klaviyo_pipelines.actions.values import json_value
from klaviyo_pipelines.config import ConfigError, SyncSpec
from klaviyo_pipelines.klaviyo.endpoints import EVENT_BULK_CREATE
from klaviyo_pipelines.warehouse.changes import ChangeRow
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import (
    RESERVED_COLUMNS,
    resolve_column,
    snapshot_rows_for_keys,
    snapshot_table,
)

LINE_ITEMS = "_kp_line_items"  # where `enrich` puts an order's line items among its values
MAX_EVENTS = EVENT_BULK_CREATE.max_items or 1000


@dataclass(frozen=True)
class LineItems:
    """`settings.line_items`: the model holding order lines and how its rows name their order."""

    model: str
    order_key: str
    order_by: str | None


class OrderCompleted(EventAction):
    info = ACTIONS["order_completed"]

    def __init__(self, sync: SyncSpec, columns: Sequence[str], config_path: str) -> None:
        keys = SyncKeys(
            sync,
            columns,
            config_path,
            mapping_keys=MAPPING_KEYS | {"products"},
            setting_keys=SETTING_KEYS | {"event_name", "product_event_name", "line_items"},
        )
        super().__init__(sync, resolve_event_mapping(keys))
        self.config_path = config_path
        self.event_name = keys.metric_name("event_name", "Order Completed") or ""
        self.product_event_name = keys.metric_name("product_event_name", "Ordered Product") or ""
        self.products_column = keys.mapped("products")
        self.line_items = _line_items(keys)
        if self.products_column and self.line_items:
            raise keys.error(
                "settings.line_items",
                "products come from mapping.products or from settings.line_items, not both",
            )
        # A property mapped to the products column repeats the product list: order event only.
        self.order_only = {
            name for name, col in self.mapping.properties.items() if col == self.products_column
        }
        self._line_columns: tuple[str, str | None] | None = None

    @property
    def columns(self) -> set[str]:
        extra = {self.products_column} if self.products_column else set()
        return self.mapping.columns | extra

    def enrich(self, wh: Warehouse, rows: list[ChangeRow]) -> list[ChangeRow]:
        rows = super().enrich(wh, rows)
        if self.line_items is None or not rows:
            return rows
        key_column, order_by = self._line_item_columns(wh)
        found = snapshot_rows_for_keys(
            wh, self.line_items.model, key_column, [row.key for row in rows]
        )
        return [
            row._replace(values={**row.values, LINE_ITEMS: _ordered(found.get(row.key), order_by)})
            for row in rows
        ]

    def _line_item_columns(self, wh: Warehouse) -> tuple[str, str | None]:
        """`order_key` and `order_by` checked against the line-items snapshot, once per run."""
        if self._line_columns is not None:
            return self._line_columns
        assert self.line_items is not None
        model = self.line_items.model
        prefix = f"syncs.{self.sync.name}.settings.line_items"
        try:
            with wh.engine.connect() as conn:
                table = wh.table(snapshot_table(model))
                columns = [
                    c
                    for c in wh.columns_of_query(conn, f"SELECT * FROM {table}")
                    if c not in RESERVED_COLUMNS
                ]
        except sa.exc.SQLAlchemyError:
            raise ConfigError(
                self.config_path,
                f"{prefix}.model",
                f"model {model!r} has no snapshot yet; snapshot it before this sync runs",
            ) from None

        def column(key: str, name: str) -> str:
            found = resolve_column(columns, name)
            if found is None:
                raise ConfigError(
                    self.config_path,
                    f"{prefix}.{key}",
                    f"column {name!r} is not in model {model!r} (columns: {', '.join(columns)})",
                )
            return found

        order_by = self.line_items.order_by
        self._line_columns = (
            column("order_key", self.line_items.order_key),
            column("order_by", order_by) if order_by else None,
        )
        return self._line_columns

    def products(self, values: Mapping[str, Any]) -> list[dict[str, Any]]:
        if self.products_column:
            return parse_products(values.get(self.products_column))
        return [json_value(item) for item in values.get(LINE_ITEMS) or []]

    def entry(self, row: ChangeRow) -> dict[str, Any]:
        profile = event_profile(self.mapping, row.values)
        fields = self.event_fields(row)
        products = self.products(row.values)
        if 1 + len(products) > MAX_EVENTS:
            raise InvalidRow(
                "products",
                f"{len(products):,} products make {len(products) + 1:,} events; an order's events "
                f"go in one request and Klaviyo takes at most {MAX_EVENTS:,} per request",
            )
        properties = event_properties(self.mapping, row.values)
        order_id = row_unique_id(self.mapping, row)
        shared = {k: v for k, v in properties.items() if k not in self.order_only}
        events = [new_event(self.event_name, properties, order_id, **fields)]
        events += [
            new_event(
                self.product_event_name,
                {**shared, **product},
                f"{order_id}:{number}",
                time=fields["time"],
                backfill=fields["backfill"],
            )
            for number, product in enumerate(products, 1)
        ]
        return bulk_entry(profile, events)


def parse_products(raw: Any) -> list[dict[str, Any]]:
    """The product objects of a column, however the warehouse hands the array over: JSON text,
    a list (PostgreSQL jsonb, DuckDB LIST), or a list of dicts or JSON strings (DuckDB STRUCT[],
    JSON[])."""
    raw = _json_text(raw, "products")
    if raw is None:
        return []
    if not isinstance(raw, list | tuple):
        raise InvalidRow(
            "products", f"must be a JSON array of product objects, got {type(raw).__name__}"
        )
    products = []
    for number, item in enumerate(raw, 1):
        value = json_value(_json_text(item, "products"))
        if not isinstance(value, dict):
            raise InvalidRow("products", f"product {number} is not an object: {value!r:.80}")
        products.append(value)
    return products


def _json_text(value: Any, field: str) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            value = bytes(value).decode()
        except UnicodeDecodeError as exc:
            raise InvalidRow(field, f"is bytes that are not UTF-8 JSON text: {exc}") from None
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except ValueError as exc:
        raise InvalidRow(field, f"is not valid JSON: {exc}") from None


def _ordered(items: list[dict[str, Any]] | None, order_by: str | None) -> list[dict[str, Any]]:
    """Line items in a stable order, so product positions (and unique ids) never shift."""
    if not items:
        return []
    if order_by:
        return sorted(items, key=lambda item: (item[order_by] is None, item[order_by]))
    return sorted(items, key=lambda item: json.dumps(json_value(item), sort_keys=True))


def _line_items(keys: SyncKeys) -> LineItems | None:
    raw = keys.sync.settings.get("line_items")
    if raw is None:
        return None
    allowed = {"model", "order_key", "order_by"}
    if not isinstance(raw, dict):
        raise keys.error(
            "settings.line_items", "must be a mapping: {model: ..., order_key: ..., order_by: ...}"
        )
    for key in raw:
        if key not in allowed:
            raise keys.error(
                f"settings.line_items.{key}",
                f"unknown key (keys: {', '.join(sorted(allowed))})",
            )
    for key in ("model", "order_key"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise keys.error(f"settings.line_items.{key}", "is required and must be a name")
    order_by = raw.get("order_by")
    if order_by is not None and not isinstance(order_by, str):
        raise keys.error("settings.line_items.order_by", f"must name a column, got {order_by!r}")
    return LineItems(raw["model"], raw["order_key"], order_by)


ACTION = OrderCompleted
