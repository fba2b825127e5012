"""Many streams, cheaply: reading, claiming and checking tens of thousands of per-user streams.

Per-user streams are the contract's own recommendation, so a worker may face 50,000 of them. Three things keep
the cost of a loop step bounded by the streams with work rather than by all streams:

- ``Rotation``: a read covers a slice of the streams, never more than the in-flight bound allows (COUNT is at least
  1 per stream, so 50,000 streams in one XREADGROUP could return 50,000 entries), and the slices are read in turn
  so no stream starves. Only when a whole turn found nothing does the worker block (it is caught up).
- ``PackedReads``: the RESP bytes of an XREADGROUP over thousands of streams, built from names encoded once and
  kept while the same read repeats (redis-py packs a 20,000-stream command in ~50 ms; the caught-up worker repeats
  its blocking read every block interval).
- ``ClaimSweep``: a claim round looks at the streams last seen with entries pending on other consumers, and at
  the next slice of a slow sweep over all streams (XPENDING summaries, pipelined), not at every stream.

On a Redis Cluster one XREADGROUP may only name keys of one hash slot, so ``PackedReads`` also builds a slice's read
as one command per slot (``SlotReads``; hash-tagged per-user streams share a slot and stay one command), kept like
the single-node bytes; ``worker.clusterstreams`` sends them per node.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from worker.clusterstreams import SlotCommand, SlotMap, resp_bulk

# Commands per pipeline when a command goes to many streams (group creation, summaries, totals).
PIPELINE_CHUNK = 1000
# Streams whose XPENDING summary a claim round reads besides the ones known to hold others' pending entries:
# 50,000 streams are all looked at within 25 rounds (~2 minutes at the default 5 s interval), at ~10 ms a round.
CLAIM_SWEEP_STREAMS = 2000


class Rotation:
    """The consumed streams, handed out in slices of at most N streams, in turn.

    ``next_slice`` walks the streams from where the previous slice ended, wrapping around, so every stream is
    in one slice per turn whatever N is. ``note(found)`` records whether a read found entries; ``caught_up``
    is True once every stream was read since entries were last found (a whole turn came back empty).
    """

    def __init__(self) -> None:
        self._streams: list[str] = []
        self._offset = 0
        self._empty_streams_read = 0  # streams read since a read last found entries
        self.version = 0  # changes whenever the streams change: cached slices are then stale

    @property
    def streams(self) -> list[str]:
        return self._streams

    def set_streams(self, streams: Sequence[str]) -> None:
        if list(streams) == self._streams:
            return
        self._streams = list(streams)
        self._offset %= max(1, len(self._streams))
        self._empty_streams_read = 0
        self.version += 1

    def next_slice(self, size: int) -> tuple[int, list[str]]:
        """(start offset, streams) of the next read: at most ``size`` streams, all of them when they fit."""
        total = len(self._streams)
        if size >= total:
            return 0, list(self._streams)
        start = self._offset
        end = start + size
        chosen = self._streams[start:end]
        if end > total:
            chosen += self._streams[:end - total]
        self._offset = end % total
        return start, chosen

    def note(self, streams_read: int, found: bool) -> None:
        self._empty_streams_read = 0 if found else self._empty_streams_read + streams_read

    @property
    def caught_up(self) -> bool:
        return self._empty_streams_read >= len(self._streams)


_NEW_ONLY = resp_bulk(">")


class SlotReads:
    """XREADGROUP commands of one read on a cluster, one per hash slot, with the streams each one covers."""

    def __init__(self, block_ms: int | None = None) -> None:
        self.block_ms = block_ms  # how long the (single) command blocks, if it does
        self.commands: list[SlotCommand] = []
        self.streams: list[list[str]] = []

    def add(self, slot: int, streams: list[str], packed: bytes) -> None:
        self.commands.append((slot, packed))
        self.streams.append(streams)


class PackedReads:
    """XREADGROUP commands as RESP bytes, built from stream names encoded once; the last few are kept whole."""

    def __init__(self, group: str, consumer: str, keep: int = 8) -> None:
        self._prefix = b"".join(resp_bulk(part) for part in ("XREADGROUP", "GROUP", group, consumer))
        self._group = resp_bulk(group)
        self._names: dict[str, bytes] = {}
        self._kept: dict[Any, bytes] = {}
        self._kept_slots: dict[Any, SlotReads] = {}
        self._keep = keep

    def new_entries(self, key: Any, streams: Sequence[str], count: int, block_ms: int | None) -> bytes:
        """The read of new entries (``>``) on ``streams``; ``key`` names this exact list (e.g. rotation version
        and offset) so a repeated read reuses its bytes."""
        cache_key = (key, count, block_ms)
        packed = self._kept.get(cache_key)
        if packed is None:
            packed = self._pack(streams, [_NEW_ONLY] * len(streams), count, block_ms)
            if len(self._kept) >= self._keep:
                self._kept.pop(next(iter(self._kept)))
            self._kept[cache_key] = packed
        return packed

    def from_ids(self, targets: dict[str, str], count: int) -> bytes:
        """A non-blocking read from explicit ids (our own pending entries): not kept, the ids move every read."""
        return self._pack(list(targets), [resp_bulk(entry_id) for entry_id in targets.values()], count, None)

    def new_entries_per_slot(self, key: Any, streams: Sequence[str], slots: SlotMap, count: int,
                             block_ms: int | None) -> SlotReads:
        """``new_entries`` on a cluster: one XREADGROUP per hash slot (Redis refuses keys of several slots in one
        command, even on one node), kept like ``new_entries``. Only a read within one slot blocks
        (``SlotReads.block_ms``): a blocking command would hold up the other commands sent to its node."""
        cache_key = ("slots", key, count, block_ms)
        reads = self._kept_slots.get(cache_key)
        if reads is None:
            grouped = slots.group(streams)
            reads = SlotReads(block_ms if len(grouped) == 1 else None)
            for slot, members in grouped.items():
                reads.add(slot, members, self._pack(members, [_NEW_ONLY] * len(members), count, reads.block_ms))
            if len(self._kept_slots) >= self._keep:
                self._kept_slots.pop(next(iter(self._kept_slots)))
            self._kept_slots[cache_key] = reads
        return reads

    def from_ids_per_slot(self, targets: dict[str, str], slots: SlotMap, count: int) -> SlotReads:
        """``from_ids`` on a cluster: one read per hash slot."""
        reads = SlotReads()
        for slot, members in slots.group(list(targets)).items():
            reads.add(slot, members, self._pack(members, [resp_bulk(targets[s]) for s in members], count, None))
        return reads

    def single_reads(self, targets: dict[str, str], slots: SlotMap, count: int) -> SlotReads:
        """One read per stream (a slot whose keys are split mid-migration answers a multi-key read TRYAGAIN)."""
        reads = SlotReads()
        for stream, entry_id in targets.items():
            reads.add(slots.slot(stream), [stream], self._pack([stream], [resp_bulk(entry_id)], count, None))
        return reads

    def acks_per_stream(self, by_stream: Mapping[str, Sequence[str]], slots: SlotMap,
                        ids_per_command: int = 10_000) -> list[SlotCommand]:
        """``acks`` on a cluster: each XACK routed by its stream's slot."""
        commands: list[SlotCommand] = []
        for stream, ids in by_stream.items():
            packed, _ = self.acks({stream: ids}, ids_per_command)
            commands.append((slots.slot(stream), packed))
        return commands

    def _pack(self, streams: Sequence[str], ids: list[bytes], count: int, block_ms: int | None) -> bytes:
        names = self._names
        encoded = []
        for stream in streams:
            name = names.get(stream)
            if name is None:
                name = names[stream] = resp_bulk(stream)
            encoded.append(name)
        options = [resp_bulk("COUNT"), resp_bulk(str(count))]
        if block_ms is not None:
            options += [resp_bulk("BLOCK"), resp_bulk(str(block_ms))]
        options.append(resp_bulk("STREAMS"))
        arguments = 4 + len(options) + 2 * len(streams)
        return b"".join([b"*%d\r\n" % arguments, self._prefix, *options, *encoded, *ids])

    def acks(self, by_stream: Mapping[str, Sequence[str]], ids_per_command: int = 10_000) -> tuple[bytes, int]:
        """XACK commands for entry ids grouped per stream, as one buffer; (bytes, number of commands). With
        thousands of streams a batch acknowledges one entry on each: redis-py's per-command packing and per-reply
        timeout dominated the ack (a quarter of a 50,000-stream drain)."""
        names = self._names
        parts: list[bytes] = []
        commands = 0
        group = self._group
        for stream, ids in by_stream.items():
            name = names.get(stream)
            if name is None:
                name = names[stream] = resp_bulk(stream)
            for start in range(0, len(ids), ids_per_command):
                chunk = ids[start:start + ids_per_command]
                parts.append(b"*%d\r\n$4\r\nXACK\r\n%s%s" % (3 + len(chunk), name, group))
                parts.extend([b"$%d\r\n%s\r\n" % (len(i), i.encode()) for i in chunk])
                commands += 1
        return b"".join(parts), commands

    def forget(self, streams: Sequence[str]) -> None:
        for stream in streams:
            self._names.pop(stream, None)
        self._kept.clear()
        self._kept_slots.clear()


