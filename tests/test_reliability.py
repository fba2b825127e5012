"""In-process reliability checks against a real redis-server and the real embedded ClickHouse engine:
poison isolation, reclaiming, deleted-while-pending entries, Redis restarts. Process-level faults
(kill -9, competing workers) live in tests/faults/."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import redis

from tests.conftest import drain, make_settings, xadd_all
from worker import sink
from worker.normalize import FlowEvent, Rejection
from worker.pipeline import Pipeline
from worker.poison import NARROWING_GROUPS, Group, is_poison, is_suspect
from worker.redisserver import RedisServer
from worker.settings import Settings
from worker.source import ClaimResult, Source
from worker.store import Store


def _event(session: str, node: str, **extra: str) -> dict[str, str]:
    return {"session_id": session, "node_id": node, "event_type": "llm_call", **extra}


@pytest.fixture
def poison_guard(store: Store) -> Iterator[None]:
    """A CHECK constraint that makes ClickHouse refuse any insert containing attributes['poison'] = '1'."""
    store.client.command(
        "ALTER TABLE flowtrack.events ADD CONSTRAINT IF NOT EXISTS test_poison_guard "
        "CHECK attributes['poison'] != '1'")
    try:
        yield
    finally:
        store.client.command("ALTER TABLE flowtrack.events DROP CONSTRAINT IF EXISTS test_poison_guard")


def test_rows_clickhouse_refuses_are_isolated_and_the_rest_lands(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str,
        poison_guard: None) -> None:
    entries = [("flow_events:1", _event("s1", f"n{i}", poison="1" if i in (7, 300, 301) else "0"))
               for i in range(500)]
    ids = xadd_all(redis_client, entries)
    pipeline = drain(make_settings(redis_server.url, clickhouse_url))

    stored = store.scalar("SELECT count() FROM flowtrack.flow_events")
    _, rejected = store.query("SELECT source_id, reason FROM flowtrack.rejected_events ORDER BY source_id")
    assert stored == 497
    assert sorted(r[0] for r in rejected) == sorted([ids[7], ids[300], ids[301]])
    assert all("ClickHouse refused the row" in r[1] and "test_poison_guard" in r[1] for r in rejected)
    assert pipeline.stats.rejected == 3
    assert redis_client.xpending("flow_events:1", "flowtrack")["pending"] == 0


def test_entries_of_a_dead_consumer_are_reclaimed(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    stream = "flow_events:2"
    xadd_all(redis_client, [(stream, _event("s2", f"n{i}")) for i in range(300)])
    redis_client.xgroup_create(stream, "flowtrack", id="0")
    redis_client.xreadgroup("flowtrack", "dead-worker", {stream: ">"}, count=120)  # dies holding 120
    time.sleep(0.3)
    pipeline = drain(make_settings(redis_server.url, clickhouse_url, claim_idle_ms=200))

    assert store.scalar("SELECT uniqExact(event_id) FROM flowtrack.flow_events") == 300
    assert pipeline.stats.claimed == 120
    assert redis_client.xpending(stream, "flowtrack")["pending"] == 0


def test_an_entry_delivered_alone_too_often_becomes_a_rejection(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    """Claimed from a dead consumer: past every narrowing level (its last delivery was alone) an entry is poison;
    one delivery short of that, it is tried alone once more, and stored."""
    stream = "flow_events:3"
    ids = xadd_all(redis_client, [(stream, _event("s3", f"n{i}")) for i in range(5)])
    redis_client.xgroup_create(stream, "flowtrack", id="0")
    redis_client.xreadgroup("flowtrack", "crashy", {stream: ">"}, count=5)
    redis_client.xack(stream, "flowtrack", *ids[2:])
    levels = len(NARROWING_GROUPS)
    redis_client.xclaim(stream, "flowtrack", "crashy", 0, [ids[0]], retrycount=5 + levels, justid=True)
    redis_client.xclaim(stream, "flowtrack", "crashy", 0, [ids[1]], retrycount=5 + levels - 1, justid=True)
    time.sleep(0.2)
    pipeline = drain(make_settings(redis_server.url, clickhouse_url, claim_idle_ms=100, claim_interval_s=0.1,
                                   max_deliveries=5))

    _, rows = store.query("SELECT source_id, reason FROM flowtrack.rejected_events")
    assert [r[0] for r in rows] == [ids[0]]
    assert f"delivered {6 + levels} times without being acknowledged, the last time alone" in rows[0][1]
    assert store.scalar("SELECT count() FROM flowtrack.flow_events WHERE node_id = 'n1'") == 1
    assert (pipeline.stats.poison, pipeline.stats.claimed) == (1, 2)
    assert redis_client.xpending(stream, "flowtrack")["pending"] == 0


def _hold(client: redis.Redis, stream: str, consumer: str, ids: list[str], deliveries: int) -> None:
    """As a worker that died ``deliveries`` times holding these entries leaves them."""
    client.xclaim(stream, "flowtrack", consumer, 0, ids, retrycount=deliveries, justid=True)


def _one_held_entry_per_stream(client: redis.Redis, prefix: str, streams: int, consumer: str,
                               deliveries: int) -> None:
    """``streams`` per-user streams ``<prefix><i>`` of one entry each, held by ``consumer`` after ``deliveries``."""
    for i in range(streams):
        stream = f"{prefix}{i}"
        [entry_id] = xadd_all(client, [(stream, _event(f"{prefix}{i}", "n0"))])
        client.xgroup_create(stream, "flowtrack", id="0")
        client.xreadgroup("flowtrack", consumer, {stream: ">"}, count=1)
        _hold(client, stream, consumer, [entry_id], deliveries)


def test_a_crash_loop_turns_no_good_entry_into_poison(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    """Our own pending entries left by a worker killed again and again (an OOM, a liveness probe) all count
    deliveries past FLOWTRACK_MAX_DELIVERIES: each is re-read in groups that narrow with its count, every group
    stored before the next is read, and all of them land (a count alone used to reject them all)."""
    stream = "flow_events:crash"
    ids = xadd_all(redis_client, [(stream, _event("s-crash", f"n{i}")) for i in range(300)])
    redis_client.xgroup_create(stream, "flowtrack", id="0")
    settings = make_settings(redis_server.url, clickhouse_url, max_deliveries=2)
    redis_client.xreadgroup("flowtrack", settings.consumer, {stream: ">"}, count=300)
    _hold(redis_client, stream, settings.consumer, ids[:200], 2)      # next delivery: level 1, groups of 4096
    _hold(redis_client, stream, settings.consumer, ids[200:290], 4)   # level 3: groups of 64
    _hold(redis_client, stream, settings.consumer, ids[290:], 6)      # level 5: alone
    pipeline = drain(settings)

    assert store.scalar("SELECT count() FROM flowtrack.flow_events WHERE session_id = 's-crash'") == 300
    assert store.scalar("SELECT count() FROM flowtrack.rejected_events") == 0
    assert (pipeline.stats.poison, pipeline.stats.narrowed) == (0, 300)
    # 200, then 64 and 26 (the level-5 entries narrow the group they would join), then ten alone
    assert pipeline.stats.batches == 13
    assert redis_client.xpending(stream, "flowtrack")["pending"] == 0


def test_claims_take_one_narrowed_group_at_a_time(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    """Entries of a dead consumer that died with them eight times (level 3 with FLOWTRACK_MAX_DELIVERIES=5): a claim
    takes 64 of them at most, and takes more only once those are stored."""
    stream = "flow_events:claimed"
    ids = xadd_all(redis_client, [(stream, _event("s-claimed", f"n{i}")) for i in range(150)])
    redis_client.xgroup_create(stream, "flowtrack", id="0")
    redis_client.xreadgroup("flowtrack", "dead", {stream: ">"}, count=150)
    _hold(redis_client, stream, "dead", ids, 7)
    time.sleep(0.2)
    pipeline = drain(make_settings(redis_server.url, clickhouse_url, claim_idle_ms=100, claim_interval_s=0.05,
                                   max_deliveries=5))

    assert store.scalar("SELECT count() FROM flowtrack.flow_events WHERE session_id = 's-claimed'") == 150
    assert (pipeline.stats.poison, pipeline.stats.claimed) == (0, 150)
    assert pipeline.stats.batches == 3  # 64, 64, 22


def test_entries_deleted_while_pending_are_reported(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    stream = "flow_events:4"
    ids = xadd_all(redis_client, [(stream, _event("s4", f"n{i}")) for i in range(10)])
    redis_client.xgroup_create(stream, "flowtrack", id="0")
    redis_client.xreadgroup("flowtrack", "dead-worker", {stream: ">"}, count=10)
    redis_client.xdel(stream, ids[2], ids[5])
    time.sleep(0.2)
    pipeline = drain(make_settings(redis_server.url, clickhouse_url, claim_idle_ms=100))

    assert store.scalar("SELECT count() FROM flowtrack.flow_events") == 8
    _, rows = store.query("SELECT source_id, reason FROM flowtrack.rejected_events ORDER BY source_id")
    assert sorted(r[0] for r in rows) == sorted([ids[2], ids[5]])
    assert all("deleted" in r[1] for r in rows)
    assert pipeline.stats.deleted_while_pending == 2
    assert redis_client.xpending(stream, "flowtrack")["pending"] == 0


def test_redis_restart_with_aof_loses_nothing(store: Store, clickhouse_url: str) -> None:
    server = RedisServer(appendonly=True).start()
    try:
        client = redis.Redis.from_url(server.url, protocol=2)
        settings = make_settings(server.url, clickhouse_url, socket_timeout_s=1.0)

        async def go() -> Pipeline:
            pipeline = Pipeline(settings)
            task = asyncio.create_task(pipeline.run())
            xadd_all(client, [("flow_events:5", _event("s5", f"a{i}")) for i in range(2000)])
            await asyncio.sleep(1.0)
            server.kill()
            await asyncio.sleep(1.0)
            server.start()
            xadd_all(client, [("flow_events:5", _event("s5", f"b{i}")) for i in range(2000)])
            await asyncio.sleep(1.5)
            pipeline.request_stop()
            await task
            await pipeline.close()
            drain = Pipeline(settings)
            assert await drain.run(drain=True)
            await drain.close()
            return pipeline

        pipeline = asyncio.run(go())
        assert store.scalar("SELECT uniqExact(node_id) FROM flowtrack.flow_events") == 4000
        assert store.scalar("SELECT count() FROM flowtrack.flow_events") == 4000
        assert pipeline.stats.source_failures >= 1
        assert client.xpending("flow_events:5", "flowtrack")["pending"] == 0
        client.close()
    finally:
        server.cleanup()


def test_redis_restarted_empty_is_not_a_crash_loop(store: Store, clickhouse_url: str) -> None:
    server = RedisServer().start()
    try:
        client = redis.Redis.from_url(server.url, protocol=2)
        settings = make_settings(server.url, clickhouse_url, socket_timeout_s=1.0, stream_rescan_s=0.2)

        async def go() -> None:
            pipeline = Pipeline(settings)
            task = asyncio.create_task(pipeline.run())
            xadd_all(client, [("flow_events", _event("s6", f"a{i}", user_id="6")) for i in range(100)])
            await asyncio.sleep(1.0)
            server.kill()
            server.start()  # no persistence: streams and groups are gone
            await asyncio.sleep(0.5)
            xadd_all(client, [("flow_events", _event("s6", f"b{i}", user_id="6")) for i in range(100)])
            await asyncio.sleep(2.0)
            pipeline.request_stop()
            await task
            await pipeline.close()

        asyncio.run(go())
        assert store.scalar("SELECT count() FROM flowtrack.flow_events WHERE node_id LIKE 'b%'") == 100
        assert store.scalar("SELECT count() FROM flowtrack.flow_events WHERE node_id LIKE 'a%'") == 100
        client.close()
    finally:
        server.cleanup()


@pytest.fixture
def poison_view(store: Store) -> Iterator[None]:
    """A materialized view that throws on attributes['poison'] = '1': its failure comes after the rows were
    written to events, so the insert is not atomic."""
    store.client.command(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS flowtrack.test_poison_view ENGINE = Null AS "
        "SELECT throwIf(attributes['poison'] = '1', 'poisoned row') AS x FROM flowtrack.events")
    try:
        yield
    finally:
        store.client.command("DROP VIEW IF EXISTS flowtrack.test_poison_view")


def test_rows_a_materialized_view_refuses_leave_no_trace(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str,
        poison_view: None) -> None:
    entries = [("flow_events:7", _event("s7" if i < 250 else "s8", f"n{i}",
                                        poison="1" if i in (3, 260) else "0")) for i in range(500)]
    entries.append(("flow_events:7", _event("s9", "n1", poison="1")))  # a session with no other event
    ids = xadd_all(redis_client, entries)
    drain(make_settings(redis_server.url, clickhouse_url))

    _, rejected = store.query("SELECT source_id FROM flowtrack.rejected_events")
    assert sorted(r[0] for r in rejected) == sorted([ids[3], ids[260], ids[500]])
    assert store.scalar("SELECT count() FROM flowtrack.flow_events") == 498
    assert store.scalar("SELECT countIf(attributes['poison'] = '1') FROM flowtrack.flow_events") == 0
    _, sessions = store.query("SELECT session_id, event_count FROM flowtrack.flow_sessions ORDER BY session_id")
    assert sessions == [("s7", 249), ("s8", 249)]
    # Nor in the time-ordered copy the live panels read.
    assert store.scalar("SELECT count() FROM flowtrack.events_by_time FINAL") == 498


@pytest.mark.parametrize("refusal", ["check-constraint", "materialized-view"])
def test_a_refused_copy_leaves_its_event_to_the_copy_before_it(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str,
        request: pytest.FixtureRequest, refusal: str) -> None:
    """Copies of an event in one batch go one per insert, the last first; when the store refuses the last, the event
    is what it would be had each copy come in a batch of its own: its latest accepted copy, the refused ones rejected.
    A refusing view writes the rows before it fails (not atomic): the fallback copy is inserted after, later."""
    request.getfixturevalue("poison_guard" if refusal == "check-constraint" else "poison_view")
    stream = "flow_events:12"
    entries = [_event("s12", "n-a", event_id="e1"), _event("s12", "n-b", event_id="e2"),
               _event("s12", "n-c", event_id="e1", poison="1"),
               # one accepted copy, then three equal refused ones (a producer's retries): refused without re-sending
               _event("s12", "n-d", event_id="e3"), *[_event("s12", "n-e", event_id="e3", poison="1")] * 3,
               # more refused versions of one event than the sink tries: the rest rejected, untried, with the reason
               *[_event("s12", f"n-p{i}", event_id="e4", poison="1") for i in range(10)]]
    ids = xadd_all(redis_client, [(stream, fields) for fields in entries])
    pipeline = drain(make_settings(redis_server.url, clickhouse_url))

    _, visible = store.query("SELECT event_id, node_id FROM flowtrack.flow_events ORDER BY event_id")
    assert visible == [("e1", "n-a"), ("e2", "n-b"), ("e3", "n-d")]
    _, rejected = store.query("SELECT source_id, reason FROM flowtrack.rejected_events")
    reasons = dict(rejected)
    assert sorted(reasons) == sorted([ids[2], *ids[4:7], *ids[7:17]])
    untried = [entry_id for entry_id, reason in reasons.items() if "were refused; this one was not tried" in reason]
    assert len(untried) == 10 - sink.MAX_COPY_GENERATIONS
    assert pipeline.stats.rejected == 14
    assert store.scalar("SELECT count() FROM flowtrack.events_by_time FINAL") == 3
    assert store.query("SELECT event_count FROM flowtrack.flow_sessions WHERE session_id = 's12'")[1] == [(3,)]
    assert redis_client.xpending(stream, "flowtrack")["pending"] == 0


def test_a_refused_entry_whose_id_was_reused_leaves_the_stored_event_alone(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str,
        poison_guard: None) -> None:
    """Redis lost its data and handed an entry id out again, to an entry the store refuses: only that entry's
    traces go; the event stored under the same id before stays, with its session's counts."""
    stream = "flow_events:13"
    redis_client.xadd(stream, _event("s13", "n1", event_id="old"), id="1700000000000-0")
    redis_client.xadd(stream, _event("s13", "n2", event_id="old-2"), id="1700000000000-1")
    drain(make_settings(redis_server.url, clickhouse_url))
    redis_client.delete(stream)
    redis_client.xadd(stream, _event("s14", "n1", event_id="new", poison="1"), id="1700000000000-0")
    redis_client.xadd(stream, _event("s14", "n2", event_id="new-2"), id="1700000000000-2")
    drain(make_settings(redis_server.url, clickhouse_url))

    _, visible = store.query("SELECT event_id FROM flowtrack.flow_events ORDER BY event_id")
    assert visible == [("new-2",), ("old",), ("old-2",)]
    _, sessions = store.query("SELECT session_id, event_count FROM flowtrack.flow_sessions ORDER BY session_id")
    assert sessions == [("s13", 2), ("s14", 1)]
    assert store.query("SELECT source_id FROM flowtrack.rejected_events")[1] == [("1700000000000-0",)]


