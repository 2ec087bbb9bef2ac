"""Warehouse failures as one clear message: which warehouse, which step, and the engine's words.

A refused connection, a wrong password, a missing privilege or table, or an SQL error in one of
our statements all reach the user as a `WarehouseError`, never as a driver traceback. The
warehouse is named by its URL with the password masked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

# Longest part of the engine's own message kept: drivers append whole statements and hints.
_MAX_DETAIL_CHARS = 500


class WarehouseError(RuntimeError):
    """A warehouse step failed; `step` is one of snapshot, change set, state write, lock, read."""

    def __init__(self, warehouse: str, step: str, detail: str) -> None:
        self.warehouse, self.step, self.detail = warehouse, step, detail
        super().__init__(f"warehouse {warehouse}: {step} failed: {detail}")


def engine_message(exc: BaseException) -> str:
    """The driver's own first line(s) of an SQLAlchemy error, without the statement echoed."""
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split())
    return text[:_MAX_DETAIL_CHARS] or type(orig).__name__


@contextmanager
def warehouse_step(warehouse: str, step: str) -> Iterator[None]:
    """Turn any database error inside the block into a WarehouseError naming the step."""
    try:
        yield
    except sa.exc.SQLAlchemyError as exc:
        raise WarehouseError(warehouse, step, engine_message(exc)) from exc
