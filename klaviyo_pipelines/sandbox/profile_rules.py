"""Server-side profile checks Klaviyo applies beyond the JSON schema.

Why: the schema says ``email`` is "a string"; Klaviyo additionally refuses malformed addresses,
phone numbers that are not valid E.164, over-long external ids and profiles with no identifier.
A reverse-ETL client must cope with those refusals (400 in single calls, import errors in bulk),
so the sandbox applies the same rules. Addresses on the RFC 2606 ``.invalid`` TLD are refused as
"Invalid email address": a realistic server-side rejection no client-side syntax check catches,
which tests and the demo use to provoke per-row failures on purpose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from klaviyo_pipelines.actions.phone import e164

IDENTIFIERS: tuple[str, ...] = ("email", "phone_number", "external_id")
MAX_EXTERNAL_ID = 255
MAX_EMAIL = 254

INVALID_EMAIL = "Invalid email address"
INVALID_PHONE = "Invalid phone number format (Example of a valid format: +13239169023)"
MISSING_IDENTIFIER = (
    "A profile requires at least one identifier: email, phone_number or external_id."
)

_EMAIL_RE = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
_E164_RE = re.compile(r"^\+[1-9]\d{1,14}$")


@dataclass(frozen=True)
class Violation:
    """One refused attribute: ``field`` is relative to ``attributes`` (e.g. ``email``)."""

    field: str
    detail: str


def email_problem(value: str) -> str | None:
    if len(value) > MAX_EMAIL or not _EMAIL_RE.match(value):
        return INVALID_EMAIL
    if value.rsplit(".", 1)[-1].lower() == "invalid":  # RFC 2606 reserved TLD
        return INVALID_EMAIL
    return None


def phone_problem(value: str) -> str | None:
    """libphonenumber's verdict on an E.164 number, through the client's fast path (its
    verdicts equal phonenumbers' on every region, test_phone_fast_path.py): a bulk import
    checks up to 10,000 numbers, and phonenumbers itself would make the sandbox slower than
    the client it measures."""
    if not _E164_RE.match(value) or e164(value, None) is None:
        return INVALID_PHONE
    return None


def external_id_problem(value: str) -> str | None:
    if not value.strip():
        return "external_id must not be blank."
    if len(value) > MAX_EXTERNAL_ID:
        return f"external_id must be at most {MAX_EXTERNAL_ID} characters."
    return None


_CHECKS = {
    "email": email_problem,
    "phone_number": phone_problem,
    "external_id": external_id_problem,
}


def check_identifiers(attributes: dict[str, Any]) -> list[Violation]:
    """Format problems of the identifiers present (non-null) in ``attributes``."""
    found: list[Violation] = []
    for name, check in _CHECKS.items():
        value = attributes.get(name)
        if isinstance(value, str):
            problem = check(value)
            if problem:
                found.append(Violation(name, problem))
    return found


def has_identifier(attributes: dict[str, Any]) -> bool:
    return any(attributes.get(name) not in (None, "") for name in IDENTIFIERS)