async def execute_packed(redis: aioredis.Redis, packed: bytes) -> Any:
    """Send RESP bytes as one command and return the reply as Redis sent it (RESP2 lists, bytes)."""
    pool = redis.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.send_packed_command(packed)
        return await conn.read_response()
    except BaseException:
        await conn.disconnect()  # a reply may still be on its way: the connection cannot be reused
        raise
    finally:
        await pool.release(conn)


async def execute_packed_many(redis: aioredis.Redis, packed: bytes, commands: int) -> list[Any]:
    """Send RESP bytes holding ``commands`` commands, return their replies in order (an error reply as its
    exception, like a pipeline with raise_on_error=False); one timeout for them all, not one per reply."""
    pool = redis.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.send_packed_command(packed)
        replies: list[Any] = []
        async with asyncio.timeout(conn.socket_timeout):
            for _ in range(commands):
                try:
                    replies.append(await conn.read_response(timeout=math.inf))
                except ResponseError as exc:
                    replies.append(exc)
        return replies
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


async def pipelined(redis: aioredis.Redis | aioredis.RedisCluster, streams: Sequence[str], command: str, *args: Any,
                    **options: Any) -> list[Any]:
    """``command <stream> *args`` for every stream, in pipelines of PIPELINE_CHUNK; errors returned, not raised.
    ``options`` go to redis-py's reply parser (e.g. ``parse_detail=True`` for XPENDING's extended form)."""
    return await pipelined_commands(redis, [(command, stream, *args) for stream in streams], **options)


