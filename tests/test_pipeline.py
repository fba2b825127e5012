"""End-to-end, in process: a real redis-server -> Pipeline -> the real ClickHouse engine (the ``store`` fixture).

Every expectation is derived from the entries the test itself wrote, never from the code under test.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from conftest import derived_id, drain, make_settings, xadd_all

from worker.normalize import FlowEvent, Normalizer, Rejection, as_bytes, parse_raw
from worker.pipeline import Pipeline
from worker.redisserver import RedisServer
from worker.settings import Settings
from worker.sink import Sink
from worker.store import Store

GROUP = "flowtrack"
T0 = 1_735_689_600_000  # 2025-01-01T00:00:00Z in ms


# -- helpers ---------------------------------------------------------------------------------------

def event(session: str, node: str, event_type: str, ts_ms: int, parent: str | None = None,
          user: str | None = "7", **attrs: str) -> dict[str, str]:
    fields = {"session_id": session, "node_id": node, "event_type": event_type, "timestamp": str(ts_ms)}
    if user is not None:
        fields["user_id"] = user
    if parent:
        fields["parent_id"] = parent
    fields.update(attrs)
    return fields


def as_json(fields: Mapping[str, Any], field: str = "data") -> dict[str, str]:
    return {field: orjson.dumps(dict(fields)).decode()}


def rows(store: Store, sql: str, **params: Any) -> list[dict[str, Any]]:
    columns, data = store.query(sql, params or None)
    return [dict(zip(columns, row, strict=True)) for row in data]


def events_by_id(store: Store) -> dict[str, dict[str, Any]]:
    result = rows(store, "SELECT event_id, user_id, session_id, node_id, parent_id, event_type, "
                         "toUnixTimestamp64Milli(ts) AS ts_ms, attributes, source_stream, source_id "
                         "FROM flowtrack.flow_events")
    by_id = {r["event_id"]: r for r in result}
    assert len(by_id) == len(result), "an event_id is visible more than once in flow_events"
    return by_id


def sessions(store: Store) -> dict[tuple[str, str], dict[str, Any]]:
    result = rows(store, "SELECT user_id, session_id, toUnixTimestamp64Milli(started_at) AS started, "
                         "toUnixTimestamp64Milli(last_event_at) AS last, "
                         "if(ended_at IS NULL, NULL, toUnixTimestamp64Milli(assumeNotNull(ended_at))) AS ended, "
                         "event_count, error_count, status, duration_ms FROM flowtrack.flow_sessions")
    by_key = {(r["user_id"], r["session_id"]): r for r in result}
    assert len(by_key) == len(result), "a session is visible more than once in flow_sessions"
    return by_key


def rejected_rows(store: Store) -> dict[tuple[str, str], dict[str, Any]]:
    result = rows(store, "SELECT source_stream, source_id, reason, raw FROM flowtrack.rejected_events")
    by_key = {(r["source_stream"], r["source_id"]): r for r in result}
    assert len(by_key) == len(result), "a rejected entry is visible more than once"
    return by_key


def group_pending(client: redis.Redis, streams: Sequence[str]) -> int:
    return sum(int(client.xpending(s, GROUP)["pending"]) for s in streams)


def assert_fully_consumed(client: redis.Redis, streams: Sequence[str]) -> None:
    """Nothing pending and the group has been delivered every entry of every stream."""
    assert group_pending(client, streams) == 0
    for stream in streams:
        newest: Any = client.xrevrange(stream, count=1)
        group = next(g for g in client.xinfo_groups(stream) if g["name"] == GROUP.encode())
        assert group["last-delivered-id"] == newest[0][0], f"{stream}: entries left unread"


def settings_for(redis_server: RedisServer, clickhouse_url: str, **overrides: Any) -> Settings:
    return make_settings(redis_server.url, clickhouse_url, **overrides)


# -- both shapes, per-user streams -----------------------------------------------------------------

def test_both_shapes_land_with_exact_values(redis_server: RedisServer, redis_client: redis.Redis,
                                            clickhouse_url: str, store: Store) -> None:
    flat_single = event("s-shapes", "root", "user_message", T0 + 1, text="hello", channel="web")
    json_single = event("s-shapes", "llm-1", "llm_call", T0 + 2, parent="root")
    json_single.pop("timestamp")  # -> the entry id's milliseconds
    payload_user = event("s-shapes", "tool-1", "tool_call", T0 + 3, parent="llm-1", user=None)
    flat_user = event("s-shapes", "end", "flow_completed", T0 + 4, parent="root", user=None, took="12")
    entries: list[tuple[str, Mapping[str, Any]]] = [
        ("flow_events", flat_single),
        ("flow_events", as_json({**json_single, "meta": {"k": [1, 2]}, "n": 3})),
        ("flow_events:7", as_json(payload_user, field="payload")),
        ("flow_events:7", flat_user),
    ]
    ids = xadd_all(redis_client, entries)

    drain(settings_for(redis_server, clickhouse_url))

    got = events_by_id(store)
    expected = {
        derived_id("flow_events", ids[0], entries[0][1]): dict(
            user_id="7", session_id="s-shapes", node_id="root", parent_id="", event_type="user_message",
            ts_ms=T0 + 1, attributes={"text": "hello", "channel": "web"}, source_stream="flow_events",
            source_id=ids[0]),
        derived_id("flow_events", ids[1], entries[1][1]): dict(
            user_id="7", session_id="s-shapes", node_id="llm-1", parent_id="root", event_type="llm_call",
            ts_ms=int(ids[1].split("-")[0]), attributes={"meta": '{"k":[1,2]}', "n": "3"},
            source_stream="flow_events", source_id=ids[1]),
        derived_id("flow_events:7", ids[2], entries[2][1]): dict(
            user_id="7", session_id="s-shapes", node_id="tool-1", parent_id="llm-1", event_type="tool_call",
            ts_ms=T0 + 3, attributes={}, source_stream="flow_events:7", source_id=ids[2]),
        derived_id("flow_events:7", ids[3], entries[3][1]): dict(
            user_id="7", session_id="s-shapes", node_id="end", parent_id="root", event_type="flow_completed",
            ts_ms=T0 + 4, attributes={"took": "12"}, source_stream="flow_events:7", source_id=ids[3]),
    }
    assert set(got) == set(expected)
    for event_id, want in expected.items():
        assert {k: got[event_id][k] for k in want} == want, event_id
    session = sessions(store)[("7", "s-shapes")]
    assert session["event_count"] == 4
    assert session["status"] == "completed"
    assert_fully_consumed(redis_client, ["flow_events", "flow_events:7"])


def test_stream_created_after_start_is_discovered(redis_server: RedisServer, redis_client: redis.Redis,
                                                  clickhouse_url: str, store: Store) -> None:
    xadd_all(redis_client, [("flow_events:early", event("s-early", "n", "user_message", T0, user=None))])
    late = [event("s-late", f"n{i}", "llm_call", T0 + i, parent=f"n{i - 1}" if i else None, user=None)
            for i in range(5)]
    settings = settings_for(redis_server, clickhouse_url, stream_rescan_s=0.2)

    async def go() -> tuple[bool, float]:
        pipeline = Pipeline(settings)
        client = aioredis.Redis.from_url(redis_server.url, protocol=2)
        task = asyncio.create_task(pipeline.run())
        try:
            await wait_acked(client, "flow_events:early")
            assert not await client.exists("flow_events:late")
            async with client.pipeline(transaction=False) as pipe:
                for fields in late:
                    pipe.xadd("flow_events:late", fields)  # type: ignore[arg-type]
                await pipe.execute()
            await wait_acked(client, "flow_events:late")
        finally:
            started = time.monotonic()
            pipeline.request_stop()
            ok = await asyncio.wait_for(task, timeout=15)
            stopped_in = time.monotonic() - started
            await pipeline.close()
            await client.aclose()
        return ok, stopped_in

    ok, stopped_in = asyncio.run(go())
    assert ok
    assert stopped_in < 5
    got = events_by_id(store)
    assert sorted((e["user_id"], e["session_id"], e["node_id"]) for e in got.values()) == sorted(
        [("early", "s-early", "n")] + [("late", "s-late", f["node_id"]) for f in late])
    assert sessions(store)[("late", "s-late")]["event_count"] == len(late)
    assert_fully_consumed(redis_client, ["flow_events:early", "flow_events:late"])


async def wait_acked(client: aioredis.Redis, stream: str, timeout_s: float = 20) -> None:
    """Until the group has been delivered every entry of ``stream`` and acknowledged them all.

    (Redis 6.2 has no ``entries-read``/``lag``: compare the last-delivered id with the newest entry.)
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        newest = await client.xrevrange(stream, count=1)
        if newest:
            groups = await client.xinfo_groups(stream)
            group = next((g for g in groups if g["name"] == GROUP.encode()), None)
            if group is not None and group["last-delivered-id"] == newest[0][0] and group["pending"] == 0:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{stream}: entries not consumed and acknowledged within {timeout_s}s")


