"""The request pipeline: route, authenticate, authorize, check revision, throttle, validate, run.

Why one place: the order of checks decides which error a client sees first, and it mirrors
Klaviyo's: unknown path 404 / wrong method 405, bad key 401, missing scope 403, bad ``revision``
400, rate limit 429, wrong media type 415, oversized body 413, malformed JSON 400 ``parse_error``,
schema violation or too many items 400 ``invalid``; only then does the operation run. Requests
refused with 429 do not count against the limits; every other authenticated request does.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from typing import Any

from klaviyo_pipelines.klaviyo.endpoints import EndpointClass, endpoint_class
from klaviyo_pipelines.sandbox.errors import ApiError, invalid, throttled
from klaviyo_pipelines.sandbox.jobs import JobWorker
from klaviyo_pipelines.sandbox.messages import ApiRequest, ApiResponse
from klaviyo_pipelines.sandbox.operations import HANDLERS, Ctx, Handler
from klaviyo_pipelines.sandbox.ratelimit import Decision, RateLimiter, Window
from klaviyo_pipelines.sandbox.schemas import Operation, SchemaRegistry, registry
from klaviyo_pipelines.sandbox.state import SandboxState

log = logging.getLogger(__name__)

AUTH_SCHEME = "Klaviyo-API-Key"
BODY_MEDIA_TYPES = frozenset({"application/vnd.api+json", "application/json"})
_REVISION_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(\.[A-Za-z0-9_-]+)?$")
_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _dig_len(*keys: str) -> Callable[[Any], int]:
    def count(body: Any) -> int:
        for key in keys:
            body = body[key]
        return len(body)

    return count


def _count_events(body: Any) -> int:
    entries = body["data"]["attributes"]["events-bulk-create"]["data"]
    return sum(len(entry["attributes"]["events"]["data"]) for entry in entries)


# Where each multi-item operation keeps its items: (counter, JSON pointer of the array).
ITEM_ARRAYS: dict[str, tuple[Callable[[Any], int], str]] = {
    "bulk_import_profiles": (
        _dig_len("data", "attributes", "profiles", "data"),
        "/data/attributes/profiles/data",
    ),
    "add_profiles_to_list": (_dig_len("data"), "/data"),
    "remove_profiles_from_list": (_dig_len("data"), "/data"),
    "bulk_create_events": (_count_events, "/data/attributes/events-bulk-create/data"),
    "bulk_subscribe_profiles": (
        _dig_len("data", "attributes", "profiles", "data"),
        "/data/attributes/profiles/data",
    ),
    "bulk_unsubscribe_profiles": (
        _dig_len("data", "attributes", "profiles", "data"),
        "/data/attributes/profiles/data",
    ),
}


@dataclass(frozen=True)
class Route:
    operation: Operation
    pattern: re.Pattern[str]
    handler: Handler


class Router:
    """Maps (method, path) to an operation; 404 for unknown paths, 405 for known paths."""

    def __init__(self, schemas: SchemaRegistry, handlers: dict[str, Handler]) -> None:
        self.routes: list[Route] = []
        for op_id, handler in handlers.items():
            op = schemas.operations[op_id]
            self.routes.append(Route(op, path_pattern(op.path), handler))

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed: list[str] = []
        for route in self.routes:
            found = route.pattern.match(path)
            if found:
                if route.operation.method == method:
                    return route, found.groupdict()
                allowed.append(route.operation.method)
        if allowed:
            raise ApiError.single(
                405,
                "method_not_allowed",
                f'Method "{method}" not allowed.',
                headers={"Allow": ", ".join(sorted(set(allowed)))},
            )
        raise ApiError.single(404, "not_found", f"The path {path} could not be found.")


def path_pattern(template: str) -> re.Pattern[str]:
    """``/api/lists/{id}`` -> a regex with a named group per parameter, trailing slash optional."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts)
    )
    return re.compile(f"^{regex}/?$")


def parse_rate(text: str) -> tuple[int, float]:
    """``"150/d"`` -> (150, 86400.0)."""
    count, _, unit = text.partition("/")
    return int(count), _PERIODS[unit.strip()[0]]


