"""Sink: write one batch of normalized events and rejections to ClickHouse, idempotently.

A batch is written column-wise with an ``insert_deduplication_token`` that is a function of the
exact rows it holds (every value, not only the entry ids), so a batch that is re-inserted after a crash between
insert and ack is dropped by ClickHouse (and, beyond the dedup window, hidden by ReplacingMergeTree FINAL), while
a batch that reuses entry ids with other content (Redis lost its data) is a new insert, never silently dropped.

Failures are classified: a transient one (server down, timeout, disk) raises
StoreUnavailableError and the caller retries the whole batch; a data error makes the sink split
the batch to isolate the rows ClickHouse refuses, which become rejections while the rest lands.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple

import orjson

from worker.errors import StoreRejectedError, StoreUnavailableError
from worker.normalize import FlowEvent, Rejection, native_block, raw_json
from worker.rollup import SessionRollup
from worker.store import DATABASE, Store, classify

log = logging.getLogger(__name__)

EVENT_COLUMNS = ("event_id", "user_id", "session_id", "node_id", "parent_id", "event_type", "ts",
                 "attributes", "source_stream", "source_id", "is_end", "is_error", "ingested_at")
REJECTED_COLUMNS = ("received_at", "source_stream", "source_id", "reason", "raw")
# The C hot path's Native blocks: (column, type as sent) in the tuples' field order, then the insert's time.
# LowCardinality columns are sent as String: the engine converts them on insert.
_DATETIME = "DateTime64(3, 'UTC')"
EVENT_BLOCK_COLUMNS = (("event_id", "String"), ("user_id", "String"), ("session_id", "String"), ("node_id", "String"),
                       ("parent_id", "String"), ("event_type", "String"), ("ts", _DATETIME),
                       ("attributes", "Map(String, String)"), ("source_stream", "String"), ("source_id", "String"),
                       ("is_end", "UInt8"), ("is_error", "UInt8"))
REJECTION_BLOCK_COLUMNS = (("source_stream", "String"), ("source_id", "String"), ("reason", "String"),
                           ("raw", "String"))
_EVENT_GETTERS = tuple(itemgetter(i) for i in range(len(FlowEvent._fields)))
_SESSION_ID = itemgetter(FlowEvent._fields.index("session_id"))
_EVENT_ID = itemgetter(FlowEvent._fields.index("event_id"))

# A batch at least this large whose every row is refused says more about the store than about the rows.
ALL_REFUSED_IS_OUTAGE_ROWS = 8
# Inserts one batch may take for the copies of an event whose later copies were refused (each a different content):
# a producer cannot make one batch cost an insert per entry.
MAX_COPY_GENERATIONS = 8


class Refusal(NamedTuple):
    """An event ClickHouse refused: why, and the ingested_at of the insert that sent it (0: not sent, see reason)."""
    event: FlowEvent
    reason: str
    stamp_ms: int


@dataclass
class WriteResult:
    stored: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    inserts: int = 0


def batch_token(columns: Sequence[Sequence[object]]) -> str:
    """A dedup token that is a function of the exact rows of an insert: every value of every column, in order.

    ClickHouse drops an insert whose token it has seen, whatever its data: a token of the entry ids alone would
    drop a batch that reuses ids with other content. One orjson pass + blake2b: ~0.35 us per row, less than the
    sorted id list it replaces.
    """
    try:
        data = orjson.dumps(columns)
    except orjson.JSONEncodeError:  # a value orjson cannot write (none expected): the exact text, still
        data = json.dumps(columns, default=repr).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=20).hexdigest()


_DELETE_EVENTS = ("DELETE FROM flowtrack.events WHERE (session_id, event_id, source_stream, source_id) "
                  "IN {keys:Array(Tuple(String, String, String, String))}")
# The time-ordered copy has no entry ids: its row of a refused entry is the one with this batch's ingested_at.
_DELETE_EVENTS_BY_TIME = ("DELETE FROM flowtrack.events_by_time WHERE (session_id, event_id, "
                          "toUnixTimestamp64Milli(ingested_at)) IN {keys:Array(Tuple(String, String, Int64))}")


class Sink:
    def __init__(self, store: Store, deduplicate: bool = True) -> None:
        self.store = store
        self.deduplicate = deduplicate  # False: FLOWTRACK_INSERT_DEDUPLICATE (storing lost rows again)
        # Its recomputes on a connection of their own: they run beside the next batch's insert, not before it; at close
        # this sink's connection, idle by then, takes half of what is left.
        self.rollup = SessionRollup(store.companion(), closing_helper=store)
        self._last_stamp_ms = 0

    def write(self, events: Sequence[FlowEvent], rejections: Sequence[Rejection]) -> WriteResult:
        """Store a batch; returns what was stored and what had to be rejected. Blocking (run it in a thread)."""
        result = WriteResult()
        refused: list[Refusal] = []
        sent = 0  # rows sent to the store
        remaining: Sequence[FlowEvent] = events
        # Copies of one event go one per insert, the last first (sink.last_copies). A copy the store refuses leaves its
        # event to the copy before it, in the next insert: as if the copies had come in batches of their own, the
        # event stays visible as its latest copy the store accepts.
        for generation in range(MAX_COPY_GENERATIONS):
            if not remaining:
                break
            latest, earlier = last_copies(remaining)
            before = len(refused)
            self._write_events(latest, self._next_stamp_ms(), result, refused)
            sent += len(latest)
            remaining = self._copies_of_refused(earlier, refused[before:], refused, result)
            if generation == MAX_COPY_GENERATIONS - 1 and remaining:
                refused += [Refusal(event, f"{MAX_COPY_GENERATIONS} later copies of this event were refused; this one "
                                           "was not tried", 0) for event in remaining]
        if sent >= ALL_REFUSED_IS_OUTAGE_ROWS and len(refused) == len(events):
            # Every row of a sizeable batch refused one by one: the store is unwell, not the data. Never turn
            # a whole batch of good entries into rejects; retry it later.
            raise StoreUnavailableError(f"ClickHouse refused all {len(events)} rows of a batch; treating it "
                                        "as an outage")
        all_rejections = list(rejections) + [
            Rejection(r.event.source_stream, r.event.source_id, r.reason, raw_json(_event_as_fields(r.event)))
            for r in refused]
        if all_rejections:
            # Rejections first: that write succeeding shows the store is writable before anything is purged.
            self._insert_rejections(all_rejections, self._next_stamp_ms())
            result.inserts += 1
        tried = [r for r in refused if r.stamp_ms]
        if tried:
            self._purge(tried)
        # After the events are stored and refused ones purged (see worker/rollup.py for when it recomputes).
        self.rollup.stored(map(_SESSION_ID, events), [(r.event.user_id, r.event.session_id) for r in tried])
        result.rejected = all_rejections
        self.store.return_freed_memory()  # what this batch's insert freed (rate-limited; embedded engine only)
        return result

    def _next_stamp_ms(self) -> int:
        """The next insert's ingested_at: strictly increasing per sink, so this sink's inserts never share a version
        and which of two copies of an event is the later never depends on how a reader breaks ties."""
        self._last_stamp_ms = max(int(time.time() * 1000), self._last_stamp_ms + 1)
        return self._last_stamp_ms

    @staticmethod
    def _copies_of_refused(earlier: list[FlowEvent], refused_now: list[Refusal], refused: list[Refusal],
                           result: WriteResult) -> list[FlowEvent]:
        """Of the copies an insert left out, those whose event's sent copy was refused: the next insert's. The others
        are stored, as their event's later copy. A copy equal to a refused one (a producer's retries of the same
        entry) is refused for the same reason without being sent again: the store decides on content."""
        if not refused_now:
            result.stored += len(earlier)
            return []
        reasons = {(r.event.session_id, r.event.event_id): r for r in refused_now}
        retry: list[FlowEvent] = []
        for event in earlier:
            refusal = reasons.get((event.session_id, event.event_id))
            if refusal is None:
                result.stored += 1
            elif _content(event) == _content(refusal.event):
                refused.append(Refusal(event, refusal.reason, 0))
            else:
                retry.append(event)
        return retry

    def _write_events(self, events: list[FlowEvent], now_ms: int, result: WriteResult,
                      refused: list[Refusal]) -> None:
        """Insert, splitting in halves to isolate the rows ClickHouse refuses (collected with its reason)."""
        if not events:
            return
        try:
            self._insert_events(events, now_ms)
            result.inserts += 1
            result.stored += len(events)
            return
        except StoreRejectedError as exc:
            if len(events) == 1:
                event = events[0]
                log.warning("ClickHouse refused event %s/%s: %s", event.source_stream, event.source_id, exc)
                refused.append(Refusal(event, f"ClickHouse refused the row: {exc}", now_ms))
                return
        # The halves have their own entry sets, hence their own dedup tokens.
        middle = len(events) // 2
        self._write_events(events[:middle], now_ms, result, refused)
        self._write_events(events[middle:], now_ms, result, refused)

    def _purge(self, refused: Sequence[Refusal]) -> None:
        """Remove every trace of refused rows. An insert that a materialized view (a user's, or a guard) refuses
        is not atomic: the rows may already be in ``events``. The session and node views read ``events``, so
        deleting them there is enough. A row is the refused entry's only with its event's identity too: an entry id
        reused with other content (Redis lost its data) names another event, which stays."""
        keys = [(r.event.session_id, r.event.event_id, r.event.source_stream, r.event.source_id) for r in refused]
        copies = [(r.event.session_id, r.event.event_id, r.stamp_ms) for r in refused]
        try:
            self.store.command(_DELETE_EVENTS, {"keys": keys})
            self.store.command(_DELETE_EVENTS_BY_TIME, {"keys": copies})
        except Exception as exc:
            raise classify(exc) from exc

    def _insert_events(self, events: Sequence[FlowEvent], now_ms: int) -> None:
        if self._insert_native(f"{DATABASE}.events", events, EVENT_BLOCK_COLUMNS, "ingested_at", now_ms, "e"):
            return
        # Column-wise, one C-level pass per column: zip(*events) would allocate an iterator per row,
        # and those allocations trigger GC passes over every live event. FlowEvent field order equals
        # EVENT_COLUMNS minus ingested_at.
        columns: list[list[Any]] = [list(map(getter, events)) for getter in _EVENT_GETTERS]
        token = batch_token(columns)  # before ingested_at: a re-insert of the same rows gets the same token
        columns.append([now_ms] * len(events))
        self._insert(f"{DATABASE}.events", columns, EVENT_COLUMNS, f"e:{token}")

    def _insert_rejections(self, rejections: Sequence[Rejection], now_ms: int) -> None:
        try:
            if self._insert_native(f"{DATABASE}.rejected", rejections, REJECTION_BLOCK_COLUMNS, "received_at",
                                   now_ms, "r"):
                return
            content = [list(col) for col in zip(*rejections, strict=True)]
            token = batch_token(content)
            columns = [[now_ms] * len(rejections), *content]
            self._insert(f"{DATABASE}.rejected", columns, REJECTED_COLUMNS, f"r:{token}")
        except StoreRejectedError as exc:
            # The rejected relation takes plain strings; if even that fails the store is unwell.
            raise StoreUnavailableError(f"cannot store rejections: {exc}") from exc

    def _insert_native(self, table: str, rows: Sequence[tuple[Any, ...]], columns: tuple[tuple[str, str], ...],
                       stamp_column: str, stamp_ms: int, token_prefix: str) -> bool:
        """Insert as the C hot path's Native block; False where it was not built or took these rows for Python's.
        Its token is a function of the exact rows, like batch_token's (another function of them: a batch re-inserted
        by a worker without the C module is deduplicated by FINAL and the rollup's recompute, not at insert)."""
        native = native_block(list(rows), columns, stamp_column, stamp_ms) if native_block is not None else None
        if native is None:
            return False
        block, token = native
        self._insert(table, block, [name for name, _ in columns] + [stamp_column], f"{token_prefix}:{token}")
        return True

    def _insert(self, table: str, rows: Sequence[Sequence[object]] | bytes, names: Sequence[str], token: str) -> None:
        """Insert columns, or a ready Native block (bytes), with the batch's dedup token."""
        # Without dedup, no token either: the engine deduplicates a tokened insert even with insert_deduplicate = 0.
        settings: dict[str, Any] = ({"insert_deduplication_token": token,
                                     "deduplicate_blocks_in_dependent_materialized_views": 1}
                                    if self.deduplicate else {"insert_deduplicate": 0})
        try:
            if isinstance(rows, bytes):
                self.store.insert_block(table, names, rows, settings=settings)
            else:
                self.store.insert(table, rows, names, settings=settings)
        except Exception as exc:
            raise classify(exc) from exc


def last_copies(events: Sequence[FlowEvent]) -> tuple[list[FlowEvent], list[FlowEvent]]:
    """The batch with one copy per event identity (session_id, event_id), the last, as FINAL and the rollup take it;
    and the copies left out, in batch order.

    Copies in one insert share its ingested_at (the version), and there FINAL keeps the last stored copy while a
    grouping reads whichever comes first: collapsing them here keeps the rollup equal to the public views (the engine
    would collapse them itself, for a third of the insert's CPU: store.WRITE_SETTINGS). Copies across inserts differ
    in ingested_at, which decides."""
    if len(set(map(_EVENT_ID, events))) == len(events):
        return list(events), []
    last_at = {(event.session_id, event.event_id): at for at, event in enumerate(events)}
    if len(last_at) == len(events):
        return list(events), []
    chosen = set(last_at.values())
    return [events[at] for at in last_at.values()], [event for at, event in enumerate(events) if at not in chosen]


def _content(event: FlowEvent) -> tuple[Any, ...]:
    """What the store sees of an event, its entry id aside."""
    return event[:8] + event[10:]


def _event_as_fields(event: FlowEvent) -> dict[str, str]:
    fields = {
        "event_id": event.event_id, "user_id": event.user_id, "session_id": event.session_id,
        "node_id": event.node_id, "parent_id": event.parent_id, "event_type": event.event_type,
        "timestamp": str(event.ts_ms),
    }
    fields.update(event.attributes)
    return fields
