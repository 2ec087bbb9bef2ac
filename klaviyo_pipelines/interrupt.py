"""Stopping a sync on Ctrl-C or SIGTERM: a process-wide flag, checked before each batch is sent.

Why a flag rather than the usual KeyboardInterrupt: a signal interrupts only the main thread,
while batches are sent by worker threads (`delivery.InFlight`) that never see it, so an
exception left them sending for minutes and lost the run's report. Instead the handlers set
the flag; the runner sends nothing more once it is set (no new page, no new batch, no next half
of a split batch), awaits the batches in flight, commits what Klaviyo confirmed and reports
the run as interrupted. A second signal falls back to the handler that was there before (a
hard stop), for when the requests in flight take too long.

Dagster replaces the signal handlers while it runs a step, so they are installed where the
sync runs (`runner.run_sync`) as well as around the CLI's runs.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

_stop = threading.Event()
_received: list[int] = []  # the signal that set the flag
_depth = 0  # nested `on_signals` blocks: only the outermost starts with a clear flag
_depth_lock = threading.Lock()

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def requested() -> bool:
    """Whether a stop was asked for: send nothing more."""
    return _stop.is_set()


def signal_number() -> int | None:
    """The signal that stopped the run (the CLI exits with 128 + it), None if none did."""
    return _received[0] if _received else None


def signal_name() -> str:
    number = signal_number()
    return signal.Signals(number).name if number is not None else "a stop request"


def sleep(seconds: float) -> None:
    """Sleep, but wake at once when a stop is asked for (rate-limit and retry waits)."""
    _stop.wait(seconds)


def request(signum: int) -> None:
    """Ask the running sync to stop, as the signal `signum` does."""
    if not _received:
        _received.append(signum)
    _stop.set()


@contextmanager
def on_signals() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM ask the sync to stop instead of raising (unless the
    process ignores them); the outermost block starts with the flag clear. Outside the main
    thread (where handlers cannot be set) this only scopes the flag."""
    global _depth
    with _depth_lock:
        if _depth == 0:
            _stop.clear()
            _received.clear()
        _depth += 1
    previous: dict[int, Any] = {}

    def handle(signum: int, frame: FrameType | None) -> None:
        if not requested():
            request(signum)
            return
        _restore(previous)  # a second signal: stop hard, as before
        signal.raise_signal(signum)

    try:
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                # A signal the process ignores stays ignored, as Python leaves it: a job a
                # shell starts in the background shares the terminal's process group and
                # ignores SIGINT, since a Ctrl-C there is meant for the job in the foreground.
                if signal.getsignal(number) is not signal.SIG_IGN:
                    previous[number] = signal.signal(number, handle)
        yield
    finally:
        _restore(previous)
        with _depth_lock:
            _depth -= 1


def _restore(handlers: dict[int, Any]) -> None:
    for number, handler in handlers.items():  # None: a handler not set from Python
        signal.signal(number, signal.SIG_DFL if handler is None else handler)
