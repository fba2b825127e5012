"""Pipeline: owns the loop source -> normalize -> batch -> sink -> ack.

Reading overlaps writing: while one batch is being stored (in a thread) the next one fills, and a stored
batch is acknowledged while the next one is being stored; neither step is ever cancelled. Reads are paced
by what the sink has accepted: at most ``max_inflight_rows`` entries are read but not yet acknowledged, so
memory stays bounded under any backlog.

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
from collections.abc import Iterable, Mapping
from typing import Any

from redis.exceptions import ResponseError

from worker import poison
from worker.ack import Backoff, Committer
from worker.batch import Batch
from worker.errors import FlowtrackError, SourceUnavailableError, StoreUnavailableError
from worker.normalize import (
    MAX_ENTRY_BYTES,
    Normalizer,
    Rejection,
    is_text,
    pairs_to_dict,
    printable,
    raw_json,
    stored_key,
)
from worker.settings import Settings
from worker.sink import Sink
from worker.source import ClaimResult, Entry, LostStream, Source, guarded, text
from worker.stats import Stats
from worker.store import Store
from worker.trim import supports_acked, trim_stream

log = logging.getLogger(__name__)

# The entry size a read assumes before it has seen any: the contract's largest entry, so the first reads stay within
# the byte budget for any entry the contract accepts. Then: the largest entry lately read, the estimate shrinking
# by ENTRY_BYTES_ESTIMATE_DECAY per read down to the minimum (small entries reach full COUNT within ~6 reads).
INITIAL_ENTRY_BYTES_ESTIMATE = MAX_ENTRY_BYTES
ENTRY_BYTES_ESTIMATE_DECAY = 4
MIN_ENTRY_BYTES_ESTIMATE = 128
# One read returns at most about this many entries (COUNT per stream shrinks with the streams read): its reply is
# a few objects per entry, alive until the entries are in the batch, and reads of 20,000 entries (half the in-flight
# rows over 100 streams) put ~15 MB more on a draining worker's peak RSS than reads of 10,000, for the same speed
# (README, "The C hot path"). One stream still reads up to FLOWTRACK_READ_COUNT at a time.
MAX_ENTRIES_PER_READ = 10_000


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
        self._writing: asyncio.Task[bool] | None = None  # the write slot: one batch being stored at a time
        self._writing_batch: Batch | None = None
        # Stored batches being acknowledged, beside the next batch's store (they are still held: in flight, kept
        # alive, theirs the deliveries an outage takes back).
        self._acking: dict[asyncio.Task[None], Batch] = {}
        self._prior_deliveries: dict[tuple[str, str], int] = {}
        # Streams with a narrowed entry among our own pending ones (worker/poison.py): re-read by Source.read_narrowed.
        self._narrowing: set[str] = set()
        self._recoveries_seen = 0  # Source.recover() calls whose re-read our delivery counts were taken for
        self._narrowed_claim_waiting = False  # a claim left narrowed entries for when nothing is in flight
        # Held entries a re-read delivered again, by the delivery count each had: set back after the read.
        self._recount: dict[int, dict[str, list[str]]] = {}
        self._stop = asyncio.Event()
        self._last_claim = 0.0
        self._last_trim = 0.0
        self._trimming: asyncio.Task[None] | None = None  # a trim pass, beside the reads
        self._trim_acked: bool | None = None
        self._drained = False
        self._told_waiting_for_claims = False
        self._committer: Committer | None = None
        self._store_ready: asyncio.Task[bool]
        # Bytes of the largest entry lately read: sizes the next read's COUNT so that a read of entries this large
        # fits the in-flight byte budget. Starts cautious, then shrinks per read unless larger entries come.
        self._entry_bytes_estimate = INITIAL_ENTRY_BYTES_ESTIMATE
        # Reads (and claims) that brought entries, and how many of them had their delivery taken back during the
        # current store outage (uncount_held): equal = every held entry is uncounted.
        self._reads_with_entries = 0
        self._reads_uncounted = -1

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
                self.stats.record_source_ok()
                if done:
                    self._drained = True
                    break
            except SourceUnavailableError as exc:
                self.stats.record_source_failure(str(exc))
                delay = backoff.next_delay()
                log.warning("%s; retrying in %.1fs", exc, delay)
                await self._sleep_unless_stopped(delay)
                await self._recover_source()
        await self._finish()
        await self._end_trim_pass()
        keepalive.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keepalive
        return self._drained or not drain

    async def close(self) -> None:
        await self.source.close()

    async def _start(self) -> bool:
        """Open and migrate the store while the streams are found and groups created (neither counts a delivery);
        False if stopped before both were ready.

        Nothing is *read* before the store can be used: each read of our own pending entries (and each claim)
        counts as a delivery in Redis, and a worker restarted again and again during a store outage would
        otherwise turn good entries into poison (README, "Reliability"; the cost: the first read waits for the
        migration instead of overlapping it).
        """
        self._store_ready = asyncio.create_task(self._prepare_store())
        if await self._prepare_source():
            return await self._store_ready
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
                # opens the rollup's connection: may fail too
                sink = await asyncio.to_thread(Sink, self.store, self.settings.insert_deduplicate)
                self.stats.record_store_reachable()
                break
            except StoreUnavailableError as exc:
                self.stats.record_sink_failure(str(exc))
                if self.stopping:
                    return False
                delay = backoff.next_delay()
                log.warning("%s; retrying in %.1fs", exc, delay)
                await self._sleep_unless_stopped(delay)
        self._committer = Committer(sink, self.source, self.stats, self.settings.retry_initial_s,
                                    self.settings.retry_max_s, lambda: self.stopping, self.uncount_held)
        log.info("store ready: %s", self.store.description)
        return True

    async def _prepare_source(self) -> bool:
        backoff = Backoff(self.settings.retry_initial_s, self.settings.retry_max_s)
        while True:
            try:
                await self.source.discover(force=True)
                self._note_own_pending(await self.source.own_pending_counts())
                return True
            except SourceUnavailableError as exc:
                if self.stopping:
                    return False
                delay = backoff.next_delay()
                log.warning("%s; retrying in %.1fs", exc, delay)
                await self._sleep_unless_stopped(delay)

    async def _recover_source(self) -> None:
        # on failure the next step tries again before it reads anything (and backs off again if it fails)
        with contextlib.suppress(SourceUnavailableError):
            await self._recover()

    async def _recover(self) -> None:
        """Owed until it succeeds (``source.recovery_owed``), and also after an ack failed while no read did: a step
        whose read succeeds anyway (Redis back between the failed recovery and the step; reads paused on a full
        in-flight window while only acks failed; in a cluster, a promoted replica answering) must not skip it, or
        our own pending entries there (acks the promoted replica never got) stay pending for good."""
        self.source.recovery_owed = True
        await self.source.recover()
        restored = await self.source.restore_unanswered(self._held_deliveries())
        if restored:
            log.info("%d entries delivered by a claim whose reply was lost keep their delivery counts", restored)
        self._note_own_pending(await self.source.own_pending_counts())
        self.source.recovery_owed = False

    def _note_own_pending(self, counts: dict[tuple[str, str], int]) -> None:
        """Our own pending entries' delivery counts, before they are re-read: the streams holding one past
        FLOWTRACK_MAX_DELIVERIES are re-read narrowed (worker/poison.py)."""
        self._prior_deliveries = counts
        self._recoveries_seen = self.source.recoveries
        max_deliveries = self.settings.max_deliveries
        suspects = [key for key, prior in counts.items() if poison.is_suspect(prior + 1, max_deliveries)]
        self._narrowing = {stream for stream, _ in suspects}
        if suspects:
            log.warning("%d of our pending entries (%d streams) were delivered FLOWTRACK_MAX_DELIVERIES=%d times or "
                        "more (a crash loop, or an entry that kills the worker): re-reading them in narrowing groups",
                        len(suspects), len(self._narrowing), max_deliveries)

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    # -- the loop --------------------------------------------------------------------------------
    async def _step(self, drain: bool) -> bool:
        if self._store_ready.done():
            self._store_ready.result()  # a store that cannot be used at all (locked, refused migration) stops us
        if self._store_failing:
            await self._wait_out_outage()
            return False
        self.source.note_slot_moves()
        if self.source.recovery_owed:
            await self._recover()
        elif self.source.recoveries != self._recoveries_seen:  # the source recovered by itself (a stream vanished)
            self._note_own_pending(await self.source.own_pending_counts())
        await self.source.discover()
        now = time.monotonic()
        if now - self._last_claim >= self.settings.claim_interval_s:
            self._last_claim = now
            await self._claim()
        if (self.settings.trim_enabled and self._trimming is None
                and now - self._last_trim >= self.settings.trim_interval_s):
            # Beside the reads, not inside the step: a pass over 20,000 streams took 8 s with reading stopped, and
            # one outlasting the interval began again at once (found by review).
            self._trimming = asyncio.create_task(self._trim_pass())
        got = 0
        room = self.settings.max_inflight_rows - self._inflight_rows()
        room_bytes = self.settings.max_inflight_bytes - self._inflight_bytes()
        if room > 0 and room_bytes > 0:
            got = await self._read(room, room_bytes, drain)
        else:
            await self._wait_for_room()
        self._report_losses()
        self._reap_write()
        self._reap_acks()
        if self._ready and self._writing is None:
            self._start_write(self._ready.pop(0))
        # Nothing read: flush what there is, once every stream was looked at (not after one quiet slice of many).
        # A narrowed group is stored at once: the next one is read only after it (worker/poison.py).
        if self._batch.due() or self._batch.suspects or (
                got == 0 and self.source.caught_up and self._batch.rows and self._writing is None):
            await self._flush()
        if drain and got == 0 and self.source.caught_up:
            if self._writing is not None or self._acking:  # reads do not block when draining: wait, do not poll
                await self._wait_for_room()
            elif not self._batch.rows and not self._ready:
                return await self._drain_finished()
        return False

    async def _wait_for_room(self) -> None:
        """Until the write or an acknowledgement ends (either frees room in flight), at most block_ms."""
        busy: set[asyncio.Task[Any]] = {*self._acking}
        if self._writing is not None:
            busy.add(self._writing)
        if busy:
            await asyncio.wait(busy, timeout=self.settings.block_ms / 1000, return_when=asyncio.FIRST_COMPLETED)
        self._reap_acks()

    @property
    def _store_failing(self) -> bool:
        return self.stats.sink_failing_since is not None and self._writing is not None

    async def _wait_out_outage(self) -> None:
        """While the store cannot write, neither read nor claim: each would count a delivery that cannot end in a
        store. Take back the deliveries of what is held (once more if a read landed after the last time), then
        wait for the write that retries with backoff."""
        await self.uncount_held()
        await self._wait_for_room()
        self._reap_write()
        if self._ready and self._writing is None:
            self._start_write(self._ready.pop(0))

    async def uncount_held(self) -> None:
        """An outage is not a delivery attempt: give every held entry (being written, waiting, filling) the delivery
        count it had before this delivery (XCLAIM RETRYCOUNT; idempotent), so a worker restarted or replaced during
        the outage, however often, does not take good entries for poison. A delivery that ends in a crash with no
        store failure seen still counts: that is how poison is recognised."""
        if self._reads_uncounted == self._reads_with_entries:
            return
        reads = self._reads_with_entries
        by_count: dict[int, dict[str, list[str]]] = {}
        for batch in self._held_batches():
            for count, by_stream in batch.deliveries_by_count().items():
                for stream, ids in by_stream.items():
                    by_count.setdefault(count, {}).setdefault(stream, []).extend(ids)
        try:
            await self.source.uncount_delivery(by_count)
        except SourceUnavailableError as exc:
            log.warning("cannot take back the deliveries of held entries during the store outage (%s)", exc)
            return
        self._reads_uncounted = reads
        log.info("store outage: %d held entries keep their delivery counts", self._inflight_rows())

    def _held_batches(self) -> list[Batch]:
        """Every batch read and not yet acknowledged: filling, waiting for the write slot, being written, stored and
        being acknowledged. An acknowledgement that has ended holds nothing, reaped or not: its entries, back as our
        own pending ones (Redis restarted from a snapshot taken before the XACK), are re-read, not skipped."""
        writing = [self._writing_batch] if self._writing_batch is not None else []
        acking = [batch for task, batch in self._acking.items() if not task.done()]
        return [self._batch, *self._ready, *writing, *acking]

    def _suspects_held(self) -> int:
        return sum(b.suspects for b in self._held_batches())

    def _held_deliveries(self) -> dict[tuple[str, str], int]:
        """(stream, entry id) -> its delivery count, of every entry held."""
        return {(stream, entry_id): batch.deliveries.get((stream, entry_id), 1)
                for batch in self._held_batches() for stream, ids in batch.ids_by_stream.items() for entry_id in ids}

    def _inflight_rows(self) -> int:
        return sum(len(b) for b in self._held_batches())

    def _inflight_bytes(self) -> int:
        return sum(b.bytes for b in self._held_batches())

    def _held_ids_by_stream(self) -> dict[str, list[str]]:
        """Entry ids read and not yet acknowledged, per stream (built on demand: keepalive, re-reads)."""
        held: dict[str, list[str]] = {}
        for batch in self._held_batches():
            for stream, ids in batch.ids_by_stream.items():
                held.setdefault(stream, []).extend(ids)
        return held

    async def _read(self, room: int, room_bytes: int, drain: bool = False) -> int:
        if self._suspects_held():
            # A narrowed group is alone in flight (worker/poison.py): nothing more is read until it is acknowledged.
            await self._wait_for_room()
            return 0
        if self._narrowed_claim_waiting:
            await self._empty_inflight()  # then claim at once: the narrowed group goes alone
            if not self._inflight_rows():
                self._last_claim = 0.0
            return 0
        only: list[str] | None = None  # of our own pending entries, these streams' only
        if self._narrowing and self.source.reading_pending:
            waiting = self.source.waiting_streams()
            only = [stream for stream in waiting if stream not in self._narrowing]
            if not only:
                narrowed = [stream for stream in waiting if stream in self._narrowing]
                if not narrowed:
                    self._narrowing = set()
                    only = None
                else:
                    return await self._read_narrowed(narrowed, room, room_bytes)
        streams = max(1, len(only) if only is not None else self.source.next_read_width())
        by_bytes = room_bytes // (self._entry_bytes_estimate * streams)
        count = max(1, min(self.settings.read_count, room // streams, by_bytes, MAX_ENTRIES_PER_READ // streams))
        wait_s = min(self.settings.block_ms / 1000, self._batch.seconds_left())
        # Draining takes what the streams hold now: a read that finds nothing ends the drain at once instead of
        # blocking for entries it would not wait for (the batch's wait, ~0.25 s, at the end of every drain).
        block_ms = None if drain else max(1, int(wait_s * 1000))
        reading_pending = self.source.reading_pending
        # COUNT is at least 1 per stream: with more streams than the rows or bytes in flight allow, read a slice of
        # them (in turn), so one read stays within both bounds.
        # Caught up, a read blocks on its slice for the batch's wait: then as many streams as the room allows, or an
        # event on a stream of another slice waits out one block per slice (50,000 streams in 10,000-stream slices:
        # probes p99 875 ms instead of ~300).
        entries_cap = room if self.source.caught_up else MAX_ENTRIES_PER_READ
        max_streams = max(1, min(room // count, room_bytes // (self._entry_bytes_estimate * count),
                                 entries_cap // count))
        groups = await self.source.read(count, block_ms, max_streams=max_streams, pending_streams=only)
        largest = self._add_pending(groups) if reading_pending else self._add_new(groups)
        if self._recount:
            recount, self._recount = self._recount, {}
            await self.source.set_delivery_counts(recount)
        if groups:
            self._reads_with_entries += 1
            self._note_entry_size(largest)
        return sum(len(items) for _, items in groups)

    def _note_entry_size(self, largest: int) -> None:
        """After a read that brought entries: the next read's COUNT sizes for entries this large."""
        self._entry_bytes_estimate = max(largest, self._entry_bytes_estimate // ENTRY_BYTES_ESTIMATE_DECAY,
                                         MIN_ENTRY_BYTES_ESTIMATE)

    async def _empty_inflight(self) -> None:
        """Toward nothing in flight: send the batch being filled to the store, wait for a write or an ack."""
        if self._batch.rows:
            await self._flush()
        await self._wait_for_room()

    async def _read_narrowed(self, streams: list[str], room: int, room_bytes: int) -> int:
        """One narrowed group of our own pending entries, read only once nothing else is in flight: a death while
        it is held then counts a delivery to that group alone."""
        if self._inflight_rows():
            await self._empty_inflight()
            return 0
        by_bytes = room_bytes // self._entry_bytes_estimate
        result = await self.source.read_narrowed(streams, self.settings.max_deliveries,
                                                 max(1, min(self.settings.read_count, room, by_bytes)))
        largest = self._add_claimed(result)
        if result.entries:
            self._note_entry_size(largest)
        return len(result.entries) + len(result.deleted_ids)

    def _add_new(self, groups: list[tuple[str, list[Any]]]) -> int:
        """The hot path: entries delivered for the first time, straight from the reply into the batch (in C where the
        hot path was built: Normalizer.fill_batch). Returns the size of the largest entry read."""
        fill = self.normalizer.fill_batch
        added = 0
        largest = 0
        for stream, items in groups:
            if not is_text(stream):  # once per stream, not per entry: the checked path rejects its entries
                self._add(Entry(stream, text(raw_id), pairs_to_dict(fields) or None) for raw_id, fields in items)
                continue
            start = 0
            while start < len(items):
                batch = self._batch if not self._batch.full else self._roll_batch()
                start, rows, size, largest_here = fill(stream, items, start, batch.max_rows - batch.rows,
                                                       batch.max_bytes - batch.bytes, batch.events,
                                                       batch.rejections, batch.stream_ids(stream))
                batch.added(rows, size)
                largest = max(largest, largest_here)
            added += len(items)
        self.stats.read += added
        return largest

    def _add_pending(self, groups: list[tuple[str, list[Any]]]) -> int:
        """Our own pending entries, re-read at start or after a reconnect: count deliveries, skip held ones.
        Returns the size of the largest entry read."""
        held = self._held_deliveries()
        entries = []
        for stream, items in groups:
            for raw_id, fields in items:
                entry_id = text(raw_id)
                count = held.get((stream, entry_id))
                if count is not None:  # still on its way to the store from before the reconnect
                    # This re-read counted a delivery it does not make: give it back (a held narrowed group would
                    # otherwise reach the next level without a death).
                    self._recount.setdefault(count, {}).setdefault(stream, []).append(entry_id)
                    continue
                prior = self._prior_deliveries.pop((stream, entry_id), 0)
                entries.append(Entry(stream, entry_id, pairs_to_dict(fields) or None, prior + 1))
        return self._add(entries)

    def _roll_batch(self) -> Batch:
        """batch_max_rows is a hard bound: a full batch queues for the write slot and a new one starts."""
        self._ready.append(self._batch)
        self._batch = self._new_batch()
        return self._batch

    def _add(self, entries: Iterable[Entry]) -> int:
        """Entries with a delivery history (re-read, reclaimed, deleted while pending): the checked path.
        Returns the size of the largest entry."""
        max_deliveries = self.settings.max_deliveries
        largest = 0
        for entry in entries:
            batch = self._batch if not self._batch.full else self._roll_batch()
            size = entry_bytes(entry.fields)
            largest = max(largest, size)
            self.stats.read += 1
            if entry.deliveries > 1:
                batch.deliveries[(entry.stream, entry.entry_id)] = entry.deliveries
            if poison.is_poison(entry.deliveries, max_deliveries):
                self.stats.poison += 1
                reason = (f"delivered {entry.deliveries} times without being acknowledged, the last time alone "
                          f"(FLOWTRACK_MAX_DELIVERIES={max_deliveries}, then {len(poison.NARROWING_GROUPS)} "
                          "deliveries in ever smaller groups)")
                batch.add(entry.stream, entry.entry_id,
                          Rejection(stored_key(entry.stream), entry.entry_id, reason, _raw(entry)), size)
                continue
            if poison.is_suspect(entry.deliveries, max_deliveries):
                batch.suspects += 1
                self.stats.narrowed += 1
            if entry.fields is None:
                self.stats.deleted_while_pending += 1
            batch.add(entry.stream, entry.entry_id,
                      self.normalizer.normalize(entry.stream, entry.entry_id, entry.fields), size)
        return largest

    def _report_losses(self) -> None:
        """Streams that vanished (DEL, FLUSHDB) with entries pending on other consumers: those entries are gone
        with their stream and Redis cannot give them back. Count them, log them, and record one rejected row per
        stream (reason with the count and id range) so `flowtrack status` and `flowtrack rejected` show the loss."""
        while self.source.lost:
            self._record_loss(self.source.lost.pop(0))

    def _record_loss(self, lost: LostStream) -> None:
        seen = lost.pending
        self.stats.lost_with_stream += seen.others
        reason = (f"stream deleted with {seen.others} entries pending on other consumers (ids {seen.first_id}.."
                  f"{seen.last_id}, as of the last claim round): Redis cannot give them back")
        log.error("%s: %s", printable(lost.stream), reason)
        batch = self._batch if not self._batch.full else self._roll_batch()
        batch.add(lost.stream, seen.first_id, Rejection(stored_key(lost.stream), seen.first_id, reason, "{}"))

    async def _claim(self) -> None:
        if self._suspects_held():
            return  # a narrowed group is alone in flight (worker/poison.py): nothing is claimed beside it
        result = await self.source.claim_idle(self.settings.claim_idle_ms, self.settings.read_count,
                                              self.settings.max_deliveries, suspects_allowed=not self._inflight_rows())
        if result.entries:
            self.stats.claimed += len(result.entries)
            log.info("reclaimed %d idle pending entries from other consumers", len(result.entries))
        self._add_claimed(result)
        # Narrowed entries of a dead consumer wait for nothing else to be in flight: stop reading until then.
        self._narrowed_claim_waiting = result.narrowed_waiting

    def _add_claimed(self, result: ClaimResult) -> int:
        """Entries delivered by XCLAIM (a dead consumer's, or a narrowed group of our own), and those of them found
        deleted from their stream while pending: each of these is recorded in the rejected relation, so the loss is
        visible, not silently forgotten."""
        if result.deleted_ids:
            log.error("%d pending entries were deleted from their streams before being processed "
                      "(trimmed or XDEL'd); first: %s", len(result.deleted_ids), result.deleted_ids[0])
            self._add(Entry(stream, entry_id, None) for stream, entry_id in result.deleted_ids)
        if result.entries or result.deleted_ids:
            self._reads_with_entries += 1
        return self._add(result.entries)

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

    async def _trim_pass(self) -> None:
        """One trim pass over the streams; Redis failing midway ends it (the reads see the outage themselves). The
        interval counts from its end."""
        try:
            await self._trim()
        except SourceUnavailableError as exc:
            log.warning("trim pass stopped: %s", exc)
        finally:
            self._last_trim = time.monotonic()
            self._trimming = None

    async def _end_trim_pass(self) -> None:
        """A drain lets the pass under way finish (what it acknowledged last is trimmed); a stop ends it after the
        stream it is at."""
        task = self._trimming
        if task is None:
            return
        if self.stopping:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _trim(self) -> None:
        redis = self.source.redis
        if self._trim_acked is None:
            self._trim_acked = await guarded(lambda: supports_acked(redis))
        removed_in_pass, streams_trimmed = 0, 0
        for stream in list(self.source.streams):
            if self.stopping:  # between streams (redis-py may swallow a cancel mid-command and go on)
                break
            try:
                removed = await guarded(lambda stream=stream: trim_stream(  # type: ignore[misc]
                    redis, stream, acked=bool(self._trim_acked)))
            except ResponseError as exc:
                log.warning("not trimming %s: %s", printable(stream), exc)  # stream gone; recover() handles it
                continue
            self.stats.trimmed += removed
            removed_in_pass += removed
            streams_trimmed += bool(removed)
        if removed_in_pass:
            log.info("trimmed %d acknowledged entries from %d stream(s)", removed_in_pass, streams_trimmed)

    async def _flush(self) -> None:
        """Send every full batch and the current one to the write slot, one write at a time, in order."""
        if self._batch.rows:
            self._roll_batch()
        while self._ready:
            if self._writing is not None:
                await asyncio.wait({self._writing})
                self._reap_write()
            self._start_write(self._ready.pop(0))
        self._reap_acks()

    def _start_write(self, batch: Batch) -> None:
        assert self._writing is None
        self._writing_batch = batch
        self._writing = asyncio.create_task(self._commit(batch))

    async def _commit(self, batch: Batch) -> bool:
        """Store a batch (the write slot); its acknowledgement follows as a task of its own (_reap_write)."""
        if not await self._store_ready:
            return False  # stopped while the store was still unreachable: the entries stay pending
        assert self._committer is not None
        return await self._committer.store(batch)

    def _reap_write(self) -> None:
        """A stored batch is acknowledged beside the next batch's store: the write slot is free once it is stored."""
        task = self._writing
        if task is None or not task.done():
            return
        batch = self._writing_batch
        self._writing = None
        self._writing_batch = None
        if task.result() and batch is not None:  # result(): surface unexpected errors instead of losing them
            assert self._committer is not None
            batch.events, batch.rejections = [], []  # stored: only the ids are still needed
            self._acking[asyncio.create_task(self._committer.ack(batch))] = batch

    def _reap_acks(self) -> None:
        for task in [task for task in self._acking if task.done()]:
            del self._acking[task]
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
        if not self._told_waiting_for_claims:
            self._told_waiting_for_claims = True
            log.info("%d entries are pending on other consumers: waiting until they are idle for %.0f s "
                     "(FLOWTRACK_CLAIM_IDLE_MS) to claim them", pending, self.settings.claim_idle_ms / 1000)
        self._last_claim = 0.0
        await self._sleep_unless_stopped(min(1.0, self.settings.claim_idle_ms / 1000))
        return False

    async def _finish(self) -> None:
        if not self._drained or self._batch.rows or self._ready:
            await self._flush()
        if self._writing is not None:
            await asyncio.wait({self._writing})
            self._reap_write()
        if self._acking:
            await asyncio.wait(set(self._acking))
            self._reap_acks()
        if self._committer is not None:
            # Sessions of acknowledged batches not recomputed yet; if this fails the next start catches up.
            with contextlib.suppress(FlowtrackError):
                await asyncio.to_thread(self._committer.sink.rollup.close)

    def _new_batch(self) -> Batch:
        # Half the byte budget per batch, like rows: one batch being written while the next one fills.
        return Batch(self.settings.batch_max_rows, self.settings.batch_max_wait_s,
                     max(1, self.settings.max_inflight_bytes // 2))


def _raw(entry: Entry) -> str:
    return raw_json(entry.fields or {})


def entry_bytes(fields: Mapping[Any, Any] | None) -> int:
    """Names + values of an entry as read (0 for a deleted one)."""
    if not fields:
        return 0
    return sum(map(len, fields)) + sum(map(len, fields.values()))


# CPython's default thresholds (700, 10, 10) run a full collection every fraction of a second over the whole
# in-flight working set (reply lists, events, insert columns): ~30% of a draining worker's time
# (README, "Benchmark"). The hot path creates no reference cycles, so collect young objects in larger steps
# and the old generation rarely. A young generation of 100k objects (not 10k) lets most of a batch's objects
# die young instead of being promoted and scanned again in the middle generation: -0.2 s of the main thread's
# 3.5 s CPU draining 400k entries (the cycles it leaves for later are few and small).
GC_THRESHOLDS = (100_000, 50, 1000)


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
