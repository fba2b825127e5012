"""The per-session rollup (flowtrack.sessions): recomputed from the deduplicated events after every batch.

A materialized view sees every stored copy of an event, so counts it keeps would count redeliveries; keeping
event ids to count them distinctly holds every id in memory. Instead the sessions a batch touched are recomputed
from ``events FINAL`` (one primary-key range each) and the result replaces their rows (schemas 008 says why the
latest recompute is exact).
"""

from __future__ import annotations

from collections.abc import Iterable

from worker.store import Store, classify

# The recompute's start time versions the rows: the latest recompute wins.
_RECOMPUTE = (
    "INSERT INTO flowtrack.sessions (user_id, session_id, started_at, last_event_at, closed_at, event_count, "
    "error_count, end_count, computed_at, is_deleted) "
    "SELECT user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count, end_count, "
    "now64(6), 0 FROM flowtrack.session_totals WHERE session_id IN {sessions:Array(String)}"
)
# (user, session) pairs left without any event (their rows were purged) get a tombstone that hides their row.
# Its last_event_at is the deletion time, so retention removes it after the row it hides.
_TOMBSTONES = (
    "INSERT INTO flowtrack.sessions (user_id, session_id, last_event_at, computed_at, is_deleted) "
    "SELECT pair.1, pair.2, now64(3), now64(6), 1 FROM (SELECT arrayJoin({pairs:Array(Tuple(String, String))}) AS pair) "
    "WHERE pair NOT IN (SELECT user_id, session_id FROM flowtrack.session_totals "
    "WHERE session_id IN {sessions:Array(String)})"
)


def refresh_sessions(store: Store, pairs: Iterable[tuple[str, str]], purged: bool = False) -> None:
    """Recompute the rollup rows of these (user_id, session_id) pairs; ``purged``: some of their events were
    deleted, so a pair may have no event left. Raises the store's classified error."""
    unique = sorted(set(pairs))
    if not unique:
        return
    sessions = sorted({session for _, session in unique})
    try:
        if purged:
            store.command(_TOMBSTONES, {"pairs": unique, "sessions": sessions})
        store.command(_RECOMPUTE, {"sessions": sessions})
    except Exception as exc:
        raise classify(exc) from exc
