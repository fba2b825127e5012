"""Pipeline: owns the loop source -> normalize -> batch -> sink -> ack.

Reading overlaps writing: while one batch is being stored and acknowledged (in a thread, never
cancelled), the next one fills. Reads are paced by what the sink has accepted: at most
``max_inflight_rows`` entries are read but not yet acknowledged, so memory stays bounded under any
backlog.

Lifecycle: ``run()`` until ``request_stop()`` (wired to SIGTERM/SIGINT by the CLI), or with
``drain=True`` until every stream is fully read and nothing is pending in the group; then
``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
import time
from collections.abc import Iterable
from typing import Any

from redis.exceptions import ResponseError

from worker.ack import Backoff, Committer
from worker.batch import Batch
from worker.errors import FlowtrackError, SourceUnavailableError, StoreUnavailableError
from worker.normalize import Normalizer, Rejection, pairs_to_dict, raw_json
from worker.settings import Settings
from worker.sink import Sink
from worker.source import Entry, Source, guarded, text
from worker.stats import Stats
from worker.store import Store
from worker.trim import supports_acked, trim_stream

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, settings: Settings, store: Store | None = None, source: Source | None = None) -> None:
        self.settings = settings
        self.stats = Stats()
        self._store = store
        self._store_lock = threading.Lock()
        self.source = source or Source(settings)
        self.normalizer = Normalizer(settings.end_event_types, settings.error_event_types)
        self._batch = self._new_batch()
        self._ready: list[Batch] = []  # full batches waiting for the write slot, in read order
        self._writing: asyncio.Task[bool] | None = None
        self._writing_batch: Batch | None = None
        self._prior_deliveries: dict[tuple[str, str], int] = {}
        self._stop = asyncio.Event()
        self._last_claim = 0.0
        self._last_trim = 0.0
        self._trim_acked: bool | None = None
        self._drained = False
        self._committer: Committer | None = None
        self._store_ready: asyncio.Task[bool]

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        # Opened from the start-up thread and, in the demo, from view threads: open it once.
        with self._store_lock:
            if self._store is None:
                self._store = Store.open(self.settings)
            return self._store

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stop requested: finishing the in-flight batch")
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def run(self, drain: bool = False) -> bool:
        """Run until stopped, or with drain=True until nothing is left. True when fully drained/stopped cleanly."""
        if not await self._start():
            return not drain  # stopped before anything was read: nothing to finish
        keepalive = asyncio.create_task(self._keep_inflight_alive())
        backoff = Backoff(self.settings.retry_initial_s, self.settings.retry_max_s)
        while not self.stopping:
            try:
                done = await self._step(drain)
                backoff.reset()
                if done:
                    self._drained = True
                    break
            except SourceUnavailableError as exc:
                self.stats.source_failures += 1
                delay = backoff.next_delay()
                log.warning("%s; retrying in %.1fs", exc, delay)
                await self._sleep_unless_stopped(delay)
                await self._recover_source()
        await self._finish()
        keepalive.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keepalive
        return self._drained or not drain

    async def close(self) -> None:
        await self.source.close()

    async def _start(self) -> bool:
        """Open and migrate the store in the background while the streams are found and the first entries read
        (start-up overlaps reading); False if stopped before the streams could be reached."""
        self._store_ready = asyncio.create_task(self._prepare_store())
        if await self._prepare_source():
            return True
        self._store_ready.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._store_ready
        return False

    async def _prepare_store(self) -> bool:
        backoff = Backoff(self.settings.retry_initial_s, self.settings.retry_max_s)
        while True:
            try:
                applied = await asyncio.to_thread(self.store.migrate)
                if applied:
                    log.info("migrations applied: %s", ", ".join(applied))
                break
            except StoreUnavailableError as exc:
                self.stats.record_sink_failure(str(exc))
                if self.stopping:
                    return False
                delay = backoff.next_delay()
                log.warning("%s; retrying in %.1fs", exc, delay)
                await self._sleep_unless_stopped(delay)
        self._committer = Committer(Sink(self.store), self.source, self.stats, self.settings.retry_initial_s,
                                    self.settings.retry_max_s, lambda: self.stopping)
        log.info("store ready: %s", self.store.description)
        return True

    async def _prepare_source(self) -> bool:
        backoff = Backoff(self.settings.retry_initial_s, self.settings.retry_max_s)
        while True:
            try:
                await self.source.discover(force=True)
                self._prior_deliveries = await self.source.own_pending_counts()
                return True
            except SourceUnavailableError as exc:
                if self.stopping:
                    return False
                delay = backoff.next_delay()
                log.warning("%s; retrying in %.1fs", exc, delay)
                await self._sleep_unless_stopped(delay)

    async def _recover_source(self) -> None:
        try:
            await self.source.recover()
            self._prior_deliveries = await self.source.own_pending_counts()
        except SourceUnavailableError:
            pass  # the next step fails again and backs off again

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    # -- the loop --------------------------------------------------------------------------------
    async def _step(self, drain: bool) -> bool:
        if self._store_ready.done():
            self._store_ready.result()  # a store that cannot be used at all (locked, refused migration) stops us
        await self.source.discover()
        now = time.monotonic()
        if now - self._last_claim >= self.settings.claim_interval_s:
            self._last_claim = now
            await self._claim()
        if self.settings.trim_enabled and now - self._last_trim >= self.settings.trim_interval_s:
            self._last_trim = now
            await self._trim()
        got = 0
        room = self.settings.max_inflight_rows - self._inflight_rows()
        if room > 0:
            got = await self._read(room)
        elif self._writing is not None:
            await asyncio.wait({self._writing}, timeout=self.settings.block_ms / 1000)
        self._reap_write()
        if self._ready and self._writing is None:
            self._start_write(self._ready.pop(0))
        if self._batch.due() or (got == 0 and self._batch.rows and self._writing is None):
            await self._flush()
        if drain and got == 0 and not self._batch.rows and not self._ready and self._writing is None:
            return await self._drain_finished()
        return False

    def _held_batches(self) -> list[Batch]:
        """Every batch read and not yet acknowledged: filling, waiting for the write slot, being written."""
        writing = [self._writing_batch] if self._writing_batch is not None else []
        return [self._batch, *self._ready, *writing]

    def _inflight_rows(self) -> int:
        return sum(len(b) for b in self._held_batches())

    def _held_ids_by_stream(self) -> dict[str, list[str]]:
        """Entry ids read and not yet acknowledged, per stream (built on demand: keepalive, re-reads)."""
        held: dict[str, list[str]] = {}
        for batch in self._held_batches():
            for stream, ids in batch.ids_by_stream.items():
                held.setdefault(stream, []).extend(ids)
        return held

    async def _read(self, room: int) -> int:
        streams = max(1, len(self.source.streams))
        count = max(1, min(self.settings.read_count, room // streams))
        wait_s = min(self.settings.block_ms / 1000, self._batch.seconds_left())
        block_ms = max(1, int(wait_s * 1000))
        reading_pending = self.source.reading_pending
        groups = await self.source.read(count, block_ms)
        if reading_pending:
            return self._add_pending(groups)
        return self._add_new(groups)

    def _add_new(self, groups: list[tuple[str, list[Any]]]) -> int:
        """The hot path: entries delivered for the first time, straight from the reply into the batch."""
        normalize = self.normalizer.normalize_pairs
        added = 0
        for stream, items in groups:
            for raw_id, fields in items:
                entry_id = raw_id.decode()
                batch = self._batch
                if batch.rows >= batch.max_rows:
                    batch = self._roll_batch()
                batch.add(stream, entry_id, normalize(stream, entry_id, fields))
            added += len(items)
        self.stats.read += added
        return added

    def _add_pending(self, groups: list[tuple[str, list[Any]]]) -> int:
        """Our own pending entries, re-read at start or after a reconnect: count deliveries, skip held ones."""
        held = {(stream, i) for stream, ids in self._held_ids_by_stream().items() for i in ids}
        entries = []
        for stream, items in groups:
            for raw_id, fields in items:
                entry_id = text(raw_id)
                if (stream, entry_id) in held:
                    continue  # still on its way to the store from before the reconnect
                prior = self._prior_deliveries.pop((stream, entry_id), 0)
                entries.append(Entry(stream, entry_id, pairs_to_dict(fields) or None, prior + 1))
        self._add(entries)
        return sum(len(items) for _, items in groups)

    def _roll_batch(self) -> Batch:
        """batch_max_rows is a hard bound: a full batch queues for the write slot and a new one starts."""
        self._ready.append(self._batch)
        self._batch = self._new_batch()
        return self._batch

    def _add(self, entries: Iterable[Entry]) -> None:
        """Entries with a delivery history (re-read, reclaimed, deleted while pending): the checked path."""
        max_deliveries = self.settings.max_deliveries
        for entry in entries:
            batch = self._batch if not self._batch.full else self._roll_batch()
            self.stats.read += 1
            if entry.deliveries > max_deliveries:
                self.stats.poison += 1
                batch.add(entry.stream, entry.entry_id, Rejection(
                    entry.stream, entry.entry_id, f"delivered {entry.deliveries} times without being stored "
                    f"(over FLOWTRACK_MAX_DELIVERIES={max_deliveries})", _raw(entry)))
                continue
            if entry.fields is None:
                self.stats.deleted_while_pending += 1
            batch.add(entry.stream, entry.entry_id,
                      self.normalizer.normalize(entry.stream, entry.entry_id, entry.fields))

    async def _claim(self) -> None:
        result = await self.source.claim_idle(self.settings.claim_idle_ms, self.settings.read_count)
        if result.deleted_ids:
            # Entries deleted from the stream while pending on a dead consumer: record each
            # one in the rejected relation so the loss is visible, not silently forgotten.
            log.error("%d pending entries were deleted from their streams before being processed "
                      "(trimmed or XDEL'd); first: %s", len(result.deleted_ids), result.deleted_ids[0])
            self._add(Entry(stream, entry_id, None) for stream, entry_id in result.deleted_ids)
        if result.entries:
            self.stats.claimed += len(result.entries)
            log.info("reclaimed %d idle pending entries from other consumers", len(result.entries))
            self._add(result.entries)

    async def _keep_inflight_alive(self) -> None:
        """Every claim interval, reset the idle time of the entries this worker holds, even while the loop
        waits on a slow insert or a store outage, so peers never mistake them for a dead consumer's."""
        while True:
            await asyncio.sleep(self.settings.claim_interval_s)
            held = self._held_ids_by_stream()
            if not held:
                continue
            try:
                await self.source.touch(held)
            except SourceUnavailableError as exc:
                log.debug("could not refresh in-flight entries: %s", exc)

    async def _trim(self) -> None:
        redis = self.source.redis
        if self._trim_acked is None:
            self._trim_acked = await guarded(lambda: supports_acked(redis))
        for stream in list(self.source.streams):
            try:
                removed = await guarded(lambda stream=stream: trim_stream(  # type: ignore[misc]
                    redis, stream, acked=bool(self._trim_acked)))
            except ResponseError as exc:
                log.warning("not trimming %s: %s", stream, exc)  # stream gone; recover() handles it
                continue
            self.stats.trimmed += removed

    async def _flush(self) -> None:
        """Send every full batch and the current one to the write slot, one write at a time, in order."""
        if self._batch.rows:
            self._roll_batch()
        while self._ready:
            if self._writing is not None:
                await asyncio.wait({self._writing})
                self._reap_write()
            self._start_write(self._ready.pop(0))

    def _start_write(self, batch: Batch) -> None:
        assert self._writing is None
        self._writing_batch = batch
        self._writing = asyncio.create_task(self._commit(batch))

    async def _commit(self, batch: Batch) -> bool:
        if not await self._store_ready:
            return False  # stopped while the store was still unreachable: the entries stay pending
        assert self._committer is not None
        return await self._committer.commit(batch)

    def _reap_write(self) -> None:
        task = self._writing
        if task is None or not task.done():
            return
        self._writing = None
        self._writing_batch = None
        task.result()  # surface unexpected errors instead of losing them

    async def _drain_finished(self) -> bool:
        if not await self._store_ready:
            return False
        await self.source.discover(force=True)
        pending = await self.source.group_pending_total()
        if pending == 0:
            unread = await self.source.unread_total()
            if unread == 0:
                log.info("drained: every stream fully read, nothing pending")
                return True
            return False
        # Pending entries of other (possibly dead) consumers: claim them once idle long enough.
        self._last_claim = 0.0
        await self._sleep_unless_stopped(min(1.0, self.settings.claim_idle_ms / 1000))
        return False

    async def _finish(self) -> None:
        if not self._drained or self._batch.rows or self._ready:
            await self._flush()
        if self._writing is not None:
            await asyncio.wait({self._writing})
            self._reap_write()
        if self._committer is not None:
            # Sessions of acknowledged batches not recomputed yet; if this fails the next start catches up.
            with contextlib.suppress(FlowtrackError):
                await asyncio.to_thread(self._committer.sink.rollup.close)

    def _new_batch(self) -> Batch:
        return Batch(self.settings.batch_max_rows, self.settings.batch_max_wait_s)


