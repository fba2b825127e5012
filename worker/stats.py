"""Stats: what the pipeline has done so far, for the terminal views, the benchmark and /metrics."""

from __future__ import annotations

import functools
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.batch import Batch
    from worker.sink import WriteResult


# Bucket bounds of the histograms /metrics exposes (rows per batch, seconds per insert).
BATCH_ROWS_BOUNDS: tuple[float, ...] = (1, 10, 100, 500, 1000, 2000, 5000, 10000, 20000, 50000)
INSERT_SECONDS_BOUNDS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Buckets:
    """A cumulative-free histogram: per-bucket counts (last = +Inf), sum and count; read by /metrics."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        index = len(self.bounds)
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                index = i
                break
        self.counts[index] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus-style cumulative buckets, ``le`` as text, ending with +Inf."""
        out: list[tuple[str, int]] = []
        running = 0
        counts = list(self.counts)
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


@dataclass
class GroupInfo:
    """Consumer-group state of one stream, refreshed periodically for /metrics."""

    lag: int = 0  # entries not yet delivered to the group; -1 when the server cannot tell
    pending: int = 0  # delivered, not yet acknowledged
    consumers: int = 0


@dataclass
class Stats:
    started_at: float = field(default_factory=time.monotonic)
    read: int = 0
    stored: int = 0
    rejected: int = 0
    acked: int = 0
    batches: int = 0
    claimed: int = 0
    deleted_while_pending: int = 0
    lost_with_stream: int = 0  # entries pending on other consumers when their stream was deleted
    poison: int = 0
    narrowed: int = 0  # entries delivered in a narrowed group (worker/poison.py)
    trimmed: int = 0
    sink_failures: int = 0
    source_failures: int = 0
    last_batch_rows: int = 0
    last_insert_s: float = 0.0
    insert_seconds_total: float = 0.0
    # monotonic time of the first sink failure of the current outage, None while healthy
    sink_failing_since: float | None = None
    last_sink_error: str = ""
    source_failing_since: float | None = None  # Redis unreachable since (monotonic), None while it answers
    last_source_error: str = ""
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    insert_latencies_s: list[float] = field(default_factory=list)
    batch_rows_hist: Buckets = field(default_factory=lambda: Buckets(BATCH_ROWS_BOUNDS))
    insert_seconds_hist: Buckets = field(default_factory=lambda: Buckets(INSERT_SECONDS_BOUNDS))
    # Per stream key; replaced as a whole by each refresh (see worker.metrics).
    groups: dict[str, GroupInfo] = field(default_factory=dict)
    groups_refreshed_at: float | None = None

    def record_write(self, result: WriteResult, batch: Batch) -> None:
        self.batches += 1
        self.stored += result.stored
        self.rejected += len(result.rejected)
        self.last_batch_rows = len(batch)
        self.batch_rows_hist.observe(len(batch))
        for rejection in result.rejected:
            reason = reason_class(rejection.reason)
            if reason not in self.rejected_by_reason and len(self.rejected_by_reason) >= MAX_REASON_CLASSES:
                reason = OTHER_REASONS
            self.rejected_by_reason[reason] += 1

    def record_sink_ok(self, seconds: float) -> None:
        self.last_insert_s = seconds
        self.insert_seconds_total += seconds
        self.insert_latencies_s.append(seconds)
        self.insert_seconds_hist.observe(seconds)
        if len(self.insert_latencies_s) > 4096:
            del self.insert_latencies_s[:2048]
        self.sink_failing_since = None

    def record_store_reachable(self) -> None:
        """The store answered (e.g. the migration at start): an outage seen before it is over."""
        self.sink_failing_since = None

    def record_sink_failure(self, error: str) -> None:
        self.sink_failures += 1
        self.last_sink_error = error
        if self.sink_failing_since is None:
            self.sink_failing_since = time.monotonic()

    def sink_failing_for_s(self) -> float:
        return _seconds_since(self.sink_failing_since)

    def record_source_failure(self, error: str) -> None:
        self.source_failures += 1
        self.last_source_error = error
        if self.source_failing_since is None:
            self.source_failing_since = time.monotonic()

    def record_source_ok(self) -> None:
        self.source_failing_since = None

    def source_failing_for_s(self) -> float:
        return _seconds_since(self.source_failing_since)

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at


# Reasons quote what the entry held (a timestamp's text, an attribute's name): classes must not, or every distinct
# bad value would be a class of its own, kept for the worker's life and a Prometheus series each. The cap is the
# guard for whatever a future reason quotes another way.
QUOTED_PATTERN = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""  # repr() quoting, escapes included (re2 too)
_QUOTED = re.compile(QUOTED_PATTERN)
_NUMBER = re.compile(r"\d+")
MAX_REASON_CLASSES = 200
OTHER_REASONS = "(other reasons)"


@functools.lru_cache(maxsize=4096)
def reason_class(reason: str) -> str:
    """Group reasons for counting: quoted values blanked, then the part before the first colon, numbers blanked."""
    head = _NUMBER.sub("N", _QUOTED.sub("…", reason).split(":", 1)[0])
    return " ".join(head.split())[:100] or "(no reason)"


def _seconds_since(started: float | None) -> float:
    """Seconds since a monotonic time, 0 when there is none (no outage going on)."""
    return 0.0 if started is None else time.monotonic() - started
