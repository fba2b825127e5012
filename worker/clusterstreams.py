"""Streams on a Redis Cluster: commands grouped by hash slot, sent one buffer per node, redirects followed.

Why not redis-py's cluster client for the hot commands: its XREADGROUP costs two extra round trips per call (the
keys of a movable-keys command come from COMMAND GETKEYS), refuses keys of several slots on the client, and a
blocking read longer than its socket timeout turns into a topology refresh and ten re-sends (research note,
section 1). So reads and acks are packed here as RESP bytes, like the single-node path (``streamset``): one
XREADGROUP per hash slot over every stream of the slice in that slot (hash-tagged per-user streams such as
``flow_events:{s07}:42`` share a slot, so they cost one command, not one each), all of a node's commands written
in one buffer on one of that node's connections, the nodes in parallel. Everything else (group creation, XPENDING,
XCLAIM, EXISTS, XINFO, XTRIM) goes through redis-py's cluster pipelines, which route per key and follow MOVED/ASK.

Redirects, as Redis 7 gives them while slots move or a replica takes over:
- MOVED: the slot map is patched for that slot (redis-py's ``move_slot``) and the command re-sent to the new owner.
- ASK (slot half-migrated, the keys already on the target): re-sent to the target behind ASKING, on the same
  connection (ASKING allows one command on its connection only).
- TRYAGAIN (a multi-key read whose keys are split between the two nodes mid-migration): the caller re-reads that
  slot one stream at a time; each single-key read is then served by the source or redirected by ASK.
Anything else a node answers is returned to the caller per command. A failed node (connection error, timeout)
makes the client refresh its whole map at the next call and the error propagates: ``guarded`` turns it into
SourceUnavailableError, the pipeline backs off and recovers (our own pending entries are re-read from id 0, so
entries delivered by a read whose reply was lost are not lost).
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.cluster import PRIMARY
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, ResponseError

# Redirects followed per call before the command is given up (returned as its last redirect error): a slot that
# keeps moving is a topology in flux; the caller's backoff waits it out.
MAX_REDIRECTS = 5
_ASKING = b"*1\r\n$6\r\nASKING\r\n"
# Commands per ``call`` round (a buffer per node each): 50,000 group creations at start-up go in 10 rounds.
CALL_CHUNK = 5000

# One packed command and the hash slot of its key(s).
SlotCommand = tuple[int, bytes]


def slot_of(name: str) -> int:
    """The hash slot of a stream name (a name from Redis may hold non-UTF-8 bytes: see ``source.text``)."""
    return int(key_slot(name.encode("utf-8", "surrogateescape")))


def slot_of_key(key: Any) -> int:
    return int(key_slot(key)) if isinstance(key, bytes) else slot_of(str(key))


def cursors_by_slot(cursors: dict[str, str]) -> list[dict[str, str]]:
    """Stream -> read-from id, split by hash slot: what one XREAD or XREADGROUP may name on a cluster."""
    parts: dict[int, dict[str, str]] = {}
    for stream, cursor in cursors.items():
        parts.setdefault(slot_of(stream), {})[stream] = cursor
    return list(parts.values())


def resp_bulk(value: str | bytes) -> bytes:
    """One RESP bulk string (the argument encoding of a Redis command)."""
    data = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pack(command: Sequence[Any]) -> bytes:
    """One command as RESP bytes; the name may hold its subcommand ("XINFO GROUPS")."""
    parts = [*str(command[0]).split(), *command[1:]]
    return b"*%d\r\n%s" % (len(parts), b"".join(resp_bulk(part if isinstance(part, bytes | str) else str(part))
                                                 for part in parts))


class SlotMap:
    """Stream name -> hash slot, computed once per name (CRC16 of 50,000 names every read would cost)."""

    def __init__(self) -> None:
        self._slots: dict[str, int] = {}

    def slot(self, stream: str) -> int:
        slot = self._slots.get(stream)
        if slot is None:
            slot = self._slots[stream] = slot_of(stream)
        return slot

    def group(self, streams: Sequence[str]) -> dict[int, list[str]]:
        """The streams grouped by slot, each group in the given order."""
        grouped: dict[int, list[str]] = {}
        for stream in streams:
            grouped.setdefault(self.slot(stream), []).append(stream)
        return grouped

    def forget(self, streams: Sequence[str]) -> None:
        for stream in streams:
            self._slots.pop(stream, None)


class NodeCommands:
    """Send packed commands to the primaries owning their slots: one buffer per node, the nodes in parallel."""

    def __init__(self, client: aioredis.RedisCluster) -> None:
        self.client = client
        # Redirects met, by kind (MOVED, ASK): how often the slot map was out of date (tests, diagnostics).
        self.redirects: Counter[str] = Counter()

    async def run(self, commands: Sequence[SlotCommand], wait_s: float = 0.0) -> list[Any]:
        """Replies in the order of ``commands``, an error reply as its exception (like a pipeline with
        raise_on_error=False); MOVED and ASK followed. ``wait_s``: how long a blocking command may wait, on top of
        the socket timeout. Raises on a connection failure (after asking the client to refresh its map)."""
        await self.client.initialize()  # a no-op unless a failure asked for a refresh
        results: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        asking: dict[int, ClusterNode] = {}
        for _ in range(MAX_REDIRECTS + 1):
            by_node = self._route(commands, todo, asking)
            replies = await asyncio.gather(
                *(self._send(node, [commands[i][1] for i in idx], [i in asking for i in idx], wait_s)
                  for node, idx in by_node.items()), return_exceptions=True)
            todo, asking = [], {}
            for (node, idx), reply in zip(by_node.items(), replies, strict=True):
                if isinstance(reply, BaseException):
                    await self._forget_topology(node)
                    raise reply
                for index, result in zip(idx, reply, strict=True):
                    results[index] = result
                    if await self._redirect(index, result, asking):
                        todo.append(index)
            if not todo:
                break
        return results

    async def call(self, commands: Sequence[Sequence[Any]], **options: Any) -> list[Any]:
        """Single-key commands (``[name, key, *args]``; a name may hold its subcommand: "XGROUP CREATE") routed by
        key, replies parsed as redis-py's own call would parse them (``options`` go to its reply parser, e.g.
        ``parse_detail=True``), error replies returned as exceptions.

        Why not redis-py's cluster pipeline: on ASK its async client sends ASKING and the command on two pooled
        connections, which differ once a node's pool holds more than one (redis-py 8.1): the target answers MOVED
        back to the source, the source ASK again, until "TTL exhausted" — for as long as the slot migrates."""
        results: list[Any] = []
        for start in range(0, len(commands), CALL_CHUNK):
            chunk = commands[start:start + CALL_CHUNK]
            replies = await self.run([(slot_of_key(command[1]), pack(command)) for command in chunk])
            for command, reply in zip(chunk, replies, strict=True):
                callback = None if isinstance(reply, Exception) else self.client.response_callbacks.get(command[0])
                results.append(reply if callback is None else callback(reply, **options))
        return results

    async def one(self, command: Sequence[Any], **options: Any) -> Any:
        """One single-key command, routed like ``call``; an error reply raised."""
        reply = (await self.call([command], **options))[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def _route(self, commands: Sequence[SlotCommand], todo: list[int],
               asking: dict[int, ClusterNode]) -> dict[ClusterNode, list[int]]:
        by_node: dict[ClusterNode, list[int]] = {}
        manager = self.client.nodes_manager
        for index in todo:
            node = asking.get(index) or manager.get_node_from_slot(commands[index][0])
            by_node.setdefault(node, []).append(index)
        return by_node

    async def _redirect(self, index: int, result: Any, asking: dict[int, ClusterNode]) -> bool:
        """Whether the command goes out again: after MOVED (slot map patched) or ASK (to the target node)."""
        if isinstance(result, MovedError):
            self.redirects["MOVED"] += 1
            await self.client.nodes_manager.move_slot(result)
            return True
        if isinstance(result, AskError):
            self.redirects["ASK"] += 1
            asking[index] = self._node_at(result.host, result.port)
            return True
        return False

    def _node_at(self, host: str, port: int) -> ClusterNode:
        """The node at host:port; one the map does not know yet is added (an ASK may point at a primary that owns no
        slot so far, as when slots move to a newly added node: CLUSTER SLOTS did not list it)."""
        manager = self.client.nodes_manager
        node = manager.get_node(host=host, port=port)
        if node is None:
            node = ClusterNode(host, port, PRIMARY, **manager.connection_kwargs)
            manager.set_nodes(manager.nodes_cache, {node.name: node})
        return node

    async def _forget_topology(self, node: ClusterNode) -> None:
        """After a node failed: drop its connections and have the client rebuild its slot map at the next call
        (redis-py's own commands do the same on a connection error)."""
        node.update_active_connections_for_reconnect()
        await node.disconnect_free_connections()
        await self.client.aclose()

    @staticmethod
    async def _send(node: ClusterNode, buffers: list[bytes], asking: list[bool], wait_s: float) -> list[Any]:
        connection = node.acquire_connection()
        try:
            await connection.send_packed_command(
                b"".join(_ASKING + buffer if ask else buffer for buffer, ask in zip(buffers, asking, strict=True)))
            replies: list[Any] = []
            timeout_s = connection.socket_timeout
            async with asyncio.timeout(None if timeout_s is None else timeout_s + wait_s):
                for ask in asking:
                    refused = await _reply(connection) if ask else None  # ASKING's +OK, or NOPERM (ACL)
                    reply = await _reply(connection)
                    replies.append(refused if isinstance(refused, Exception) else reply)
            return replies
        except BaseException:
            await connection.disconnect()  # a reply may still be on its way: the connection cannot be reused
            raise
        finally:
            node.release(connection)


async def _reply(connection: Any) -> Any:
    try:
        return await connection.read_response(timeout=math.inf)
    except ResponseError as exc:
        return exc