def _raw(entry: Entry) -> str:
    return raw_json(entry.fields or {})


# CPython's default thresholds (700, 10, 10) run a full collection every fraction of a second over the whole
# in-flight working set (reply lists, events, insert columns): ~30% of a draining worker's time
# (README, "Benchmark"). The hot path creates no reference cycles, so collect young objects in larger steps
# and the old generation rarely.
GC_THRESHOLDS = (10_000, 100, 1000)


async def run_worker(settings: Settings, drain: bool = False) -> bool:
    """The `flowtrack run` lifecycle: open, handle signals, run, close."""
    from worker.metrics import WorkerMetrics

    gc.freeze()  # what start-up loaded is never garbage: keep it out of every collection
    previous_thresholds = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    pipeline = Pipeline(settings)
    pipeline.install_signal_handlers()
    metrics = WorkerMetrics.start(pipeline.stats, pipeline.source, settings)  # None when metrics_port = 0
    try:
        ok = await pipeline.run(drain=drain)
        stats = pipeline.stats
        log.info("stopped: read %d, stored %d, rejected %d, acked %d in %d batches (%.1fs)",
                 stats.read, stats.stored, stats.rejected, stats.acked, stats.batches, stats.uptime_s)
        return ok
    finally:
        if metrics is not None:
            await metrics.stop()
        await pipeline.close()
        gc.set_threshold(*previous_thresholds)
