"""Identifiers shaped like Klaviyo's, so clients that sniff id formats behave as in production.

Profiles and bulk jobs get 26-character ULIDs (Crockford base32, uppercase, time-ordered, so
sorting by id is sorting by creation, which keyset pagination relies on); lists get 6-character
alphanumeric ids such as ``Y6nRLr``; import errors get UUIDs.
"""

from __future__ import annotations

import random
import secrets
import string
import threading
import time
import uuid

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# A bulk import makes a ULID a profile: 13 lookups of two characters (10 bits) each cost half
# of 26 steps of one.
_PAIRS = [_CROCKFORD[i >> 5] + _CROCKFORD[i & 31] for i in range(1024)]
_PAIR_SHIFTS = tuple(range(120, -1, -10))
_LIST_ALPHABET = string.ascii_letters + string.digits


class UlidGenerator:
    """Monotonic ULIDs: strictly increasing even when many are made in the same millisecond."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0
        # Ids need to be unique, not secret: a seeded Mersenne Twister, not a system call each.
        self._random = random.Random(secrets.randbits(128))

    def new(self) -> str:
        with self._lock:
            now_ms = int(time.time() * 1000)
            if now_ms <= self._last_ms:
                now_ms = self._last_ms
                self._last_random += 1
                if self._last_random >= 1 << 80:  # random part overflowed: borrow a millisecond
                    now_ms += 1
                    self._last_random = self._random.getrandbits(79)
            else:
                self._last_random = self._random.getrandbits(79)  # headroom for increments
            self._last_ms = now_ms
            value = (now_ms << 80) | self._last_random
        return "".join([_PAIRS[(value >> shift) & 1023] for shift in _PAIR_SHIFTS])


_ULIDS = UlidGenerator()


def new_ulid() -> str:
    """A 26-character uppercase ULID, e.g. ``01GDDKASAP8TKDDA2GRZDSVP4H``."""
    return _ULIDS.new()


def new_list_id() -> str:
    """A 6-character alphanumeric list id, e.g. ``Y6nRLr``."""
    return "".join(secrets.choice(_LIST_ALPHABET) for _ in range(6))


def new_uuid() -> str:
    """A random UUID string, the shape Klaviyo uses for error ids."""
    return str(uuid.uuid4())
