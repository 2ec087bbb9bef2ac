"""What a verification found: per sync, rows checked, in step, drifted by kind, not checked."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SAMPLE = 1_000  # rows a sync's verification reads unless told otherwise
MAX_SAMPLES = 20


@dataclass(frozen=True)
class Drift:
    """One difference: the row (or, for counts, the metric and day), its kind (missing,
    different, not_a_member, still_a_member, extra_member, consent_changed), the field."""

    key: str
    kind: str
    field: str | None = None
    warehouse: Any = None
    klaviyo: Any = None


@dataclass
class VerifyReport:
    sync: str
    action: str
    delivered: int = 0  # rows in the delivery state
    checked: int = 0
    in_step: int = 0
    drifted: Counter[str] = field(default_factory=Counter)  # rows, by their first drift's kind
    unchecked: Counter[str] = field(default_factory=Counter)  # rows not checked, by reason
    samples: list[Drift] = field(default_factory=list)
    repaired: int = 0

    def row(self, drifts: Sequence[Drift]) -> bool:
        """Count one checked row with what was found about it; True when it drifted."""
        self.checked += 1
        if not drifts:
            self.in_step += 1
            return False
        self.drifted[drifts[0].kind] += 1
        self.sample(drifts)
        return True

    def sample(self, drifts: Sequence[Drift]) -> None:
        room = MAX_SAMPLES - len(self.samples)
        self.samples += list(drifts)[: max(0, room)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "sync": self.sync,
            "action": self.action,
            "delivered": self.delivered,
            "checked": self.checked,
            "in_step": self.in_step,
            "drifted": sum(self.drifted.values()),
            "drifted_by_kind": dict(self.drifted),
            "unchecked": dict(self.unchecked),
            "repaired": self.repaired,
            "samples": [
                {
                    "key": d.key,
                    "kind": d.kind,
                    "field": d.field,
                    "warehouse": d.warehouse,
                    "klaviyo": d.klaviyo,
                }
                for d in self.samples
            ],
        }
