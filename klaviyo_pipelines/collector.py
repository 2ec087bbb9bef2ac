"""Fewer full garbage collections while a delivery (or the Klaviyo sandbox) runs.

Why: a delivery allocates millions of short-lived objects, so at Python's default thresholds
the collector runs a full collection every ten middle ones: 53 on a 400,000-profile sync,
each walking every object of the process (about 90 ms of CPU) with the GIL held, sending
and committing stalled meanwhile: a sixth of the client's CPU. They freed about 1,200
objects in all: rows are freed by reference counting, not by the collector. Raising the last
threshold leaves young and middle collections (which find the few cycles) as they are and
makes full ones ten times rarer; the thresholds are put back when the last delivery of the
process ends. The sandbox holds them raised while it serves: the profiles it keeps are walked
by every full collection too.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Middle collections between two full ones (Python's default is 10).
FULL_COLLECTION_THRESHOLD = 100

_deliveries = 0  # deliveries running in this process, which share the thresholds
_saved: tuple[int, ...] = ()
_lock = threading.Lock()


@contextmanager
def fewer_full_collections() -> Iterator[None]:
    """Raise the full-collection threshold for a delivery; restore it once no delivery of the
    process runs."""
    global _deliveries, _saved
    with _lock:
        if not _deliveries:
            _saved = gc.get_threshold()
            young, middle, *_ = _saved
            gc.set_threshold(young, middle, max(FULL_COLLECTION_THRESHOLD, *_saved[2:]))
        _deliveries += 1
    try:
        yield
    finally:
        with _lock:
            _deliveries -= 1
            if not _deliveries:
                gc.set_threshold(*_saved)