@pytest.mark.parametrize(("events", "copies"), [(20, 0), (20, 5), (3, 9)],
                         ids=["distinct", "with-copies-of-an-event", "copies-of-fewer-events-than-the-threshold"])
def test_a_batch_refused_row_by_row_is_an_outage_not_poison(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str, events: int,
        copies: int) -> None:
    """When the store refuses every row of a batch, the store is what is wrong: nothing is rejected, nothing
    acknowledged, and the batch lands once the store accepts it again; also when the batch holds copies of an event
    (equal ones, or other versions of it, each sent in an insert of its own once the later one is refused)."""
    stream = "flow_events:9"
    xadd_all(redis_client, [(stream, _event("s9", f"n{i}", event_id=f"e{i}")) for i in range(events)]
             + [(stream, _event("s9", "n0" if events > 3 else f"n{i}", event_id=f"e{i % events}"))
                for i in range(copies)])
    store.client.command("ALTER TABLE flowtrack.events ADD CONSTRAINT IF NOT EXISTS test_refuse_all CHECK 0")
    # A long first backoff: the constraint is dropped while the worker waits, not in the middle of a split.
    settings = make_settings(redis_server.url, clickhouse_url, retry_initial_s=2.0, retry_max_s=2.0)

    async def go() -> tuple[Pipeline, int, int]:
        pipeline = Pipeline(settings)
        task = asyncio.create_task(pipeline.run())
        for _ in range(200):
            if pipeline.stats.sink_failures:
                break
            await asyncio.sleep(0.02)
        pending_during = int(redis_client.xpending(stream, "flowtrack")["pending"])
        rejected_during = int(store.scalar("SELECT count() FROM flowtrack.rejected_events"))
        store.client.command("ALTER TABLE flowtrack.events DROP CONSTRAINT IF EXISTS test_refuse_all")
        await asyncio.sleep(3.0)
        pipeline.request_stop()
        await task
        await pipeline.close()
        return pipeline, pending_during, rejected_during

    try:
        pipeline, pending_during, rejected_during = asyncio.run(go())
    finally:
        store.client.command("ALTER TABLE flowtrack.events DROP CONSTRAINT IF EXISTS test_refuse_all")
    assert (pending_during, rejected_during) == (events + copies, 0)
    assert pipeline.stats.sink_failures >= 1
    assert store.scalar("SELECT count() FROM flowtrack.flow_events") == events
    assert store.scalar("SELECT count() FROM flowtrack.rejected_events") == 0
    assert redis_client.xpending(stream, "flowtrack")["pending"] == 0


