"""The run's report: what the clients sent and were answered, each fault's recovery, the
events and the problems; printed, and as JSON for a program (`--report`)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter


@dataclasses.dataclass
class Report:
    seed: int
    sent: int = 0
    answers: Counter[int] = dataclasses.field(default_factory=Counter)
    resolved: int = 0
    fenced_refusals: int = 0
    transfers: Counter[int] = dataclasses.field(default_factory=Counter)  # by final status
    recovery: dict[str, float] = dataclasses.field(default_factory=dict)  # fault -> seconds
    events: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    hostile: Counter[str] = dataclasses.field(default_factory=Counter)  # what it sent, found
    holds: Counter[str] = dataclasses.field(default_factory=Counter)  # by final status

    def event(self, text: str) -> None:
        self.events.append(text)

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def summary(self) -> str:
        lines = [
            f"seed {self.seed}: {self.sent} operations sent, answers {dict(self.answers)}, "
            f"{self.resolved} unknowns resolved by retrying with their keys, "
            f"transfers {dict(self.transfers)}, holds {dict(self.holds)}, "
            f"{self.fenced_refusals} late batches refused by a fence",
            f"  hostile client: {dict(self.hostile)}",
            *(f"  {e}" for e in self.events),
        ]
        if self.problems:
            lines += ["PROBLEMS:", *(f"  {p}" for p in self.problems)]
            lines.append(f"replay with: python -m load.chaos --seed {self.seed}")
        return "\n".join(lines)

    def to_json(self) -> str:
        """The report for a program (`--report`): answers keyed by status as text."""
        fields = dataclasses.asdict(self)
        fields["answers"] = {str(status): n for status, n in sorted(self.answers.items())}
        fields["transfers"] = {str(status): n for status, n in sorted(self.transfers.items())}
        fields["hostile"] = dict(sorted(self.hostile.items()))
        fields["holds"] = dict(sorted(self.holds.items()))
        return json.dumps(fields, indent=2)