# -- trees -----------------------------------------------------------------------------------------

def test_deep_and_wide_trees(redis_server: RedisServer, redis_client: redis.Redis, clickhouse_url: str,
                             store: Store) -> None:
    depth, width = 500, 2000
    deep = [event("s-deep", f"d{i}", "llm_call" if i % 2 else "tool_call", T0 + i * 10,
                  parent=f"d{i - 1}" if i else None) for i in range(depth)]
    wide: list[dict[str, str]] = [event("s-wide", "root", "user_message", T0)]
    durations = {}
    for i in range(width):
        start = T0 + 100 + i
        durations[f"c{i}"] = 10 + i % 7
        wide.append(event("s-wide", f"c{i}", "tool_call", start, parent="root", user=None))
        wide.append(event("s-wide", f"c{i}", "tool_result", start + durations[f"c{i}"], parent="root", user=None))
    rng = random.Random(2)
    rng.shuffle(wide)  # arrival order is not time order: a node's name is its earliest event's type
    entries = [("flow_events", f) for f in deep] + [("flow_events:7", f) for f in wide]
    xadd_all(redis_client, entries)

    drain(settings_for(redis_server, clickhouse_url, batch_max_rows=700))

    nodes = rows(store, "SELECT session_id, node_id, parent_id, name, toUnixTimestamp64Milli(start_ts) AS start, "
                        "toUnixTimestamp64Milli(end_ts) AS end, duration_ms, status, user_id "
                        "FROM flowtrack.flow_nodes WHERE session_id IN ('s-deep', 's-wide')")
    deep_nodes = {n["node_id"]: n for n in nodes if n["session_id"] == "s-deep"}
    wide_nodes = {n["node_id"]: n for n in nodes if n["session_id"] == "s-wide"}
    assert len(deep_nodes) == depth
    assert len(wide_nodes) == width + 1
    for i in range(depth):
        node = deep_nodes[f"d{i}"]
        assert node["parent_id"] == (f"d{i - 1}" if i else "")
        assert node["name"] == ("llm_call" if i % 2 else "tool_call")
        assert (node["start"], node["end"], node["duration_ms"]) == (T0 + i * 10, T0 + i * 10, 0)
    # walking up from the deepest leaf reaches the root after exactly `depth` levels
    levels, node_id = 0, f"d{depth - 1}"
    while node_id:
        levels += 1
        node_id = deep_nodes[node_id]["parent_id"]
    assert levels == depth
    assert wide_nodes["root"]["parent_id"] == "" and wide_nodes["root"]["name"] == "user_message"
    for child, duration in durations.items():
        node = wide_nodes[child]
        assert (node["parent_id"], node["name"], node["duration_ms"], node["status"], node["user_id"]) == (
            "root", "tool_call", duration, "ok", "7"), child
    all_sessions = sessions(store)
    assert all_sessions[("7", "s-deep")]["event_count"] == depth
    assert all_sessions[("7", "s-wide")]["event_count"] == len(wide)
    assert all_sessions[("7", "s-deep")]["duration_ms"] == (depth - 1) * 10
    assert_fully_consumed(redis_client, ["flow_events", "flow_events:7"])