def test_an_ended_acknowledgement_holds_nothing(redis_server: RedisServer, redis_client: redis.Redis,
                                                clickhouse_url: str) -> None:
    """Redis restarted from a snapshot taken before an XACK gives the acknowledged entries back as our own pending
    ones. A re-read of them must take them, also while the acknowledgement's task has ended but is not reaped yet
    (it will not send its XACK again): skipped as "still on their way", they stayed pending for good and a drain
    never ended."""
    stream = "flow_events:14"
    ids = xadd_all(redis_client, [(stream, _event("s14", f"n{i}")) for i in range(3)])
    redis_client.xgroup_create(stream, "flowtrack", id="0")
    reply = redis_client.xreadgroup("flowtrack", "test-worker", {stream: ">"})  # delivered to us, as before the ack
    # As the pipeline reads them: [id, [name, value, ...]] (redis-py's XREADGROUP gives the fields as a dict).
    items = [[entry_id, [part for pair in fields.items() for part in pair]] for entry_id, fields in reply[0][1]]

    async def go() -> tuple[int, int]:
        pipeline = Pipeline(make_settings(redis_server.url, clickhouse_url))
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ended.set_result(None)
        acknowledged = pipeline._new_batch()
        acknowledged.ids_by_stream = {stream: list(ids)}
        acknowledged.rows = len(ids)
        pipeline._acking[ended] = acknowledged  # type: ignore[index]  # ended, not reaped
        pipeline._add_pending([(stream, items)])
        await pipeline.close()
        return pipeline._batch.rows, pipeline._inflight_rows()

    assert asyncio.run(go()) == (3, 3)


