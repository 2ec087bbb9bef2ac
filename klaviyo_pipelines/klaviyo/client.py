"""HTTP client for Klaviyo's REST API: auth headers, pacing, retries and typed errors.

This layer knows nothing of Dagster or the warehouse. Callers get either a 2xx response or
one of the errors in `klaviyo_pipelines.klaviyo.errors`, after transient failures were
already retried here, so actions only decide what a *permanent* failure means for their rows.
"""

from __future__ import annotations

import email.utils
import importlib.metadata
import json as jsonlib
import logging
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from klaviyo_pipelines import interrupt
from klaviyo_pipelines.klaviyo.endpoints import EndpointClass, endpoint_class
from klaviyo_pipelines.klaviyo.errors import (
    Interrupted,
    KlaviyoError,
    PermanentError,
    RateLimitedError,
    TransientError,
    error_for_status,
    parse_error_details,
    redact_json,
)
from klaviyo_pipelines.klaviyo.rate_limit import RateLimiter

logger = logging.getLogger(__name__)

MEDIA_TYPE = "application/vnd.api+json"
DEFAULT_BASE_URL = "https://a.klaviyo.com"
DEFAULT_REVISION = "2026-07-15"
_INITIAL_BACKOFF = 0.5
_MASK = "********"


def _package_version() -> str:
    try:
        return importlib.metadata.version("klaviyo_pipelines")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


USER_AGENT = f"klaviyo-pipelines/{_package_version()}"


class Secret:
    """Holds a credential so that printing, logging or repr() of its holder never shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The raw value. Call only where it goes on the wire."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{_MASK}')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


class _ApiKeyAuth(httpx.Auth):
    """Adds the Authorization header per request, so the key never sits in client headers."""

    def __init__(self, secret: Secret) -> None:
        self._secret = secret

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        request.headers["Authorization"] = "Klaviyo-API-Key " + self._secret.reveal()
        yield request

    def __repr__(self) -> str:
        return f"_ApiKeyAuth({self._secret!r})"


@dataclass(frozen=True)
class ClientStats:
    """Counters for run metadata. `waited_seconds` is pacing plus retry backoff sleeps."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    transient_errors: int = 0
    waited_seconds: float = 0.0