class SandboxApp:
    """Turns an :class:`ApiRequest` into an :class:`ApiResponse` against one emulated account."""

    def __init__(
        self,
        *,
        api_key: str,
        state: SandboxState,
        worker: JobWorker,
        limiter: RateLimiter,
        scopes: Iterable[str] | None = None,
        enforce_rate_limits: bool = True,
        job_delay: float = 0.0,
    ) -> None:
        self.schemas = registry()
        self.router = Router(self.schemas, HANDLERS)
        self._expected_auth = f"{AUTH_SCHEME} {api_key}".encode()
        self.scopes = _expand_scopes(scopes) if scopes is not None else None
        self.state = state
        self.worker = worker
        self.limiter = limiter
        self.enforce_rate_limits = enforce_rate_limits
        self.job_delay = job_delay
        self.base_url = ""

    def handle(self, request: ApiRequest) -> ApiResponse:
        """Run the whole pipeline; never raises for client errors."""
        cls = endpoint_class(request.method, request.path)
        operation: str | None = None
        items = 0
        decision: Decision | None = None
        try:
            route, params = self.router.match(request.method, request.path)
            op = route.operation
            operation = op.operation_id
            self._authenticate(request)
            self._authorize(op)
            self._check_revision(request)
            decision = self._throttle(op, cls)
            body = None
            if op.request_schema is not None:
                body = self._parse_body(request, cls)
                items = self.count_items(op.operation_id, body)
                self.schemas.validate(op.operation_id, body)
                self._check_items(op.operation_id, items, cls)
            ctx = Ctx(
                request, op, params, body, self.state, self.worker, self.base_url, self.job_delay
            )
            response = route.handler(ctx)
        except ApiError as error:
            response = ApiResponse(error.status, error.document(), dict(error.headers))
        except Exception:  # a sandbox bug: answer like Klaviyo's 500 instead of dropping the line
            log.exception("sandbox operation %s failed", operation)
            crash = ApiError.single(500, "error", "A server error occurred in the sandbox.")
            response = ApiResponse(500, crash.document())
        if decision is not None and decision.allowed and response.status != 429:
            response.headers["RateLimit-Limit"] = str(decision.limit)
            response.headers["RateLimit-Remaining"] = str(decision.remaining)
            response.headers["RateLimit-Reset"] = self.limiter.format_seconds(decision.reset)
        response.operation = operation
        response.endpoint = cls.name
        response.items = items
        return response

    def count_items(self, operation_id: str | None, body: Any) -> int:
        """How many profiles/events/ids a request carries (0 if unknown or unparsable)."""
        entry = ITEM_ARRAYS.get(operation_id or "")
        if entry is None:
            return 1 if isinstance(body, dict) and "data" in body else 0
        try:
            return entry[0](body)
        except (KeyError, TypeError, IndexError):
            return 0

    def count_raw_items(self, method: str, path: str, raw: bytes) -> tuple[str | None, int]:
        """(operation id, item count) for a request the app never ran (a faulted one)."""
        try:
            route, _ = self.router.match(method, path)
        except ApiError:
            return None, 0
        if not raw:
            return route.operation.operation_id, 0
        try:
            body = json.loads(raw)
        except ValueError:
            return route.operation.operation_id, 0
        return route.operation.operation_id, self.count_items(route.operation.operation_id, body)

    # ---- pipeline steps ------------------------------------------------------------------

    def _authenticate(self, request: ApiRequest) -> None:
        supplied = request.headers.get("authorization", "").strip().encode()
        if not hmac.compare_digest(supplied, self._expected_auth):
            raise ApiError.single(401, "not_authenticated", "Missing or invalid private key.")

    def _authorize(self, op: Operation) -> None:
        if self.scopes is None:
            return
        missing = [scope for scope in op.scopes if scope not in self.scopes]
        if missing:
            raise ApiError.single(
                403,
                "permission_denied",
                "You do not have permission to perform this action. This API key is missing "
                f"required scopes: {', '.join(missing)}.",
                meta={"missing_scopes": missing},
            )

    def _check_revision(self, request: ApiRequest) -> None:
        revision = request.headers.get("revision")
        if not revision:
            raise invalid(
                "Missing revision header. Send e.g. 'revision: 2026-07-15'.", parameter="revision"
            )
        found = _REVISION_RE.match(revision.strip())
        valid = False
        if found:
            try:
                date(int(found.group(1)), int(found.group(2)), int(found.group(3)))
                valid = True
            except ValueError:
                valid = False
        if not valid:
            raise invalid(
                f"Invalid revision header {revision!r}; expected the format YYYY-MM-DD[.suffix].",
                parameter="revision",
            )

    def _throttle(self, op: Operation, cls: EndpointClass) -> Decision | None:
        if not self.enforce_rate_limits:
            return None
        windows = [
            Window(f"{cls.name}:burst", cls.burst_per_second, 1.0),
            Window(f"{cls.name}:steady", cls.steady_per_minute, 60.0, steady=True),
        ]
        daily = (op.ratelimit or {}).get("daily")
        if daily:
            limit, seconds = parse_rate(daily)
            windows.append(Window(f"{op.operation_id}:daily", limit, seconds))
        decision = self.limiter.acquire(windows)
        if not decision.allowed:
            raise throttled(self.limiter.format_seconds(decision.retry_after, at_least_a_tick=True))
        return decision

    def _parse_body(self, request: ApiRequest, cls: EndpointClass) -> Any:
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type not in BODY_MEDIA_TYPES:
            raise ApiError.single(
                415,
                "unsupported_media_type",
                f'Unsupported media type "{content_type}" in request. '
                "Use application/vnd.api+json.",
            )
        if cls.max_bytes is not None and len(request.body) > cls.max_bytes:
            raise ApiError.single(
                413,
                "payload_too_large",
                f"Request body is {len(request.body)} bytes; the maximum for this endpoint is "
                f"{cls.max_bytes} bytes.",
                pointer="/data",
            )
        if not request.body:
            raise ApiError.single(400, "parse_error", "A JSON request body is required.")
        try:
            return json.loads(request.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError.single(400, "parse_error", f"JSON parse error - {exc}") from None

    def _check_items(self, operation_id: str, items: int, cls: EndpointClass) -> None:
        if cls.max_items is None or items <= cls.max_items or operation_id not in ITEM_ARRAYS:
            return
        raise invalid(
            f"Too many items: {items} in one request; the maximum is {cls.max_items}.",
            pointer=ITEM_ARRAYS[operation_id][1],
        )


def _expand_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """A key with ``x:write`` can also read ``x`` (Klaviyo's "full access" level)."""
    granted = set(scopes)
    granted |= {s.rsplit(":", 1)[0] + ":read" for s in granted if s.endswith(":write")}
    return frozenset(granted)