# -- unicode ---------------------------------------------------------------------------------------

def test_unicode_ids_and_attributes_round_trip(redis_server: RedisServer, redis_client: redis.Redis,
                                               clickhouse_url: str, store: Store) -> None:
    cases = [
        event("séance-🧵", "nœud-racine", "user_message", T0, user="ユーザー", texte="Résumé des ventes 📈"),
        event("séance-🧵", "子ノード", "llm_call", T0 + 5, parent="nœud-racine", user="ユーザー",
              **{"clé-é": "значение", "emoji": "👩‍💻"}),
    ]
    entries: list[tuple[str, Mapping[str, Any]]] = [
        ("flow_events", cases[0]),
        ("flow_events:ユーザー", as_json({**cases[1], "nested": {"ключ": ["ü", 1]}})),
    ]
    ids = xadd_all(redis_client, entries)

    drain(settings_for(redis_server, clickhouse_url))

    got = events_by_id(store)
    first = got[derived_id("flow_events", ids[0], entries[0][1])]
    second = got[derived_id("flow_events:ユーザー", ids[1], entries[1][1])]
    assert (first["session_id"], first["node_id"], first["user_id"]) == ("séance-🧵", "nœud-racine", "ユーザー")
    assert first["attributes"] == {"texte": "Résumé des ventes 📈"}
    assert (second["node_id"], second["parent_id"], second["source_stream"]) == (
        "子ノード", "nœud-racine", "flow_events:ユーザー")
    assert second["attributes"] == {"clé-é": "значение", "emoji": "👩‍💻", "nested": '{"ключ":["ü",1]}'}
    # unicode parameters in SQL find them too
    assert rows(store, "SELECT count() AS n FROM flowtrack.flow_events WHERE session_id = {s:String}",
                s="séance-🧵") == [{"n": 2}]
    assert sessions(store)[("ユーザー", "séance-🧵")]["event_count"] == 2


# -- duplicates and redelivery ---------------------------------------------------------------------

