"""Many per-user streams (issue 11): slices bounded by the in-flight limit cover every stream, none starves,
packed reads return what redis-py's would, and the claim sweep finds pending work among thousands of streams.
Real redis-server; 5,000 streams here, 50,000 in `flowtrack bench --streams 50000`."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

from tests.conftest import drain, make_settings
from worker.pipeline import Pipeline
from worker.redisserver import RedisServer
from worker.source import Source
from worker.store import Store
from worker.streamset import (
    ClaimSweep,
    PackedReads,
    Rotation,
    execute_packed,
    execute_packed_many,
    others_pending,
    pipelined,
)

GROUP = "g"
STREAMS = [f"flow_events:{user}" for user in range(1, 5001)]


def _fill(client: redis.Redis, streams: list[str], per_stream: int) -> None:
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        for n in range(per_stream):
            pipe.xadd(stream, {"n": str(n)})
        pipe.xgroup_create(stream, GROUP, id="0")
    pipe.execute()


def _connect(server: RedisServer) -> aioredis.Redis:
    return aioredis.Redis.from_url(server.url, protocol=2, decode_responses=False)


def test_rotation_slices_cover_every_stream_once_per_turn() -> None:
    rotation = Rotation()
    rotation.set_streams(STREAMS)
    for size in (1, 7, 1000, 1999, 4999):
        seen: Counter[str] = Counter()
        for _ in range(-(-len(STREAMS) // size)):  # one turn: ceil(N / size) slices
            _, chosen = rotation.next_slice(size)
            assert len(chosen) == size
            seen.update(chosen)
        assert set(seen) == set(STREAMS)
        assert max(seen.values()) <= 2  # the last slice of a turn wraps into the next turn's first streams
    assert rotation.next_slice(10_000)[1] == STREAMS  # all of them when they fit


def test_rotation_is_caught_up_only_after_a_whole_empty_turn() -> None:
    rotation = Rotation()
    rotation.set_streams(STREAMS)
    rotation.note(2000, found=False)
    rotation.note(2000, found=False)
    assert not rotation.caught_up
    rotation.note(2000, found=True)  # entries found: a new turn must come back empty
    rotation.note(2000, found=False)
    rotation.note(2000, found=False)
    assert not rotation.caught_up
    rotation.note(1000, found=False)
    assert rotation.caught_up
    rotation.set_streams([*STREAMS, "flow_events:new"])  # a new stream has not been read yet
    assert not rotation.caught_up


def test_packed_reads_bounded_by_the_slice_read_every_entry_once(redis_server: RedisServer,
                                                                   redis_client: redis.Redis) -> None:
    _fill(redis_client, STREAMS, 2)

    async def read_all() -> tuple[Counter[tuple[bytes, bytes]], int]:
        client = _connect(redis_server)
        packed = PackedReads(GROUP, "c1")
        rotation = Rotation()
        rotation.set_streams(STREAMS)
        got: Counter[tuple[bytes, bytes]] = Counter()
        largest = 0
        try:
            while not rotation.caught_up:
                start, chosen = rotation.next_slice(1500)
                reply: Any = await execute_packed(client, packed.new_entries((rotation.version, start), chosen, 1,
                                                                             None))
                entries = [(stream, entry[0]) for stream, items in reply or () for entry in items]
                largest = max(largest, len(entries))
                got.update(entries)
                rotation.note(len(chosen), bool(entries))
        finally:
            await client.aclose()
        return got, largest

    got, largest = asyncio.run(read_all())
    assert largest <= 1500  # COUNT 1 over a 1,500-stream slice: never more, whatever the backlog
    assert len(got) == 2 * len(STREAMS) and set(got.values()) == {1}
    assert {stream.decode() for stream, _ in got} == set(STREAMS)  # no stream starved


def test_a_packed_read_replies_like_redis_py_and_from_ids_rereads_pending(redis_server: RedisServer,
                                                                          redis_client: redis.Redis) -> None:
    streams = STREAMS[:3]
    _fill(redis_client, streams, 2)

    async def run() -> tuple[Any, Any]:
        client = _connect(redis_server)
        packed = PackedReads(GROUP, "c1")
        try:
            first = await execute_packed(client, packed.new_entries("k", streams, 5, None))
            again = await execute_packed(client, packed.from_ids({s: "0" for s in streams}, 5))
            return first, again
        finally:
            await client.aclose()

    first, again = asyncio.run(run())
    assert [s.decode() for s, _ in first] == streams
    assert all(len(items) == 2 and items[0][1] == [b"n", b"0"] for _, items in first)
    assert again == first  # the same entries, now pending on c1, re-read by id


def test_a_blocking_read_over_thousands_of_streams_wakes_on_any_of_them(redis_server: RedisServer,
                                                                        redis_client: redis.Redis) -> None:
    pipe = redis_client.pipeline(transaction=False)
    for stream in STREAMS:
        pipe.xgroup_create(stream, GROUP, id="$", mkstream=True)  # empty streams: a caught-up group
    pipe.execute()

    async def run() -> list[float]:
        client = _connect(redis_server)
        writer = _connect(redis_server)
        packed = PackedReads(GROUP, "c1")
        waits = []
        try:
            for stream in random.Random(3).sample(STREAMS, 5):
                read = asyncio.ensure_future(execute_packed(client, packed.new_entries("all", STREAMS, 1, 5000)))
                await asyncio.sleep(0.1)
                started = time.monotonic()
                await writer.xadd(stream, {"n": "new"})
                reply = await read
                waits.append(time.monotonic() - started)
                assert [s.decode() for s, _ in reply] == [stream]
        finally:
            await client.aclose()
            await writer.aclose()
        return waits

    assert max(asyncio.run(run())) < 1.0  # woken by the entry, not by the 5 s block running out


def test_claim_sweep_finds_pending_work_on_one_stream_among_thousands(redis_server: RedisServer,
                                                                       redis_client: redis.Redis) -> None:
    _fill(redis_client, STREAMS, 1)
    dead_on = STREAMS[3777]
    redis_client.xreadgroup(GROUP, "dead", {dead_on: ">"}, count=1)  # pending on a consumer that is gone

    async def rounds() -> list[list[str]]:
        client = _connect(redis_server)
        sweep = ClaimSweep(per_round=1000)
        found_in = []
        try:
            for _ in range(7):
                streams = sweep.streams_for_round(STREAMS)
                assert len(streams) <= 1000 + len(sweep.with_others_pending)
                summaries = await pipelined(client, streams, "XPENDING", GROUP)
                for stream, summary in zip(streams, summaries, strict=True):
                    sweep.note(stream, others_pending(summary, "me"))
                found_in.append(sorted(sweep.with_others_pending))
        finally:
            await client.aclose()
        return found_in

    found_in = asyncio.run(rounds())
    assert found_in[3] == [dead_on]  # streams 3000..3999 are swept in the fourth round
    assert found_in[:3] == [[], [], []]
    assert found_in[4:] == [[dead_on]] * 3  # looked at again every round while work is pending there


def test_others_pending_counts_only_other_consumers() -> None:
    summary = {"pending": 5, "min": b"1-0", "max": b"5-0",
               "consumers": [{"name": b"me", "pending": 2}, {"name": b"dead", "pending": 3}]}
    assert others_pending(summary, "me") == 3
    assert others_pending(summary, "dead") == 2
    assert others_pending({"pending": 0, "min": None, "max": None, "consumers": []}, "me") == 0
    assert others_pending(redis.ResponseError("NOGROUP"), "me") == 0


# -- the worker on thousands of streams ------------------------------------------------------------------------

def _events(client: redis.Redis, streams: list[str], per_stream: int) -> int:
    pipe = client.pipeline(transaction=False)
    for n, stream in enumerate(streams):
        for i in range(per_stream):
            pipe.xadd(stream, {"session_id": f"s-{n}", "node_id": f"n-{i}", "event_type": "llm_call",
                               "timestamp": str(1_735_689_600_000 + i)})
    pipe.execute()
    return len(streams) * per_stream


def _count(store: Store, sql: str) -> int:
    return int(store.query(sql)[1][0][0])


def _drain_counting_entries_per_read(settings: Any, timeout_s: float) -> list[int]:
    """Drain with every Source.read counted: the entries each read returned."""
    per_read: list[int] = []
    original_read = Source.read

    async def measured_read(self: Source, count: int, block_ms: int | None, max_streams: int | None = None,
                            pending_streams: Sequence[str] | None = None) -> list[tuple[str, list[Any]]]:
        groups = await original_read(self, count, block_ms, max_streams, pending_streams)
        per_read.append(sum(len(items) for _, items in groups))
        return groups

    Source.read = measured_read  # type: ignore[method-assign]
    try:
        drain(settings, timeout_s=timeout_s)
    finally:
        Source.read = original_read  # type: ignore[method-assign]
    return per_read


def test_worker_drains_thousands_of_streams_with_reads_bounded_by_the_inflight_limit(
        redis_server: RedisServer, redis_client: redis.Redis, clickhouse_url: str, store: Store) -> None:
    produced = _events(redis_client, STREAMS, 2)
    settings = make_settings(redis_server.url, clickhouse_url, streams=("flow_events:*",), batch_max_rows=400,
                             max_inflight_rows=800, read_count=100)
    largest = _drain_counting_entries_per_read(settings, timeout_s=180)
    assert max(largest) <= 800  # COUNT 1 x 5,000 streams would have been 5,000 entries in one read
    assert _count(store, "SELECT count() FROM flowtrack.flow_events") == produced
    assert _count(store, "SELECT uniqExact(source_stream) FROM flowtrack.flow_events") == len(STREAMS)
    assert sum(int(g["pending"]) for s in STREAMS[:50] for g in redis_client.xinfo_groups(s)) == 0


def test_a_caught_up_worker_stores_an_event_on_any_of_thousands_of_streams_promptly(
        redis_server: RedisServer, redis_client: redis.Redis, clickhouse_url: str, store: Store) -> None:
    pipe = redis_client.pipeline(transaction=False)
    for stream in STREAMS:
        pipe.xgroup_create(stream, "flowtrack", id="$", mkstream=True)
    pipe.execute()
    settings = make_settings(redis_server.url, clickhouse_url, streams=("flow_events:*",), batch_max_wait_s=0.25,
                             block_ms=200, max_inflight_rows=2000, batch_max_rows=1000, claim_interval_s=5.0)
    chosen = random.Random(11).sample(STREAMS, 6)

    async def run() -> list[float]:
        pipeline = Pipeline(settings)
        task = asyncio.create_task(pipeline.run())
        writer = aioredis.Redis.from_url(redis_server.url, protocol=2)
        waits = []
        try:
            await asyncio.sleep(3)  # started and caught up (nothing to read)
            for n, stream in enumerate(chosen):
                started = time.monotonic()
                await writer.xadd(stream, {"session_id": f"probe-{n}", "node_id": "p", "event_type": "probe"})
                while pipeline.stats.acked < n + 1:
                    assert time.monotonic() - started < 10, f"event on {stream} not stored within 10 s"
                    await asyncio.sleep(0.01)
                waits.append(time.monotonic() - started)
            stop_started = time.monotonic()
            pipeline.request_stop()
            await asyncio.wait_for(task, timeout=10)
            waits.append(time.monotonic() - stop_started)
        finally:
            await writer.aclose()
            await pipeline.close()
        return waits

    *waits, stop_s = asyncio.run(run())
    # 5,000 streams over 2,000-stream slices: a blocking read per slice (200 ms), then the batch wait (250 ms)
    assert max(waits) < 2.0, waits
    assert stop_s < 2.0  # SIGTERM is prompt: the blocking read ends within its block
    assert _count(store, "SELECT count() FROM flowtrack.flow_events WHERE event_type = 'probe'") == len(chosen)


def test_claim_finds_a_dead_consumers_entries_on_one_stream_among_thousands(
        redis_server: RedisServer, redis_client: redis.Redis, clickhouse_url: str, store: Store) -> None:
    produced = _events(redis_client, STREAMS, 1)
    dead_on = STREAMS[4321]
    pipe = redis_client.pipeline(transaction=False)
    for stream in STREAMS:
        pipe.xgroup_create(stream, "flowtrack", id="0")
    pipe.execute()
    redis_client.xreadgroup("flowtrack", "dead-worker", {dead_on: ">"}, count=1)

    drain(make_settings(redis_server.url, clickhouse_url, streams=("flow_events:*",), claim_idle_ms=200,
                        claim_interval_s=0.1), timeout_s=180)

    assert _count(store, "SELECT count() FROM flowtrack.flow_events") == produced
    assert _count(store, f"SELECT count() FROM flowtrack.flow_events WHERE source_stream = '{dead_on}'") == 1
    assert redis_client.xpending(dead_on, "flowtrack")["pending"] == 0


def test_packed_acks_acknowledge_like_xack_and_return_error_replies(redis_server: RedisServer,
                                                                      redis_client: redis.Redis) -> None:
    streams = STREAMS[:300]
    _fill(redis_client, streams, 3)
    redis_client.xreadgroup(GROUP, "c1", dict.fromkeys(streams, ">"), count=3)
    by_stream = {s: [e[0].decode() for e in redis_client.xrange(s)] for s in streams}
    redis_client.set("flow_events:string", "x")
    by_stream["flow_events:string"] = ["1-0"]  # WRONGTYPE: an error reply among the others

    async def run() -> list[Any]:
        client = _connect(redis_server)
        try:
            packed, commands = PackedReads(GROUP, "c1").acks(by_stream, ids_per_command=2)
            assert commands == 2 * len(streams) + 1  # 3 ids per stream, at most 2 per XACK
            return await execute_packed_many(client, packed, commands)
        finally:
            await client.aclose()

    replies = asyncio.run(run())
    assert sum(r for r in replies if isinstance(r, int)) == 3 * len(streams)
    assert [type(r) for r in replies if not isinstance(r, int)] == [redis.ResponseError]
    assert sum(redis_client.xpending(s, GROUP)["pending"] for s in streams) == 0


def test_at_a_steady_rate_batches_fill_for_their_wait_instead_of_flushing_after_every_read(
        redis_server: RedisServer, redis_client: redis.Redis, clickhouse_url: str, store: Store) -> None:
    streams = STREAMS[:10]
    pipe = redis_client.pipeline(transaction=False)
    for stream in streams:
        pipe.xgroup_create(stream, "flowtrack", id="$", mkstream=True)
    pipe.execute()
    settings = make_settings(redis_server.url, clickhouse_url, streams=("flow_events:*",), batch_max_wait_s=0.25,
                             block_ms=200)

    async def run() -> int:
        pipeline = Pipeline(settings)
        task = asyncio.create_task(pipeline.run())
        writer = aioredis.Redis.from_url(redis_server.url, protocol=2)
        try:
            await asyncio.sleep(2)
            for n in range(300):  # ~3 s at ~100 events/s, one event at a time
                await writer.xadd(streams[n % 10], {"session_id": f"s-{n}", "node_id": "n", "event_type": "t"})
                await asyncio.sleep(0.01)
            while pipeline.stats.acked < 300:
                await asyncio.sleep(0.05)
            pipeline.request_stop()
            await asyncio.wait_for(task, timeout=10)
        finally:
            await writer.aclose()
            await pipeline.close()
        return pipeline.stats.batches

    batches = asyncio.run(run())
    assert batches <= 30, batches  # ~3.5 s of events at one batch per 0.25 s wait: ~14, not one per event
    assert _count(store, "SELECT count() FROM flowtrack.flow_events") == 300


def test_a_busy_stream_among_thousands_is_read_in_a_few_reads_not_one_entry_per_turn(
        redis_server: RedisServer, redis_client: redis.Redis, clickhouse_url: str) -> None:
    """A slice read takes one entry per stream (COUNT 1 x thousands of streams): a stream it left entries in is read
    again at once with the COUNT their few streams allow, and the turn goes on (a session's burst on one user's
    stream would otherwise wait one turn per entry: seconds at 50,000 streams)."""
    pipe = redis_client.pipeline(transaction=False)
    for stream in STREAMS:
        pipe.xgroup_create(stream, GROUP, id="$", mkstream=True)
    pipe.execute()
    busy, quiet = STREAMS[1234], STREAMS[4321]
    for n in range(300):
        redis_client.xadd(busy, {"n": str(n)})
    redis_client.xadd(quiet, {"n": "0"})
    settings = make_settings(redis_server.url, clickhouse_url, streams=("flow_events:*",), group=GROUP,
                             read_count=1000)
    room = 2000  # rows the pipeline would allow in flight: slices of 2,000 streams, COUNT 1

    async def run() -> tuple[list[tuple[int, int, int]], Counter[str]]:
        source = Source(settings)
        reads: list[tuple[int, int, int]] = []  # (streams asked, COUNT, entries)
        got: Counter[str] = Counter()
        try:
            await source.discover(force=True)
            while sum(got.values()) < 301 and len(reads) < 400:
                width = source.next_read_width()
                count = max(1, min(settings.read_count, room // width))
                groups = await source.read(count, None, max_streams=room // count)
                reads.append((width, count, sum(len(items) for _, items in groups)))
                got.update({stream: len(items) for stream, items in groups})
        finally:
            await source.close()
        return reads, got

    reads, got = asyncio.run(run())
    assert got == Counter({busy: 300, quiet: 1})
    assert len(reads) <= 8, reads  # one entry per turn of 3 slices would have been ~900 reads
    assert any(width == 1 and count == 1000 for width, count, _ in reads)  # the follow-up read: one stream, more


def test_one_read_holds_at_most_max_entries_per_read(
        redis_server: RedisServer, redis_client: redis.Redis, clickhouse_url: str, store: Store) -> None:
    """The reply of one read lives until its entries are in the batch: over 100 streams one read takes at most
    MAX_ENTRIES_PER_READ entries, not half the in-flight rows (20,000), and the drain stores every entry."""
    from worker.pipeline import MAX_ENTRIES_PER_READ

    streams = STREAMS[:100]
    produced = _events(redis_client, streams, 300)
    settings = make_settings(redis_server.url, clickhouse_url, streams=("flow_events:*",))
    per_read = _drain_counting_entries_per_read(settings, timeout_s=120)
    assert MAX_ENTRIES_PER_READ // 2 < max(per_read) <= MAX_ENTRIES_PER_READ < 20_000
    assert _count(store, "SELECT count() FROM flowtrack.flow_events") == produced


def _calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_worker_with_no_stream_to_consume_waits_and_rescans_at_its_interval(
        redis_server: RedisServer, redis_client: redis.Redis, clickhouse_url: str, store: Store) -> None:
    """No stream yet (an empty Redis, every per-user stream deleted, the default name holding a string): the worker
    rescanned at every step and never waited, a core spun and Redis took thousands of SCANs a second (found by
    review). It waits as a read would and rescans every FLOWTRACK_STREAM_RESCAN_S; the first stream is still found."""
    redis_client.flushdb()
    redis_client.set("flow_events", "not a stream")
    settings = make_settings(redis_server.url, clickhouse_url, streams=("flow_events", "flow_events:*"),
                             stream_rescan_s=1.0, block_ms=200)

    async def run() -> tuple[int, int]:
        pipeline = Pipeline(settings)
        task = asyncio.create_task(pipeline.run())
        try:
            await asyncio.sleep(1.0)  # started
            scans, creates = _calls(redis_client, "scan"), _calls(redis_client, "xgroup|create")
            await asyncio.sleep(3.0)
            scans, creates = _calls(redis_client, "scan") - scans, _calls(redis_client, "xgroup|create") - creates
            redis_client.xadd("flow_events:9", {"session_id": "s-late", "node_id": "n", "event_type": "t"})
            deadline = time.monotonic() + 10
            while pipeline.stats.acked < 1:
                assert time.monotonic() < deadline, "the first stream was not found"
                await asyncio.sleep(0.05)
            pipeline.request_stop()
            await asyncio.wait_for(task, timeout=10)
        finally:
            await pipeline.close()
        return scans, creates

    scans, creates = asyncio.run(run())
    assert scans <= 8 and creates <= 8, (scans, creates)  # a few rescans in 3 s, not thousands
    assert _count(store, "SELECT count() FROM flowtrack.flow_events WHERE session_id = 's-late'") == 1


def test_streams_found_after_start_are_read_from_their_oldest_entry_whatever_the_start_id(
        redis_server: RedisServer, redis_client: redis.Redis, clickhouse_url: str, store: Store) -> None:
    """FLOWTRACK_GROUP_START_ID=$ skips what the streams held at start; a stream created (or re-created) while the
    worker runs holds only new entries, but its group was created at $ too: the entries written before the next
    scan found it were skipped, silently (found by review). A key spelled like the pattern (`flow_events:*`) and
    deleted is not re-created either."""
    redis_client.flushdb()
    redis_client.xadd("flow_events:1", {"session_id": "s-before", "node_id": "n", "event_type": "t"})
    redis_client.xadd("flow_events:*", {"session_id": "s-literal", "node_id": "n", "event_type": "t"})
    settings = make_settings(redis_server.url, clickhouse_url, streams=("flow_events:*",), group_start_id="$",
                             stream_rescan_s=1.0, block_ms=200)

    async def run() -> None:
        pipeline = Pipeline(settings)
        task = asyncio.create_task(pipeline.run())
        try:
            await asyncio.sleep(1.5)
            redis_client.delete("flow_events:*")
            for n in range(5):
                redis_client.xadd("flow_events:42", {"session_id": "s-new", "node_id": f"n{n}", "event_type": "t"})
            redis_client.xadd("flow_events:1", {"session_id": "s-after", "node_id": "n", "event_type": "t"})
            deadline = time.monotonic() + 15
            while pipeline.stats.acked < 6:
                assert time.monotonic() < deadline, f"stored {pipeline.stats.acked} of 6"
                await asyncio.sleep(0.05)
            await asyncio.sleep(2.5)  # two more rescans, and a recovery if one were due
            pipeline.request_stop()
            await asyncio.wait_for(task, timeout=10)
        finally:
            await pipeline.close()

    asyncio.run(run())
    sessions = dict(store.query("SELECT session_id, count() FROM flowtrack.flow_events "
                                "WHERE session_id IN ('s-before', 's-literal', 's-new', 's-after') "
                                "GROUP BY session_id")[1])
    assert sessions == {"s-new": 5, "s-after": 1}  # $ at start: what was there then is skipped, as asked
    assert not redis_client.exists("flow_events:*")


def test_a_trim_pass_over_thousands_of_streams_runs_beside_the_reads(
        redis_server: RedisServer, redis_client: redis.Redis, clickhouse_url: str, store: Store) -> None:
    """A trim pass asks every stream for its groups and pending entries: over 20,000 streams 8 s with reading stopped
    (probe latency 52 s at a 5 s interval) and a SIGTERM waiting for it (found by review). It runs beside the reads,
    and a stop does not wait for it."""
    redis_client.flushdb()
    streams = [f"flow_events:t{n}" for n in range(20_000)]
    pipe = redis_client.pipeline(transaction=False)
    for stream in streams:
        pipe.xgroup_create(stream, "flowtrack", id="$", mkstream=True)
    pipe.execute()
    settings = make_settings(redis_server.url, clickhouse_url, streams=("flow_events:t*",), trim_enabled=True,
                             trim_interval_s=3600.0, batch_max_wait_s=0.1, block_ms=100)

    async def run() -> tuple[float, bool, float]:
        pipeline = Pipeline(settings)
        task = asyncio.create_task(pipeline.run())
        try:
            deadline = time.monotonic() + 30
            while pipeline._trimming is None:  # the first step starts the pass
                assert time.monotonic() < deadline, "no trim pass started"
                await asyncio.sleep(0.01)
            redis_client.xadd("flow_events:t7", {"session_id": "s-probe", "node_id": "n", "event_type": "t"})
            started = time.monotonic()
            while pipeline.stats.acked < 1:
                assert time.monotonic() - started < 20, "the probe was not stored"
                await asyncio.sleep(0.01)
            stored_s, pass_running = time.monotonic() - started, pipeline._trimming is not None
            stop_started = time.monotonic()
            pipeline.request_stop()
            await asyncio.wait_for(task, timeout=20)
            return stored_s, pass_running, time.monotonic() - stop_started
        finally:
            await pipeline.close()

    stored_s, pass_running, stop_s = asyncio.run(run())
    assert pass_running, f"the pass ended before the probe was stored ({stored_s:.2f} s): nothing was shown"
    assert stop_s < 2.0, stop_s
    assert _count(store, "SELECT count() FROM flowtrack.flow_events WHERE session_id = 's-probe'") == 1


def test_status_over_more_streams_than_one_pipeline_reports_each_and_draws_the_most_behind(
        redis_server: RedisServer, redis_client: redis.Redis, clickhouse_url: str) -> None:
    """status asked three or four round trips per stream, one after the other (20,000 streams: 14 s), and drew every
    one in the terminal (found by review). Now pipelined, in chunks; the table shows the streams most behind and
    says how many it leaves out; --json lists every one."""
    from tests.conftest import cli_env, run_cli
    from worker.flows import STATUS_CHUNK
    from worker.views import STATUS_TABLE_STREAMS

    redis_client.flushdb()
    streams = [f"flow_events:st{n:04}" for n in range(STATUS_CHUNK * 2 + 37)]
    pipe = redis_client.pipeline(transaction=False)
    for stream in streams:
        pipe.xadd(stream, {"session_id": "s", "node_id": "n", "event_type": "t"})
        pipe.xgroup_create(stream, "flowtrack", id="$")
    pipe.execute()
    behind = {streams[n]: n % 5 + 1 for n in range(0, len(streams), 97)}  # lag of a few streams, across chunks
    for stream, lag in behind.items():
        for _ in range(lag):
            redis_client.xadd(stream, {"session_id": "s", "node_id": "n", "event_type": "t"})
    redis_client.xadd(streams[1], {"session_id": "s", "node_id": "n", "event_type": "t"})
    redis_client.xreadgroup("flowtrack", "c1", {streams[1]: ">"})  # one pending entry, nothing unread
    env = cli_env(redis_server.url, clickhouse_url, FLOWTRACK_STREAMS="flow_events:st*")
    report = json.loads(run_cli(["status", "--no-store", "--json"], env).stdout)
    got = {s["name"]: s for s in report["streams"]}
    assert set(got) == set(streams)
    assert {name: s["group"]["lag"] for name, s in got.items() if s["group"]["lag"]} == behind
    assert {name: s["group"]["pending"] for name, s in got.items() if s["group"]["pending"]} == {streams[1]: 1}
    assert got[streams[1]]["group"]["consumers"][0]["pending"] == 1
    assert report["redis"]["total_lag"] == sum(behind.values())
    table = run_cli(["status", "--no-store", "--max-lag", "100"], {**env, "COLUMNS": "200"}).stdout
    assert f"{len(streams) - STATUS_TABLE_STREAMS:,} more stream(s) not shown" in table
    assert all(stream in table for stream in behind)  # the ones behind are among those drawn
