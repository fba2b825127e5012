"""The worker's promise against hostile bytes, vanishing streams, reused entry ids, large entries, replays of
odd bytes and deep JSON (issue 10, items 1, 2, 4, 5, 6, 7). Real redis-server, real embedded ClickHouse; the
restarts-during-an-outage item (3) lives in tests/faults/test_outage_restarts.py."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from prometheus_client import generate_latest
from typer.testing import CliRunner

from tests.conftest import ROOT, cli_env, derived_id, drain, make_settings, xadd_all
from worker.cli import app
from worker.metrics import MetricsServer
from worker.normalize import KEY_NOT_UTF8, MAX_ENTRY_BYTES, MAX_JSON_DEPTH, Normalizer, Rejection, parse_raw
from worker.pipeline import Pipeline
from worker.redisserver import RedisServer
from worker.settings import Settings
from worker.store import Store

GROUP = "flowtrack"


def _event(session: str, node: str, **extra: str) -> dict[str, str]:
    return {"session_id": session, "node_id": node, "event_type": "llm_call", **extra}


def _rejected(store: Store) -> dict[tuple[str, str], dict[str, str]]:
    _, rows = store.query("SELECT source_stream, source_id, reason, raw FROM flowtrack.rejected_events")
    return {(str(r[0]), str(r[1])): {"reason": str(r[2]), "raw": str(r[3])} for r in rows}


def _visible(store: Store) -> dict[str, dict[str, Any]]:
    names, rows = store.query("SELECT event_id, source_stream, source_id, node_id FROM flowtrack.flow_events")
    return {str(r[0]): dict(zip(names, r, strict=True)) for r in rows}


def _pending(client: redis.Redis, key: bytes | str) -> int:
    return int(client.xpending(key, GROUP)["pending"])


def invoke(args: list[str], redis_url: str, clickhouse_url: str) -> Any:
    return CliRunner().invoke(app, args, env=cli_env(redis_url, clickhouse_url), catch_exceptions=False)


# -- 1. bytes from Redis never crash anything ----------------------------------------------------------------

BAD_KEY = b"flow_events:\xff"
CONTROL_KEY = b"flow_events:\x1b]0;t\x07\x1b[2J"  # valid UTF-8 that would drive a terminal


def test_keys_fields_and_values_that_are_not_utf8_never_stop_the_worker(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    good = xadd_all(redis_client, [("flow_events:1", _event("s1", f"n{i}")) for i in range(5)])
    bad_key_id = redis_client.xadd(BAD_KEY, _event("s2", "n"))  # type: ignore[arg-type]
    control_id = redis_client.xadd(CONTROL_KEY, _event("s3", "n"))  # type: ignore[arg-type]
    bad_name_id = redis_client.xadd("flow_events:1", {**_event("s1", "odd-name"), b"\xfe\xff": b"v"})  # type: ignore[dict-item]
    bad_value_id = redis_client.xadd("flow_events:1", {**_event("s1", "odd-value"), "note": b"a\xffb"})  # type: ignore[dict-item]

    pipeline = drain(make_settings(redis_server.url, clickhouse_url))

    visible = _visible(store)
    assert {e["source_id"] for e in visible.values() if e["source_stream"] == "flow_events:1"} == set(good)
    # a key that is valid UTF-8 is stored exactly, control characters and all (display escapes them, not storage)
    control = [e for e in visible.values() if e["source_stream"] == CONTROL_KEY.decode()]
    assert [e["source_id"] for e in control] == [control_id.decode()]
    rejected = _rejected(store)
    key_row = rejected[("flow_events:\\xff", bad_key_id.decode())]
    assert key_row["reason"].startswith(KEY_NOT_UTF8)
    assert parse_raw(key_row["raw"]) == _event("s2", "n")
    assert rejected[("flow_events:1", bad_name_id.decode())]["reason"] == "a field name is not valid UTF-8"
    assert rejected[("flow_events:1", bad_value_id.decode())]["reason"] == "field 'note' is not valid UTF-8"
    # every entry acknowledged on its exact key, the non-UTF-8 one included
    for key in (b"flow_events:1", BAD_KEY, CONTROL_KEY):
        assert _pending(redis_client, key) == 0
    assert pipeline.stats.rejected == 3


def test_status_shows_odd_keys_groups_and_consumers_escaped(
        redis_server: RedisServer, redis_client: redis.Redis, clickhouse_url: str) -> None:
    for key in (BAD_KEY, CONTROL_KEY, b"flow_events:1"):
        redis_client.xadd(key, _event("s", "n"))  # type: ignore[arg-type]
        redis_client.xgroup_create(key, GROUP, id="0")
        redis_client.xgroup_create(key, b"g\xfe\x1b[2J", id="0")  # a foreign group with odd bytes
        redis_client.xreadgroup(GROUP, b"c\xff\x1b[31m", {key: ">"})  # type: ignore[dict-item, arg-type]

    result = invoke(["status", "--no-store"], redis_server.url, clickhouse_url)
    as_json = invoke(["status", "--no-store", "--json"], redis_server.url, clickhouse_url)

    for out in (result, as_json):
        assert out.exception is None or isinstance(out.exception, SystemExit), out.output
        assert "\x1b" not in out.output and "Traceback" not in out.output
    report = json.loads(as_json.output)
    names = {s["name"]: s for s in report["streams"]}
    assert set(names) == {"flow_events:\\xff", "flow_events:\\x1b]0;t\\x07\\x1b[2J", "flow_events:1"}
    for stream in names.values():  # the exact keys were queried: each shows its group, consumer and pending entry
        assert stream["length"] == 1 and stream["group"]["pending"] == 1
        assert [c["name"] for c in stream["group"]["consumers"]] == ["c\\xff\\x1b[31m"]
    assert "flow_events:\\xff" in result.output


def test_tail_and_rejected_take_odd_keys_and_fields(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    redis_client.xadd(BAD_KEY, _event("s", "n"))  # type: ignore[arg-type]
    redis_client.xadd("flow_events:1", {**_event("s", "n"), b"\xfe": b"\xff"})  # type: ignore[dict-item]
    tailed = invoke(["tail", "--since", "1h", "--no-follow", "-f", "json"], redis_server.url, clickhouse_url)
    assert tailed.exit_code == 0, tailed.output
    lines = [json.loads(line) for line in tailed.output.splitlines()]
    assert {(r["source_stream"], r["reason"].split(" (")[0]) for r in lines} == {
        ("flow_events:\\xff", KEY_NOT_UTF8), ("flow_events:1", "a field name is not valid UTF-8")}
    drain(make_settings(redis_server.url, clickhouse_url))
    listed = invoke(["rejected", "-f", "json"], redis_server.url, clickhouse_url)
    assert listed.exit_code == 0, listed.output
    assert {r["source_stream"] for r in json.loads(listed.output)} == {"flow_events:\\xff", "flow_events:1"}


def test_tail_pages_through_a_stream_ending_at_the_largest_entry_id(
        redis_server: RedisServer, redis_client: redis.Redis, clickhouse_url: str) -> None:
    """A full page of the backlog ending at 18446744073709551615-18446744073709551615: the next page was asked from
    "(" + that id, which Redis refuses, and tail ended in a traceback after printing everything (found by review)."""
    from worker.tail import PAGE

    top = 2**64 - 1
    pipe = redis_client.pipeline(transaction=False)
    for n in range(PAGE - 1):
        pipe.xadd("flow_events:top", _event(f"s{n}", "n"), id=f"{n + 1}-0")  # type: ignore[arg-type]
    pipe.xadd("flow_events:top", _event("s-last", "n"), id=f"{top}-{top}")  # type: ignore[arg-type]
    pipe.execute()
    tailed = invoke(["tail", "--since", "0", "--no-follow", "-f", "json"], redis_server.url, clickhouse_url)
    assert tailed.exit_code == 0, tailed.output[-2000:]
    ids = [json.loads(line)["source_id"] for line in tailed.output.splitlines()]
    assert len(ids) == PAGE and ids[-1] == f"{top}-{top}"


# -- 2. streams and groups vanishing under the worker --------------------------------------------------------

def _seen_pending(pipeline: Pipeline, stream: str) -> int:
    seen = pipeline.source._pending_seen.get(stream)
    return seen.others if seen is not None else -1


async def _until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _running(settings: Settings, scenario: Callable[[Pipeline], Awaitable[None]]) -> Pipeline:
    pipeline = Pipeline(settings)
    task = asyncio.create_task(pipeline.run())
    try:
        await scenario(pipeline)
        assert not task.done(), f"the worker stopped: {task.exception() if task.done() else ''}"
    finally:
        pipeline.request_stop()
        ok = await asyncio.wait_for(task, 60)
        await pipeline.close()
    assert ok
    return pipeline


def test_del_and_flushdb_while_the_worker_waits_are_survived_and_the_loss_reported(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    settings = make_settings(redis_server.url, clickhouse_url, claim_interval_s=0.2, claim_idle_ms=600_000,
                             block_ms=2000, streams=("flow_events", "flow_events:*"))

    def stored() -> int:
        return int(store.scalar("SELECT count() FROM flowtrack.flow_events"))

    held: list[int] = []

    async def scenario(pipeline: Pipeline) -> None:
        xadd_all(redis_client, [("flow_events:5", _event("s5", f"n{i}")) for i in range(5)])
        xadd_all(redis_client, [("flow_events:6", _event("s6", f"n{i}")) for i in range(3)])
        await _until(lambda: stored() == 8, 30, "the first entries")
        # a dead consumer holds entries of flow_events:6 (not idle long enough to be reclaimed); the blocked worker
        # may take the first of them itself
        xadd_all(redis_client, [("flow_events:6", _event("s6", f"held{i}")) for i in range(7)])
        held.append(len(redis_client.xreadgroup(GROUP, "dead", {"flow_events:6": ">"})[0][1]))
        await _until(lambda: stored() == 8 + 7 - held[0], 30, "the worker's share")
        # a claim round (between blocked reads) must have seen them pending before the DEL takes them along
        await _until(lambda: _seen_pending(pipeline, "flow_events:6") == held[0], 30, "a claim round")
        redis_client.delete("flow_events:6")  # UNBLOCKED ... the stream key no longer exists
        await _until(lambda: pipeline.stats.lost_with_stream == held[0], 30, "the loss to be counted")
        xadd_all(redis_client, [("flow_events:5", _event("s5", "after-del"))])
        await _until(lambda: stored() == 16 - held[0], 30, "an entry after the DEL")
        redis_client.flushdb()  # the named stream and every group go
        await asyncio.sleep(1.0)
        xadd_all(redis_client, [("flow_events", _event("s7", "after-flush", user_id="7")),
                                ("flow_events:8", _event("s8", "after-flush"))])
        await _until(lambda: stored() == 18 - held[0], 30, "entries after FLUSHDB")
        redis_client.xgroup_destroy("flow_events:8", GROUP)  # NOGROUP on the next read
        xadd_all(redis_client, [("flow_events:8", _event("s8", "after-destroy"))])
        await _until(lambda: stored() == 19 - held[0], 30, "an entry after XGROUP DESTROY")

    pipeline = asyncio.run(_running(settings, scenario))

    losses = [(k, r) for k, r in _rejected(store).items() if "stream deleted" in r["reason"]]
    assert len(losses) == 1
    (stream, _), row = losses[0]
    assert stream == "flow_events:6"
    assert held[0] >= 5
    assert row["reason"].startswith(f"stream deleted with {held[0]} entries pending on other consumers")
    assert "Redis cannot give them back" in row["reason"]
    metrics = generate_latest(MetricsServer(pipeline.stats, settings).registry).decode()
    assert f"flowtrack_entries_lost_with_stream_total {held[0]}.0" in metrics
    status = json.loads(invoke(["status", "--json"], redis_server.url, clickhouse_url).output)
    assert any(reason.startswith("stream deleted with N entries pending")
               for reason in status["store"]["rejected_by_reason"])


# -- 4. an entry id reused with other content ----------------------------------------------------------------

def test_a_reused_entry_id_with_other_content_is_a_new_event_and_a_redelivery_is_not(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    settings = make_settings(redis_server.url, clickhouse_url)
    ids = ["1700000000000-1", "1700000000000-2", "1700000000000-3"]
    first = [_event("s1", "n1"), _event("s1", "n2"), {**_event("s1", "n3"), "event_id": "explicit-3"}]
    for entry_id, fields in zip(ids, first, strict=True):
        redis_client.xadd("flow_events:1", fields, id=entry_id)  # type: ignore[arg-type]
    drain(settings)
    assert len(_visible(store)) == 3

    # Redis loses its data; the producer writes the same ids again: one with other content, one the same (a true
    # redelivery), one with an explicit event_id and other content (the same event by contract)
    redis_client.flushdb()
    again = [_event("s1", "OTHER"), _event("s1", "n2"), {**_event("s1", "n3-changed"), "event_id": "explicit-3"}]
    for entry_id, fields in zip(ids, again, strict=True):
        redis_client.xadd("flow_events:1", fields, id=entry_id)  # type: ignore[arg-type]
    drain(settings)

    visible = _visible(store)
    expected = {derived_id("flow_events:1", ids[0], first[0]), derived_id("flow_events:1", ids[0], again[0]),
                derived_id("flow_events:1", ids[1], first[1]), "explicit-3"}
    assert set(visible) == expected
    assert visible[derived_id("flow_events:1", ids[0], again[0])]["node_id"] == "OTHER"
    assert _rejected(store) == {}
    # the same single entry again (its own batch, the same bytes): still visible once
    redis_client.flushdb()
    redis_client.xadd("flow_events:1", again[0], id=ids[0])  # type: ignore[arg-type]
    drain(settings)
    assert set(_visible(store)) == expected
    assert store.scalar("SELECT count() FROM flowtrack.flow_events WHERE node_id = 'OTHER'") == 1


# -- 5. large entries: bytes bound, truncated raw ------------------------------------------------------------

def _peak_rss_mb_of_drain(redis_url: str, store_url: str, **env: str) -> int:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "run", "--drain"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=cli_env(redis_url, store_url, **env))
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak > before, "another child already peaked higher: measure in a fresh process"
    return peak // 1024


def test_large_entries_keep_memory_bounded_and_their_raw_truncated(
        redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> None:
    big = b"x" * (10 * 1024 * 1024)
    pipe = redis_client.pipeline(transaction=False)
    for i in range(4000):
        pipe.xadd("flow_events:1", _event("s", f"n{i}"))  # type: ignore[arg-type]
        if 2000 <= i < 2030:  # a burst of 30 entries of 10 MB in the middle
            pipe.xadd("flow_events:1", {**_event("s", f"big{i}"), "blob": big})  # type: ignore[dict-item]
            pipe.execute()
    pipe.execute()
    store_url = f"chdb://{tmp_path / 'store'}"

    peak_mb = _peak_rss_mb_of_drain(redis_server.url, store_url)

    # 30 x 10 MB read at once used to peak at ~1.7 GB (raw kept whole, the reply copied twice): now the reply
    # is the only large thing, and it is bounded by what a read may bring.
    assert peak_mb < 1000, peak_mb
    query = subprocess.run([sys.executable, "-m", "worker.cli", "sql",
                            "SELECT count() AS n, max(length(raw)) AS raw_bytes, any(reason) AS reason, "
                            "any(raw) AS one_raw FROM flowtrack.rejected_events",
                            "--format", "json", "--clickhouse-url", store_url],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert query.returncode == 0, query.stderr[-2000:]
    row = json.loads(query.stdout)[0]
    assert int(row["n"]) == 30
    assert int(row["raw_bytes"]) < 4 * 1024
    assert "over the 1048576-byte limit" in row["reason"] and "raw kept truncated" in row["reason"]
    marker, original_bytes, fields = parse_raw(row["one_raw"])
    assert marker == "truncated" and original_bytes > 10 * 1024 * 1024 and fields["session_id"] == "s"


def test_batches_and_reads_respect_the_byte_budget(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    budget = 4 * 1024 * 1024
    entries = [("flow_events:2", {**_event("s", f"n{i}"), "blob": "y" * (700 * 1024 if i % 3 == 0 else 10)})
               for i in range(60)]
    xadd_all(redis_client, entries)
    settings = make_settings(redis_server.url, clickhouse_url, max_inflight_bytes=budget)
    held: list[int] = []

    async def go() -> None:
        pipeline = Pipeline(settings)
        task = asyncio.create_task(pipeline.run(drain=True))
        while not task.done():  # sample what the worker holds while it works
            held.append(pipeline._inflight_bytes())
            await asyncio.sleep(0)
        assert task.result()
        await pipeline.close()

    asyncio.run(go())
    assert store.scalar("SELECT count() FROM flowtrack.flow_events") == 60
    # a read may bring one estimate's worth beyond the budget (entries it has not seen yet), never a backlog
    assert max(held) <= budget + 2 * 700 * 1024 + 100_000, max(held)
    with pytest.raises(Exception, match="at least 1 MiB"):
        Settings(max_inflight_bytes=1000).validate()


# -- 6. replaying a rejection for bytes that are not UTF-8 ---------------------------------------------------

@pytest.mark.parametrize(("fields", "reason"), [
    ({b"session_id": b"s-\xff\xfe", b"node_id": b"n", b"event_type": b"t"}, "field 'session_id' is not valid UTF-8"),
    ({b"session_id": b"s", b"node_id": b"n", b"event_type": b"t", b"\xc3(": b"v"}, "a field name is not valid UTF-8"),
    ({b"data": b'{"session_id": "s-\xff", "node_id": "n", "event_type": "t"}'}, "field 'data' is not valid UTF-8"),
], ids=["value", "field-name", "inside-data"])
def test_a_replay_rechecks_the_exact_bytes_the_original_check_saw(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str,
        fields: dict[bytes, bytes], reason: str) -> None:
    entry_id = redis_client.xadd("flow_events:1", fields).decode()  # type: ignore[arg-type]
    settings = make_settings(redis_server.url, clickhouse_url)
    drain(settings)
    assert _rejected(store)[("flow_events:1", entry_id)]["reason"] == reason

    outcome = json.loads(invoke(["rejected", "--replay", "flow_events:1", entry_id, "-f", "json"],
                                redis_server.url, clickhouse_url).output)[0]
    assert (outcome["action"], outcome["detail"]) == ("still invalid", reason)
    assert redis_client.xlen("flow_events:1") == 1  # nothing re-added

    # forced: the very same bytes go back to the stream, and the worker rejects them again for the same reason
    forced = json.loads(invoke(["rejected", "--replay", "flow_events:1", entry_id, "--force", "-f", "json"],
                               redis_server.url, clickhouse_url).output)[0]
    assert forced["action"] == "replayed"
    replayed = redis_client.xrange("flow_events:1", min=forced["new_id"], max=forced["new_id"])[0][1]
    assert {k: v for k, v in replayed.items() if k in fields} == fields
    drain(settings)
    assert _rejected(store)[("flow_events:1", forced["new_id"])]["reason"] == reason
    assert store.scalar("SELECT count() FROM flowtrack.flow_events") == 0


def test_a_rejection_for_a_non_utf8_key_is_never_replayed_to_another_key(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    entry_id = redis_client.xadd(BAD_KEY, _event("s", "n")).decode()  # type: ignore[arg-type]
    drain(make_settings(redis_server.url, clickhouse_url))
    for extra in ([], ["--force"]):
        outcome = json.loads(invoke(["rejected", "--replay", "flow_events:\\xff", entry_id, "-f", "json", *extra],
                                    redis_server.url, clickhouse_url).output)[0]
        assert outcome["action"] == "still invalid" and outcome["detail"].startswith(KEY_NOT_UTF8)
    assert redis_client.exists("flow_events:\\xff") == 0


# -- 7. deep JSON ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [100, 254, 255, 256, 500, 1000, 1024, 1025, 10_000])
def test_json_nesting_gets_one_precise_reason_at_every_depth(depth: int) -> None:
    """``depth`` counts the envelope object as level 1; the attribute value is nested one level less."""
    value = "[" * (depth - 1) + "]" * (depth - 1)
    data = f'{{"session_id": "s", "node_id": "n", "event_type": "t", "deep": {value}}}'.encode()
    for normalize in (Normalizer().normalize_pairs, lambda s, i, p: Normalizer().normalize(s, i, dict([p]))):
        result = normalize("flow_events:1", "1-0", [b"data", data])
        if depth <= MAX_JSON_DEPTH:
            assert not isinstance(result, Rejection), result.reason
            assert orjson.loads(result.attributes["deep"]) is not None
        else:
            assert isinstance(result, Rejection)
            assert result.reason.startswith(f"JSON nested deeper than {MAX_JSON_DEPTH} levels: "), result.reason
            assert "internal" not in result.reason


def test_truncated_raw_is_small_and_says_how_big_the_entry_was() -> None:
    fields = {b"session_id": b"s", b"node_id": b"n", b"event_type": b"t", b"blob": b"z" * (3 * MAX_ENTRY_BYTES)}
    result = Normalizer().normalize("flow_events:1", "1-0", fields)
    assert isinstance(result, Rejection)
    assert len(result.raw) < 2048
    size = sum(len(k) + len(v) for k, v in fields.items())
    assert parse_raw(result.raw)[:2] == ["truncated", size]
    assert str(size) in result.reason


def test_a_key_that_is_not_a_stream_is_left_out_not_a_crash(redis_server: RedisServer, redis_client: redis.Redis,
                                                              clickhouse_url: str, store: Store) -> None:
    """A name in FLOWTRACK_STREAMS that holds a string, and a consumed stream replaced by a string while the worker
    runs (RENAME over it: the key never stops existing; and DEL then SET): the worker leaves those keys out and goes
    on with the others, instead of dying on WRONGTYPE (from XGROUP CREATE, XREADGROUP or XACK)."""
    redis_client.set("flow_events", "not a stream")
    xadd_all(redis_client, [("flow_events:1", _event("s-a", f"n{i}")) for i in range(5)])
    settings = make_settings(redis_server.url, clickhouse_url, stream_rescan_s=0.2)
    drain(settings)
    assert store.scalar("SELECT count() FROM flowtrack.flow_events") == 5

    async def go() -> Pipeline:
        pipeline = Pipeline(settings)
        task = asyncio.create_task(pipeline.run())
        xadd_all(redis_client, [("flow_events:2", _event("s-b", f"n{i}")) for i in range(5)])
        await asyncio.sleep(1.0)  # caught up, blocked in XREADGROUP
        redis_client.set("tmp", "x")
        redis_client.rename("tmp", "flow_events:1")
        await asyncio.sleep(0.5)
        redis_client.delete("flow_events:2")
        redis_client.set("flow_events:2", "y")
        xadd_all(redis_client, [("flow_events:3", _event("s-c", f"n{i}")) for i in range(5)])
        await asyncio.sleep(1.5)
        assert not task.done(), task
        pipeline.request_stop()
        await task
        await pipeline.close()
        return pipeline

    asyncio.run(go())
    _, rows = store.query("SELECT session_id, count() FROM flowtrack.flow_events GROUP BY session_id ORDER BY 1")
    assert rows == [("s-a", 5), ("s-b", 5), ("s-c", 5)]


def test_tail_follows_on_when_a_followed_stream_becomes_another_type(redis_server: RedisServer,
                                                                    redis_client: redis.Redis) -> None:
    env = cli_env(redis_server.url, "chdb:///nonexistent-not-used")
    xadd_all(redis_client, [("flow_events:1", _event("s-t", "n0"))])
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "tail", "-n", "2", "-f", "json"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)
        redis_client.delete("flow_events:1")
        redis_client.set("flow_events:1", "not a stream")
        time.sleep(1.0)
        deadline = time.monotonic() + 30
        n = 0
        while proc.poll() is None and time.monotonic() < deadline:
            xadd_all(redis_client, [("flow_events:2", _event("s-t", f"m{n}"))])
            n += 1
            time.sleep(0.3)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert [json.loads(line)["node_id"] for line in stdout.splitlines()] == ["m0", "m1"]


def test_replay_takes_odd_records_odd_ids_and_odd_stream_names(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    """The replay records (a hash anybody with write access to Redis can edit), an event_id whose bytes are not
    UTF-8 replayed with --force, stream names that hold markup and terminal controls in the replay's warning, and a
    --limit that cuts a replay short: none crashes a command or goes unsaid."""
    markup = "agents:[/]\x1b]0;t\x07[bold]x"  # outside FLOWTRACK_STREAMS: the replay warns about it
    redis_client.xadd("flow_events:1", {**_event("s", "n"), "event_id": b"\x85"})  # type: ignore[dict-item]
    redis_client.xadd("flow_events:2", {"session_id": "s", "event_type": "t"})  # no node_id
    redis_client.xadd(markup, {"session_id": "s", "event_type": "t"})
    for i in range(3):
        redis_client.xadd("flow_events:3", {"session_id": "s", "event_type": "t", "k": str(i)})
    drain(make_settings(redis_server.url, clickhouse_url, streams=("flow_events:*", "agents:*")))
    redis_client.hset("flowtrack:replayed", mapping={"flow_events:2 x": "not json", "flow_events:3 y": "[1]"})

    listed = invoke(["rejected", "-f", "json"], redis_server.url, clickhouse_url)
    assert listed.exit_code == 0 and len(json.loads(listed.output)) == 6

    forced = invoke(["rejected", "--replay", "--force", "--stream", "flow_events:1"], redis_server.url, clickhouse_url)
    assert forced.exit_code == 0, forced.output
    again = invoke(["rejected", "--replay", "--force", "--stream", "flow_events:1"], redis_server.url, clickhouse_url)
    assert "already replayed" in again.output
    assert redis_client.xlen("flow_events:1") == 2  # replayed once: its record was written

    warned = invoke(["rejected", "--replay", "--stream", markup, "--force"], redis_server.url, clickhouse_url)
    assert warned.exit_code == 0, warned.output
    assert "\x1b" not in warned.stderr and "\x07" not in warned.stderr
    assert "[/]" in warned.stderr and "[bold]" in warned.stderr  # shown as text, not read as markup

    limited = invoke(["rejected", "--replay", "--force", "--stream", "flow_events:3", "--limit", "2"],
                     redis_server.url, clickhouse_url)
    assert limited.exit_code == 0 and "--limit 2 reached" in limited.stderr

    redis_client.delete("flowtrack:replayed")
    redis_client.set("flowtrack:replayed", "not a hash")
    broken = invoke(["rejected"], redis_server.url, clickhouse_url)
    assert broken.exit_code == 1
    assert "flowtrack:replayed holds a string" in broken.stderr


def test_a_json_document_repeating_a_key_is_rejected_not_half_stored(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    """The same class one level down: data={"session_id": "A", ..., "session_id": "B"} was stored as session B, A
    dropped without a word (orjson keeps the last copy), and so was a nested object's repeated key."""
    documents = ['{"session_id": "A", "node_id": "n", "event_type": "t", "session_id": "B"}',
                 '{"session_id": "s", "node_id": "n", "event_type": "t", "tool": {"args": 1, "args": 2}}']
    ids = [redis_client.xadd("flow_events:1", {"data": document}).decode() for document in documents]
    fine = redis_client.xadd("flow_events:1", _event("s-fine", "n1")).decode()  # type: ignore[arg-type]
    drain(make_settings(redis_server.url, clickhouse_url))
    rejected = _rejected(store)
    assert set(rejected) == {("flow_events:1", entry_id) for entry_id in ids}
    for entry_id, document, key in zip(ids, documents, ("session_id", "args"), strict=True):
        assert rejected[("flow_events:1", entry_id)]["reason"].startswith(f"key {key!r} appears 2 times")
        assert parse_raw(rejected[("flow_events:1", entry_id)]["raw"]) == {"data": document}
    assert set(_visible(store)) == {derived_id("flow_events:1", fine, _event("s-fine", "n1"))}


