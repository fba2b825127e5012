"""Tail: flow events straight from the streams, as they arrive, without joining the consumer group.

Reads with XRANGE (the backlog since a point in time) and XREAD (live), never XREADGROUP: the tail
creates no pending entries and steals nothing from the worker. Entries are normalized with the
worker's own (pure) rules, so what the tail shows is what the worker stores, or why it rejects it.

On a Redis Cluster one XREAD may only name streams of one hash slot: the live read is split by slot, sent per node
in one pipeline (no BLOCK: a blocked command would hold up the node's other reads; when nothing came, the tail waits
``CLUSTER_POLL_S`` before the next round), and blocks as on a plain Redis when every stream shares one slot.
A redirect (the slot moved, failed over, or is being migrated) refreshes the slot map and the slot is read again in
the next round from the same cursor: nothing is skipped or shown twice.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from redis.cluster import ClusterNode
from redis.exceptions import AskError, ClusterDownError, ResponseError, TryAgainError

from worker.clusterstreams import cursors_by_slot, slot_of
from worker.flows import _text, epoch_ms, resolve_streams
from worker.normalize import FlowEvent, Normalizer, Rejection, is_text, pairs_to_dict
from worker.redisclient import SyncClient
from worker.settings import Settings
from worker.source import not_a_stream, raw_reply

MAX_SEQ = 18446744073709551615
PAGE = 1000
CLUSTER_POLL_S = 0.2  # a caught-up tail over several slots looks again after this long
# What a node answers while slots move or a replica takes over (redis-py strips the MOVED/ASK code from the text).
REDIRECTS = (AskError, TryAgainError, ClusterDownError)  # MovedError is an AskError


@dataclass(frozen=True)
class TailFilter:
    user: str | None = None
    session: str | None = None
    event_types: frozenset[str] = frozenset()

    @property
    def active(self) -> bool:
        return bool(self.user or self.session or self.event_types)

    def accepts(self, item: FlowEvent | Rejection) -> bool:
        if isinstance(item, Rejection):
            return not self.active  # a broken entry has no trustworthy user/session/type
        return ((self.user is None or item.user_id == self.user)
                and (self.session is None or item.session_id == self.session)
                and (not self.event_types or item.event_type in self.event_types))


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def start_id(since: datetime | None, server_ms: int) -> str:
    """An exclusive XREAD cursor: everything at or after ``since`` (default: from now on)."""
    ms = epoch_ms(since) if since is not None else server_ms
    return f"{ms - 1}-{MAX_SEQ}" if ms > 0 else "0-0"


class Tail:
    def __init__(self, client: SyncClient, settings: Settings, flt: TailFilter, block_ms: int = 500,
                 rescan_s: float = 2.0) -> None:
        self.client = client
        # Entries as Redis sends them ([name, value, …]), not as dicts: a dict keeps one value of a repeated name,
        # and the entry must be judged as the worker judges it (rejected, every pair kept). This client is the
        # command's own. (Reads a cluster pipelines through its nodes' clients still come as dicts: _item takes both.)
        for command in ("XRANGE", "XREAD"):
            client.set_response_callback(command, raw_reply)
        self.specs = settings.streams
        self.filter = flt
        self.normalizer = Normalizer(settings.end_event_types, settings.error_event_types)
        self.block_ms = min(block_ms, max(1, int(settings.socket_timeout_s * 1000) - 500))
        self.rescan_s = rescan_s
        self.cursors: dict[str, str] = {}
        self._start = "0-0"
        self._last_scan = 0.0

    def _server_ms(self) -> int:
        seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def _discover(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_scan < self.rescan_s:
            return
        self._last_scan = now
        for stream in resolve_streams(self.client, self.specs):
            # A stream that appears while we follow holds only new entries (or entries since --since).
            self.cursors.setdefault(stream, self._start)

    def _item(self, stream: str, entry_id: str, fields: Mapping[bytes, bytes] | list[bytes]
              ) -> FlowEvent | Rejection:
        if not isinstance(fields, list):
            return self.normalizer.normalize(stream, entry_id, fields)
        if not is_text(stream):  # normalize_pairs leaves the key to its caller (the worker checks it per stream)
            return self.normalizer.normalize(stream, entry_id, pairs_to_dict(fields))
        return self.normalizer.normalize_pairs(stream, entry_id, fields)

    def backlog(self, since: datetime) -> Iterator[FlowEvent | Rejection]:
        """Entries from ``since`` up to now, over every stream, in entry-id order (XRANGE, paged, merged)."""
        self._start = start_id(since, 0)
        self._discover(force=True)
        ends = {s: self._last_id(s) for s in self.cursors}

        def pages(stream: str) -> Iterator[tuple[tuple[int, int], str, str, Mapping[bytes, bytes]]]:
            low = "(" + self.cursors[stream]
            end = ends[stream]
            while end != "0-0":
                rows: Any = self.client.xrange(stream, min=low, max=end, count=PAGE)
                for raw_id, fields in rows:
                    entry_id = _text(raw_id)
                    self.cursors[stream] = entry_id
                    yield id_key(entry_id), stream, entry_id, fields
                # At the end already: no next page to ask for (past the largest id, "(" + it is refused).
                if len(rows) < PAGE or self.cursors[stream] == end:
                    return
                low = "(" + self.cursors[stream]

        for _, stream, entry_id, fields in heapq.merge(*(pages(s) for s in list(self.cursors))):
            item = self._item(stream, entry_id, fields)
            if self.filter.accepts(item):
                yield item
        for stream, end in ends.items():  # nothing missed between the backlog and the live part
            if id_key(end) > id_key(self.cursors[stream]):
                self.cursors[stream] = end

    def _last_id(self, stream: str) -> str:
        try:
            rows: Any = self.client.xrevrange(stream, count=1)
        except ResponseError as exc:
            if not not_a_stream(exc):
                raise
            return "0-0"  # no longer a stream since it was found: nothing of it to show
        return _text(rows[0][0]) if rows else "0-0"

    def follow(self, should_stop: Callable[[], bool] = lambda: False) -> Iterator[FlowEvent | Rejection | None]:
        """Live entries (XREAD BLOCK), forever; yields None on each idle wake-up so callers can stop."""
        if not self.cursors:
            self._start = start_id(None, self._server_ms())
            self._discover(force=True)
            self._start = "0-0"  # later-discovered streams are new: all of them is new
        while not should_stop():
            self._discover()
            if not self.cursors:
                time.sleep(self.block_ms / 1000)
                yield None
                continue
            try:
                reply = self._read_live()
            except ResponseError as exc:
                if not not_a_stream(exc):
                    raise
                self._forget_non_streams()  # a followed key now holds another type: followed again once a stream
                yield None
                continue
            batch: list[tuple[tuple[int, int], str, str, Mapping[bytes, bytes]]] = []
            for raw_stream, rows in reply or ():
                stream = _text(raw_stream)
                for raw_id, fields in rows:
                    entry_id = _text(raw_id)
                    self.cursors[stream] = entry_id
                    batch.append((id_key(entry_id), stream, entry_id, fields))
            if not batch:
                yield None
                continue
            batch.sort(key=lambda t: t[:3])
            for _, stream, entry_id, fields in batch:
                item = self._item(stream, entry_id, fields)
                if self.filter.accepts(item):
                    yield item

    def _forget_non_streams(self) -> None:
        for stream in list(self.cursors):
            if _text(self.client.type(stream)) not in ("stream", "none"):
                del self.cursors[stream]

    def _read_live(self) -> Any:
        """XREAD from every cursor: one blocking call on a plain Redis, split by hash slot on a cluster."""
        if not isinstance(self.client, redis.RedisCluster):
            return self.client.xread(self.cursors, count=PAGE, block=self.block_ms)  # type: ignore[arg-type]
        reads = cursors_by_slot(self.cursors)
        if len(reads) == 1:  # one slot: one blocking read, as on a plain Redis
            return self._read_slots(self.client, reads, self.block_ms)
        reply = self._read_slots(self.client, reads, None)
        if not reply:
            time.sleep(min(self.block_ms / 1000, CLUSTER_POLL_S))
        return reply

    @staticmethod
    def _read_slots(client: redis.RedisCluster, reads: list[dict[str, str]], block_ms: int | None) -> list[Any]:
        """One XREAD per slot, pipelined per node through the node's own client (no key look-up per command).
        Reads answered with a redirect are dropped this round, after the slot map is refreshed."""
        per_node: dict[str, list[dict[str, str]]] = {}
        nodes: dict[str, ClusterNode] = {}
        for streams in reads:
            node = client.nodes_manager.get_node_from_slot(slot_of(next(iter(streams))))
            nodes[node.name] = node
            per_node.setdefault(node.name, []).append(streams)
        replies: list[Any] = []
        stale_map = False
        for name, node_reads in per_node.items():
            pipe = client.get_redis_connection(nodes[name]).pipeline(transaction=False)
            for streams in node_reads:
                pipe.xread(streams, count=PAGE, block=block_ms)  # type: ignore[arg-type]
            for result in pipe.execute(raise_on_error=False):
                if isinstance(result, REDIRECTS):
                    stale_map = True
                elif isinstance(result, Exception):
                    raise result
                elif result:
                    replies.extend(result)
        if stale_map:
            client.nodes_manager.initialize()
        return replies