class KlaviyoClient:
    """Thread-safe Klaviyo API client; share one per account (it owns the rate limiter).

    Retries (tenacity, at most `max_attempts` attempts in all): 429 after Retry-After (capped
    by `max_retry_after`, backoff when absent), any 5xx, timeouts and connection errors, with
    exponential backoff and jitter up to `max_backoff`. Other 4xx fail at once, so a bad key
    costs one request, not a retry storm.

    A POST answered with a 5xx or a timeout may still have been applied by Klaviyo. Retrying
    it is right for this pipeline: bulk profile import, profile-import and list membership
    are upserts, subscription jobs are idempotent, and events carry a deterministic
    `unique_id`, so a repeat changes nothing. Do not send non-idempotent writes through here
    without such a key.

    `time_scale` shortens the rate windows and the retry backoff for a sandbox that runs fast
    time (it must match the rate limiter's). Retry-After is honoured as sent, in real seconds.
    """

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        revision: str = DEFAULT_REVISION,
        timeout: float = 30.0,
        max_attempts: int = 6,
        max_backoff: float = 30.0,
        max_retry_after: float = 120.0,
        rate_limiter: RateLimiter | None = None,
        time_scale: float = 1.0,
        verify: bool = True,
    ) -> None:
        if not isinstance(api_key, str) or not api_key.strip():
            raise ValueError("api_key is empty: set the Klaviyo private API key")
        api_key = api_key.strip()
        if not api_key.isascii() or not api_key.isprintable() or " " in api_key:
            raise ValueError("api_key contains spaces or invalid characters; copy the key again")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if rate_limiter is not None and rate_limiter.time_scale != time_scale:
            raise ValueError(
                f"rate_limiter.time_scale ({rate_limiter.time_scale}) differs from "
                f"time_scale ({time_scale})"
            )
        self._api_key = Secret(api_key)
        self.base_url = base_url.rstrip("/")
        self.revision = revision
        self._base = httpx.URL(self.base_url)
        self._max_attempts = max_attempts
        self._max_backoff = max_backoff
        self._max_retry_after = max_retry_after
        self._time_scale = time_scale
        self._limiter = rate_limiter or RateLimiter(time_scale=time_scale)
        self._stats = ClientStats()
        self._stats_lock = threading.Lock()
        self._sleep: Callable[[float], None] = interrupt.sleep
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            verify=verify,
            follow_redirects=False,
            auth=_ApiKeyAuth(self._api_key),
            headers={"revision": revision, "Accept": MEDIA_TYPE, "User-Agent": USER_AGENT},
        )

    def __repr__(self) -> str:
        return (
            f"KlaviyoClient(base_url={self.base_url!r}, revision={self.revision!r}, "
            f"api_key={self._api_key!r})"
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def rate_limiter(self) -> RateLimiter:
        """The limiter pacing this client (share it with other clients of the same account)."""
        return self._limiter

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the counters since this client was created."""
        with self._stats_lock:
            return self._stats

    def _count(self, **deltas: float) -> None:
        with self._stats_lock:
            current = self._stats
            self._stats = replace(
                current, **{k: getattr(current, k) + v for k, v in deltas.items() if v}
            )

    # -- requests ----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json: object | None = None,
        content: bytes | None = None,
        params: dict[str, Any] | None = None,
    ) -> httpx.Response:
        """Send a request with pacing and retries; return the 2xx response or raise.

        `path` is relative (`/api/profiles`) or a full URL on the base host (a `links.next`).
        `content` is sent as is, for callers that sized an already serialised payload.
        Raises `PermanentError` (incl. `AuthError`, `ConflictError`) at once, and
        `TransientError`/`RateLimitedError` once `max_attempts` attempts have failed.
        """
        if json is not None and content is not None:
            raise ValueError("pass either json or content, not both")
        method = method.upper()
        url, api_path = self._resolve(path)
        body = content if content is not None else _dumps(json) if json is not None else None
        headers = {"Content-Type": MEDIA_TYPE} if body is not None else None
        cls = endpoint_class(method, api_path)
        retrying = Retrying(
            stop=stop_after_attempt(self._max_attempts),
            wait=self._retry_wait,
            retry=retry_if_exception_type(TransientError),
            sleep=self._retry_sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                number = attempt.retry_state.attempt_number
                return self._send(method, url, api_path, cls, body, headers, params, number)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _send(
        self,
        method: str,
        url: str,
        api_path: str,
        cls: EndpointClass,
        body: bytes | None,
        headers: dict[str, str] | None,
        params: dict[str, Any] | None,
        attempt: int,
    ) -> httpx.Response:
        waited = self._limiter.acquire(cls)
        where = {"method": method, "path": api_path, "attempts": attempt}
        if interrupt.requested():  # a poll, a retry or a row's own request: not after a stop
            self._count(waited_seconds=waited)
            raise Interrupted(reason=f"not sent: stopped by {interrupt.signal_name()}", **where)
        sent_at = self._limiter.now()
        self._count(requests=1, retries=int(attempt > 1), waited_seconds=waited)
        try:
            response = self._http.request(method, url, content=body, headers=headers, params=params)
        except httpx.TimeoutException as exc:
            self._count(transient_errors=1)
            raise TransientError(reason=f"timeout ({type(exc).__name__})", **where) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as exc:
            self._count(transient_errors=1)
            reason = f"connection error ({type(exc).__name__}: {self._redact(str(exc))})"
            raise TransientError(reason=reason, **where) from exc
        except httpx.HTTPError as exc:
            reason = f"request failed ({type(exc).__name__}: {self._redact(str(exc))})"
            raise PermanentError(reason=reason, **where) from exc

        # httpx (0.28, 0.29) makes a response and its stream refer to each other, so the
        # response, its request and the request's body (megabytes for a bulk import) outlive
        # every use until a garbage collection finds the cycle (encode/httpx#3733): 330 MB on
        # a 1M-profile sync with the collector off. The body is read: drop the stream.
        response.stream = httpx.ByteStream(b"")
        self._limiter.observe(cls, response.headers, sent_at=sent_at)
        if response.is_success:
            return response
        status = response.status_code
        retry_after: float | None = None
        if status == 429:
            retry_after = _parse_retry_after(response.headers.get("Retry-After"))
            self._count(rate_limited=1)
            if retry_after is not None:
                self._limiter.penalize(cls, min(retry_after, self._max_retry_after))
        elif status >= 500:
            self._count(transient_errors=1)
        # Redacted before decoding and again after: JSON may carry the key \u-escaped.
        details = parse_error_details(self._redact(response.text), status)
        raise error_for_status(
            status,
            errors=[detail.redacted(self._redact) for detail in details],
            retry_after=retry_after,
            reason=self._redact(response.reason_phrase) or None,
            **where,
        )

    def _retry_wait(self, state: RetryCallState) -> float:
        """Retry-After for a 429 that sent one, else exponential backoff with equal jitter."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
            return min(exc.retry_after, self._max_retry_after)
        base = min(self._max_backoff, _INITIAL_BACKOFF * 2 ** (state.attempt_number - 1))
        return (base / 2 + random.uniform(0, base / 2)) / self._time_scale

    def _retry_sleep(self, seconds: float) -> None:
        self._count(waited_seconds=seconds)
        self._sleep(seconds)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        level = logging.INFO if isinstance(exc, RateLimitedError) else logging.WARNING
        logger.log(
            level,
            "Klaviyo request failed: %s; retrying in %.2fs (attempt %d of %d)",
            exc,
            state.upcoming_sleep,
            state.attempt_number + 1,
            self._max_attempts,
        )

    def _resolve(self, path: str) -> tuple[str, str]:
        """Return (url for httpx, API path for routing and messages).

        Full URLs must point at the base host: the Authorization header goes with every
        request, so a `links.next` elsewhere would leak the key.
        """
        if path.startswith(("http://", "https://")):
            url = httpx.URL(path)
            if (url.scheme, url.host, url.port) != (
                self._base.scheme,
                self._base.host,
                self._base.port,
            ):
                raise ValueError(
                    f"refusing to send the API key to {url.scheme}://{url.host}: "
                    f"URLs must be on {self.base_url}"
                )
            api_path = url.path
            prefix = self._base.path.rstrip("/")
            if prefix and api_path.startswith(prefix):
                api_path = api_path[len(prefix) :]
            return path, api_path
        if not path.startswith("/"):
            path = "/" + path
        return path, path.split("?", 1)[0]

    def _redact(self, text: str) -> str:
        key = self._api_key.reveal()
        return text.replace(key, _MASK) if key in text else text

    # -- JSON helpers ------------------------------------------------------------------------

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        """The decoded document, the key masked in every string (a job's errors become ledger
        reasons; a value echoed back may hold it)."""
        try:
            doc = redact_json(response.json(), self._redact)
        except ValueError as exc:
            raise self._bad_body(response, "response body is not JSON") from exc
        if not isinstance(doc, dict):
            raise self._bad_body(response, "response body is not a JSON object")
        return doc

    def _bad_body(self, response: httpx.Response, reason: str) -> KlaviyoError:
        _, api_path = self._resolve(str(response.request.url))
        return PermanentError(
            method=response.request.method,
            path=api_path,
            status=response.status_code,
            reason=reason,
        )

    def get(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET and return the JSON document."""
        return self._json(self.request("GET", path, params=params))

    def post(
        self, path: str, json: object | None = None, *, content: bytes | None = None
    ) -> dict[str, Any] | None:
        """POST; return the JSON document, or None when Klaviyo sent no body (202/204)."""
        response = self.request("POST", path, json=json, content=content)
        return self._json(response) if response.content else None

    def patch(self, path: str, json: object) -> dict[str, Any]:
        """PATCH and return the JSON document (empty dict if Klaviyo sent no body)."""
        response = self.request("PATCH", path, json=json)
        return self._json(response) if response.content else {}

    def delete(self, path: str, json: object | None = None) -> None:
        """DELETE (list membership removal sends a body)."""
        self.request("DELETE", path, json=json)

    def paginate(self, path: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Yield every resource of `data[]`, following `links.next` until it is absent or null.

        `links.next` is followed verbatim (it carries the cursor and the original query).
        """
        url: str | None = path
        query = params
        seen: set[str] = set()
        while url:
            if url in seen:
                raise PermanentError(
                    method="GET",
                    path=self._resolve(url)[1],
                    reason="pagination loop: links.next points at a page already read",
                )
            seen.add(url)
            page = self.get(url, query)
            data = page.get("data")
            if isinstance(data, list):
                yield from (item for item in data if isinstance(item, dict))
            elif isinstance(data, dict):
                yield data
            links = page.get("links")
            nxt = links.get("next") if isinstance(links, dict) else None
            url = nxt if isinstance(nxt, str) and nxt else None
            query = None


def _dumps(payload: object) -> bytes:
    """Compact UTF-8 JSON; NaN/Infinity raise because Klaviyo rejects them anyway."""
    return jsonlib.dumps(
        payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: integer, fractional, or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(seconds, 0.0)
