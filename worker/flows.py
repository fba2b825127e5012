"""Flows: what the terminal views ask of the store and of Redis (history, show, status, rejected, replay).

Every value that reaches SQL is bound as a ``{name:Type}`` parameter; the only text spliced into a
statement comes from fixed whitelists (sort columns, directions). Redis is only read here (XINFO,
XPENDING, XRANGE) except by ``replay``, which re-XADDs rejected entries through the normal path.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import redis
from redis._parsers import Encoder
from redis.connection import PythonRespSerializer
from redis.exceptions import ClusterError, RedisClusterException

from worker.errors import ConfigError, FlowtrackError, StoreLockedError, StoreUnavailableError
from worker.normalize import (
    KEY_NOT_UTF8,
    REPEATED_RAW_TAG,
    FlowEvent,
    Normalizer,
    as_bytes,
    derive_event_id,
    entry_id_ms,
    mapping_digest,
    parse_raw,
    printable,
)
from worker.redisclient import SyncClient
from worker.settings import Settings, redact_url
from worker.source import NO_CLIENT_INFO, is_pattern, vanished
from worker.stats import QUOTED_PATTERN, reason_class
from worker.store import Store, broken_parts_message

REPLAYED_KEY = "flowtrack:replayed"  # hash: "<stream> <entry id>" -> JSON record of the replay
REPLAYED_ATTRIBUTE = "replayed_from"  # attribute a replayed event carries: "<stream>/<entry id>"

# -- time ranges --------------------------------------------------------------------------------
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$", re.I)
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """'now', a duration ago ('90s', '15m', '2h', '7d', '1w'), epoch seconds/ms, or ISO-8601 (naive = UTC)."""
    try:
        return _parse_when(text, now)
    except (OverflowError, ValueError):  # nan, inf, 1e30, a duration beyond the calendar: not a time
        raise ConfigError(f"cannot read {text!r} as a time between 1970 and 9999") from None


def _parse_when(text: str, now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    value = text.strip()
    if value.lower() == "now":
        return now
    match = _RELATIVE.match(value)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2).lower()])
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        seconds = number / 1000 if number >= 100_000_000_000 else number
        return datetime.fromtimestamp(seconds, UTC)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a time: use e.g. 15m, 2h, 7d, an ISO-8601 time "
                          "or epoch seconds") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def epoch_ms(when: datetime) -> int:
    return round(when.timestamp() * 1000)


# -- history ------------------------------------------------------------------------------------
HISTORY_COLUMNS = ("user_id", "session_id", "started_at", "ended_at", "duration_ms", "event_count",
                   "error_count", "status")
SORT_KEYS = {"started": "started_at", "ended": "ended_at", "duration": "duration_ms", "events": "event_count",
             "errors": "error_count", "status": "status", "user": "user_id", "session": "session_id"}
STATUSES = ("active", "completed", "failed")


def history(store: Store, user: str | None, since: datetime, until: datetime | None = None,
            status: str | None = None, sort: str = "started", descending: bool = True,
            limit: int = 100) -> tuple[list[str], list[Sequence[Any]]]:
    """Sessions that started in [since, until), of one user or all, sorted by a whitelisted key."""
    if sort not in SORT_KEYS:
        raise ConfigError(f"--sort must be one of {', '.join(SORT_KEYS)}; got {sort!r}")
    if status is not None and status not in STATUSES:
        raise ConfigError(f"--status must be one of {', '.join(STATUSES)}; got {status!r}")
    where = ["started_at >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC')"]
    params: dict[str, Any] = {"since_ms": epoch_ms(since), "limit": max(0, limit)}
    if until is not None:
        where.append("started_at < fromUnixTimestamp64Milli({until_ms:Int64}, 'UTC')")
        params["until_ms"] = epoch_ms(until)
    if user is not None:
        where.append("user_id = {user:String}")
        params["user"] = user
    if status is not None:
        where.append("status = {status:String}")
        params["status"] = status
    direction = "DESC" if descending else "ASC"
    # Only whitelisted fragments are spliced in; every value is a bound parameter.
    sql = (f"SELECT {', '.join(HISTORY_COLUMNS)} FROM flowtrack.flow_sessions WHERE {' AND '.join(where)} "  # noqa: S608
           f"ORDER BY {SORT_KEYS[sort]} {direction}, session_id LIMIT {{limit:UInt32}}")
    return store.query(sql, params)


# -- one flow as a tree -------------------------------------------------------------------------
@dataclass
class Node:
    node_id: str
    parent_id: str
    name: str
    start: datetime
    end: datetime
    duration_ms: int
    status: str
    attributes: dict[str, str] = field(default_factory=dict)
    event_types: list[str] = field(default_factory=list)
    note: str = ""  # 'orphan' (parent never seen) or 'cycle' (parent chain loops)


@dataclass
class Flow:
    session_id: str
    user_id: str
    status: str
    started_at: datetime
    ended_at: datetime | None
    duration_ms: int
    event_count: int
    error_count: int
    nodes: list[Node]


@dataclass(frozen=True)
class Placed:
    """A node in display order (depth first), with its depth and whether it is its parent's last child.

    The guides of a line (which ancestors still have siblings below) follow from the ``last`` flags of the
    lines before it, so they are not stored per node: that would be quadratic in depth (a 20k-deep chain
    held 200M flags).
    """

    node: Node
    depth: int
    offset_ms: int
    last: bool


# One session's events of one user as flow_events shows them, with flow_nodes' columns computed from them (003):
# copies collapsed by grouping on the identity (the last stored copy wins, FINAL's rule). Not through the views
# (events FINAL): a session's key range sits in every part, and FINAL's merge of those one-granule ranges costs
# several times the read (measured at 10M: ~20 ms grouped, 40-180 ms under FINAL).
_SESSION_EVENTS = (
    "(SELECT event_id, argMax(node_id, stored) AS node_id, argMax(parent_id, stored) AS parent_id, "
    "toString(argMax(event_type, stored)) AS event_type, argMax(ts, stored) AS ts, "
    "argMax(attributes, stored) AS attributes, argMax(is_error, stored) AS is_error "
    "FROM (SELECT *, ingested_at AS stored FROM flowtrack.events WHERE session_id = {sid:String}) "
    "GROUP BY event_id HAVING argMax(user_id, stored) = {user:String})"
)


def load_flow(store: Store, session_id: str, user: str | None = None) -> Flow | None:
    params: dict[str, Any] = {"sid": session_id}
    # The rollup is sorted by (user_id, session_id): the session's users come from session_spans (sorted by
    # session_id), so both reads are primary-key lookups.
    user_filter = "user_id IN (SELECT user_id FROM flowtrack.session_spans WHERE session_id = {sid:String})"
    if user is not None:
        user_filter = "user_id = {user:String}"
        params["user"] = user
    _, sessions = store.query(
        "SELECT user_id, status, started_at, ended_at, duration_ms, event_count, error_count "  # noqa: S608
        f"FROM flowtrack.flow_sessions WHERE session_id = {{sid:String}} AND {user_filter} "
        "ORDER BY last_event_at DESC LIMIT 1", params)
    if not sessions:
        return None
    user_id, status, started_at, ended_at, duration_ms, events, errors = sessions[0]
    params["user"] = user_id
    _, node_rows = store.query(
        # name and parent: of the node's first event, ties in time broken by event_id (as flow_nodes, 011)
        "SELECT node_id, argMinIf(parent_id, (ts, event_id), parent_id != '') AS parent_id, "  # noqa: S608
        "argMin(event_type, (ts, event_id)) AS name, "
        "min(ts) AS start_ts, max(ts) AS end_ts, dateDiff('millisecond', start_ts, end_ts) AS duration_ms, "
        f"if(countIf(is_error = 1) > 0, 'error', 'ok') AS status FROM {_SESSION_EVENTS} "
        "GROUP BY node_id ORDER BY start_ts, node_id", params)
    nodes = {row[0]: Node(row[0], row[1] or "", row[2], row[3], row[4], int(row[5]), row[6])
             for row in node_rows}
    _, event_rows = store.query(
        f"SELECT node_id, event_type, attributes FROM {_SESSION_EVENTS} ORDER BY ts, event_id", params)  # noqa: S608
    for node_id, event_type, attributes in event_rows:
        node = nodes.get(node_id)
        if node is not None:
            node.event_types.append(event_type)
            node.attributes.update(attributes)
    return Flow(session_id, user_id, status, started_at, ended_at, int(duration_ms), int(events), int(errors),
                list(nodes.values()))


def place_nodes(nodes: Sequence[Node], started_at: datetime | None = None) -> list[Placed]:
    """Depth-first display order, built iteratively (no recursion: flows can be thousands of levels deep),
    in time and memory linear in the number of nodes (plus sorting siblings).

    Roots are nodes without a parent, then nodes whose parent never appeared (marked 'orphan'); nodes left
    unreached (their parent chain loops) become roots marked 'cycle'. Siblings are ordered by start time.
    """
    if not nodes:
        return []
    origin = started_at or min(n.start for n in nodes)
    by_id = {n.node_id: n for n in nodes}
    children: dict[str, list[Node]] = {}
    roots: list[Node] = []
    for node in nodes:
        if not node.parent_id:
            roots.append(node)
        elif node.parent_id not in by_id:
            node.note = "orphan"
            roots.append(node)
        else:
            children.setdefault(node.parent_id, []).append(node)

    def order(items: Iterable[Node]) -> list[Node]:
        return sorted(items, key=lambda n: (n.start, n.node_id))

    placed: list[Placed] = []
    visited: set[str] = set()

    def walk(tops: list[Node]) -> None:
        stack: list[tuple[Node, int, bool]] = [
            (node, 0, i == len(tops) - 1) for i, node in reversed(list(enumerate(tops)))]
        while stack:
            node, depth, last = stack.pop()
            if node.node_id in visited:
                continue
            visited.add(node.node_id)
            offset = int((node.start - origin).total_seconds() * 1000)
            placed.append(Placed(node, depth, offset, last))
            kids = [k for k in order(children.get(node.node_id, ())) if k.node_id not in visited]
            for i in range(len(kids) - 1, -1, -1):
                stack.append((kids[i], depth + 1, i == len(kids) - 1))

    walk(order(roots))
    # Whatever is left sits on parent cycles: each pass starts at the earliest node not yet shown.
    for node in order(nodes):
        if node.node_id not in visited:
            node.note = "cycle"
            walk([node])
    return placed


def flow_as_records(flow: Flow, placed: Sequence[Placed]) -> dict[str, Any]:
    """The flow for --format json: a flat list of nodes with depth (nested JSON would hit depth limits)."""
    return {
        "session_id": flow.session_id, "user_id": flow.user_id, "status": flow.status,
        "started_at": flow.started_at.isoformat(),
        "ended_at": flow.ended_at.isoformat() if flow.ended_at else None,
        "duration_ms": flow.duration_ms, "event_count": flow.event_count, "error_count": flow.error_count,
        "nodes": [{"node_id": p.node.node_id, "parent_id": p.node.parent_id, "depth": p.depth,
                   "name": p.node.name, "offset_ms": p.offset_ms, "duration_ms": p.node.duration_ms,
                   "status": p.node.status, "events": p.node.event_types, "attributes": p.node.attributes,
                   "note": p.node.note} for p in placed],
    }


SYNC_PACKER_BUFFER_CUTOFF = 6000  # redis-py's default: values larger than this are sent without a copy


# -- Redis, read-only ---------------------------------------------------------------------------
def connect_sync(settings: Settings) -> redis.Redis:
    # RESP2 pinned, like the worker's client: stream replies keep one shape.
    # Names that are not UTF-8 round-trip: decoded with surrogateescape (``_text``), encoded back the same way.
    # redis-py's hiredis packer encodes str strictly and ignores encoding_errors: pack with its Python packer
    # (stateless, so one serves every connection), which uses the client's encoder.
    encoder = Encoder("utf-8", "surrogateescape", decode_responses=False)  # type: ignore[no-untyped-call]
    return redis.Redis.from_url(settings.redis_url, protocol=2, socket_timeout=settings.socket_timeout_s,
                                socket_connect_timeout=min(5.0, settings.socket_timeout_s),
                                encoding_errors="surrogateescape",
                                command_packer=PythonRespSerializer(SYNC_PACKER_BUFFER_CUTOFF, encoder.encode),
                                **NO_CLIENT_INFO)


# "Redis cannot be reached", from a plain Redis or a cluster (a node down, slots not served, a failover under way):
# commands say it in one line and exit 1, never with a traceback. (Not OSError: a closed stdout is one too.)
REDIS_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, RedisClusterException, ClusterError)


def resolve_streams(client: SyncClient, specs: Iterable[str],
                    not_streams: list[tuple[str, str]] | None = None) -> list[str]:
    """Existing stream keys named or matched by the specs; never creates anything (unlike the worker's Source).
    On a cluster SCAN runs on every primary (redis-py's cluster ``scan_iter``), names are looked up where they live.
    ``not_streams`` collects (name, type) of the names given that hold another type (the worker leaves them out)."""
    found: list[str] = []
    for spec in specs:
        if is_pattern(spec):
            found.extend(sorted(_text(k) for k in client.scan_iter(match=spec, count=1000, _type="stream")))
            continue
        kind = _text(client.type(spec))
        if kind == "stream":
            found.append(spec)
        elif kind != "none" and not_streams is not None:
            not_streams.append((spec, kind))
    return list(dict.fromkeys(found))


def _text(value: Any) -> str:
    """Bytes from Redis as str that encodes back to the same bytes (see ``worker.source.text``); show it with
    ``printable``."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


# -- status -------------------------------------------------------------------------------------
@dataclass
class ConsumerStatus:
    name: str
    pending: int
    idle_ms: int


@dataclass
class GroupStatus:
    name: str
    lag: int | None  # None: Redis cannot tell; with lag_capped, "at least lag"
    lag_capped: bool
    pending: int
    stale_pending: int  # pending entries idle longer than the claim threshold (capped at 1000)
    last_delivered_id: str
    consumers: list[ConsumerStatus]


@dataclass
class StreamStatus:
    name: str
    length: int
    last_id: str
    group: GroupStatus | None  # the worker's group; None when the worker has not created it yet


@dataclass
class StatusReport:
    redis_url: str
    group: str
    claim_idle_ms: int
    max_lag: int
    streams: list[StreamStatus] = field(default_factory=list)
    redis_error: str = ""
    cluster_primaries: int = 0  # a Redis Cluster of this many primaries; 0: a plain Redis
    store: str = ""
    store_error: str = ""
    store_locked: bool = False
    events: int | None = None
    sessions: dict[str, int] = field(default_factory=dict)
    last_ingested_at: datetime | None = None
    rejected_total: int | None = None
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """No problem found, and everything asked for was checked (a store held by another process was not)."""
        return not self.problems and not self.store_locked

    @property
    def verdict(self) -> str:
        """healthy, unhealthy (a problem found), or unknown (no problem found, but the store was not checked)."""
        if self.problems:
            return "unhealthy"
        return "unknown" if self.store_locked else "healthy"

    @property
    def total_lag(self) -> int:
        return sum((s.group.lag or 0) if s.group else s.length for s in self.streams)

    @property
    def total_pending(self) -> int:
        return sum(s.group.pending for s in self.streams if s.group)

    def as_json(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy, "verdict": self.verdict, "problems": self.problems, "warnings": self.warnings,
            "redis": {"url": redact_url(self.redis_url), "error": self.redis_error or None, "group": self.group,
                      "claim_idle_ms": self.claim_idle_ms, "max_lag": self.max_lag,
                      "cluster_primaries": self.cluster_primaries,
                      "total_lag": self.total_lag, "total_pending": self.total_pending},
            "streams": [{
                "name": s.name, "length": s.length, "last_id": s.last_id,
                "group": None if s.group is None else {
                    "name": s.group.name, "lag": s.group.lag, "lag_capped": s.group.lag_capped,
                    "pending": s.group.pending, "stale_pending": s.group.stale_pending,
                    "last_delivered_id": s.group.last_delivered_id,
                    "consumers": [{"name": c.name, "pending": c.pending, "idle_ms": c.idle_ms}
                                  for c in s.group.consumers]}}
                for s in self.streams],
            "store": {"description": self.store, "error": self.store_error or None, "locked": self.store_locked,
                      "events": self.events, "sessions": self.sessions,
                      "last_ingested_at": self.last_ingested_at.isoformat() if self.last_ingested_at else None,
                      "rejected": self.rejected_total, "rejected_by_reason": self.rejected_by_reason},
        }


def redis_status(report: StatusReport, settings: Settings) -> None:
    """Fill the Redis half of the report; only reads (XINFO, XPENDING, XRANGE). On a cluster every command goes to
    the node that owns the stream, so the totals (lag, pending) are summed over the whole cluster."""
    from worker.redisclient import connect_sync as connect_any

    client: SyncClient | None = None
    try:
        client = connect_any(settings)
        if isinstance(client, redis.RedisCluster):
            report.cluster_primaries = len(client.get_primaries())  # type: ignore[no-untyped-call]
        not_streams: list[tuple[str, str]] = []
        keys = resolve_streams(client, settings.streams, not_streams)
        for spec, kind in not_streams:  # a configured name the worker leaves out: say so, as the worker does
            report.warnings.append(f"{printable(spec)} holds a {kind}, not a stream: the worker does not consume it "
                                   "(it does once the name holds a stream)")
        for start in range(0, len(keys), STATUS_CHUNK):
            report.streams.extend(_streams_status(client, keys[start:start + STATUS_CHUNK], settings.group,
                                                  report.claim_idle_ms, report.max_lag))
    except (*REDIS_UNREACHABLE, OSError) as exc:
        report.redis_error = f"Redis unreachable at {redact_url(settings.redis_url)}: {' '.join(str(exc).split())}"
    finally:
        if client is not None:
            client.close()


# Streams asked about per pipeline: one stream at a time took three or four round trips each (20,000 streams: 14 s).
STATUS_CHUNK = 500


def _replies(client: SyncClient, calls: Sequence[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
    """One pipeline of (method, args, kwargs) calls; each reply, or the error Redis gave for it."""
    pipe = client.pipeline(transaction=False)
    for method, args, kwargs in calls:
        getattr(pipe, method)(*args, **kwargs)
    return list(pipe.execute(raise_on_error=False))


def _usable(reply: Any) -> bool:
    """A reply to use; False for a stream deleted (or its group destroyed) since the scan: nothing to report about
    it. Any other error is raised."""
    if isinstance(reply, Exception):
        if isinstance(reply, redis.ResponseError) and vanished(reply):
            return False
        raise reply
    return True


def _streams_status(client: SyncClient, names: Sequence[str], group_name: str, claim_idle_ms: int,
                    max_lag: int) -> list[StreamStatus]:
    """``names`` are exact keys (surrogate-escaped); the report holds them ``printable``: text for terminals and
    JSON, whatever bytes the key holds. Two pipelines: every stream's info and groups, then what the streams
    holding the group need (their consumers, idle pending entries, and on Redis < 7 the lag)."""
    # As bytes: a cluster pipeline computes the slot with a strict encoder, which refuses a surrogate-escaped key.
    keys = {name: name.encode("utf-8", "surrogateescape") for name in names}
    asks: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    for name in names:
        asks += [("xinfo_stream", (keys[name],), {}), ("xinfo_groups", (keys[name],), {})]
    first = _replies(client, asks)
    found: list[tuple[str, Any, Any]] = []  # (name, stream info, our group's XINFO GROUPS row or None)
    for name, info, groups in zip(names, first[::2], first[1::2], strict=True):
        if _usable(info) and _usable(groups):
            found.append((name, info, next((g for g in groups if _text(g["name"]) == group_name), None)))
    cap = max(max_lag + 1, 1000)
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    for name, _, raw in found:
        if raw is None:
            continue
        calls.append(("xinfo_consumers", (keys[name], group_name), {}))
        if int(raw["pending"]):  # idle pending entries: asked only where there are pending entries
            calls.append(("xpending_range", (keys[name], group_name), {"min": "-", "max": "+", "count": 1000,
                                                                       "idle": claim_idle_ms}))
        if raw.get("lag") is None:  # Redis < 7 does not report lag: count what lies beyond the last delivered id
            calls.append(("xrange", (keys[name],), {"min": f"({_text(raw['last-delivered-id'])}", "max": "+",
                                                    "count": cap}))
    second = iter(_replies(client, calls)) if calls else iter(())
    statuses = []
    for name, info, raw in found:
        group = None
        if raw is not None:
            lag, capped = raw.get("lag"), False
            consumers = next(second)
            stale_rows = next(second) if int(raw["pending"]) else []
            beyond = next(second) if lag is None else []
            if not (_usable(consumers) and _usable(stale_rows) and _usable(beyond)):
                continue
            if lag is None:
                lag, capped = len(beyond), len(beyond) >= cap
            group = GroupStatus(
                printable(group_name), None if lag is None else int(lag), capped, int(raw["pending"]),
                len(stale_rows), _text(raw["last-delivered-id"]),
                [ConsumerStatus(printable(_text(c["name"])), int(c["pending"]), int(c["idle"])) for c in consumers])
        statuses.append(StreamStatus(printable(name), int(info["length"]), _text(info.get("last-generated-id", "")),
                                     group))
    return statuses


def store_status(report: StatusReport, store: Store) -> None:
    """Fill the store half: events, sessions by status, freshness, rejected entries by reason."""
    report.store = store.description
    # From the rollup (one row per session) instead of counting events FINAL: the sum of its exact per-session
    # counts is the number of visible events.
    _, rows = store.query("SELECT status, count(), sum(event_count) FROM flowtrack.flow_sessions "
                          "GROUP BY status ORDER BY status")
    report.sessions = {str(status): int(count) for status, count, _ in rows}
    report.events = sum(int(events) for _, _, events in rows)
    report.last_ingested_at = last_ingested_at(store) if report.events else None
    # Classed in the store as reason_class does (quoted values out before the split at ':', numbers blanked): the
    # heads then repeat, and the 1000 commonest cover what matters; the total is counted on its own.
    _, rows = store.query(
        "SELECT replaceRegexpAll(splitByChar(':', replaceRegexpAll(reason, {quoted:String}, '…'))[1], '[0-9]+', 'N') "
        "AS head, count() FROM flowtrack.rejected_events GROUP BY head ORDER BY count() DESC LIMIT 1000",
        {"quoted": QUOTED_PATTERN})
    by_reason: Counter[str] = Counter()
    for head, count in rows:
        by_reason[reason_class(str(head))] += int(count)
    report.rejected_by_reason = dict(by_reason.most_common())
    report.rejected_total = int(store.scalar("SELECT count() FROM flowtrack.rejected_events") or 0)
    broken = store.broken_stored_parts()
    if broken:
        report.problems.append(broken_parts_message(broken))


def last_ingested_at(store: Store) -> Any:
    """The latest insert time: the last day first (the minmax index on ingested_at skips older granules),
    the whole time-ordered copy only when nothing arrived that day."""
    recent = store.scalar("SELECT max(ingested_at) FROM flowtrack.events_by_time "
                          "WHERE ingested_at >= now64(3) - INTERVAL 1 DAY HAVING count() > 0")
    return recent if recent is not None else store.scalar("SELECT max(ingested_at) FROM flowtrack.events_by_time")


def collect_status(settings: Settings, max_lag: int, check_store: bool = True) -> StatusReport:
    """Everything `flowtrack status` shows; StoreLockedError is recorded, not raised (the caller decides)."""
    report = StatusReport(settings.redis_url, settings.group, settings.claim_idle_ms, max_lag)
    redis_status(report, settings)
    if check_store:
        try:
            store_status(report, Store.open(settings))
        except StoreLockedError as exc:
            report.store_locked = True
            report.store_error = str(exc)
        except StoreUnavailableError as exc:
            report.store_error = str(exc)
        except Exception as exc:  # a missing schema, a server refusing us: unhealthy, say why
            report.store_error = f"store query failed: {' '.join(str(exc).split())[:300]}"
    judge(report)
    return report


def judge(report: StatusReport) -> None:
    """Problems make the exit code non-zero; warnings are shown only."""
    if report.redis_error:
        report.problems.append(report.redis_error)
    for stream in report.streams:
        group = stream.group
        if group is None:
            if stream.length:
                report.warnings.append(f"{stream.name}: no group {report.group!r} yet ({stream.length} entries "
                                       "unread; the worker creates it when it first sees the stream)")
                if stream.length > report.max_lag:
                    report.problems.append(f"{stream.name}: {stream.length} entries and no consumer group "
                                           f"(over --max-lag {report.max_lag})")
            continue
        if group.lag is not None and group.lag > report.max_lag:
            report.problems.append(f"{stream.name}: lag {group.lag}{'+' if group.lag_capped else ''} entries "
                                   f"(over --max-lag {report.max_lag})")
        if group.stale_pending:
            report.problems.append(f"{stream.name}: {group.stale_pending}{'+' if group.stale_pending >= 1000 else ''}"
                                   f" pending entries idle over the claim threshold ({report.claim_idle_ms} ms): "
                                   "is a worker running?")
        if (group.lag or group.pending) and not group.consumers:
            report.warnings.append(f"{stream.name}: entries waiting and no consumer in group {report.group!r}")
    if report.store_error and not report.store_locked:
        report.problems.append(report.store_error)
    if report.rejected_total:
        report.warnings.append(f"{report.rejected_total} rejected entries (see `flowtrack rejected`)")


# -- rejected entries and replay ----------------------------------------------------------------
REJECTED_COLUMNS = ("received_at", "source_stream", "source_id", "reason", "raw")


@dataclass
class RejectedRow:
    received_at: datetime
    source_stream: str
    source_id: str
    reason: str
    raw: str
    replayed: str = ""  # '', 'queued <new id>' (re-XADDed) or 'stored' (the replayed event landed)

    @property
    def key(self) -> str:
        return f"{self.source_stream}/{self.source_id}"


def list_rejected(store: Store, stream: str | None = None, ids: Sequence[str] = (), reason: str | None = None,
                  since: datetime | None = None, limit: int = 50) -> list[RejectedRow]:
    where: list[str] = []
    params: dict[str, Any] = {"limit": max(0, limit)}
    if stream is not None:
        where.append("source_stream = {stream:String}")
        params["stream"] = stream
    if ids:
        where.append("source_id IN {ids:Array(String)}")
        params["ids"] = list(ids)
    if reason:
        where.append("positionCaseInsensitiveUTF8(reason, {reason:String}) > 0")
        params["reason"] = reason
    if since is not None:
        where.append("received_at >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC')")
        params["since_ms"] = epoch_ms(since)
    clause = f"WHERE {' AND '.join(where)} " if where else ""
    _, rows = store.query(f"SELECT {', '.join(REJECTED_COLUMNS)} FROM flowtrack.rejected_events {clause}"  # noqa: S608
                          "ORDER BY received_at DESC, source_stream, source_id LIMIT {limit:UInt32}", params)
    found = [RejectedRow(*row) for row in rows]
    if found:
        _, stored = store.query(
            f"SELECT DISTINCT attributes['{REPLAYED_ATTRIBUTE}'] AS k FROM flowtrack.flow_events "  # noqa: S608
            "WHERE k IN {keys:Array(String)}", {"keys": [r.key for r in found]})
        landed = {row[0] for row in stored}
        for row in found:
            if row.key in landed:
                row.replayed = "stored"
    return found


def mark_queued_replays(client: SyncClient, rows: Sequence[RejectedRow]) -> None:
    """Fill 'queued <id>' for rows replayed to the stream but not (yet) stored."""
    todo = [r for r in rows if not r.replayed]
    if not todo:
        return
    _check_replay_records(client)
    records = client.hmget(REPLAYED_KEY, [_replay_field(r.source_stream, r.source_id) for r in todo])
    for row, record in zip(todo, records, strict=True):
        if record:
            row.replayed = f"queued {_replay_record(record).get('new_id', '?')}"


def _replay_field(stream: str, entry_id: str) -> str:
    return f"{stream} {entry_id}"


def _check_replay_records(client: SyncClient) -> None:
    """The replay records are a hash at REPLAYED_KEY, a key anybody with write access to Redis can change."""
    kind = _text(client.type(REPLAYED_KEY))
    if kind not in ("hash", "none"):
        raise FlowtrackError(f"Redis key {REPLAYED_KEY} holds a {printable(kind)}, not the hash of replay records: "
                             "rename or delete it")


def _replay_record(raw: Any) -> dict[str, Any]:
    """One replay record as written by ``replay``; anything else (edited by hand) reads as a record without
    details: the entry was replayed, what became of it is unknown."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(record, dict):
        return {}
    return {key: printable(str(value)) for key, value in record.items()}


def _record_text(text: str) -> str:
    """Text for a replay record: JSON takes only UTF-8, and ids keep bytes that were not (lone surrogates)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class ReplayOutcome:
    source_stream: str
    source_id: str
    action: str  # replayed | already replayed | still invalid | nothing to replay | not replayed | not found
    detail: str = ""
    new_id: str = ""
    event_id: str = ""


def replay_fields(stream: str, entry_id: str, raw: str) -> dict[str, str]:
    """The rejected entry's fields, pinned so the replay is the same event as the original would have been.

    ``event_id`` defaults to the id the original entry derived (so replaying twice, or replaying an entry
    that did land after all, is visible once), ``timestamp`` to the original entry id's time; values inside
    a ``data`` envelope still win over these flat defaults. ``replayed_from`` records the origin.
    The raw is read back exactly (``parse_raw``): bytes that were not UTF-8 come back as the same lone
    surrogates, so ``as_bytes`` gives the original bytes. A raw kept truncated (an oversized entry) has nothing
    to replay.
    """
    try:
        decoded = parse_raw(raw) if raw else {}
    except ValueError:
        return {}
    if not isinstance(decoded, dict):
        return {}
    fields = {str(k): v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in decoded.items()}
    if not fields:
        return {}
    fields.setdefault("event_id", derive_event_id(stream, entry_id, mapping_digest(fields)))
    fields.setdefault("timestamp", str(entry_id_ms(entry_id)))
    fields[REPLAYED_ATTRIBUTE] = f"{stream}/{entry_id}"
    return fields


def _as_entry(fields: dict[str, str]) -> dict[bytes, bytes]:
    """Fields as the stream holds them: the exact original bytes, for the re-check and for XADD."""
    return {as_bytes(k): as_bytes(v) for k, v in fields.items()}


def replay(store: Store, client: SyncClient, settings: Settings, rows: Sequence[RejectedRow],
           force: bool = False, again: bool = False) -> list[ReplayOutcome]:
    """Re-XADD chosen rejected entries to their source stream, to be read by the worker like any entry.

    Two separate overrides, so neither re-adds entries by surprise: entries that the current contract still
    rejects are replayed only with ``force`` (they come back as rejections with today's reason); entries
    already replayed (the record is a hash in Redis) only with ``again`` — and the pinned event_id keeps
    such a replay visible once anyway.
    """
    normalizer = Normalizer(settings.end_event_types, settings.error_event_types)
    outcomes: list[ReplayOutcome] = []
    _check_replay_records(client)
    for row in rows:
        outcome = ReplayOutcome(row.source_stream, row.source_id, "replayed")
        fields = replay_fields(row.source_stream, row.source_id, row.raw)
        record = client.hget(REPLAYED_KEY, _replay_field(row.source_stream, row.source_id))
        if row.reason.startswith(KEY_NOT_UTF8):  # even with --force: the key's exact bytes were not kept
            outcome.action, outcome.detail = "still invalid", row.reason
        elif not fields:
            outcome.action = "nothing to replay"
            outcome.detail = ("the entry repeats a field name: which value is meant is not known"
                              if row.raw.startswith(f'["{REPEATED_RAW_TAG}"')
                              else "the raw entry was kept truncated (over the size limit)" if row.raw.startswith("[")
                              else "the entry had no fields (deleted before read)")
        elif (record or row.replayed == "stored") and not again:
            outcome.action = "already replayed"
            outcome.new_id = _replay_record(record).get("new_id", "") if record else ""
            outcome.detail = "use --again to replay it once more (the event stays visible once)"
        else:
            entry = _as_entry(fields)
            checked = normalizer.normalize(row.source_stream, row.source_id, entry)
            if not isinstance(checked, FlowEvent) and not force:
                outcome.action, outcome.detail = "still invalid", checked.reason
            else:
                outcome.event_id = checked.event_id if isinstance(checked, FlowEvent) else fields["event_id"]
                try:
                    new_id = _text(client.xadd(row.source_stream, entry))  # type: ignore[arg-type]
                except redis.ResponseError as exc:  # e.g. WRONGTYPE: the stream's name now holds another type
                    outcome.action, outcome.detail = "not replayed", f"Redis refused the XADD: {exc}"
                    outcomes.append(outcome)
                    continue
                outcome.new_id = new_id
                client.hset(REPLAYED_KEY, _replay_field(row.source_stream, row.source_id), orjson.dumps({
                    "new_id": new_id, "event_id": _record_text(outcome.event_id), "at_ms": int(time.time() * 1000),
                    "reason": _record_text(row.reason[:200])}).decode())
        outcomes.append(outcome)
    return outcomes
