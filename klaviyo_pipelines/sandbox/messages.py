"""Transport-neutral request and response objects passed between the HTTP layer and the API.

Why: keeping sockets out of the API logic lets the HTTP server stay a thin, fast shell and keeps
the emulation testable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ApiRequest:
    """One HTTP request: ``headers`` keys are lower-case; ``query`` keeps order and repeats."""

    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes = b""

    def param(self, name: str) -> str | None:
        """Last value of query parameter ``name``."""
        value = None
        for key, item in self.query:
            if key == name:
                value = item
        return value


@dataclass
class ApiResponse:
    """One answer: ``document`` is JSON-encoded by the server (None means no body)."""

    status: int
    document: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    operation: str | None = None
    endpoint: str = "default"
    items: int = 0
