"""The storage layout (issue 9): exactly-once views, exact session rollups under every kind of copy, the migration of
a store at the old schema, retention TTLs. Real chDB throughout; the insert path is the worker's Sink."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import ROOT, xadd_all
from worker import rollup as rollup_module
from worker import store as store_module
from worker.errors import StoreRejectedError
from worker.normalize import FlowEvent, Normalizer
from worker.redisserver import RedisServer
from worker.settings import Settings
from worker.sink import Refusal, Sink
from worker.store import RETENTION_COLUMNS, Store

NORMALIZER = Normalizer()
NOW_MS = int(time.time() * 1000)
SESSION_COLUMNS = "user_id, session_id, started_at, last_event_at, ended_at, event_count, error_count, status, " \
                  "duration_ms"


def event(session: str, n: int, event_type: str = "llm_call", ts_ms: int | None = None, event_id: str | None = None,
          user: str = "u1", entry: str | None = None) -> FlowEvent:
    """One normalized event as the worker builds it (entry id = its stream position)."""
    fields = {"session_id": session, "node_id": f"n{n}", "event_type": event_type, "user_id": user}
    if ts_ms is not None:
        fields["timestamp"] = str(ts_ms)
    if event_id is not None:
        fields["event_id"] = event_id
    item = NORMALIZER.normalize("flow_events", entry or f"{NOW_MS - 1000 + n}-0", fields)
    assert isinstance(item, FlowEvent), item
    return item


def write(sink: Sink, events: Sequence[FlowEvent]) -> None:
    sink.write(events, [])  # no pause between batches: one sink's inserts never tie on ingested_at


def flow_session(store: Store, session: str) -> list[Any]:
    _, rows = store.query(f"SELECT {SESSION_COLUMNS} FROM flowtrack.flow_sessions "
                          "WHERE session_id = {s:String} ORDER BY user_id", {"s": session})
    return [list(r) for r in rows]


def from_visible_events(store: Store, session: str) -> list[Any]:
    """flow_sessions' row computed the slow, obviously right way: from flow_events (events FINAL)."""
    _, rows = store.query(
        "SELECT user_id, session_id, min(ts), max(ts), if(status = 'active', NULL, maxIf(ts, e.is_end OR e.is_error)), "
        "count(), countIf(e.is_error), multiIf(countIf(e.is_error) > 0, 'failed', countIf(e.is_end) > 0, 'completed', "
        "'active') AS status, dateDiff('millisecond', min(ts), if(status = 'active', max(ts), "
        "maxIf(ts, e.is_end OR e.is_error))) "
        "FROM (SELECT user_id, session_id, ts, event_type = 'flow_completed' AS is_end, "
        "event_type = 'error' AS is_error "
        "FROM flowtrack.flow_events WHERE session_id = {s:String}) AS e GROUP BY user_id, session_id ORDER BY user_id",
        {"s": session})
    return [list(r) for r in rows]


def physical_rows(store: Store, session: str) -> int:
    return int(store.scalar("SELECT count() FROM flowtrack.events WHERE session_id = {s:String}", {"s": session}))


def visible_rows(store: Store, session: str) -> int:
    return int(store.scalar("SELECT count() FROM flowtrack.flow_events WHERE session_id = {s:String}", {"s": session}))


# -- exact sessions under every kind of copy --------------------------------------------------------
def base_flow(session: str) -> list[FlowEvent]:
    return [event(session, 1, "user_message", NOW_MS - 5000), event(session, 2, "llm_call", NOW_MS - 4000),
            event(session, 3, "error", NOW_MS - 3000), event(session, 4, "flow_completed", NOW_MS - 2000)]


def redelivered(sink: Sink, session: str) -> None:
    """Entries delivered again in batches of another composition (other dedup tokens): physical copies."""
    flow = base_flow(session)
    write(sink, flow[:3])
    write(sink, flow[1:])
    write(sink, [flow[2], flow[0]])


def reinserted(sink: Sink, session: str) -> None:
    """The same batch inserted again (a crash between insert and ack): dropped by the dedup token."""
    flow = base_flow(session)
    write(sink, flow)
    write(sink, flow)  # the token is a function of the exact rows in order (worker/sink.batch_token)


def duplicate_ids(sink: Sink, session: str) -> None:
    """An explicit event_id sent in several entries; re-sent without a timestamp it takes its entry's time, so the
    copies disagree on ts (here the later copy is earlier than the session's first event)."""
    write(sink, [event(session, 1, "user_message", NOW_MS - 5000, "e-1", entry="1-1"),
                 event(session, 2, "llm_call", NOW_MS - 4000, "e-2", entry="1-2")])
    write(sink, [event(session, 2, "llm_call", None, "e-2", entry=f"{NOW_MS - 9000}-0"),
                 event(session, 3, "flow_completed", NOW_MS - 1000, "e-3", entry="1-3")])
    write(sink, [event(session, 3, "flow_completed", NOW_MS - 1000, "e-3", entry="1-4")])


@pytest.mark.parametrize("make_copies", [redelivered, reinserted, duplicate_ids])
def test_sessions_are_exact_whatever_copies_were_stored(store: Store, make_copies: Any) -> None:
    session = f"s-{make_copies.__name__}"
    sink = Sink(store)
    make_copies(sink, session)
    sink.rollup.flush()
    expected = from_visible_events(store, session)
    assert len(expected) == 1
    assert flow_session(store, session) == expected
    if make_copies is reinserted:
        assert physical_rows(store, session) == visible_rows(store, session) == 4
    else:
        assert physical_rows(store, session) > visible_rows(store, session)  # copies really are stored
    # Merges change nothing visible.
    for table in ("events", "sessions", "events_by_time"):
        store.command(f"OPTIMIZE TABLE flowtrack.{table} FINAL")
    assert flow_session(store, session) == expected