async def pipelined_commands(redis: aioredis.Redis | aioredis.RedisCluster, commands: Sequence[Sequence[Any]],
                             **options: Any) -> list[Any]:
    """Each command (name, *arguments), in pipelines of PIPELINE_CHUNK; errors returned, not raised."""
    replies: list[Any] = []
    for start in range(0, len(commands), PIPELINE_CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for command in commands[start:start + PIPELINE_CHUNK]:
                pipe.execute_command(*command, **options)
            replies.extend(await pipe.execute(raise_on_error=False))
    return replies


class ClaimSweep:
    """Which streams a claim round looks at: the ones last seen with entries pending on other consumers, and
    the next ``per_round`` streams of a sweep over all of them."""

    def __init__(self, per_round: int = CLAIM_SWEEP_STREAMS) -> None:
        self.per_round = per_round
        self.with_others_pending: set[str] = set()
        self._offset = 0

    def streams_for_round(self, streams: Sequence[str]) -> list[str]:
        total = len(streams)
        if total <= self.per_round:
            return list(streams)
        start = self._offset % total
        end = start + self.per_round
        swept = list(streams[start:end]) + (list(streams[:end - total]) if end > total else [])
        self._offset = end % total
        in_sweep = set(swept)
        return [s for s in self.with_others_pending if s not in in_sweep] + swept

    def note(self, stream: str, others_pending: int) -> None:
        if others_pending:
            self.with_others_pending.add(stream)
        else:
            self.with_others_pending.discard(stream)

    def forget(self, stream: str) -> None:
        self.with_others_pending.discard(stream)


def others_pending(summary: Any, consumer: str) -> int:
    """Entries pending on consumers other than ``consumer``, from an XPENDING summary as redis-py parses it
    ({"pending", "min", "max", "consumers": [{"name", "pending"}, …]}); 0 for an error reply (stream gone)."""
    if not isinstance(summary, dict):
        return 0
    mine = consumer.encode("utf-8", "surrogateescape")
    return sum(int(c["pending"]) for c in summary.get("consumers") or ()
               if c["name"] not in (mine, consumer))
