"""Batch: entries collected between two flushes, bounded by rows, by bytes and by the age of the oldest entry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from worker.normalize import FlowEvent, Rejection


@dataclass
class Batch:
    max_rows: int
    max_wait_s: float
    max_bytes: int = 1 << 62
    events: list[FlowEvent] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    # Every entry id of the batch per stream, events and rejections alike: what one pipelined XACK acknowledges.
    ids_by_stream: dict[str, list[str]] = field(default_factory=dict)
    rows: int = 0
    bytes: int = 0  # entry sizes as read (names + values), whatever became of them
    started_at: float | None = None
    # Deliveries of entries delivered more than once (re-read, reclaimed); every other entry: once.
    deliveries: dict[tuple[str, str], int] = field(default_factory=dict)
    # Entries of a narrowed group (delivered past FLOWTRACK_MAX_DELIVERIES, worker/poison.py): the batch is sent at
    # once, and no other such group is read until it is acknowledged.
    suspects: int = 0

    def __len__(self) -> int:
        return self.rows

    def add(self, stream: str, entry_id: str, item: FlowEvent | Rejection, size: int = 0) -> None:
        self.stream_ids(stream).append(entry_id)
        if type(item) is FlowEvent:
            self.events.append(item)
        else:
            self.rejections.append(item)  # type: ignore[arg-type]
        self.added(1, size)

    def stream_ids(self, stream: str) -> list[str]:
        """The stream's list of entry ids (created empty), which ``add`` and Normalizer.fill_batch append to."""
        ids = self.ids_by_stream.get(stream)
        if ids is None:
            ids = self.ids_by_stream[stream] = []
        return ids

    def added(self, rows: int, size: int) -> None:
        """Count entries appended to the lists (by ``add``, or directly by Normalizer.fill_batch)."""
        if rows and self.started_at is None:
            self.started_at = time.monotonic()
        self.rows += rows
        self.bytes += size

    @property
    def full(self) -> bool:
        return self.rows >= self.max_rows or self.bytes >= self.max_bytes

    def deliveries_by_count(self) -> dict[int, dict[str, list[str]]]:
        """Entry ids per stream, grouped by how often each was delivered: to take back a delivery that an outage
        made useless (Pipeline.uncount_held)."""
        grouped: dict[int, dict[str, list[str]]] = {}
        for stream, ids in self.ids_by_stream.items():
            for entry_id in ids:
                count = self.deliveries.get((stream, entry_id), 1)
                grouped.setdefault(count, {}).setdefault(stream, []).append(entry_id)
        return grouped

    def seconds_left(self, now: float | None = None) -> float:
        """Time until the batch is due by age; infinite while it is empty."""
        if self.started_at is None:
            return float("inf")
        now = time.monotonic() if now is None else now
        return max(0.0, self.started_at + self.max_wait_s - now)

    def due(self, now: float | None = None) -> bool:
        return self.rows > 0 and (self.full or self.seconds_left(now) <= 0.0)
