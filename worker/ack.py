"""Ack: the commit step. Store a batch (events + rejections), then XACK every entry in it.

Nothing is acknowledged before ClickHouse accepted the batch. Outages are waited out with
exponential backoff and jitter; they never turn good entries into rejects. The step runs as its
own task and the pipeline never cancels it, so SIGTERM cannot cut it between insert and ack.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from worker.batch import Batch
from worker.errors import SourceUnavailableError, StoreUnavailableError
from worker.sink import Sink, WriteResult
from worker.source import Source
from worker.stats import Stats

log = logging.getLogger(__name__)


@dataclass
class Backoff:
    initial_s: float
    max_s: float
    attempt: int = 0

    def next_delay(self) -> float:
        delay = min(self.max_s, self.initial_s * (2 ** self.attempt))
        self.attempt += 1
        return float(delay * random.uniform(0.5, 1.0))  # jitter spreads competing workers apart

    def reset(self) -> None:
        self.attempt = 0


class Committer:
    def __init__(self, sink: Sink, source: Source, stats: Stats, initial_s: float, max_s: float,
                 stopping: Callable[[], bool], on_outage: Callable[[], Awaitable[None]] | None = None) -> None:
        self.sink = sink
        self.on_outage = on_outage
        self.source = source
        self.stats = stats
        self.initial_s = initial_s
        self.max_s = max_s
        self.stopping = stopping

    async def store(self, batch: Batch) -> bool:
        """Store, the first half of a commit (the pipeline acknowledges while the next batch is being stored); False
        if given up because of a stop during an outage (nothing stored for sure, nothing to acknowledge)."""
        result = await self._store(batch)
        if result is None:
            return False
        self.stats.record_write(result, batch)
        return True

    async def _store(self, batch: Batch) -> WriteResult | None:
        backoff = Backoff(self.initial_s, self.max_s)
        while True:
            started = time.perf_counter()
            try:
                result = await asyncio.to_thread(self.sink.write, batch.events, batch.rejections)
            except StoreUnavailableError as exc:
                self.stats.record_sink_failure(str(exc))
                if self.on_outage is not None:
                    await self.on_outage()  # an outage is not a delivery attempt (Pipeline.uncount_held)
                if self.stopping():
                    log.warning("stopping during a store outage: %d entries stay pending for the next run",
                                len(batch))
                    return None
                delay = backoff.next_delay()
                log.warning("store unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            self.stats.record_sink_ok(time.perf_counter() - started)
            return result

    async def ack(self, batch: Batch) -> None:
        """Acknowledge a stored batch: retried through Redis outages, given up on a stop (redelivered, deduplicated)."""
        backoff = Backoff(self.initial_s, self.max_s)
        while True:
            try:
                acked = await self.source.ack(batch.ids_by_stream)
                self.stats.acked += acked
                return
            except SourceUnavailableError as exc:
                # Stored but unacknowledged entries are redelivered later and deduplicated by ClickHouse, so a stop
                # gives up at the first failure: against a Redis that does not answer, each attempt waits out the
                # socket timeout, and three of them outlasted a container's stop grace period (30 s).
                if self.stopping():
                    log.warning("stopping while Redis is down: %d stored entries will be redelivered "
                                "and deduplicated", len(batch))
                    return
                delay = backoff.next_delay()
                log.warning("cannot acknowledge (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