# Duplicates across batches, and within one insert (the sink sends the last copy of each: sink.last_copies).
@pytest.mark.parametrize("batch_max_rows", [4, 20000], ids=["across-batches", "within-one-insert"])
def test_explicit_duplicate_event_ids_are_visible_once(redis_server: RedisServer, redis_client: redis.Redis,
                                                       clickhouse_url: str, store: Store, batch_max_rows: int) -> None:
    originals = [event("s-dup", f"n{i}", "error" if i == 3 else "llm_call", T0 + i, event_id=f"ev-{i}")
                 for i in range(6)]
    dup_within_run: list[tuple[str, Mapping[str, Any]]] = [
        ("flow_events", originals[0]),                      # same stream, same shape
        ("flow_events", as_json(originals[1])),             # other shape
        ("flow_events:7", as_json(originals[2], "payload")),  # other stream (user 7 from the key too)
        ("flow_events", originals[3]), ("flow_events", originals[3]),  # the error event three times
    ]
    xadd_all(redis_client, [("flow_events", f) for f in originals] + dup_within_run)
    settings = settings_for(redis_server, clickhouse_url, batch_max_rows=batch_max_rows)
    drain(settings)

    def check() -> None:
        got = events_by_id(store)
        assert sorted(got) == sorted(f"ev-{i}" for i in range(6))
        assert {e["node_id"] for e in got.values()} == {f"n{i}" for i in range(6)}
        session = sessions(store)[("7", "s-dup")]
        assert (session["event_count"], session["error_count"], session["status"]) == (6, 1, "failed")

    check()
    if batch_max_rows > len(originals) + len(dup_within_run):  # one insert: one copy of each event goes in
        assert store.scalar("SELECT count() FROM flowtrack.events WHERE event_id = 'ev-3'") == 1
    # the same explicit ids again, in new entries, in a later run
    xadd_all(redis_client, [("flow_events:7", as_json(f)) for f in originals])
    drain(settings)
    check()
    assert_fully_consumed(redis_client, ["flow_events", "flow_events:7"])


def _mixed_corpus() -> tuple[list[tuple[str, Mapping[str, Any]]], int]:
    """Valid events of three sessions (both shapes, two streams) plus malformed entries; (entries, n_valid)."""
    valid: list[tuple[str, Mapping[str, Any]]] = []
    for s in range(3):
        for i in range(15):
            fields = event(f"s-r{s}", f"n{i}", "flow_completed" if i == 14 and s == 0 else "llm_call",
                           T0 + s * 1000 + i, parent=f"n{i - 1}" if i else None, user=None)
            valid.append((f"flow_events:{s}", as_json(fields) if i % 2 else fields))
    malformed: list[tuple[str, Mapping[str, Any]]] = [
        ("flow_events:0", {"data": "{broken"}),
        ("flow_events:1", {"node_id": "x", "event_type": "t"}),
    ]
    return valid + malformed, len(valid)


def _snapshot(store: Store) -> tuple[Any, ...]:
    got = events_by_id(store)
    visible = sorted((k, v["session_id"], v["node_id"], v["ts_ms"], v["source_id"]) for k, v in got.items())
    return visible, sessions(store), sorted((k, v["reason"]) for k, v in rejected_rows(store).items())


def test_redelivery_of_already_stored_entries_changes_nothing(redis_server: RedisServer,
                                                              redis_client: redis.Redis, clickhouse_url: str,
                                                              store: Store) -> None:
    entries, n_valid = _mixed_corpus()
    xadd_all(redis_client, entries)
    streams = sorted({s for s, _ in entries})
    first = drain(settings_for(redis_server, clickhouse_url, batch_max_rows=50, read_count=50))
    assert first.stats.batches == 1
    before = _snapshot(store)
    assert len(before[0]) == n_valid
    assert len(before[2]) == len(entries) - n_valid
    assert sessions(store)[("0", "s-r0")]["status"] == "completed"

    # 1. the group forgets it ever delivered anything: every entry is delivered and inserted again,
    #    in batches of another composition (so no insert-dedup token matches)
    for stream in streams:
        redis_client.xgroup_setid(stream, GROUP, "0")
    again = drain(settings_for(redis_server, clickhouse_url, batch_max_rows=7, read_count=2))
    assert again.stats.read == len(entries)
    assert again.stats.batches > 1
    assert _snapshot(store) == before

    # 2. the very same batch written twice through the sink (a crash between insert and ack, then a retry)
    normalizer = Normalizer()
    stored: dict[str, Any] = {s: redis_client.xrange(s) for s in streams}
    items = [normalizer.normalize(s, i.decode(), f) for s in streams for i, f in stored[s]]
    batch_events = [x for x in items if isinstance(x, FlowEvent)]
    batch_rejections = [x for x in items if isinstance(x, Rejection)]
    assert len(batch_events) == n_valid
    sink = Sink(store)
    for _ in range(2):
        result = sink.write(batch_events, batch_rejections)
        assert result.stored == n_valid
    assert _snapshot(store) == before
    assert_fully_consumed(redis_client, streams)