def test_a_stop_while_redis_does_not_answer_gives_up_the_acknowledgement(store: Store, clickhouse_url: str) -> None:
    """SIGTERM while Redis hangs (SIGSTOP: every call waits out the socket timeout) during an acknowledgement: the
    stop gives it up at the first failure (the entries stay pending, stored, deduplicated when redelivered) instead
    of retrying it through backoff, which outlasted a container's stop grace period. Nothing is lost."""
    server = RedisServer().start()
    try:
        assert server.process is not None
        client = redis.Redis.from_url(server.url, protocol=2)
        stream = "flow_events:15"
        xadd_all(client, [(stream, _event("s15", f"n{i}")) for i in range(300)])
        settings = make_settings(server.url, clickhouse_url, socket_timeout_s=1.0, retry_initial_s=5.0,
                                 retry_max_s=5.0)
        process = server.process

        async def go() -> float:
            pipeline = Pipeline(settings)
            real_ack = pipeline.source.ack
            stopped_at: list[float] = []

            async def ack_into_a_hung_redis(by_stream: dict[str, list[str]]) -> int:
                if not stopped_at:
                    os.kill(process.pid, signal.SIGSTOP)
                    stopped_at.append(0.0)
                    asyncio.get_running_loop().call_later(0.5, lambda: (stopped_at.append(time.monotonic()),
                                                                        pipeline.request_stop()))
                return await real_ack(by_stream)

            pipeline.source.ack = ack_into_a_hung_redis  # type: ignore[method-assign]
            await asyncio.wait_for(pipeline.run(), timeout=60)
            took = time.monotonic() - stopped_at[-1]
            os.kill(process.pid, signal.SIGCONT)
            await pipeline.close()
            return took

        took = asyncio.run(go())
        assert took < 5.0  # one failed attempt (~1.5 s here), not three with 5 s of backoff between them
        assert client.xpending(stream, "flowtrack")["pending"] == 300  # given up: pending, stored, not lost
        drain(settings)
        assert store.scalar("SELECT count() FROM flowtrack.flow_events") == 300
        assert client.xpending(stream, "flowtrack")["pending"] == 0
        client.close()
    finally:
        if server.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.process.pid, signal.SIGCONT)
        server.cleanup()


