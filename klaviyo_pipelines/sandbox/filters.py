"""Parser for Klaviyo's ``filter`` query parameter, checked against the operation's declared filters.

Why: clients build filter strings by hand (``any(email,["a@x.com","b@x.com"])``); the sandbox must
accept exactly what Klaviyo documents (both quote styles, list values, comma-joined ANDs, unquoted
ISO datetimes) and reject fields or operator forms the operation does not declare in
``x-klaviyo-filters`` with a 400, so a client bug shows up in tests instead of in production.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from klaviyo_pipelines.sandbox.errors import ApiError, invalid

PARAMETER = "filter"


@dataclass(frozen=True)
class FilterExpr:
    """One ``op(field,value)`` term; ``value`` is a list when the filter used ``[...]``."""

    op: str
    field: str
    value: Any
    is_list: bool

    @property
    def values(self) -> list[Any]:
        return list(self.value) if self.is_list else [self.value]


def _bad(detail: str) -> ApiError:
    return invalid(f"Invalid filter provided: {detail}", parameter=PARAMETER)


class _Parser:
    """Recursive-descent parser: ``expr ("," expr)*`` with ``expr := op "(" field "," value ")"``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> ApiError:
        return _bad(f"{message} at position {self.pos}.")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def expect(self, char: str) -> None:
        self.skip_ws()
        if self.peek() != char:
            raise self.error(f"expected {char!r}")
        self.pos += 1

    def parse(self) -> list[FilterExpr]:
        exprs = [self.expression()]
        self.skip_ws()
        while self.peek() == ",":
            self.pos += 1
            exprs.append(self.expression())
            self.skip_ws()
        if self.pos != len(self.text):
            raise self.error("unexpected trailing characters")
        return exprs

    def name(self) -> str:
        self.skip_ws()
        start = self.pos
        while self.peek() and (self.peek().isalnum() or self.peek() in "-_.$"):
            self.pos += 1
        if start == self.pos:
            raise self.error("expected a name")
        return self.text[start : self.pos]

    def expression(self) -> FilterExpr:
        op = self.name()
        self.expect("(")
        field = self.name()
        self.expect(",")
        self.skip_ws()
        is_list = self.peek() == "["
        value = self.list_value() if is_list else self.scalar()
        self.expect(")")
        return FilterExpr(op, field, value, is_list)

    def list_value(self) -> list[Any]:
        self.expect("[")
        values: list[Any] = []
        self.skip_ws()
        if self.peek() == "]":
            self.pos += 1
            return values
        while True:
            values.append(self.scalar())
            self.skip_ws()
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("]")
            return values

    def scalar(self) -> Any:
        self.skip_ws()
        quote = self.peek()
        if quote in ("'", '"'):
            return self.quoted(quote)
        start = self.pos
        while self.peek() and self.peek() not in ",)]":
            self.pos += 1
        raw = self.text[start : self.pos].strip()
        if not raw:
            raise self.error("expected a value")
        if raw in ("true", "false"):
            return raw == "true"
        if raw == "null":
            return None
        for convert in (int, float):
            try:
                return convert(raw)
            except ValueError:
                pass
        parsed = parse_datetime(raw)
        if parsed is None:
            raise self.error(f"string values must be quoted, got {raw!r}")
        return parsed

    def quoted(self, quote: str) -> str:
        self.pos += 1
        out: list[str] = []
        while True:
            char = self.peek()
            if not char:
                raise self.error("unterminated string")
            self.pos += 1
            if char == "\\" and self.peek():
                out.append(self.peek())
                self.pos += 1
            elif char == quote:
                return "".join(out)
            else:
                out.append(char)


def parse_datetime(raw: str) -> datetime | None:
    """ISO-8601 datetime (``Z`` allowed), made timezone-aware (UTC if naive); None if not one."""
    if len(raw) < 10 or not raw[:4].isdigit():
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def parse_filter(text: str, declared: dict[str, Any] | None) -> list[FilterExpr]:
    """Parse ``text`` and check each term against ``declared`` (the ``x-klaviyo-filters`` block)."""
    if not text.strip():
        raise _bad("empty filter.")
    declared = declared or {}
    out: list[FilterExpr] = []
    for expr in _Parser(text).parse():
        spec = declared.get(expr.field)
        if spec is None:
            allowed = ", ".join(sorted(declared)) or "none"
            raise _bad(f"'{expr.field}' is not a filterable field. Allowed fields: {allowed}.")
        operators = spec.get("operators", {})
        form, other = ("list", "single") if expr.is_list else ("single", "list")
        if expr.op not in operators.get(form, []):
            hint = ""
            if expr.op in operators.get(other, []):
                hint = f" '{expr.op}' on '{expr.field}' requires a {other} value."
            raise _bad(
                f"operator '{expr.op}' with a {form} value is not supported for field "
                f"'{expr.field}'.{hint}"
            )
        checked = [_check_value(expr.field, spec, value) for value in expr.values]
        out.append(
            FilterExpr(expr.op, expr.field, checked if expr.is_list else checked[0], expr.is_list)
        )
    return out


def _check_value(field: str, spec: dict[str, Any], value: Any) -> Any:
    """Coerce and check one value against the declared value type (string or date-time, enum)."""
    value_spec = spec.get("value", {})
    if value_spec.get("format") == "date-time":
        if isinstance(value, str):
            value = parse_datetime(value)
        if not isinstance(value, datetime):
            raise _bad(f"'{field}' needs an ISO-8601 datetime.")
        return value
    if not isinstance(value, str):
        raise _bad(f"'{field}' needs a quoted string value.")
    enum = value_spec.get("enum")
    if enum and value not in enum:
        raise _bad(f"'{value}' is not one of {', '.join(enum)}.")
    return value
