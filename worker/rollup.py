"""The per-session rollup (flowtrack.sessions): recomputed from the deduplicated events by the worker.

A materialized view sees every stored copy of an event, so counts it keeps would count redeliveries; keeping
event ids to count them distinctly holds every id in memory. Instead the sessions the worker stored events for
are recomputed from ``events`` (their primary-key ranges, copies collapsed) and the result replaces their rows;
schemas/clickhouse/008_rollups.sql says why the latest recompute is exact.

Session ids are random, so one recompute's sessions sit in granules all over ``events``: the more sessions one query
takes, the more of them share a granule and a read range, and the fewer rows are read per session. So touched
sessions are collected and recomputed together, by a daemon thread on a connection of its own (the sink's inserts go
on meanwhile; live flows show up in flow_sessions within about a second): when the oldest waited ``max_delay_s``, or
— while the worker is busy (at least ``busy_pending_sessions`` pending when that second is up: a backlog draining) —
``busy_max_delay_s``; at once when ``max_pending_sessions`` are pending; and in the caller's thread when rows were
purged (before the next batch), when twice ``max_pending_sessions`` are pending (the recompute fell behind the
inserts: the sink waits for it, which bounds what is pending), and when the pipeline finishes. Draining a backlog,
the longer wait halves the rows the recompute reads (README, "ClickHouse relations", has the figures). The sessions
are recomputed ``chunk_sessions`` at a time, so the engine's memory for one recompute query stays bounded however
many are pending. Sessions of batches acknowledged but not yet recomputed when a worker died are recomputed at its
next start (store.CATCH_UP_WINDOW, run by migrate, in chunks).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from worker.errors import FlowtrackError
from worker.store import TOMBSTONES, Store, classify

log = logging.getLogger(__name__)

# At most this many sessions per recompute query: the query's memory grows with its sessions (~5 kB each).
CHUNK_SESSIONS = 5000
# A recompute given a helper connection splits its sessions over both when it has at least this many: the engine runs
# one recompute query on about one core, and the closing recompute (the end of a drain waits for it) has the machine to
# itself (12k sessions of a 400k drain: 0.34 -> 0.21 s; README, "Where the time goes").
SPLIT_MIN_SESSIONS = 2000

def recompute(store: Store, sessions: Iterable[str], purged_pairs: Iterable[tuple[str, str]] = (),
              chunk_sessions: int = CHUNK_SESSIONS, helper: Store | None = None) -> None:
    """Recompute the rollup rows of these sessions, ``chunk_sessions`` per query; ``purged_pairs``: (user, session)
    pairs some of whose events were deleted, so they may have no event left; ``helper``: another connection to the
    same store, given half of the sessions when there are many (SPLIT_MIN_SESSIONS). Raises the store's classified
    error (chunks already recomputed stay so: a recompute is idempotent)."""
    pairs = sorted(set(purged_pairs))
    ids = sorted(set(sessions) | {session for _, session in pairs})
    try:
        if pairs:
            store.command(TOMBSTONES, {"pairs": pairs, "sessions": sorted({session for _, session in pairs})})
        if helper is None or helper is store or len(ids) < SPLIT_MIN_SESSIONS:
            _recompute_chunks(store, ids, chunk_sessions)
            return
        half = len(ids) // 2
        # Half the chunk each: two queries at once hold what one chunk's query would (the engine's memory per query
        # grows with its sessions). Leaving the with-block waits for the helper's half, also when this half failed.
        chunk = max(1, chunk_sessions // 2)
        with ThreadPoolExecutor(1, thread_name_prefix="session-rollup-helper") as pool:
            other_half = pool.submit(_recompute_chunks, helper, ids[half:], chunk)
            _recompute_chunks(store, ids[:half], chunk)
            other_half.result()
    except Exception as exc:
        raise classify(exc) from exc


def _recompute_chunks(store: Store, ids: Sequence[str], chunk_sessions: int) -> None:
    for start in range(0, len(ids), chunk_sessions):
        chunk = ids[start:start + chunk_sessions]
        store.recompute_sessions(chunk)


class SessionRollup:
    """Keeps the rollup of the sessions one sink stored events for; ``stored`` is called after each stored batch.

    Thread-safe: the sink's writer thread adds sessions, a daemon thread recomputes what has waited longer than
    ``max_delay_s`` (``busy_max_delay_s`` once ``busy_pending_sessions`` are pending) or as soon as
    ``max_pending_sessions`` are pending. Give it a store of its own (``Store.companion``) for its recomputes to run
    beside the sink's inserts instead of between them, and the sink's (``closing_helper``), idle by then, to share
    the recompute at close."""

    def __init__(self, store: Store, max_pending_sessions: int = 20000, max_delay_s: float = 1.0,
                 busy_pending_sessions: int = 2000, busy_max_delay_s: float = 3.0,
                 chunk_sessions: int = CHUNK_SESSIONS, closing_helper: Store | None = None) -> None:
        self.store = store
        self.closing_helper = closing_helper
        self.max_pending_sessions = max_pending_sessions
        self.max_delay_s = max_delay_s
        # A live worker touches tens to hundreds of sessions a second; thousands means a backlog is draining.
        self.busy_pending_sessions = busy_pending_sessions
        self.busy_max_delay_s = busy_max_delay_s
        self.chunk_sessions = chunk_sessions
        self._pending: set[str] = set()
        self._pending_since = 0.0
        self._lock = threading.Lock()
        self._timer: threading.Thread | None = None
        self._closing = threading.Event()
        self._wake = threading.Event()  # the timer thread re-checks what is pending (the state decides, not the event)

    def stored(self, sessions: Iterable[str],
               purged_pairs: Iterable[tuple[str, str]] = ()) -> None:
        """Note a stored batch: recompute in this thread when rows were purged or the recompute fell behind, else
        in the timer thread (at once when enough is pending, else within max_delay_s)."""
        purged = list(purged_pairs)
        with self._lock:
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.update(sessions)
            pending = len(self._pending)
        if purged or pending >= 2 * self.max_pending_sessions:
            self.flush(purged)
            return
        self._start_timer()
        if pending >= self.max_pending_sessions:
            self._wake.set()

    def flush(self, purged_pairs: Iterable[tuple[str, str]] = (), helper: Store | None = None) -> None:
        """Recompute every pending session (with ``helper``'s connection too: recompute()); on failure they stay
        pending (and the error is raised)."""
        with self._lock:
            pending, self._pending = self._pending, set()
        try:
            recompute(self.store, pending, purged_pairs, self.chunk_sessions, helper)
        except Exception:
            with self._lock:
                self._pending |= pending
            raise
        self.store.return_freed_memory()  # the recompute's reads are the largest allocations of a drain

    def close(self) -> None:
        """Stop the timer thread (waiting out a recompute it runs: the engine must not shut down under it), then
        recompute what is still pending. Raises the store's error if that fails (the next start catches up)."""
        self._closing.set()
        self._wake.set()
        timer = self._timer
        if timer is not None:
            timer.join()
        if self.pending:
            self.flush(helper=self.closing_helper)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _start_timer(self) -> None:
        with self._lock:
            if self._closing.is_set() or self._timer is not None:
                return
            self._timer = threading.Thread(target=self._flush_when_quiet, name="session-rollup", daemon=True)
            self._timer.start()

    def _delay_s(self) -> float:
        """How long the oldest pending session may wait (call under the lock)."""
        busy = len(self._pending) >= self.busy_pending_sessions
        return max(self.max_delay_s, self.busy_max_delay_s) if busy else self.max_delay_s

    def _flush_when_quiet(self) -> None:
        while not self._closing.is_set():
            with self._lock:
                if not self._pending:
                    self._timer = None  # under the lock: a batch stored from now on starts a new timer
                    return
                if len(self._pending) >= self.max_pending_sessions:
                    wait_s = 0.0
                else:
                    wait_s = self._pending_since + self._delay_s() - time.monotonic()
            if wait_s > 0:
                self._wake.wait(wait_s)
                self._wake.clear()
                continue
            try:
                self.flush()
            except FlowtrackError as exc:  # the store is unwell: the next batch, or the next start, recomputes
                log.warning("session rollup recompute failed: %s", exc)
                self._closing.wait(self.max_delay_s)
