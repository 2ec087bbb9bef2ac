"""Typed errors for Klaviyo API calls.

The class tells the caller what to do next: `TransientError` means "try again later" (the
client has already retried), `PermanentError` means "this request will never succeed as sent"
(bad payload, missing scope, unknown id), and `ConflictError` carries the id Klaviyo says
already owns an identifier so callers can fall back to an update.

Messages never contain request headers, so the API key cannot leak through them; text from
Klaviyo's answers passes through `ApiErrorDetail.redacted` / `redact_json` in the client.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

_MAX_DETAILS_IN_MESSAGE = 3
_MAX_RAW_BODY_CHARS = 300


@dataclass(frozen=True)
class ApiErrorDetail:
    """One entry of a JSON:API `errors[]` array, with every field optional.

    Klaviyo's spec marks `id/code/title/detail` as required, but proxies, load balancers and
    older revisions return other shapes, so nothing here is assumed present.
    """

    status: int | None = None
    code: str | None = None
    title: str | None = None
    detail: str | None = None
    pointer: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)
    parameter: str | None = None
    id: str | None = None

    def redacted(self, redact: Callable[[str], str]) -> ApiErrorDetail:
        """This detail with `redact` applied to all its text, meta's nested values included."""
        texts = {
            name: redact(value)
            for name in ("code", "title", "detail", "pointer", "parameter", "id")
            if isinstance(value := getattr(self, name), str)
        }
        return replace(self, meta=redact_json(dict(self.meta), redact), **texts)

    def describe(self) -> str:
        """Short human form: `code: detail (at pointer)`."""
        text = self.detail or self.title or "no detail"
        head = f"{self.code}: {text}" if self.code else text
        where = self.pointer or (f"?{self.parameter}" if self.parameter else None)
        return f"{head} (at {where})" if where else head


def redact_json(value: Any, redact: Callable[[str], str]) -> Any:
    """A decoded JSON value with `redact` applied to every string in it, keys included."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_json(k, redact): redact_json(v, redact) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_json(v, redact) for v in value]
    return value


def parse_error_details(
    body: bytes | str | None, status: int | None = None
) -> tuple[ApiErrorDetail, ...]:
    """Parse a response body into `ApiErrorDetail`s; never raises.

    A body that is not a JSON:API error document (an HTML error page from a proxy, an empty
    504) becomes a single detail holding a truncated copy of the text, so the caller still
    sees something useful.
    """
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body or ""
    try:
        doc = json.loads(text) if text.strip() else None
    except ValueError:
        doc = None
    raw_errors = doc.get("errors") if isinstance(doc, dict) else None
    details: list[ApiErrorDetail] = []
    if isinstance(raw_errors, list):
        for raw in raw_errors:
            if isinstance(raw, dict):
                details.append(_detail_from_dict(raw, status))
    if details:
        return tuple(details)
    snippet = " ".join(text.split())[:_MAX_RAW_BODY_CHARS]
    if isinstance(doc, dict) and isinstance(doc.get("detail"), str):
        snippet = doc["detail"][:_MAX_RAW_BODY_CHARS]
    if not snippet:
        return ()
    return (ApiErrorDetail(status=status, detail=snippet),)


def _detail_from_dict(raw: Mapping[str, Any], fallback_status: int | None) -> ApiErrorDetail:
    source = raw.get("source") if isinstance(raw.get("source"), dict) else {}
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
    return ApiErrorDetail(
        status=_as_int(raw.get("status"), fallback_status),
        code=_as_str(raw.get("code")),
        title=_as_str(raw.get("title")),
        detail=_as_str(raw.get("detail")),
        pointer=_as_str(source.get("pointer")),
        meta=dict(meta),
        parameter=_as_str(source.get("parameter")),
        id=_as_str(raw.get("id")),
    )


def _as_str(value: object) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _as_int(value: object, default: int | None) -> int | None:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return default


def _rebuild(cls: type[KlaviyoError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class KlaviyoError(Exception):
    """Base class: a Klaviyo request failed. Carries the request line and parsed errors.

    `path` never includes the query string (filters can contain emails).
    """

    def __init__(
        self,
        *,
        method: str,
        path: str,
        status: int | None = None,
        errors: Sequence[ApiErrorDetail] = (),
        reason: str | None = None,
        attempts: int = 1,
        hint: str | None = None,
    ) -> None:
        self.method = method.upper()
        self.path = path.split("?", 1)[0]
        self.status = status
        self.errors: tuple[ApiErrorDetail, ...] = tuple(errors)
        self.reason = reason
        self.attempts = attempts
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        outcome = str(self.status) if self.status is not None else (self.reason or "error")
        parts = [d.describe() for d in self.errors[:_MAX_DETAILS_IN_MESSAGE]]
        extra = len(self.errors) - _MAX_DETAILS_IN_MESSAGE
        if extra > 0:
            parts.append(f"(+{extra} more)")
        if self.status is not None and self.reason and not parts:
            parts.append(self.reason)
        message = f"{self.method} {self.path} -> {outcome}"
        if parts:
            message += " " + "; ".join(parts)
        if self.attempts > 1:
            message += f" (after {self.attempts} attempts)"
        if self.hint:
            message = message.rstrip(". ") + f". {self.hint}"
        return message

    @property
    def code(self) -> str | None:
        """The first error's `code` (for example `invalid`, `duplicate_profile`)."""
        return self.errors[0].code if self.errors else None

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only __init__ breaks Exception's default pickling (used by multiprocess runs).
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class Interrupted(KlaviyoError):
    """A stop (SIGINT / SIGTERM) came before this request went out: it was not sent."""


