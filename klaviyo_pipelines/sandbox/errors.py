"""JSON:API error documents in the exact shape Klaviyo sends, raised as exceptions.

Operations raise :class:`ApiError`; the request pipeline turns it into a response. Keeping the
shape in one place means every error the sandbox produces has ``id``, ``status``, ``code``,
``title``, ``detail``, ``source``, ``links`` and ``meta``, like Klaviyo's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from klaviyo_pipelines.sandbox.ids import new_uuid

TITLES: dict[int, str] = {
    400: "Invalid input.",
    401: "Authentication credentials were not provided.",
    403: "You do not have permission to perform this action.",
    404: "Not found.",
    405: "Method not allowed.",
    409: "Conflict.",
    413: "Request entity too large.",
    415: "Unsupported media type.",
    429: "Request was throttled.",
    500: "A server error occurred.",
    502: "Bad gateway.",
    503: "Service unavailable.",
    504: "Gateway timeout.",
}


def error_object(
    status: int,
    code: str,
    detail: str,
    *,
    title: str | None = None,
    pointer: str | None = None,
    parameter: str | None = None,
    meta: dict[str, Any] | None = None,
    links: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One entry of an ``errors`` array."""
    source: dict[str, str] = {}
    if pointer is not None:
        source["pointer"] = pointer
    if parameter is not None:
        source["parameter"] = parameter
    return {
        "id": new_uuid(),
        "status": status,
        "code": code,
        "title": title or TITLES.get(status, "Error."),
        "detail": detail,
        "source": source,
        "links": links or {},
        "meta": meta or {},
    }


@dataclass
class ApiError(Exception):
    """An HTTP error answer: status, the ``errors`` entries, and any extra headers."""

    status: int
    errors: list[dict[str, Any]]
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status}: {self.errors[0]['detail'] if self.errors else ''}"

    @classmethod
    def single(cls, status: int, code: str, detail: str, **kwargs: Any) -> ApiError:
        """Shorthand for the common one-error case."""
        headers = kwargs.pop("headers", None) or {}
        return cls(status, [error_object(status, code, detail, **kwargs)], headers)

    def document(self) -> dict[str, Any]:
        return {"errors": self.errors}


def invalid(detail: str, pointer: str | None = None, parameter: str | None = None) -> ApiError:
    """400 ``invalid``, the code Klaviyo uses for validation failures."""
    return ApiError.single(400, "invalid", detail, pointer=pointer, parameter=parameter)


def not_found(detail: str) -> ApiError:
    return ApiError.single(404, "not_found", detail)


THROTTLE_DOCS = "https://developers.klaviyo.com/en/docs/rate_limits_and_error_handling#rate-limits"


def throttled(retry_after: str) -> ApiError:
    """Klaviyo's 429 body (klaviyo-api-node #66) with a matching ``Retry-After`` header."""
    unit = "second" if retry_after == "1" else "seconds"
    return ApiError.single(
        429,
        "throttled",
        f"Request was throttled. Expected available in {retry_after} {unit}.",
        pointer="/data",
        links={"type": THROTTLE_DOCS},
        headers={"Retry-After": retry_after},
    )