# -- the session's path in the rollup (migration 009) ------------------------------------------------------
def session_path(store: Store, session: str) -> list[str]:
    """The path of each (user, session) row of flow_session_paths."""
    _, rows = store.query("SELECT path FROM flowtrack.flow_session_paths WHERE session_id = {s:String} "
                          "ORDER BY user_id", {"s": session})
    return [str(r[0]) for r in rows]


def path_from_visible_events(store: Store, session: str) -> list[str]:
    """The path the obvious way: flow_events (events FINAL) in (ts, event_id) order."""
    _, rows = store.query("SELECT arrayStringConcat(arrayMap(e -> e.3, arraySort(groupArray((ts, event_id, "
                          "event_type)))), ' → ') FROM flowtrack.flow_events WHERE session_id = {s:String} "
                          "GROUP BY user_id ORDER BY user_id", {"s": session})
    return [str(r[0]) for r in rows]


@pytest.mark.parametrize(("make_copies", "expected"), [
    (redelivered, "user_message → llm_call → error → flow_completed"),
    (reinserted, "user_message → llm_call → error → flow_completed"),
    # e-2's last stored copy is the earliest event; its two copies are one step.
    (duplicate_ids, "llm_call → user_message → flow_completed"),
])
def test_a_sessions_path_is_exact_whatever_copies_were_stored(store: Store, make_copies: Any, expected: str) -> None:
    session = f"s-path-{make_copies.__name__}"
    sink = Sink(store)
    make_copies(sink, session)
    sink.rollup.flush()
    assert session_path(store, session) == path_from_visible_events(store, session) == [expected]
    for table in ("events", "sessions", "events_by_time"):
        store.command(f"OPTIMIZE TABLE flowtrack.{table} FINAL")
    assert session_path(store, session) == [expected]
    # flow_sessions keeps its contract columns; flow_session_paths is its rows plus the path.
    _, columns = store.query("SELECT name FROM system.columns WHERE database = 'flowtrack' AND table = 'flow_sessions' "
                             "ORDER BY position")
    assert ", ".join(str(c[0]) for c in columns) == SESSION_COLUMNS
    _, rows = store.query(f"SELECT {SESSION_COLUMNS} FROM flowtrack.flow_session_paths WHERE session_id = {{s:String}}",
                          {"s": session})
    assert [list(r) for r in rows] == flow_session(store, session)


def test_steps_at_the_same_time_are_in_event_id_order_however_they_arrived(store: Store) -> None:
    """Ties in time are broken by event_id, so the path depends on the events alone, not on arrival or merges."""
    sink = Sink(store)
    same_ms = NOW_MS - 2000
    steps = {"e-a": "llm_call", "e-b": "tool_call", "e-c": "error"}

    def tied(session: str, order: str) -> list[FlowEvent]:
        return [event(session, n, steps[f"e-{k}"], same_ms, f"e-{k}", entry=f"2-{n}") for n, k in enumerate(order)]

    write(sink, tied("s-tie-1", "bca"))  # one batch, arriving out of id order
    for single in tied("s-tie-2", "cab"):  # one batch per event, in another order
        write(sink, [single])
    write(sink, tied("s-tie-3", "abc"))
    write(sink, tied("s-tie-3", "cba"))  # redelivered, reversed
    sink.rollup.flush()
    expected = ["llm_call → tool_call → error"]
    for session in ("s-tie-1", "s-tie-2", "s-tie-3"):
        assert session_path(store, session) == expected, session
    store.command("OPTIMIZE TABLE flowtrack.events FINAL")
    sink.rollup.stored(["s-tie-1", "s-tie-2", "s-tie-3"])
    sink.rollup.flush()  # recomputed from the merged parts: same paths
    assert [session_path(store, s) for s in ("s-tie-1", "s-tie-2", "s-tie-3")] == [expected] * 3


@pytest.mark.parametrize(("steps", "marked"), [(50, False), (51, True), (300, True)])
def test_a_long_sessions_path_keeps_its_first_50_steps_and_a_marker(store: Store, steps: int, marked: bool) -> None:
    session = f"s-long-{steps}"
    sink = Sink(store)
    kinds = ["user_message"] + [("llm_call", "tool_call")[n % 2] for n in range(1, steps)]
    write(sink, [event(session, n, kind, NOW_MS - 100_000 + n, f"e-{n:04d}", entry=f"3-{n}")
                 for n, kind in enumerate(kinds)])
    sink.rollup.flush()
    path = session_path(store, session)[0]
    assert path == " → ".join(kinds[:50]) + (" → …" if marked else "")
    assert flow_session(store, session)[0][5] == steps  # the counts are not capped


def test_a_purged_step_leaves_the_path_and_a_fully_purged_session_leaves_no_row(store: Store) -> None:
    sink = Sink(store)
    # Entries of their own: a purge deletes by (session, event, stream, entry id).
    partly, wholly = [[event(session, n, kind, NOW_MS - 5000 + n, entry=f"{stream}-{n}")
                       for n, kind in enumerate(("user_message", "llm_call", "error", "flow_completed"))]
                      for session, stream in (("s-purge-part", 4), ("s-purge-all", 5))]
    write(sink, partly + wholly)
    sink.rollup.flush()
    assert session_path(store, "s-purge-part") == ["user_message → llm_call → error → flow_completed"]
    now_ms = int(time.time() * 1000)
    sink._purge([Refusal(e, "refused", now_ms) for e in (partly[2], *wholly)])  # as for rows ClickHouse refused
    sink.rollup.flush([(e.user_id, e.session_id) for e in (partly[2], *wholly)])
    assert session_path(store, "s-purge-part") == ["user_message → llm_call → flow_completed"]
    assert session_path(store, "s-purge-all") == [] and flow_session(store, "s-purge-all") == []
    # The tombstone is the latest row of the purged session: no path, is_deleted.
    _, rows = store.query("SELECT path, is_deleted FROM flowtrack.sessions WHERE session_id = 's-purge-all' "
                          "ORDER BY computed_at DESC LIMIT 1")
    assert rows == [("", 1)]