class TransientError(KlaviyoError):
    """5xx, timeout, connection failure or 429: retrying later may succeed.

    Raised by the client only after its own retries were used up (`attempts` says how many).
    """


class RateLimitedError(TransientError):
    """HTTP 429. `retry_after` is Klaviyo's Retry-After in seconds, None when it sent none."""

    def __init__(self, *, retry_after: float | None = None, **kwargs: Any) -> None:
        self.retry_after = retry_after
        super().__init__(**kwargs)


class PermanentError(KlaviyoError):
    """A 4xx other than 429: the same request will fail again, so it is never retried."""


class AuthError(PermanentError):
    """401/403: the API key is missing, invalid or lacks a scope. Fix config, do not retry."""

    @property
    def missing_scopes(self) -> tuple[str, ...]:
        """Scopes named by Klaviyo's error detail, if any (for example `profiles:write`)."""
        return _scopes_in(self.errors)


class ConflictError(PermanentError):
    """409, typically `duplicate_profile`: an identifier already belongs to another profile."""

    @property
    def duplicate_profile_id(self) -> str | None:
        """The existing profile's id from `errors[0].meta.duplicate_profile_id`, if given."""
        for detail in self.errors:
            value = detail.meta.get("duplicate_profile_id")
            if value:
                return str(value)
        return None


_SCOPE_RE = re.compile(r"\b([a-z][a-z-]*:(?:read|write|manage|full))\b")

# Best-effort hints for a 403 whose detail does not name the scope (from x-klaviyo-scopes).
_SCOPE_HINTS: tuple[tuple[str, re.Pattern[str], str], ...] = tuple(
    (m, re.compile(p), s)
    for m, p, s in (
        ("POST", r"^/api/profile-bulk-import-jobs/?$", "profiles:write, lists:write"),
        ("GET", r"^/api/profile-bulk-import-jobs", "profiles:read, lists:read"),
        ("GET", r"^/api/profiles", "profiles:read"),
        ("*", r"^/api/profiles|^/api/profile-import", "profiles:write"),
        ("*", r"^/api/event", "events:write"),
        ("*", r"^/api/lists/[^/]+/relationships/profiles", "lists:write, profiles:write"),
        ("GET", r"^/api/lists", "lists:read"),
        ("*", r"^/api/lists", "lists:write"),
        ("*", r"^/api/profile-subscription-bulk-", "subscriptions:write, profiles:write"),
        ("*", r"^/api/profile-suppression-bulk-", "subscriptions:write"),
        ("*", r"^/api/data-privacy-deletion-jobs", "data-privacy:write"),
        ("*", r"^/api/accounts", "accounts:read"),
    )
)


def _scopes_in(errors: Sequence[ApiErrorDetail]) -> tuple[str, ...]:
    found: list[str] = []
    for detail in errors:
        listed = detail.meta.get("missing_scopes")
        if isinstance(listed, list):
            found.extend(str(s) for s in listed if str(s) not in found)
        for text in (detail.detail, detail.title):
            for scope in _SCOPE_RE.findall(text or ""):
                if scope not in found:
                    found.append(scope)
    return tuple(found)


def _likely_scopes(method: str, path: str) -> str | None:
    for route_method, pattern, scopes in _SCOPE_HINTS:
        if route_method in ("*", method.upper()) and pattern.search(path):
            return scopes
    return None


_AUTH_CODES = frozenset({"not_authenticated", "authentication_failed"})
_PERMISSION_CODES = frozenset({"permission_denied"})


def _auth_hint(status: int | None, errors: Sequence[ApiErrorDetail], method: str, path: str) -> str:
    codes = {d.code for d in errors}
    if status == 403 or codes & _PERMISSION_CODES:
        named = _scopes_in(errors)
        if named:
            need = ", ".join(named)
            return (
                f"The Klaviyo private API key lacks the scope {need}: add it to the key in "
                "Klaviyo (Settings > API keys) or use a key that has it"
            )
        likely = _likely_scopes(method, path)
        extra = f" (this endpoint usually needs {likely})" if likely else ""
        return (
            "The Klaviyo private API key lacks a scope this endpoint needs"
            f"{extra}: grant it in Klaviyo (Settings > API keys) or use a key that has it"
        )
    return (
        "The API key is missing or invalid: set a valid Klaviyo private API key "
        "(Klaviyo > Settings > API keys; it starts with 'pk_') and check it was not revoked"
    )


def error_for_status(
    status: int,
    *,
    method: str,
    path: str,
    errors: Sequence[ApiErrorDetail] = (),
    attempts: int = 1,
    retry_after: float | None = None,
    reason: str | None = None,
) -> KlaviyoError:
    """Build the right `KlaviyoError` subclass for a non-2xx status."""
    common: dict[str, Any] = {
        "method": method,
        "path": path,
        "status": status,
        "errors": errors,
        "attempts": attempts,
        "reason": reason,
    }
    codes = {d.code for d in errors}
    if status == 429:
        return RateLimitedError(retry_after=retry_after, **common)
    if status >= 500:
        return TransientError(**common)
    if status in (401, 403) or codes & (_AUTH_CODES | _PERMISSION_CODES):
        return AuthError(hint=_auth_hint(status, errors, method, path), **common)
    if status == 409:
        return ConflictError(**common)
    return PermanentError(**common)