def test_narrowed_groups_shrink_by_level_and_only_suspects_narrow() -> None:
    limit = 5

    def admitted(prior: list[int], size: int) -> int:
        return Group(limit, size).admit(prior)

    by_level = [admitted([limit + level - 1] * 10_000, 10_000) for level in range(1, 7)]
    assert by_level == [*NARROWING_GROUPS, 10_000]  # level 6: poison, rejected without a store, narrows nothing
    assert admitted([0] * 3000, 1000) == 1000  # within the limit: the caller's COUNT
    assert admitted([0, 0, limit + 4], 1000) == 2  # a run within the limit ends before a narrowed entry
    assert admitted([limit + 4, 0], 1000) == 1  # level 5: alone
    assert admitted([limit, 0, 0], 1000) == 3  # a narrowed group takes the entries within the limit after it
    across = Group(limit, 1000)  # one group over several streams
    assert [across.admit([limit] * 3), across.admit([limit + 2] * 100), across.closed] == [3, 61, True]
    assert [is_suspect(d, limit) for d in (5, 6, 10, 11)] == [False, True, True, False]
    assert [is_poison(d, limit) for d in (10, 11)] == [False, True]


# -- narrowing, death by death -------------------------------------------------------------------------------------
# A worker's death mid-insert, in process: a BaseException out of the sink's write ends the run with nothing of that
# batch acknowledged, as SIGKILL would (tests/faults/test_crash_loop.py kills real processes); here the point is to
# see exactly which entries each insert held when the worker died.
class _Killed(BaseException):
    pass


def _life_that_dies(settings: Settings, monkeypatch: pytest.MonkeyPatch, dies_if: Callable[[set[str]], bool],
                    writes: list[set[str]], before_read: Callable[[], None] | None = None) -> None:
    """One worker life that dies in the first insert ``dies_if`` picks; ``writes``: each insert's entry ids."""
    original_write = sink.Sink.write

    def write(self: sink.Sink, events: Sequence[FlowEvent], rejections: Sequence[Rejection]) -> Any:
        ids = {e.source_id for e in events} | {r.source_id for r in rejections}
        writes.append(ids)
        if dies_if(ids):
            raise _Killed()
        return original_write(self, events, rejections)

    monkeypatch.setattr(sink.Sink, "write", write)
    if before_read is not None:
        original_note = Pipeline._note_own_pending

        def note(self: Pipeline, counts: dict[tuple[str, str], int]) -> None:
            original_note(self, counts)
            before_read()
        monkeypatch.setattr(Pipeline, "_note_own_pending", note)

    async def go() -> None:
        pipeline = Pipeline(settings)
        try:
            await asyncio.wait_for(pipeline.run(drain=True), 60)
        finally:
            await pipeline.close()

    with pytest.raises(_Killed):
        asyncio.run(go())
    monkeypatch.undo()


