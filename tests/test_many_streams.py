"""Many per-user streams (issue 11): slices bounded by the in-flight limit cover every stream, none starves,
packed reads return what redis-py's would, and the claim sweep finds pending work among thousands of streams.
Real redis-server; 5,000 streams here, 50,000 in `flowtrack bench --streams 50000`."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import redis
import redis.asyncio as aioredis

from worker.redisserver import RedisServer
from worker.streamset import ClaimSweep, PackedReads, Rotation, execute_packed, others_pending, pipelined

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
