"""Cursor pagination in Klaviyo's style: ``page[size]``, opaque ``page[cursor]``, full-URL links.

Why: clients must follow ``links.next`` verbatim (or pass its cursor) until it is null, and must
respect each endpoint's page-size bounds; the sandbox enforces both with 400s and emits the same
link shapes. Cursors encode an offset into the endpoint's stable ordering.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from klaviyo_pipelines.sandbox.errors import invalid
from klaviyo_pipelines.sandbox.messages import ApiRequest

_PREFIX = "sbx1:"


def encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"{_PREFIX}{offset}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith(_PREFIX):
            raise ValueError(raw)
        offset = int(raw[len(_PREFIX) :])
        if offset < 0:
            raise ValueError(raw)
        return offset
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise invalid("Invalid page cursor.", parameter="page[cursor]") from None


@dataclass(frozen=True)
class PageRequest:
    size: int
    offset: int


def page_request(request: ApiRequest, bounds: dict[str, int] | None) -> PageRequest:
    """Read and check ``page[size]`` against the operation's bounds, and decode ``page[cursor]``."""
    bounds = bounds or {"default": 20, "minimum": 1, "maximum": 100}
    raw_size = request.param("page[size]")
    size = bounds.get("default") or bounds["maximum"]
    if raw_size is not None:
        try:
            size = int(raw_size)
        except ValueError:
            raise invalid("page[size] must be an integer.", parameter="page[size]") from None
        low, high = bounds.get("minimum", 1), bounds["maximum"]
        if not low <= size <= high:
            raise invalid(
                f"page[size] must be between {low} and {high}, got {size}.",
                parameter="page[size]",
            )
    raw_cursor = request.param("page[cursor]")
    return PageRequest(size, decode_cursor(raw_cursor) if raw_cursor else 0)


def _url(base_url: str, request: ApiRequest, cursor: str | None) -> str:
    pairs = [(k, v) for k, v in request.query if k != "page[cursor]"]
    if cursor is not None:
        pairs.append(("page[cursor]", cursor))
    query = urlencode(pairs, quote_via=quote, safe="")
    return f"{base_url}{request.path}" + (f"?{query}" if query else "")


def paginate(
    items: Sequence[Any], page: PageRequest, base_url: str, request: ApiRequest
) -> tuple[Sequence[Any], dict[str, str | None]]:
    """Slice ``items`` for ``page`` and build ``links`` (self, next, prev; absent ones are None)."""
    chunk = items[page.offset : page.offset + page.size]
    has_next = page.offset + page.size < len(items)
    links: dict[str, str | None] = {
        "self": _url(base_url, request, encode_cursor(page.offset) if page.offset else None),
        "next": _url(base_url, request, encode_cursor(page.offset + page.size))
        if has_next
        else None,
        "prev": None,
    }
    if page.offset:
        previous = max(0, page.offset - page.size)
        links["prev"] = _url(base_url, request, encode_cursor(previous) if previous else None)
    return chunk, links
