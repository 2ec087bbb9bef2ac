"""Klaviyo's official request schemas (vendored) and body validation with JSON:API errors.

Why: the sandbox must reject exactly what Klaviyo rejects, so every request body is checked
against the schema from Klaviyo's own OpenAPI file (vendored by
``scripts/vendor_klaviyo_schemas.py`` into ``klaviyo_schemas.json``; nothing reads ``../shared`` at
run time). Validators are built once per process. The happy path uses a compiled checker
(:mod:`fastcheck`); only invalid bodies pay for ``jsonschema``'s detailed errors, which become
400 ``invalid`` errors whose ``source.pointer`` names the offending member.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft7Validator, FormatChecker
from jsonschema.exceptions import ValidationError, best_match

from klaviyo_pipelines.sandbox.errors import ApiError, error_object
from klaviyo_pipelines.sandbox.fastcheck import Check, UnsupportedSchema, compile_schema

SCHEMA_FILE = "klaviyo_schemas.json"
MAX_REPORTED_ERRORS = 10


def _is_datetime(value: object) -> bool:
    if not isinstance(value, str):  # formats only constrain strings
        return True
    if len(value) < 11 or value[10] not in "Tt ":
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return False
    return True


def _is_date(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


FORMATS: dict[str, Check] = {"date-time": _is_datetime, "date": _is_date}


def _format_checker() -> FormatChecker:
    checker = FormatChecker(formats=())
    for name, func in FORMATS.items():
        checker.checks(name)(func)
    return checker


@dataclass(frozen=True)
class Operation:
    """What the sandbox knows about one Klaviyo operation, straight from the vendored spec."""

    operation_id: str
    method: str
    path: str
    scopes: tuple[str, ...]
    ratelimit: dict[str, str] | None
    filters: dict[str, Any] | None
    page_size: dict[str, int] | None
    sorts: tuple[str, ...] | None
    request_schema: dict[str, Any] | None


class _BodyValidator:
    """A fast yes/no check plus a lazily built ``jsonschema`` validator for the error details."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self.full = Draft7Validator(schema, format_checker=_format_checker())
        try:
            self.fast: Check = compile_schema(schema, FORMATS)
        except UnsupportedSchema:
            self.fast = self.full.is_valid

    def errors(self, body: Any) -> list[ValidationError]:
        if self.fast(body):
            return []
        return sorted(self.full.iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))


class SchemaRegistry:
    """Loads the vendored JSON once and validates request bodies by operation id."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.source: dict[str, Any] = document["source"]
        self.operations: dict[str, Operation] = {}
        self._validators: dict[str, _BodyValidator] = {}
        for op_id, raw in document["operations"].items():
            op = Operation(
                operation_id=op_id,
                method=raw["method"],
                path=raw["path"],
                scopes=tuple(raw.get("scopes") or ()),
                ratelimit=raw.get("ratelimit"),
                filters=raw.get("filters"),
                page_size=raw.get("page_size"),
                sorts=tuple(raw["sorts"]) if raw.get("sorts") else None,
                request_schema=raw.get("request_schema"),
            )
            self.operations[op_id] = op
            if op.request_schema is not None:
                self._validators[op_id] = _BodyValidator(op.request_schema)

    def validate(self, operation_id: str, body: Any) -> None:
        """Raise a 400 :class:`ApiError` listing schema violations, or return quietly."""
        validator = self._validators.get(operation_id)
        if validator is None:
            return
        errors = validator.errors(body)
        if errors:
            raise ApiError(400, [_to_error_object(e) for e in errors[:MAX_REPORTED_ERRORS]])


def pointer_for(path: list[Any] | tuple[Any, ...]) -> str:
    """RFC 6901 JSON pointer for a path of keys and indexes."""
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in path]
    return "/" + "/".join(parts) if parts else "/"


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


_JSON_TYPE_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}


def _to_error_object(error: ValidationError) -> dict[str, Any]:
    leaf = best_match([error])  # descends into anyOf/oneOf to the most relevant sub-error
    path = list(leaf.absolute_path)
    instance = leaf.instance
    keyword = leaf.validator
    if keyword == "required":
        missing = next((name for name in leaf.validator_value if name not in instance), None)
        if missing is not None:
            path.append(missing)
        detail = f"'{missing}' is a required property."
    elif keyword == "type":
        expected = leaf.validator_value
        expected_text = " or ".join(expected) if isinstance(expected, list) else expected
        actual = _JSON_TYPE_NAMES.get(type(instance), type(instance).__name__)
        detail = f"{_describe(instance)} is not of type {expected_text} (got {actual})."
    elif keyword == "enum":
        choices = ", ".join(_describe(c) for c in leaf.validator_value)
        detail = f"{_describe(instance)} is not a valid choice. Expected one of: {choices}."
    elif keyword == "format":
        detail = f"{_describe(instance)} is not a valid {leaf.validator_value}."
    else:
        detail = leaf.message
    return error_object(400, "invalid", detail, pointer=pointer_for(path))


@cache
def registry() -> SchemaRegistry:
    """The process-wide registry (validators are expensive to build, so build them once)."""
    text = resources.files("klaviyo_pipelines.sandbox").joinpath(SCHEMA_FILE).read_text("utf-8")
    return SchemaRegistry(json.loads(text))