def test_a_narrowed_claim_waits_for_nothing_else_in_flight(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead consumer's entry whose next delivery is its last chance alone (level 5), under steady new traffic:
    it is claimed only once nothing else is in flight, and its insert holds it alone; dying there makes it poison,
    and only it."""
    stream = "flow_events:alone"
    redis_client.xgroup_create(stream, "flowtrack", id="0", mkstream=True)
    [x] = xadd_all(redis_client, [(stream, _event("s", "x"))])
    redis_client.xreadgroup("flowtrack", "dead", {stream: ">"}, count=1)
    _hold(redis_client, stream, "dead", [x], 6)  # FLOWTRACK_MAX_DELIVERIES=2: the claim is delivery 7, level 5
    settings = make_settings(redis_server.url, clickhouse_url, max_deliveries=2, claim_idle_ms=1500,
                             claim_interval_s=0.05, batch_max_wait_s=5)
    stop = threading.Event()

    def produce() -> None:
        client = redis.Redis.from_url(redis_server.url)
        sent = 0
        while not stop.is_set():
            client.xadd(stream, _event("s", f"n{sent}"))
            sent += 1
            time.sleep(0.003)

    producer = threading.Thread(target=produce)
    producer.start()
    writes: list[set[str]] = []
    try:
        _life_that_dies(settings, monkeypatch, lambda ids: x in ids, writes)
    finally:
        stop.set()
        producer.join()
    assert writes[-1] == {x}
    assert len(writes) > 1  # the new traffic was stored before, not held beside it

    drain(settings)
    _, rows = store.query("SELECT source_id, reason FROM flowtrack.rejected_events")
    assert [r[0] for r in rows] == [x] and "the last time alone" in rows[0][1]


def test_a_narrowed_entry_is_not_read_beside_the_entries_before_it(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Our own pending [i0 within the limit, x at level 5]: i0 is stored on its own first; a death in that insert
    costs x nothing (it was not read), and the next life stores both."""
    stream = "flow_events:own"
    ids = xadd_all(redis_client, [(stream, _event("s", f"n{i}")) for i in range(2)])
    redis_client.xgroup_create(stream, "flowtrack", id="0")
    settings = make_settings(redis_server.url, clickhouse_url, max_deliveries=2, batch_max_wait_s=5)
    redis_client.xreadgroup("flowtrack", settings.consumer, {stream: ">"}, count=2)
    _hold(redis_client, stream, settings.consumer, [ids[1]], 6)
    writes: list[set[str]] = []
    _life_that_dies(settings, monkeypatch, lambda w: ids[0] in w, writes)
    assert writes == [{ids[0]}]
    assert int(redis_client.xpending_range(stream, "flowtrack", ids[1], ids[1], 1)[0]["times_delivered"]) == 6

    drain(settings)
    assert store.scalar("SELECT count() FROM flowtrack.flow_events WHERE session_id = 's'") == 2
    assert store.scalar("SELECT count() FROM flowtrack.rejected_events") == 0


def test_a_narrowed_group_is_what_our_pending_list_holds_now(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer claims some of our pending entries after we counted them: the group is cut from what we hold at
    the read (ids, not a COUNT from a cursor), so the level-5 entry after the level-4 ones still goes alone."""
    stream = "flow_events:shrunk"
    ids = xadd_all(redis_client, [(stream, _event("s", f"n{i}")) for i in range(9)])
    redis_client.xgroup_create(stream, "flowtrack", id="0")
    settings = make_settings(redis_server.url, clickhouse_url, max_deliveries=2, batch_max_wait_s=5,
                             claim_idle_ms=600_000)
    redis_client.xreadgroup("flowtrack", settings.consumer, {stream: ">"}, count=9)
    _hold(redis_client, stream, settings.consumer, ids[:8], 5)  # level 4: groups of 8
    _hold(redis_client, stream, settings.consumer, [ids[8]], 6)  # level 5: alone

    def peer_claims() -> None:
        redis_client.xclaim(stream, "flowtrack", "peer", 0, ids[:3], justid=True)

    writes: list[set[str]] = []
    _life_that_dies(settings, monkeypatch, lambda w: ids[8] in w, writes, before_read=peer_claims)
    assert writes == [set(ids[3:8]), {ids[8]}]


def test_a_recovery_does_not_count_a_delivery_for_held_entries(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A claimed level-4 group is being stored when another stream vanishes: the source recovers and re-reads our
    pending entries from the start, which counts a delivery in Redis for the held ones too; they get their count
    back. The worker dies in that insert: at the next life they are at level 5, stored one by one, none rejected."""
    s, t = "flow_events:a", "flow_events:b"
    ids = xadd_all(redis_client, [(s, _event("s", f"n{i}")) for i in range(8)])
    xadd_all(redis_client, [(t, _event("t", "t0"))])
    redis_client.xgroup_create(s, "flowtrack", id="0")
    redis_client.xreadgroup("flowtrack", "dead", {s: ">"}, count=8)
    _hold(redis_client, s, "dead", ids, 5)  # FLOWTRACK_MAX_DELIVERIES=2: the claim is delivery 6, level 4
    time.sleep(0.2)
    settings = make_settings(redis_server.url, clickhouse_url, max_deliveries=2, claim_idle_ms=100,
                             claim_interval_s=0.05)

    def dies(w: set[str]) -> bool:
        if not set(ids) <= w:
            return False
        redis_client.delete(t)  # a per-user stream deleted meanwhile
        time.sleep(1.0)  # the loop goes on (and recovers) while the insert runs
        return True

    writes: list[set[str]] = []
    _life_that_dies(settings, monkeypatch, dies, writes)
    counts = {r["message_id"].decode(): r["times_delivered"] for r in redis_client.xpending_range(s, "flowtrack",
                                                                                                 "-", "+", 100)}
    assert counts == {i: 6 for i in ids}

    pipeline = drain(settings)
    assert store.scalar("SELECT count() FROM flowtrack.flow_events WHERE session_id = 's'") == 8
    assert store.scalar("SELECT count() FROM flowtrack.rejected_events") == 0
    assert pipeline.stats.batches == 8  # level 5: one by one


def test_narrowing_gathers_one_group_over_many_streams(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    """A crash loop over per-user streams leaves one pending entry of ours per stream at level 1: one group of
    them all (up to 4096) is one insert, not one insert per stream."""
    settings = make_settings(redis_server.url, clickhouse_url, max_deliveries=2)
    _one_held_entry_per_stream(redis_client, "flow_events:u", 300, settings.consumer, 2)
    pipeline = drain(settings, timeout_s=120)
    assert store.scalar("SELECT count() FROM flowtrack.flow_events") == 300
    # One group for all (the first read's is smaller: the in-flight byte budget starts from a cautious entry size).
    assert pipeline.stats.batches <= 3


def test_a_narrowed_read_does_not_take_back_what_a_peer_claimed_meanwhile(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer's claim round takes our listed entries between our XPENDING and our XCLAIM (found by review): our
    XCLAIM (min idle = the least idle time listed) leaves them to the peer, one delivery counted, not two."""
    stream = "flow_events:race"
    ids = xadd_all(redis_client, [(stream, _event("s", f"n{i}")) for i in range(8)])
    redis_client.xgroup_create(stream, "flowtrack", id="0")
    settings = make_settings(redis_server.url, clickhouse_url, max_deliveries=2, claim_idle_ms=600_000)
    redis_client.xreadgroup("flowtrack", settings.consumer, {stream: ">"}, count=8)
    _hold(redis_client, stream, settings.consumer, ids, 5)
    time.sleep(0.05)
    original = Source._claim_ids

    async def racing(self: Source, taken: dict[str, dict[str, int]], idle_ms: dict[str, int],
                     result: ClaimResult) -> None:
        for name, candidates in taken.items():
            redis_client.xclaim(name, "flowtrack", "peer", 0, list(candidates))
        await original(self, taken, idle_ms, result)

    monkeypatch.setattr(Source, "_claim_ids", racing)
    _run_for(settings, 2.0)
    held = {r["message_id"].decode(): (r["consumer"].decode(), r["times_delivered"])
            for r in redis_client.xpending_range(stream, "flowtrack", "-", "+", 100)}
    assert held == {i: ("peer", 6) for i in ids}


def _run_for(settings: Settings, seconds: float) -> Pipeline:
    async def go() -> Pipeline:
        pipeline = Pipeline(settings)
        task = asyncio.create_task(pipeline.run())
        await asyncio.sleep(seconds)
        pipeline.request_stop()
        await task
        await pipeline.close()
        return pipeline
    return asyncio.run(go())


def test_a_narrowed_stream_that_vanished_is_recovered_not_polled(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A narrowed stream deleted before its group is read (found by review): the narrowed read's NOGROUP owes a
    recovery, which drops the stream; the loop neither polls it again and again nor stops reading other streams."""
    gone, live = "flow_events:gone", "flow_events:live"
    [x] = xadd_all(redis_client, [(gone, _event("s", "x"))])
    redis_client.xgroup_create(gone, "flowtrack", id="0")
    redis_client.xgroup_create(live, "flowtrack", id="0", mkstream=True)
    settings = make_settings(redis_server.url, clickhouse_url, max_deliveries=2, claim_interval_s=4)
    redis_client.xreadgroup("flowtrack", settings.consumer, {gone: ">"}, count=1)
    _hold(redis_client, gone, settings.consumer, [x], 3)
    calls = 0
    original = Source.read_narrowed

    async def counting(self: Source, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            redis_client.delete(gone)
        return await original(self, *args)

    monkeypatch.setattr(Source, "read_narrowed", counting)

    async def go() -> int:
        pipeline = Pipeline(settings)
        task = asyncio.create_task(pipeline.run())
        await asyncio.sleep(1.0)
        redis_client.xadd(live, _event("u", "new"))
        await asyncio.sleep(2.0)  # within the claim interval: no claim round helps
        read = pipeline.stats.read
        pipeline.request_stop()
        await task
        await pipeline.close()
        return read

    assert asyncio.run(go()) >= 1  # the new entry of the other stream was read within the claim interval
    assert calls < 50


def test_a_dead_consumers_narrowed_entries_over_many_streams_are_one_claim(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead consumer leaves one level-1 entry on each of 10 streams (found by review): one claim round takes them
    as one group, not one stream per claim interval."""
    _one_held_entry_per_stream(redis_client, "flow_events:d", 10, "dead", 2)
    time.sleep(0.2)
    settings = make_settings(redis_server.url, clickhouse_url, max_deliveries=2, claim_idle_ms=100,
                             claim_interval_s=1.0)
    pipeline = drain(settings)
    assert store.scalar("SELECT count() FROM flowtrack.flow_events") == 10
    assert (pipeline.stats.claimed, pipeline.stats.batches) == (10, 1)


def test_a_narrowed_read_keeps_to_the_inflight_byte_budget(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash loop is often an OOM (found by review): our own 200 kB entries at level 1 are re-read within
    FLOWTRACK_MAX_INFLIGHT_BYTES, as they would be one level lower."""
    stream = "flow_events:big"
    blob = "x" * 200_000
    ids = xadd_all(redis_client, [(stream, _event("s", f"n{i}", payload=blob)) for i in range(60)])
    redis_client.xgroup_create(stream, "flowtrack", id="0")
    budget = 2 * 1024 * 1024
    settings = make_settings(redis_server.url, clickhouse_url, max_deliveries=2, max_inflight_bytes=budget)
    redis_client.xreadgroup("flowtrack", settings.consumer, {stream: ">"}, count=60)
    _hold(redis_client, stream, settings.consumer, ids, 2)
    peak = 0
    original = Pipeline._add_claimed

    def add_claimed(self: Pipeline, result: ClaimResult) -> int:
        nonlocal peak
        largest = original(self, result)
        peak = max(peak, self._inflight_bytes())
        return largest

    monkeypatch.setattr(Pipeline, "_add_claimed", add_claimed)
    drain(settings)
    assert store.scalar("SELECT count() FROM flowtrack.flow_events") == 60
    assert 0 < peak <= budget


def test_entries_deleted_while_pending_on_us_past_the_limit_are_reported(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    stream = "flow_events:del"
    ids = xadd_all(redis_client, [(stream, _event("s", f"n{i}")) for i in range(4)])
    redis_client.xgroup_create(stream, "flowtrack", id="0")
    settings = make_settings(redis_server.url, clickhouse_url, max_deliveries=2)
    redis_client.xreadgroup("flowtrack", settings.consumer, {stream: ">"}, count=4)
    _hold(redis_client, stream, settings.consumer, ids, 3)
    redis_client.xdel(stream, ids[1], ids[3])
    drain(settings, timeout_s=20)
    assert store.scalar("SELECT count() FROM flowtrack.flow_events") == 2
    _, rows = store.query("SELECT source_id, reason FROM flowtrack.rejected_events ORDER BY source_id")
    assert [r[0] for r in rows] == [ids[1], ids[3]] and all("deleted" in r[1] for r in rows)
    assert redis_client.xpending(stream, "flowtrack")["pending"] == 0


def test_a_lost_claim_reply_does_not_count_a_delivery(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis stalls (a slow script) past the socket timeout while our narrowed XCLAIM of a level-5 entry waits in
    its queue (found by review): Redis runs it (one delivery) but the reply is lost. The recovery gives the entry
    its count back, so it is delivered alone again and stored, not rejected with no worker ever dying."""
    stream = "flow_events:stall"
    [x] = xadd_all(redis_client, [(stream, _event("s", "x"))])
    redis_client.xgroup_create(stream, "flowtrack", id="0")
    settings = make_settings(redis_server.url, clickhouse_url, max_deliveries=2, socket_timeout_s=0.5)
    redis_client.xreadgroup("flowtrack", settings.consumer, {stream: ">"}, count=1)
    _hold(redis_client, stream, settings.consumer, [x], 6)  # the next delivery is level 5: alone
    original = Source._claim_ids
    stalls = 0

    async def stalled(self: Source, taken: dict[str, dict[str, int]], idle_ms: dict[str, int],
                      result: ClaimResult) -> None:
        nonlocal stalls
        if stalls == 0:
            stalls += 1
            busy = redis.Redis.from_url(redis_server.url)
            script = ("local t = redis.call('TIME'); local s = t[1] * 1000000 + t[2]; "
                      "repeat local n = redis.call('TIME') until n[1] * 1000000 + n[2] - s > 1200000")
            threading.Thread(target=lambda: busy.eval(script, 0), daemon=True).start()
            await asyncio.sleep(0.1)
        await original(self, taken, idle_ms, result)

    monkeypatch.setattr(Source, "_claim_ids", stalled)
    drain(settings, timeout_s=30)
    assert stalls == 1
    assert store.scalar("SELECT count() FROM flowtrack.flow_events") == 1
    assert store.scalar("SELECT count() FROM flowtrack.rejected_events") == 0


def test_a_dead_consumers_deep_narrowed_entries_over_many_streams_are_not_listed_again_and_again(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One level-5 entry (alone) of a dead consumer on each of 200 streams (found by review): once a claim round
    has its group it stops listing the other streams; it used to list every remaining one per round, n(n+1)/2
    XPENDING calls in all."""
    _one_held_entry_per_stream(redis_client, "flow_events:d", 200, "dead", 6)
    time.sleep(0.3)
    calls = 0
    original = Source._idle_pending_of_others

    async def counting(self: Source, stream: str, min_idle_ms: int, limit: int) -> dict[str, int]:
        nonlocal calls
        calls += 1
        return await original(self, stream, min_idle_ms, limit)

    monkeypatch.setattr(Source, "_idle_pending_of_others", counting)
    pipeline = drain(make_settings(redis_server.url, clickhouse_url, max_deliveries=2, claim_idle_ms=200),
                     timeout_s=120)
    assert store.scalar("SELECT count() FROM flowtrack.flow_events") == 200
    assert pipeline.stats.batches == 200  # level 5: each alone
    assert calls <= 2 * 200  # 20,100 before