def test_an_entry_repeating_a_field_name_is_rejected_not_half_stored(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    """XADD k * session_id A session_id B …: Redis keeps both; the worker stored session B and dropped A silently.
    Rejected now, every pair kept in the raw; `tail` says so too, and a replay says why there is nothing to replay."""
    repeated = redis_client.execute_command(
        "XADD", "flow_events:1", "*", "session_id", "A", "session_id", "B", "node_id", "n", "event_type", "t").decode()
    fine = redis_client.xadd("flow_events:1", _event("s-fine", "n1")).decode()  # type: ignore[arg-type]
    drain(make_settings(redis_server.url, clickhouse_url))
    rejected = _rejected(store)
    assert set(rejected) == {("flow_events:1", repeated)}
    assert rejected[("flow_events:1", repeated)]["reason"].startswith("field 'session_id' appears 2 times")
    assert parse_raw(rejected[("flow_events:1", repeated)]["raw"]) == [
        "repeated", ["session_id", "A", "session_id", "B", "node_id", "n", "event_type", "t"]]
    assert set(_visible(store)) == {derived_id("flow_events:1", fine, _event("s-fine", "n1"))}

    outcome = json.loads(invoke(["rejected", "--replay", "flow_events:1", repeated, "--force", "-f", "json"],
                                redis_server.url, clickhouse_url).output)[0]
    assert outcome["action"] == "nothing to replay" and "repeats a field name" in outcome["detail"]
    tailed = invoke(["tail", "--since", "0", "-f", "json"], redis_server.url, clickhouse_url).output
    assert "appears 2 times" in tailed


def test_status_says_when_a_configured_name_is_not_a_stream(redis_server: RedisServer, redis_client: redis.Redis,
                                                             clickhouse_url: str) -> None:
    """The worker warns and leaves such a name out; `status` listed nothing about it and said healthy."""
    redis_client.set("mystr", "x")
    redis_client.xadd("flow_events:1", _event("s-1", "n1"))  # type: ignore[arg-type]
    env = {**cli_env(redis_server.url, clickhouse_url), "FLOWTRACK_STREAMS": "flow_events,flow_events:*,mystr"}
    result = CliRunner().invoke(app, ["status", "--json", "--no-store"], env=env, catch_exceptions=False)
    report = json.loads(result.stdout)
    assert any(w.startswith("mystr holds a string, not a stream") for w in report["warnings"]), report["warnings"]
    assert [s["name"] for s in report["streams"]] == ["flow_events:1"]