def test_a_duplicate_id_with_another_timestamp_is_one_event_at_its_last_stored_time(store: Store) -> None:
    """Identity is (session_id, event_id): the copy stored last is the event (the contract's refinement)."""
    session = "s-retimed"
    sink = Sink(store)
    duplicate_ids(sink, session)
    sink.rollup.flush()
    _, rows = store.query("SELECT event_id, toUnixTimestamp64Milli(ts) FROM flowtrack.flow_events "
                          "WHERE session_id = {s:String} ORDER BY event_id", {"s": session})
    assert rows == [("e-1", NOW_MS - 5000), ("e-2", NOW_MS - 9000), ("e-3", NOW_MS - 1000)]
    row = flow_session(store, session)[0]
    assert row[5] == 3 and row[7] == "completed"
    assert int(row[2].timestamp() * 1000) == NOW_MS - 9000  # started_at from the visible copy
    # The same event id in another session is another event.
    write(sink, [event("s-other", 1, "llm_call", NOW_MS, "e-2", entry="1-9")])
    sink.rollup.flush()
    assert visible_rows(store, "s-other") == 1 and visible_rows(store, session) == 3


def test_a_session_with_several_users_and_one_flow_reads(store: Store) -> None:
    """A session whose events name two users has one row per (user, session), as before; load_flow finds it."""
    from worker.flows import load_flow

    sink = Sink(store)
    write(sink, [event("s-two", 1, "user_message", NOW_MS - 3000, user="a"),
                 event("s-two", 2, "error", NOW_MS - 2000, user="b")])
    sink.rollup.flush()
    assert [r[0] for r in flow_session(store, "s-two")] == ["a", "b"]
    assert flow_session(store, "s-two") == from_visible_events(store, "s-two")
    flow = load_flow(store, "s-two")
    assert flow is not None and flow.user_id == "b" and flow.event_count == 1  # the latest active user


def test_a_session_re_sent_under_another_user_keeps_no_row_for_the_first(store: Store) -> None:
    """The same events (same event ids) stored again under another user: the session is the new user's alone, in the
    rollup as in the events; a session that really names two users keeps both rows (above)."""
    sink = Sink(store)
    first = [event("s-moved", n, ts_ms=NOW_MS - 5000 + n, event_id=f"e{n}", user="old") for n in range(3)]
    write(sink, first)
    sink.rollup.flush()
    assert [r[0] for r in flow_session(store, "s-moved")] == ["old"]
    write(sink, [event("s-moved", n, ts_ms=NOW_MS - 5000 + n, event_id=f"e{n}", user="new") for n in range(3)])
    sink.rollup.flush()
    assert [r[0] for r in flow_session(store, "s-moved")] == ["new"]
    assert flow_session(store, "s-moved") == from_visible_events(store, "s-moved")
    # Only some of them moved: both users keep a row, each with its own events.
    write(sink, [event("s-moved", 0, ts_ms=NOW_MS - 5000, event_id="e0", user="old")])
    sink.rollup.flush()
    assert [r[0] for r in flow_session(store, "s-moved")] == ["new", "old"]
    assert flow_session(store, "s-moved") == from_visible_events(store, "s-moved")


