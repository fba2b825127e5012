"""Safe trimming against a real redis-server: nothing pending or unread is ever removed."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis

from tests.conftest import xadd_all
from worker.redisserver import RedisServer
from worker.trim import next_id, safe_min_id, trim_stream


def _ids(client: redis.Redis, stream: str) -> list[str]:
    return [i.decode() for i, _ in client.xrange(stream)]


def _trim(url: str, stream: str) -> int:
    async def go() -> int:
        client = aioredis.Redis.from_url(url, protocol=2)
        try:
            return await trim_stream(client, stream)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_next_id_orders_after_the_given_id() -> None:
    assert next_id("5-0") == "5-1"
    assert next_id("1700000000000-41") == "1700000000000-42"


def test_trim_keeps_pending_and_unread_entries(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    stream = "flow_events:1"
    ids = xadd_all(redis_client, [(stream, {"n": str(i)}) for i in range(10)])
    redis_client.xgroup_create(stream, "fast", id="0")
    redis_client.xgroup_create(stream, "slow", id="0")
    # fast reads everything and acks all but entry 6; slow has only read (and acked) the first 3
    redis_client.xreadgroup("fast", "c1", {stream: ">"}, count=10)
    redis_client.xack(stream, "fast", *[i for n, i in enumerate(ids) if n != 6])
    redis_client.xreadgroup("slow", "c1", {stream: ">"}, count=3)
    redis_client.xack(stream, "slow", *ids[:3])

    async def go() -> tuple[str | None, int]:
        client = aioredis.Redis.from_url(redis_server.url, protocol=2)
        try:
            return await safe_min_id(client, stream), await trim_stream(client, stream)
        finally:
            await client.aclose()

    min_id, removed = asyncio.run(go())
    # slow group's next undelivered entry is ids[3]; fast's oldest pending is ids[6]
    assert min_id == next_id(ids[2])
    assert removed == 3
    assert _ids(redis_client, stream) == ids[3:]


def test_trim_keeps_oldest_pending_entry(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    stream = "flow_events:2"
    ids = xadd_all(redis_client, [(stream, {"n": str(i)}) for i in range(6)])
    redis_client.xgroup_create(stream, "g", id="0")
    redis_client.xreadgroup("g", "c1", {stream: ">"}, count=6)
    redis_client.xack(stream, "g", ids[0], ids[1], ids[3], ids[4], ids[5])  # ids[2] stays pending

    assert _trim(redis_server.url, stream) == 2
    assert _ids(redis_client, stream) == ids[2:]
    pending = redis_client.xpending(stream, "g")
    assert pending["pending"] == 1


def test_stream_without_group_is_never_trimmed(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    stream = "flow_events:3"
    xadd_all(redis_client, [(stream, {"n": str(i)}) for i in range(4)])

    assert _trim(redis_server.url, stream) == 0
    assert redis_client.xlen(stream) == 4


def test_the_id_after_one_at_the_largest_sequence_carries_into_the_milliseconds(redis_server: RedisServer,
                                                                                 redis_client: redis.Redis) -> None:
    """`5-18446744073709551615` gave `5-18446744073709551616`: Redis refused the XTRIM and the stream was never
    trimmed again (found by review). The largest id has nothing after it: trimming keeps it."""
    top = 2**64 - 1
    assert next_id(f"5-{top}") == "6-0"
    assert next_id(f"{top}-{top}") == f"{top}-{top}"
    for last, kept in ((f"5-{top}", []), (f"{top}-{top}", [f"{top}-{top}"])):
        stream = f"flow_events:carry-{last[:1]}"
        redis_client.xadd(stream, {"a": "1"}, id="1-1")
        redis_client.xadd(stream, {"a": "2"}, id=last)
        redis_client.xgroup_create(stream, "flowtrack", id="0")
        redis_client.xreadgroup("flowtrack", "c", {stream: ">"})
        redis_client.xack(stream, "flowtrack", "1-1", last)
        assert _trim(redis_server.url, stream) == 2 - len(kept)  # the largest id has nothing after it: kept
        assert _ids(redis_client, stream) == kept