def test_crash_after_insert_before_ack_is_redelivered_once(redis_server: RedisServer,
                                                           redis_client: redis.Redis, clickhouse_url: str,
                                                           store: Store) -> None:
    entries, n_valid = _mixed_corpus()
    xadd_all(redis_client, entries)
    streams = sorted({s for s, _ in entries})
    settings = settings_for(redis_server, clickhouse_url)
    # A previous life of this very consumer read everything and stored it, then died before XACK.
    for stream in streams:
        redis_client.xgroup_create(stream, GROUP, id="0")
    reply: Any = redis_client.xreadgroup(GROUP, settings.consumer, {s: ">" for s in streams}, count=1000)
    normalizer = Normalizer()
    items = [normalizer.normalize(s.decode(), i.decode(), f) for s, msgs in reply for i, f in msgs]
    assert len(items) == len(entries)
    Sink(store).write([x for x in items if isinstance(x, FlowEvent)], [x for x in items if isinstance(x, Rejection)])
    assert group_pending(redis_client, streams) == len(entries)

    pipeline = drain(settings)

    assert pipeline.stats.read == len(entries)  # its own pending entries were re-read
    assert len(events_by_id(store)) == n_valid
    assert len(rejected_rows(store)) == len(entries) - n_valid
    assert all(s["event_count"] == 15 for s in sessions(store).values())
    assert_fully_consumed(redis_client, streams)


def test_drain_claims_entries_pending_on_a_dead_consumer(redis_server: RedisServer, redis_client: redis.Redis,
                                                         clickhouse_url: str, store: Store) -> None:
    fields = [event("s-dead", f"n{i}", "llm_call", T0 + i) for i in range(20)]
    xadd_all(redis_client, [("flow_events", f) for f in fields])
    redis_client.xgroup_create("flow_events", GROUP, id="0")
    redis_client.xreadgroup(GROUP, "dead-worker", {"flow_events": ">"}, count=12)
    assert group_pending(redis_client, ["flow_events"]) == 12

    drain(settings_for(redis_server, clickhouse_url, claim_idle_ms=200, claim_interval_s=0.1))

    assert len(events_by_id(store)) == len(fields)
    assert sessions(store)[("7", "s-dead")]["event_count"] == len(fields)
    assert_fully_consumed(redis_client, ["flow_events"])


def test_batches_are_bounded_by_rows(redis_server: RedisServer, redis_client: redis.Redis, clickhouse_url: str,
                                     store: Store) -> None:
    entries = [("flow_events", event("s-batches", f"n{i}", "llm_call", T0 + i)) for i in range(100)]
    xadd_all(redis_client, entries)
    max_rows = 10

    pipeline = drain(settings_for(redis_server, clickhouse_url, batch_max_rows=max_rows))

    assert len(events_by_id(store)) == len(entries)
    assert pipeline.stats.batches >= len(entries) // max_rows, (
        f"{len(entries)} entries stored in {pipeline.stats.batches} batch(es) with batch_max_rows={max_rows}")


@pytest.mark.parametrize(("entries_n", "streams_n"), [(25, 1), (40, 1), (30, 3)])
def test_drain_does_not_wait_for_entries_it_would_not_take(entries_n: int, streams_n: int,
                                                             redis_server: RedisServer, redis_client: redis.Redis,
                                                             clickhouse_url: str, store: Store) -> None:
    """A drain takes what the streams hold: once a read finds nothing it finishes, whatever the batch wait and
    the read's block time (a part-filled last batch, an exactly full one, several streams)."""
    streams = [f"drain_now:{i}" for i in range(streams_n)]
    entries = [(streams[i % streams_n], event(f"s-now-{i % 4}", f"n{i}", "llm_call", T0 + i))
               for i in range(entries_n)]
    xadd_all(redis_client, entries)
    wait_s = 30.0

    started = time.monotonic()
    drain(settings_for(redis_server, clickhouse_url, streams="drain_now:*", batch_max_rows=20,
                       batch_max_wait_s=wait_s, block_ms=int(wait_s * 1000)), timeout_s=3 * wait_s)
    elapsed_s = time.monotonic() - started

    assert elapsed_s < wait_s / 2, f"the drain waited {elapsed_s:.1f}s for entries after taking all of them"
    assert len(events_by_id(store)) == entries_n
    assert_fully_consumed(redis_client, streams)


