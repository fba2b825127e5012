"""Batch: entries collected between two flushes, bounded by rows and by the age of the oldest entry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from worker.normalize import FlowEvent, Rejection


@dataclass
class Batch:
    max_rows: int
    max_wait_s: float
    events: list[FlowEvent] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    # Every (stream, entry id) in the batch, events and rejections alike: what gets acknowledged.
    keys: list[tuple[str, str]] = field(default_factory=list)
    started_at: float | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def add_event(self, event: FlowEvent) -> None:
        self._touch()
        self.events.append(event)
        self.keys.append((event.source_stream, event.source_id))

    def add_rejection(self, rejection: Rejection) -> None:
        self._touch()
        self.rejections.append(rejection)
        self.keys.append((rejection.source_stream, rejection.source_id))

    def _touch(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()

    @property
    def full(self) -> bool:
        return len(self.keys) >= self.max_rows

    def seconds_left(self, now: float | None = None) -> float:
        """Time until the batch is due by age; infinite while it is empty."""
        if self.started_at is None:
            return float("inf")
        now = time.monotonic() if now is None else now
        return max(0.0, self.started_at + self.max_wait_s - now)

    def due(self, now: float | None = None) -> bool:
        return bool(self.keys) and (self.full or self.seconds_left(now) <= 0.0)