def test_pending_sessions_are_recomputed_when_quiet_or_when_enough_are_pending(store: Store) -> None:
    """Batches' sessions are recomputed together; nothing may stay pending once the streams go quiet."""
    sink = Sink(store)
    sink.rollup.max_delay_s = 0.3
    write(sink, [event("s-quiet", n, ts_ms=NOW_MS - 100 + n) for n in range(4)])
    assert sink.rollup.pending == 1
    deadline = time.monotonic() + 10
    while sink.rollup.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink.rollup.pending == 0
    while flow_session(store, "s-quiet") == [] and time.monotonic() < deadline:
        time.sleep(0.05)  # pending is emptied as the recompute starts (on its own connection): wait for its rows
    assert flow_session(store, "s-quiet") == from_visible_events(store, "s-quiet")
    sink.rollup.max_delay_s, sink.rollup.max_pending_sessions = 3600, 3
    write(sink, [event(f"s-many-{n}", 1, ts_ms=NOW_MS) for n in range(2)])
    assert sink.rollup.pending == 2
    write(sink, [event("s-many-2", 1, ts_ms=NOW_MS)])  # the third pending session: the timer thread recomputes now
    deadline = time.monotonic() + 10  # far below max_delay_s
    while any(flow_session(store, f"s-many-{n}") == [] for n in range(3)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink.rollup.pending == 0
    assert [flow_session(store, f"s-many-{n}")[0][5] for n in range(3)] == [1, 1, 1]


def test_a_recompute_that_fell_behind_holds_up_the_sink(store: Store) -> None:
    """Twice max_pending_sessions pending (the recompute cannot keep up with the inserts): the batch that gets there
    is recomputed in the sink's own thread before write() returns, which bounds what can be pending."""
    sink = Sink(store)
    sink.rollup.max_delay_s, sink.rollup.max_pending_sessions = 3600, 3
    write(sink, [event(f"s-behind-{n}", 1, ts_ms=NOW_MS) for n in range(6)])
    assert sink.rollup.pending == 0
    assert [flow_session(store, f"s-behind-{n}")[0][5] for n in range(6)] == [1] * 6


def test_the_rollup_recomputes_beside_the_inserts_not_between_them(store: Store) -> None:
    """The recompute runs on a connection of its own: while one holds it, the next batch is still stored."""
    sink = Sink(store)
    assert sink.rollup.store is not sink.store
    assert Sink(store).rollup.store is sink.rollup.store  # one second connection per store, however many sinks
    written = threading.Event()

    def write_a_batch() -> None:
        write(sink, [event("s-beside", 1, ts_ms=NOW_MS)])
        written.set()

    with sink.rollup.store._lock:  # what a long recompute holds
        writer = threading.Thread(target=write_a_batch, daemon=True)
        writer.start()
        assert written.wait(30), "the sink waited for the rollup's connection"
    writer.join(30)
    sink.rollup.flush()
    assert flow_session(store, "s-beside") == from_visible_events(store, "s-beside")


def test_a_busy_worker_recomputes_less_often_and_still_within_the_busy_delay(store: Store) -> None:
    """Many sessions pending when max_delay_s is up (a backlog draining): they wait up to busy_max_delay_s, then are
    recomputed, exactly; few pending ones keep the short delay."""
    sink = Sink(store)
    sink.rollup.max_delay_s, sink.rollup.busy_pending_sessions, sink.rollup.busy_max_delay_s = 0.2, 3, 2.0
    sessions = [f"s-busy-{n}" for n in range(3)]
    before_stored = time.monotonic()  # the oldest pending session's wait starts after this
    write(sink, [event(session, 1, ts_ms=NOW_MS) for session in sessions])
    time.sleep(0.8)  # well past max_delay_s: a quiet worker would have recomputed by now
    assert sink.rollup.pending == 3
    assert all(flow_session(store, session) == [] for session in sessions)
    deadline = time.monotonic() + 10
    while sink.rollup.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink.rollup.pending == 0 and time.monotonic() - before_stored >= 2.0
    while any(flow_session(store, s) == [] for s in sessions) and time.monotonic() < deadline:
        time.sleep(0.05)  # pending is emptied as the recompute starts: wait for its rows
    assert all(flow_session(store, session) == from_visible_events(store, session) for session in sessions)
    write(sink, [event(f"s-calm-{n}", 1, ts_ms=NOW_MS) for n in range(2)])  # below the busy threshold
    deadline = time.monotonic() + 10
    while sink.rollup.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink.rollup.pending == 0


def test_a_recompute_in_chunks_is_exact_for_every_session(store: Store) -> None:
    """More sessions pending than one recompute query takes: every chunk's sessions are recomputed, copies and all."""
    sink = Sink(store)
    sink.rollup.chunk_sessions, sink.rollup.max_delay_s = 2, 3600  # recomputed by flush() alone
    sessions = [f"s-chunk-{n}" for n in range(5)]
    for session in sessions[:3]:
        redelivered(sink, session)
    for session in sessions[3:]:
        duplicate_ids(sink, session)
    assert sink.rollup.pending == 5
    sink.rollup.flush()
    for session in sessions:
        expected = from_visible_events(store, session)
        assert len(expected) == 1 and flow_session(store, session) == expected


def test_the_closing_recompute_shares_its_sessions_with_the_sinks_connection(store: Store,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """At close the sink's connection is idle: it takes half of the pending sessions (each half in chunks of half
    the size: two queries hold what one would), and every session comes out exact; if a half fails, close() raises
    and every session stays pending."""
    monkeypatch.setattr(rollup_module, "SPLIT_MIN_SESSIONS", 4)
    used: list[tuple[int, int, int]] = []
    recompute_chunks = rollup_module._recompute_chunks

    def recording(on: Store, ids: Sequence[str], chunk_sessions: int) -> None:
        used.append((id(on), len(ids), chunk_sessions))
        recompute_chunks(on, ids, chunk_sessions)

    monkeypatch.setattr(rollup_module, "_recompute_chunks", recording)
    sink = Sink(store)
    sink.rollup.chunk_sessions, sink.rollup.max_delay_s = 4, 3600  # recomputed by close() alone, 2 per query
    sessions = [f"s-close-{n}" for n in range(7)]
    for session in sessions[:4]:
        redelivered(sink, session)
    for session in sessions[4:]:
        duplicate_ids(sink, session)
    sink.rollup.close()
    assert sorted(used) == sorted([(id(sink.rollup.store), 3, 2), (id(sink.store), 4, 2)])
    for session in sessions:
        expected = from_visible_events(store, session)
        assert len(expected) == 1 and flow_session(store, session) == expected

    failing = Sink(store)
    failing.rollup.max_delay_s = 3600
    write(failing, [event(f"s-close-fail-{n}", 1, ts_ms=NOW_MS) for n in range(6)])
    monkeypatch.setattr(store, "recompute_sessions", lambda sessions: Store.command(store, "SELECT throwIf(1)"))
    with pytest.raises(StoreRejectedError):
        failing.rollup.close()
    assert failing.rollup.pending == 6


def test_sessions_left_pending_by_a_stopped_worker_are_caught_up_at_start(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = Sink(store)
    sink._insert_events([event("s-stopped", n, ts_ms=NOW_MS - 100 + n) for n in range(3)]
                        + [event(f"s-stopped-{k}", 0, ts_ms=NOW_MS) for k in range(7)], int(time.time() * 1000))
    assert flow_session(store, "s-stopped") == []  # stored and (say) acknowledged, then the worker died
    # In chunks (a drain's ten minutes are hundreds of thousands of sessions): 8 sessions, 3 per statement.
    monkeypatch.setattr(store_module, "CATCH_UP_CHUNK_SESSIONS", 3)
    store.migrate()  # what `run` does at start
    assert flow_session(store, "s-stopped") == from_visible_events(store, "s-stopped")
    assert session_path(store, "s-stopped") == ["llm_call → llm_call → llm_call"]  # the catch-up fills the path too
    for k in range(7):
        assert flow_session(store, f"s-stopped-{k}") == from_visible_events(store, f"s-stopped-{k}") != []


def test_the_start_up_catch_up_leaves_no_row_for_a_user_the_session_no_longer_names(store: Store) -> None:
    """The catch-up recomputed the sessions a killed worker left pending but did not look for users they no longer
    name, as the worker's own recompute does: re-sent under another user, the session kept its first user's row
    (its events counted twice in status and history) until its next event (found by review)."""
    sink = Sink(store)
    write(sink, [event("s-moved-away", n, ts_ms=NOW_MS - 100 + n, event_id=f"m{n}", user="first") for n in range(2)])
    sink.rollup.flush()
    assert [r[0] for r in flow_session(store, "s-moved-away")] == ["first"]
    sink._insert_events([event("s-moved-away", n, ts_ms=NOW_MS - 100 + n, event_id=f"m{n}", user="second")
                         for n in range(2)], int(time.time() * 1000))  # stored, acknowledged, then the worker died
    store.migrate()  # what `run` does at start
    assert [r[0] for r in flow_session(store, "s-moved-away")] == ["second"]
    assert flow_session(store, "s-moved-away") == from_visible_events(store, "s-moved-away")


def test_an_insert_cut_off_before_its_time_ordered_copy_is_completed_at_start(store: Store) -> None:
    """An embedded engine killed mid-insert can leave the ``events`` part written and its materialized view's
    ``events_by_time`` part not (seen in the cluster kill -9 scenario). Reproduced exactly: the view detached for one
    insert. The next start gives those rows their time-ordered copy (once, however often it runs) and their
    sessions' rollup; rows that have their copy are left alone. Both before any recompute (the store's first insert
    was the one cut off: the rollup is empty) and after one."""
    if not store.embedded:
        pytest.skip("the start-up heal is the embedded engine's (a server finishes an insert its client left)")
    sink = Sink(store)
    sink.rollup.max_delay_s = 3600  # recomputed by flush() alone

    def cut_off(session: str) -> None:
        store.command("DETACH TABLE flowtrack.events_by_time_mv")
        try:
            sink._insert_events([event(session, n, ts_ms=NOW_MS - 100 + n) for n in range(3)],
                                int(time.time() * 1000))
        finally:
            store.command("ATTACH TABLE flowtrack.events_by_time_mv")

    def copies() -> list[tuple[str, int]]:
        return [tuple(row) for row in store.query("SELECT session_id, count() FROM flowtrack.events_by_time "
                                                  "GROUP BY session_id ORDER BY session_id")[1]]

    cut_off("s-cut-first")
    assert copies() == []
    store.migrate()
    assert copies() == [("s-cut-first", 3)]
    assert flow_session(store, "s-cut-first") == from_visible_events(store, "s-cut-first")
    sink.write([event("s-whole", n, ts_ms=NOW_MS - 200 + n) for n in range(2)], [])
    sink.rollup.flush()
    cut_off("s-cut-later")
    store.migrate()
    store.migrate()
    assert copies() == [("s-cut-first", 3), ("s-cut-later", 3), ("s-whole", 2)]
    for session in ("s-cut-first", "s-cut-later", "s-whole"):
        assert flow_session(store, session) == from_visible_events(store, session)
    assert [row[5] for row in flow_session(store, "s-cut-later")] == [3]


def test_rejections_are_visible_once(store: Store) -> None:
    from worker.normalize import Rejection

    sink = Sink(store)
    bad = [Rejection("flow_events", f"7-{n}", "missing session_id", "{}") for n in range(3)]
    sink.write([], bad)
    sink.write([], bad[1:])  # redelivered in another batch
    assert int(store.scalar("SELECT count() FROM flowtrack.rejected_events")) == 3
    assert int(store.scalar("SELECT count() FROM flowtrack.rejected")) == 5


def test_two_entries_rejected_under_one_reused_entry_id_are_both_kept(store: Store) -> None:
    """Redis lost its data and a chosen entry id came back with other content, broken too: the second rejection
    replaced the first (found by review). A rejection's identity holds what the entry held, as a derived event id does;
    the same entry rejected again (redelivered, replayed) is still one row."""
    from worker.normalize import Rejection

    sink = Sink(store)
    first = Rejection("flow_events:reused", "1700000000000-1", "missing node_id", '{"session_id": "a"}')
    second = Rejection("flow_events:reused", "1700000000000-1", "timestamp 'yesterday' is not a time",
                       '{"session_id": "b", "node_id": "n", "event_type": "t", "timestamp": "yesterday"}')
    sink.write([], [first])
    sink.write([], [second])
    sink.write([], [first])  # redelivered
    _, rows = store.query("SELECT reason, raw FROM flowtrack.rejected_events "
                          "WHERE source_stream = 'flow_events:reused' ORDER BY reason")
    assert [tuple(row) for row in rows] == [(first.reason, first.raw), (second.reason, second.raw)]


# -- retention ----------------------------------------------------------------------------------------
@pytest.fixture
def retention_store(clickhouse_url: str, store: Store) -> Iterator[Store]:
    """The session store with its TTLs put back to 'keep forever' afterwards (other tests store old events)."""
    try:
        yield store
    finally:
        store.retention_days = None
        store.migrate()


def ttls(store: Store) -> dict[str, str]:
    _, rows = store.query("SELECT name, engine_full FROM system.tables WHERE database = 'flowtrack' "
                          "AND name IN {names:Array(String)}", {"names": list(RETENTION_COLUMNS)})
    return {str(name): str(engine).split(" TTL ")[1].split(" SETTINGS")[0] if " TTL " in str(engine) else ""
            for name, engine in rows}


def test_retention_drops_old_events_sessions_and_rejections_and_can_change(retention_store: Store) -> None:
    store = retention_store
    sink = Sink(store)
    day_ms = 86_400_000
    old, recent = NOW_MS - 60 * day_ms, NOW_MS - day_ms
    write(sink, [event("s-old", n, ts_ms=old + n) for n in range(3)])
    write(sink, [event("s-recent", n, ts_ms=recent + n) for n in range(3)])
    # Times the contract takes past 2106-02-07 (32-bit DateTime's end): a TTL through DateTime wrapped and dropped them.
    far = [4_102_444_800_000, 5_680_281_600_000, 7_258_032_000_000]  # 2100-01-01, 2150-01-01, 2199-12-31
    write(sink, [event("s-far", n, ts_ms=far[n]) for n in range(3)])
    sink.rollup.flush()
    store.command("INSERT INTO flowtrack.rejected VALUES (fromUnixTimestamp64Milli({t:Int64}), 's', '1-1', 'r', '{}')",
                  {"t": old})
    store.retention_days = 30
    store.migrate()
    assert set(ttls(store).values()) == {f"{c} + toIntervalDay(30)" for c in RETENTION_COLUMNS.values()}
    for table in RETENTION_COLUMNS:
        store.command(f"OPTIMIZE TABLE flowtrack.{table} FINAL")
    assert visible_rows(store, "s-old") == 0 and physical_rows(store, "s-old") == 0
    assert visible_rows(store, "s-recent") == 3
    assert visible_rows(store, "s-far") == 3 and flow_session(store, "s-far")[0][5] == 3
    assert int(store.scalar("SELECT count() FROM flowtrack.events_by_time WHERE session_id = 's-far'")) == 3
    assert flow_session(store, "s-old") == [] and flow_session(store, "s-recent")[0][5] == 3
    assert int(store.scalar("SELECT count() FROM flowtrack.events_by_time WHERE session_id = 's-old'")) == 0
    assert int(store.scalar("SELECT count() FROM flowtrack.rejected_events")) == 0
    # Changeable later: another value replaces the TTL, unset removes it; re-running with the same value is a no-op.
    store.retention_days = 400
    store.migrate()
    assert set(ttls(store).values()) == {f"{c} + toIntervalDay(400)" for c in RETENTION_COLUMNS.values()}
    store.migrate()
    store.retention_days = None
    store.migrate()
    assert set(ttls(store).values()) == {""}


def test_retention_setting_is_read_from_the_environment() -> None:
    assert Settings.from_env({}).retention_days is None
    assert Settings.from_env({"FLOWTRACK_RETENTION_DAYS": "90"}).retention_days == 90
    from worker.errors import ConfigError

    for bad in ("0", "-3", "soon"):
        with pytest.raises(ConfigError):
            Settings.from_env({"FLOWTRACK_RETENTION_DAYS": bad})


# -- migration of a store at an old schema (001-005, 001-008) ------------------------------------------
# Runs in its own process: chDB allows one store path per process. It fills the store with the real pipeline at
# an old schema (migrations 001-005: the rollup did not exist then; 001-008: the rollup as the 008 worker wrote it,
# without paths), with redelivered copies, explicit duplicate ids and rejections, records what the public
# relations show, then runs today's `flowtrack migrate`.
# What the public relations show, read before and after the migration (the same queries both times).
PUBLIC_VIEW_QUERIES = {
    "events": "SELECT event_id, user_id, session_id, node_id, parent_id, event_type, toString(ts), "
              "toString(attributes) FROM flowtrack.flow_events ORDER BY event_id",
    "sessions": "SELECT user_id, session_id, toString(started_at), toString(last_event_at), toString(ended_at), "
                "event_count, error_count, status, duration_ms FROM flowtrack.flow_sessions "
                "ORDER BY user_id, session_id",
    "nodes": "SELECT * FROM flowtrack.flow_nodes ORDER BY session_id, node_id",
    "rejected": "SELECT source_stream, source_id, reason, raw FROM flowtrack.rejected_events "
                "ORDER BY source_stream, source_id",
}
EVENTS_SORTING_KEY = "SELECT sorting_key FROM system.tables WHERE database = 'flowtrack' AND name = 'events'"
OLD_STORE_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from worker import store as store_module, rollup
    from worker.pipeline import Pipeline
    from worker.settings import Settings

    redis_url, url, out, old_version = *sys.argv[1:4], int(sys.argv[4])
    settings = Settings(redis_url=redis_url, clickhouse_url=url, consumer="old", batch_max_rows=7,
                        batch_max_wait_s=0.05, block_ms=50)
    everything = store_module.load_migrations
    store_module.load_migrations = lambda directory=None: [m for m in everything(directory) if m.version <= old_version]
    store_module.Store._apply_retention = lambda self: None
    store_module.CATCH_UP_WINDOW = "SELECT '' WHERE 0"
    store_module.HEAL_EVENTS_BY_TIME = "SELECT 1"
    rollup.SessionRollup.stored = lambda self, *args, **kwargs: None

    async def fill():
        pipeline = Pipeline(settings)
        try:
            assert await pipeline.run(drain=True)
        finally:
            await pipeline.close()
    asyncio.run(fill())
    st = store_module.Store.open(settings)
    st.client.command("INSERT INTO flowtrack.events SELECT * FROM flowtrack.events WHERE node_id = 'n1'")
    if old_version >= 8:  # the 008 worker's recompute of every session (the rollup had no path column then)
        st.client.command("INSERT INTO flowtrack.sessions (user_id, session_id, started_at, last_event_at, closed_at, "
                          "event_count, error_count, end_count, computed_at, is_deleted) SELECT user_id, session_id, "
                          "started_at, last_event_at, closed_at, event_count, error_count, end_count, now64(6), 0 "
                          "FROM flowtrack.session_totals")
    queries = json.loads(open(out).read())
    seen = {k: [[str(v) for v in row] for row in st.query(q)[1]] for k, q in queries.items()}
    json.dump(seen, open(out, "w"))
""")
AFTER_SCRIPT = textwrap.dedent("""
    import json, sys
    from worker.settings import Settings
    from worker.store import Store
    url, out = sys.argv[1:3]
    st = Store.open(Settings(clickhouse_url=url))
    queries = json.loads(open(out).read())
    seen = {k: [[str(v) for v in row] for row in st.query(q)[1]] for k, q in queries.items()}
    json.dump(seen, open(out + ".after", "w"))
""")


@pytest.mark.parametrize("old_version", [5, 8])
def test_a_store_filled_at_the_old_schema_migrates_with_everything_visible_once(
        redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path, old_version: int) -> None:
    url = f"chdb://{tmp_path / 'old-store'}"
    entries: list[tuple[str, dict[str, str]]] = []
    for s in range(6):
        for n in range(1, 5):
            fields = {"session_id": f"s-{s}", "node_id": f"n{n}", "event_type": "llm_call", "user_id": f"u{s % 2}",
                      "timestamp": str(NOW_MS - 10_000 + s * 100 + n)}
            if n == 4:
                fields["event_type"] = "error" if s % 3 == 0 else "flow_completed"
            entries.append((f"flow_events:u{s % 2}", fields))
    # An explicit id sent twice (the second without a timestamp), and one entry that breaks the contract.
    entries.append(("flow_events:u0", {"session_id": "s-0", "node_id": "n9", "event_type": "tool_call",
                                       "user_id": "u0", "event_id": "dup", "timestamp": str(NOW_MS)}))
    entries.append(("flow_events:u0", {"session_id": "s-0", "node_id": "n9", "event_type": "tool_call",
                                       "user_id": "u0", "event_id": "dup"}))
    entries.append(("flow_events:u1", {"node_id": "n1", "event_type": "llm_call"}))
    xadd_all(redis_client, entries)

    before = tmp_path / "before.json"
    before.write_text(json.dumps({**PUBLIC_VIEW_QUERIES, "sorting_key": EVENTS_SORTING_KEY,
                                  "physical": "SELECT count() FROM flowtrack.events"}))
    subprocess.run([sys.executable, "-c", OLD_STORE_SCRIPT, redis_server.url, url, str(before), str(old_version)],
                   cwd=ROOT, check=True, timeout=180, env=_env())
    old = json.loads(before.read_text())
    assert old["sorting_key"] == [["event_id" if old_version < 6 else "session_id, event_id"]]
    assert int(old["physical"][0][0]) > len(old["events"])  # copies in the old table
    assert len(old["events"]) == 6 * 4 + 1 and len(old["rejected"]) == 1

    subprocess.run([sys.executable, "-m", "worker.cli", "migrate", "--clickhouse-url", url], cwd=ROOT, check=True,
                   timeout=180, env=_env(), capture_output=True)
    queries = {**PUBLIC_VIEW_QUERIES, "sorting_key": EVENTS_SORTING_KEY,
               "by_time": "SELECT count() FROM flowtrack.events_by_time FINAL",
               "paths": "SELECT user_id, session_id, path FROM flowtrack.flow_session_paths "
                        "ORDER BY user_id, session_id",
               "expected_paths": "SELECT user_id, session_id, arrayStringConcat(arrayMap(e -> e.3, "
                                 "arraySort(groupArray((ts, event_id, event_type)))), ' → ') "
                                 "FROM flowtrack.flow_events GROUP BY user_id, session_id ORDER BY user_id, session_id"}
    after_path = tmp_path / "after.json"
    after_path.write_text(json.dumps(queries))
    subprocess.run([sys.executable, "-c", AFTER_SCRIPT, url, str(after_path)], cwd=ROOT, check=True, timeout=120,
                   env=_env())
    new = json.loads((tmp_path / "after.json.after").read_text())
    assert new["sorting_key"] == [["session_id, event_id"]]
    for relation in ("events", "sessions", "nodes", "rejected"):
        assert new[relation] == old[relation], relation
    # 008 fills events_by_time from the events once each; a worker at 008 wrote it through its view, where an
    # explicit id re-sent without a timestamp in another batch sits at both of its times (008_rollups.sql). Here both
    # copies come in one batch, and the sink sends one copy per batch (the last: sink.last_copies).
    assert new["by_time"] == [[str(len(old["events"]))]]
    # Every old session has its path (009's backfill), the one its visible events give.
    assert len(new["paths"]) == len(old["sessions"]) == 6
    assert new["paths"] == new["expected_paths"]
    assert all(path.startswith("llm_call → llm_call → llm_call → ") for _, _, path in new["paths"])


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("FLOWTRACK_")}


def test_migrate_twice_and_a_rerun_after_a_crash_mid_swap_change_nothing(store: Store) -> None:
    """Guarded migrations run only while the old layout is in place: re-running 006/007/012 is a no-op, and 008
    (whose positional backfill does not fit the rollup once 009 added the path) is skipped after 009; 009 re-runs."""
    from worker.store import load_migrations

    sink = Sink(store)
    write(sink, base_flow("s-rerun"))
    sink.rollup.flush()
    before = flow_session(store, "s-rerun")
    guarded = [m for m in load_migrations() if m.only_if]
    assert {m.version for m in guarded} == {6, 7, 8, 10, 12}
    relayouts = [m for m in guarded if m.version != 10]  # 010's guard asks what the engine can do, not the layout
    for migration in relayouts:
        assert int(store.client.command(migration.only_if)) == 0
    store.command("ALTER TABLE flowtrack.schema_migrations DELETE WHERE version >= 6 SETTINGS mutations_sync = 1")
    store.migrate()
    assert flow_session(store, "s-rerun") == before and visible_rows(store, "s-rerun") == 4
    path = ["user_message → llm_call → error → flow_completed"]
    assert session_path(store, "s-rerun") == path
    store.command("ALTER TABLE flowtrack.schema_migrations DELETE WHERE version = 8 SETTINGS mutations_sync = 1")
    store.migrate()  # 008 alone again: skipped, the paths stay
    assert session_path(store, "s-rerun") == path and flow_session(store, "s-rerun") == before



def test_events_merge_wider_where_the_engine_has_the_setting(store: Store) -> None:
    """010: `events` merges ~20 parts of a size at once (fewer rewrites per event); the other tables keep the
    default. Guarded by the setting's presence, so a server without it records 010 and changes nothing."""
    from worker.store import load_migrations

    (widen,) = [m for m in load_migrations() if m.version == 10]
    assert widen.only_if is not None and int(store.client.command(widen.only_if)) == 1  # chDB has the setting
    ddl = {table: str(store.scalar("SELECT create_table_query FROM system.tables WHERE database = 'flowtrack' "
                                   "AND name = {t:String}", {"t": table}))
           for table in ("events", "events_by_time", "sessions", "session_spans")}
    assert "merge_selector_base = 20" in ddl["events"]
    assert not any("merge_selector_base" in ddl[t] for t in ("events_by_time", "sessions", "session_spans"))
    assert int(store.client.command(widen.only_if.replace("'merge_selector_base'", "'no_such_setting'"))) == 0


# -- a rollup part the engine wrote without being able to ------------------------------------------------
_ROLLUP_UNDER_A_FULL_DISK = textwrap.dedent("""
    import resource, sys
    from worker.normalize import Normalizer
    from worker.settings import Settings
    from worker.sink import Sink
    from worker.store import Store
    store = Store.open(Settings(clickhouse_url=sys.argv[1]))
    store.migrate()
    normalizer = Normalizer(("flow_completed",), ("error",))
    sink = Sink(store)
    events = [normalizer.normalize("flow_events:1", f"1-{i}", {b"session_id": f"s-{i % 7}".encode(),
              b"node_id": f"n{i}".encode(), b"event_type": b"llm_call"}) for i in range(70)]
    sink.write(events, [])
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))  # every file write beyond 1 byte fails (EFBIG)
    sink.rollup.flush()  # chDB finishes this INSERT ... SELECT without an error
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    # the worker goes on for an hour: later recomputes move the start-up catch-up's window past these sessions
    store.command("INSERT INTO flowtrack.sessions (user_id, session_id, computed_at, is_deleted) "
                  "VALUES ('9', 's-later', now64(6) + INTERVAL 1 HOUR, 0)")
""")


_NEXT_START = textwrap.dedent("""
    import json, sys
    from worker.settings import Settings
    from worker.store import Store
    store = Store.open(Settings(clickhouse_url=sys.argv[1]))
    broken = "SELECT count() FROM system.detached_parts WHERE database = 'flowtrack' AND startsWith(name, 'broken')"
    before = int(store.scalar(broken))
    store.migrate()
    _, rows = store.query("SELECT session_id, event_count FROM flowtrack.flow_sessions "
                          "WHERE session_id != 's-later' ORDER BY session_id")
    print(json.dumps({"broken_before": before, "broken_after": int(store.scalar(broken)),
                      "sessions": [[str(s), int(n)] for s, n in rows]}))
""")


def test_a_rollup_part_written_on_a_full_disk_is_rebuilt_at_the_next_start(tmp_path: Path) -> None:
    """chDB can finish the rollup's INSERT ... SELECT while its files cannot be written; the part is detached as
    broken when the store is next opened. The next start (migrate) must rebuild the sessions it held.
    Both steps run in processes of their own: chDB allows one store path per process."""
    url = f"chdb://{tmp_path / 'store'}"
    for script in (_ROLLUP_UNDER_A_FULL_DISK, _NEXT_START):
        proc = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, timeout=180,
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["sessions"] == [[f"s-{k}", 10] for k in range(7)]
    assert seen["broken_after"] == 0
    assert seen["broken_before"] >= 1, "the engine no longer breaks this part: the injected fault did not occur"


def test_copies_that_disagree_within_one_insert_show_the_same_copy_everywhere(store: Store) -> None:
    """An explicit event_id sent three times with other content in one batch (one insert, one ingested_at for all):
    the rollup, its path and every public view take the same copy, the last; the others are not stored."""
    session = "s-conflict"
    sink = Sink(store)
    write(sink, [event(session, 1, "user_message", NOW_MS - 5000, "e-1", entry="1-1"),
                 event(session, 2, "llm_call", NOW_MS - 4000, "e-2", entry="1-2"),
                 event(session, 2, "flow_failed", NOW_MS - 3000, "e-2", entry="1-3"),
                 event(session, 2, "tool_call", NOW_MS - 2000, "e-2", entry="1-4")])
    sink.rollup.flush()
    assert physical_rows(store, session) == visible_rows(store, session) == 2
    _, rows = store.query("SELECT event_id, event_type, toUnixTimestamp64Milli(ts) FROM flowtrack.flow_events "
                          "WHERE session_id = {s:String} ORDER BY event_id", {"s": session})
    assert rows == [("e-1", "user_message", NOW_MS - 5000), ("e-2", "tool_call", NOW_MS - 2000)]
    assert flow_session(store, session) == from_visible_events(store, session)
    assert session_path(store, session) == path_from_visible_events(store, session)


def test_one_sinks_inserts_never_share_a_version(store: Store) -> None:
    """Batches stored within one millisecond still get distinct ingested_at (the version that decides which copy of
    an event is the later one): later batch, later version, and the last copy is the one every relation shows."""
    sink = Sink(store)
    for n in range(30):
        sink.write([event("s-stamps", n, "llm_call", NOW_MS, f"e-{n}", entry=f"1-{n}"),
                    event("s-stamps", n, "llm_call", NOW_MS + n, "e-same", entry=f"2-{n}")], [])
    _, rows = store.query("SELECT event_id, toUnixTimestamp64Milli(ingested_at) FROM flowtrack.events "
                          "WHERE session_id = 's-stamps' AND event_id != 'e-same' ORDER BY ingested_at")
    assert [event_id for event_id, _ in rows] == [f"e-{n}" for n in range(30)]
    assert len({stamp for _, stamp in rows}) == 30
    _, shown = store.query("SELECT node_id FROM flowtrack.flow_events WHERE event_id = 'e-same'")
    assert shown == [("n29",)]
    sink.rollup.flush()
    assert flow_session(store, "s-stamps") == from_visible_events(store, "s-stamps")
    assert session_path(store, "s-stamps") == path_from_visible_events(store, "s-stamps")