@pytest.mark.parametrize(("streams_n", "write_delay_s"), [(1, 0.0), (8, 0.0), (8, 0.05), (30, 0.05)])
def test_entries_in_flight_never_exceed_the_limit(
        streams_n: int, write_delay_s: float, redis_server: RedisServer, redis_client: redis.Redis,
        clickhouse_url: str, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Delivered and not yet acknowledged (the group's pending count, as Redis keeps it) stays within
    max_inflight_rows at every read, with a fast and with a slow store, over one and over many streams."""
    streams = [f"inflight:{i}" for i in range(streams_n)]
    entries = [(streams[i % streams_n], event(f"s-in-{i % 7}", f"n{i}", "llm_call", T0 + i)) for i in range(1200)]
    xadd_all(redis_client, entries)
    limit = 300
    from worker.source import Source
    original_read = Source.read
    original_write = Sink.write
    seen: list[int] = []

    async def watched_read(self: Source, count: int, block_ms: int | None, max_streams: int | None = None,
                           pending_streams: Sequence[str] | None = None) -> list[tuple[str, list[Any]]]:
        groups = await original_read(self, count, block_ms, max_streams, pending_streams)
        seen.append(sum(int(redis_client.xpending(s, GROUP)["pending"]) for s in streams if redis_client.exists(s)))
        return groups

    def slow_write(self: Sink, events: Sequence[FlowEvent], rejections: Sequence[Rejection]) -> Any:
        time.sleep(write_delay_s)
        return original_write(self, events, rejections)

    monkeypatch.setattr(Source, "read", watched_read)
    monkeypatch.setattr(Sink, "write", slow_write)
    drain(settings_for(redis_server, clickhouse_url, streams="inflight:*", group=GROUP, batch_max_rows=100,
                       max_inflight_rows=limit, read_count=1000))

    assert len(seen) > 1200 // limit, "too few reads to judge"
    assert max(seen) <= limit, f"{max(seen)} entries in flight with max_inflight_rows={limit}"
    assert len(events_by_id(store)) == len(entries)
    assert_fully_consumed(redis_client, streams)


def test_entries_deleted_while_pending_are_rejected_not_stuck(redis_server: RedisServer,
                                                              redis_client: redis.Redis, clickhouse_url: str,
                                                              store: Store) -> None:
    """XDEL/XTRIM of a pending entry: it is recorded as rejected ('deleted') and leaves the PEL; drain ends."""
    fields = [event("s-del", f"n{i}", "llm_call", T0 + i) for i in range(6)]
    ids = xadd_all(redis_client, [("flow_events", f) for f in fields])
    settings = settings_for(redis_server, clickhouse_url, claim_idle_ms=100, claim_interval_s=0.1)
    redis_client.xgroup_create("flow_events", GROUP, id="0")
    redis_client.xreadgroup(GROUP, settings.consumer, {"flow_events": ">"}, count=3)  # our own, pending
    redis_client.xreadgroup(GROUP, "dead-worker", {"flow_events": ">"}, count=3)  # a dead consumer's
    deleted = [ids[1], ids[4]]  # one of ours, one of the dead consumer's
    redis_client.xdel("flow_events", *deleted)

    drain(settings, timeout_s=20)

    stored = events_by_id(store)
    assert sorted(e["source_id"] for e in stored.values()) == sorted(set(ids) - set(deleted))
    got = rejected_rows(store)
    assert set(got) == {("flow_events", d) for d in deleted}
    assert all("deleted" in r["reason"] for r in got.values())
    assert group_pending(redis_client, ["flow_events"]) == 0


# -- malformed entries -----------------------------------------------------------------------------

MALFORMED: list[tuple[str, str, dict[str, Any], str]] = [
    # (id, stream, fields, reason substring)
    ("missing-session", "flow_events", {"node_id": "n", "event_type": "t", "user_id": "1"},
     "missing required field 'session_id'"),
    ("invalid-json", "flow_events", {"data": '{"session_id": "s",'}, "field 'data' is not valid JSON"),
    ("json-array", "flow_events:9", {"payload": "[1, 2]"}, "must hold a JSON object"),
    ("bad-timestamp", "flow_events:9", {"session_id": "s", "node_id": "n", "event_type": "t", "timestamp": "soon"},
     "neither ISO-8601 nor epoch"),
    ("negative-timestamp", "flow_events:9", {"session_id": "s", "node_id": "n", "event_type": "t",
                                             "timestamp": "-5"}, "outside 1970-01-01..2200-01-01"),
    ("own-parent", "flow_events:9", {"session_id": "s", "node_id": "n", "event_type": "t", "parent_id": "n"},
     "parent_id equals node_id"),
    ("no-user", "flow_events", {"session_id": "s", "node_id": "n", "event_type": "t"}, "missing user_id"),
    ("invalid-utf8", "flow_events:9", {"session_id": b"\xff\xfe", "node_id": "n", "event_type": "t"},
     "not valid UTF-8"),
    ("non-string-session", "flow_events:9", {"data": '{"session_id": 12, "node_id": "n", "event_type": "t"}'},
     "session_id must be a string"),
    ("too-long-node", "flow_events:9", {"session_id": "s", "node_id": "n" * 300, "event_type": "t"},
     "over the 256-char limit"),
]


def test_malformed_entries_are_rejected_stored_and_acknowledged(redis_server: RedisServer,
                                                                redis_client: redis.Redis, clickhouse_url: str,
                                                                store: Store) -> None:
    good = [event("s-ok", f"n{i}", "llm_call", T0 + i, user=None) for i in range(5)]
    entries: list[tuple[str, Mapping[str, Any]]] = []
    for i, (_, stream, fields, _) in enumerate(MALFORMED):  # malformed entries between good ones
        if i < len(good):
            entries.append(("flow_events:9", good[i]))
        entries.append((stream, fields))
    ids = xadd_all(redis_client, entries)
    cases = iter(MALFORMED)
    bad_ids = {(stream, entry_id): next(cases) for (stream, fields), entry_id in zip(entries, ids, strict=True)
               if fields not in good}
    assert len(bad_ids) == len(MALFORMED)

    drain(settings_for(redis_server, clickhouse_url))

    got = rejected_rows(store)
    assert set(got) == set(bad_ids)
    for key, (case_id, _, fields, reason) in bad_ids.items():
        assert reason in got[key]["reason"], case_id
        raw = parse_raw(got[key]["raw"])  # exactly what was read: odd bytes included
        assert {as_bytes(k): as_bytes(v) for k, v in raw.items()} == {
            as_bytes(k): as_bytes(v) for k, v in fields.items()}, case_id
    assert len(events_by_id(store)) == len(good)
    assert sessions(store)[("9", "s-ok")]["event_count"] == len(good)
    streams = sorted({s for s, _ in entries})
    assert_fully_consumed(redis_client, streams)


def test_drain_of_empty_streams_exits_promptly(redis_server: RedisServer, redis_client: redis.Redis,
                                               clickhouse_url: str, store: Store) -> None:
    started = time.monotonic()
    drain(settings_for(redis_server, clickhouse_url))
    assert time.monotonic() - started < 10
    # the named stream and the group exist (MKSTREAM), nothing is pending, nothing was stored
    assert redis_client.xlen("flow_events") == 0
    assert [g["name"] for g in redis_client.xinfo_groups("flow_events")] == [GROUP.encode()]
    assert rows(store, "SELECT count() AS n FROM flowtrack.flow_events") == [{"n": 0}]


# -- sessions --------------------------------------------------------------------------------------

def test_session_status_counts_and_timing_with_custom_types(redis_server: RedisServer,
                                                           redis_client: redis.Redis, clickhouse_url: str,
                                                           store: Store) -> None:
    flows = {
        # session: (events as (node, type, offset ms), status, ended offset or None, duration, errors)
        "s-completed": ([("a", "user_message", 0), ("b", "llm_call", 100), ("end", "session_closed", 300)],
                        "completed", 300, 300, 0),
        "s-failed": ([("a", "user_message", 0), ("t", "tool_failed", 50), ("b", "llm_call", 80)],
                     "failed", 50, 50, 1),
        "s-failed-twice": ([("a", "user_message", 0), ("e1", "error", 20), ("e2", "tool_failed", 70)],
                           "failed", 70, 70, 2),
        "s-active": ([("a", "user_message", 0), ("b", "llm_call", 40)], "active", None, 40, 0),
        # the default end type is not an end type once configuration replaced it
        "s-default-end-ignored": ([("a", "user_message", 0), ("end", "flow_completed", 25)], "active", None, 25, 0),
    }
    entries: list[tuple[str, Mapping[str, Any]]] = []
    for session, (steps, *_rest) in flows.items():
        base = T0 + 10_000 * len(entries)
        for node, event_type, offset in steps:
            entries.append(("flow_events:5", event(session, node, event_type, base + offset,
                                                   parent=None if node == "a" else "a", user=None)))
    random.Random(5).shuffle(entries)
    xadd_all(redis_client, entries)

    drain(settings_for(redis_server, clickhouse_url, end_event_types=("session_closed",),
                      error_event_types=("error", "tool_failed")))

    got = sessions(store)
    assert {k[1] for k in got} == set(flows)
    for session, (steps, status, ended, duration, errors) in flows.items():
        row = got[("5", session)]
        start = min(int(f["timestamp"]) for _, f in entries if f["session_id"] == session)
        assert row["started"] == start, session
        assert row["last"] == start + max(offset for *_, offset in steps), session
        assert row["event_count"] == len(steps), session
        assert row["error_count"] == errors, session
        assert row["status"] == status, session
        assert row["ended"] == (None if ended is None else start + ended), session
        assert row["duration_ms"] == duration, session
    failed_nodes = rows(store, "SELECT node_id, status FROM flowtrack.flow_nodes WHERE session_id = 's-failed'")
    assert {r["node_id"]: r["status"] for r in failed_nodes} == {"a": "ok", "t": "error", "b": "ok"}


@pytest.mark.parametrize("shape", ["flat", "data", "payload"])
def test_producer_flows_land_with_expected_counts_and_status(shape: str, redis_server: RedisServer,
                                                             redis_client: redis.Redis, clickhouse_url: str,
                                                             store: Store) -> None:
    from worker.producer import ProduceConfig, generate_flows

    flows = list(generate_flows(ProduceConfig(users=4, seed=11, error_ratio=0.3, open_ratio=0.3), sessions=12))
    entries: list[tuple[str, Mapping[str, Any]]] = []
    for flow in flows:
        for fields in flow.events:
            entries.append((f"flow_events:{flow.user_id}", fields if shape == "flat" else as_json(fields, shape)))
    xadd_all(redis_client, entries)

    drain(settings_for(redis_server, clickhouse_url))

    got = sessions(store)
    assert len(got) == len(flows)
    assert {s["status"] for s in got.values()} == {f.status for f in flows}
    for flow in flows:
        row = got[(flow.user_id, flow.session_id)]
        assert (row["event_count"], row["status"]) == (len(flow.events), flow.status), flow.session_id
    assert len(events_by_id(store)) == len(entries)


def test_a_batch_over_centuries_of_weeks_is_stored_with_its_sessions(redis_server: RedisServer,
                                                                     redis_client: redis.Redis, clickhouse_url: str,
                                                                     store: Store) -> None:
    """The contract takes timestamps from 1970 to 2200 and the tables are partitioned by week: one batch of events
    in hundreds of weeks (a replayed archive, a client with a broken clock) must be stored, its sessions rolled up,
    not refused by the engine's partitions-per-insert limit and retried for ever."""
    week_ms = 7 * 86_400_000
    rng = random.Random(3)
    weeks = rng.sample(range(200, 11_900), 300)  # 300 distinct weeks of 1973..2197 (ms values: not epoch seconds)
    entries = [("flow_events:5", event(f"s-{n % 4}", f"n{n}", "llm_call", w * week_ms + n))
               for n, w in enumerate(weeks)]
    entries.append(("flow_events:5", event("s-0", "end", "flow_completed", max(weeks) * week_ms + 10_000)))
    xadd_all(redis_client, entries)

    drain(settings_for(redis_server, clickhouse_url))

    stored = events_by_id(store)
    assert sorted(r["ts_ms"] for r in stored.values()) == sorted(int(f["timestamp"]) for _, f in entries)
    got = sessions(store)
    assert {s: got[("7", s)]["event_count"] for s in ("s-0", "s-1", "s-2", "s-3")} == {
        "s-0": 76, "s-1": 75, "s-2": 75, "s-3": 75}
    assert got[("7", "s-0")]["status"] == "completed"
    assert_fully_consumed(redis_client, ["flow_events:5"])


def test_an_entry_id_chosen_beyond_the_time_range_is_rejected_not_stored(
        redis_server: RedisServer, redis_client: redis.Redis, clickhouse_url: str, store: Store) -> None:
    """A producer may choose the entry id (XADD key <ms>-<seq>). Without a timestamp field the event's time is the id's,
    and it obeys the range a timestamp does (1970..2200): beyond it the entry is rejected with the reason. Before, a
    year-31 million time was stored and crashed every view that showed it, and one past 2^63 ms could not be encoded,
    which looked like a store outage retried for ever (the batch's good entries never stored)."""
    fields = {"session_id": "s-ids", "node_id": "n", "event_type": "llm_call"}
    chosen = {"flow_events:ids-a": "7258118399999-0", "flow_events:ids-b": "7258118400000-0",
              "flow_events:ids-c": "999999999999999999-0", "flow_events:ids-d": "9223372036854775808-0",
              "flow_events:ids-e": "18446744073709551615-0"}
    for stream, entry_id in chosen.items():
        redis_client.xadd(stream, {**fields, "node_id": stream[-1]}, id=entry_id)
    drain(make_settings(redis_server.url, clickhouse_url))

    _, stored = store.query("SELECT node_id, toUnixTimestamp64Milli(ts) FROM flowtrack.flow_events")
    assert stored == [("a", 7258118399999)]
    _, rejected = store.query("SELECT source_stream, reason FROM flowtrack.rejected_events ORDER BY source_stream")
    assert [stream for stream, _ in rejected] == ["flow_events:ids-b", "flow_events:ids-c", "flow_events:ids-d",
                                                  "flow_events:ids-e"]
    assert all("entry id's time" in reason and "outside 1970-01-01..2200-01-01" in reason for _, reason in rejected)
