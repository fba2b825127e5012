"""Trim: retention that never removes an entry still pending or unread by any consumer group.

On a Redis Cluster the commands go through ``worker.clusterstreams.NodeCommands`` (routed by key, ASK followed with
ASKING on the command's own connection), not redis-py's own routing, which loops to "TTL exhausted" on a slot being
migrated; the version check asks one node (a cluster client's INFO answers per node).

XTRIM/MAXLEN delete entries whether or not they are pending, so the bound is computed from the
groups themselves: MINID = the lowest of, over every group on the stream, its oldest pending entry
and the entry right after its last-delivered id. Entries at or above MINID are kept. Where the
server supports it (Redis >= 8.2) the ACKED option is added, which makes Redis itself refuse to
delete entries not yet acknowledged by every group.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis

from worker.clusterstreams import NodeCommands
from worker.source import parse_id, text

log = logging.getLogger(__name__)


_MAX_PART = 2**64 - 1  # an entry id is two unsigned 64-bit numbers


def next_id(entry_id: str) -> str:
    """The smallest id after this one (the largest id itself: nothing follows it). A sequence at its maximum carried
    into nothing: `5-18446744073709551615` gave `5-18446744073709551616`, which Redis refuses, every pass for ever."""
    ms, seq = parse_id(entry_id)
    if seq < _MAX_PART:
        return f"{ms}-{seq + 1}"
    return f"{ms + 1}-0" if ms < _MAX_PART else entry_id


async def safe_min_id(redis: aioredis.Redis | aioredis.RedisCluster, stream: str) -> str | None:
    """The highest MINID that keeps every pending or undelivered entry; None if the stream has no group."""
    routed = NodeCommands(redis) if isinstance(redis, aioredis.RedisCluster) else None
    groups = await (routed.one(("XINFO GROUPS", stream)) if routed else redis.xinfo_groups(stream))
    if not groups:
        return None  # nobody has consumed it: trimming could only lose data
    bounds: list[str] = []
    for group in groups:
        name = text(group["name"])
        bounds.append(next_id(text(group["last-delivered-id"])))
        summary = await (routed.one(("XPENDING", stream, name)) if routed else redis.xpending(stream, name))
        if int(summary["pending"]) > 0 and summary.get("min"):
            bounds.append(text(summary["min"]))
    return min(bounds, key=parse_id)


async def supports_acked(redis: aioredis.Redis | aioredis.RedisCluster) -> bool:
    # A cluster client sends INFO to every node and answers per node: one node's version stands for all (a cluster
    # mixing versions mid-upgrade gets ACKED only once the node asked has it: trimming stays safe without ACKED).
    if isinstance(redis, aioredis.RedisCluster):
        info = await redis.info("server", target_nodes=aioredis.RedisCluster.RANDOM)
    else:
        info = await redis.info("server")
    major, minor, *_ = (int(p) for p in str(info.get("redis_version", "0.0.0")).split(".")[:3])
    return (major, minor) >= (8, 2)


async def trim_stream(redis: aioredis.Redis | aioredis.RedisCluster, stream: str, acked: bool = False) -> int:
    """Trim what every group has acknowledged; returns the number of entries removed."""
    min_id = await safe_min_id(redis, stream)
    if min_id is None or min_id == "0-1":
        return 0
    args: list[Any] = ["XTRIM", stream, "MINID", min_id]
    if acked:
        args.append("ACKED")
    if isinstance(redis, aioredis.RedisCluster):
        removed = int(await NodeCommands(redis).one(args))
    else:
        removed = int(await redis.execute_command(*args))  # type: ignore[no-untyped-call]
    if removed:  # one line per pass at INFO (the pipeline's): 20,000 streams made 20,000 lines a pass here
        log.debug("trimmed %d acknowledged entries from %s (MINID %s)", removed, stream, min_id)
    return removed
