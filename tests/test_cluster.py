"""The worker on a real Redis Cluster (3 primaries, 1 replica each, on loopback): detection from any node, discovery
on every primary, reads per hash slot, acks/claims/trims routed per stream, and slots migrated between and during
runs — every entry stored exactly once, nothing reported lost.

One cluster for the module (~6 s to form); every primary is flushed before each test. Expectations come from the
entries the tests wrote, never from the code under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from tests.conftest import derived_id, drain, make_settings
from worker.errors import FlowtrackError
from worker.pipeline import Pipeline
from worker.producer import ProduceConfig, produce
from worker.redisclient import connect, connect_sync, is_cluster
from worker.rediscluster import LocalCluster, cluster_port, key_slots
from worker.redisserver import RedisServer
from worker.settings import Settings
from worker.source import PRODUCER_CLUSTER_ACL_RULES, WORKER_CLUSTER_ACL_RULES, Source
from worker.store import Store

GROUP = "flowtrack"
T0 = 1_735_689_600_000


def _cluster_capable() -> str | None:
    """Why this redis-server cannot run a cluster node, or None if it can."""
    try:
        # a port whose bus port (+10000) exists: an ephemeral port's would not
        with RedisServer(port=cluster_port(), extra_args=["--cluster-enabled", "yes"]) as server, redis.Redis(
                port=server.port, protocol=2) as client:
            return None if client.info("cluster").get("cluster_enabled") == 1 else "cluster_enabled is not 1"
    except (FlowtrackError, redis.RedisError, OSError) as exc:
        return f"redis-server has no cluster support: {exc}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    reason = _cluster_capable()
    if reason:
        pytest.skip(reason)
    with LocalCluster(primaries=3, replicas=1) as local:
        yield local


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[redis.RedisCluster]:
    """A cluster client of the test's own, on a flushed cluster (every primary; replicas follow)."""
    cluster.wait_ok()
    for node in cluster.primaries():
        with cluster.client(node) as plain:
            plain.flushall()
    with redis.RedisCluster.from_url(cluster.url, protocol=2) as cluster_client:
        yield cluster_client


def fields(session: str, node: str, ts_ms: int) -> dict[str, str]:
    return {"session_id": session, "node_id": node, "event_type": "llm_call", "timestamp": str(ts_ms),
            "user_id": "7"}


def add(client: redis.RedisCluster, entries: Sequence[tuple[str, Mapping[str, str]]]) -> set[str]:
    """XADD the entries; the event ids the worker must store for them."""
    pipe = client.pipeline()
    for stream, values in entries:
        pipe.xadd(stream, dict(values))
    ids = pipe.execute()
    return {derived_id(stream, entry_id.decode(), values) for (stream, values), entry_id in zip(entries, ids,
                                                                                               strict=True)}


def spread(plain: int, tags: int, per_tag: int, per_stream: int, prefix: str = "") -> list[tuple[str, dict[str, str]]]:
    """Entries over ``plain`` per-user streams and ``tags`` x ``per_tag`` hash-tagged ones."""
    streams = [f"flow_events:{prefix}u{i}" for i in range(plain)]
    streams += [f"flow_events:{{{prefix}s{t:02d}}}:{u}" for t in range(tags) for u in range(per_tag)]
    return [(stream, fields(f"{stream}-session", f"n{n}", T0 + n)) for stream in streams for n in range(per_stream)]


def stored_ids(store: Store) -> list[str]:
    _, rows = store.query("SELECT event_id FROM flowtrack.flow_events")
    return [row[0] for row in rows]


def assert_stored_once(store: Store, expected: set[str]) -> None:
    ids = stored_ids(store)
    assert len(ids) == len(set(ids)), "an event is visible more than once"
    assert set(ids) == expected


def assert_nothing_pending(client: redis.RedisCluster) -> None:
    streams = [k.decode() for k in client.scan_iter(match="flow_events*", _type="stream")]
    assert streams
    for stream in streams:
        assert client.xpending(stream, GROUP)["pending"] == 0, stream
        newest: Any = client.xrevrange(stream, count=1)
        group = next(g for g in client.xinfo_groups(stream) if g["name"] == GROUP.encode())
        if newest:  # the named stream ``flow_events`` is created empty (MKSTREAM)
            assert group["last-delivered-id"] == newest[0][0], f"{stream}: entries left unread"


def settings_for(cluster: LocalCluster, clickhouse_url: str, url: str | None = None, **overrides: Any) -> Settings:
    overrides.setdefault("streams", ("flow_events", "flow_events:*"))
    return make_settings(url or cluster.url, clickhouse_url, **overrides)


def primaries_holding(cluster: LocalCluster, streams: Sequence[str]) -> set[int]:
    return {cluster.primary_for_slot(slot).port for slot in key_slots(streams)}


# -- detection -------------------------------------------------------------------------------------

def test_a_cluster_is_detected_from_a_primary_and_from_a_replica(cluster: LocalCluster,
                                                                  redis_server: RedisServer) -> None:
    primary = cluster.primaries()[0]
    replica = cluster.replicas_of(primary)[0]

    async def kinds(url: str) -> tuple[bool, int]:
        client = await connect(Settings(redis_url=url))
        try:
            await client.set("detect{x}", "1")  # a write from a replica's URL lands on the primary
            primaries = len(client.get_primaries()) if isinstance(client, aioredis.RedisCluster) else 0
            return is_cluster(client), primaries
        finally:
            await client.aclose()

    assert asyncio.run(kinds(primary.url)) == (True, 3)
    assert asyncio.run(kinds(replica.url)) == (True, 3)
    assert asyncio.run(kinds(redis_server.url)) == (False, 0)
    for url, expected in ((primary.url, True), (replica.url, True), (redis_server.url, False)):
        sync = connect_sync(Settings(redis_url=url))
        try:
            assert is_cluster(sync) is expected
            sync.set("detect-sync{x}", "é")
            assert sync.get("detect-sync{x}") == "é".encode()
        finally:
            sync.close()


# -- discovery and reads ---------------------------------------------------------------------------

def test_discovery_finds_streams_on_every_primary_and_creates_their_groups(cluster: LocalCluster,
                                                                         client: redis.RedisCluster) -> None:
    entries = spread(plain=30, tags=6, per_tag=5, per_stream=1)
    add(client, entries)
    streams = sorted({s for s, _ in entries})
    assert len(primaries_holding(cluster, streams)) == 3

    async def go() -> list[str]:
        source = Source(settings_for(cluster, "chdb://unused"))
        try:
            await source.discover(force=True)
            return sorted(source.streams)
        finally:
            await source.close()

    found = asyncio.run(go())
    assert [s for s in found if s != "flow_events"] == streams
    for stream in streams:
        assert [g["name"] for g in client.xinfo_groups(stream)] == [GROUP.encode()]


def test_one_read_per_hash_slot(cluster: LocalCluster, client: redis.RedisCluster) -> None:
    """40 hash-tagged streams in 2 tags are read with 2 XREADGROUP commands, not 40; every entry comes back once."""
    entries = spread(plain=0, tags=2, per_tag=20, per_stream=3)
    add(client, entries)
    for node in cluster.primaries():
        with cluster.client(node) as plain:
            plain.config_resetstat()

    async def go() -> list[tuple[str, str]]:
        source = Source(settings_for(cluster, "chdb://unused", streams=("flow_events:*",)))
        try:
            await source.discover(force=True)
            got: list[tuple[str, str]] = []
            for _ in range(3):  # pending re-read (nothing), then new entries
                for stream, items in await source.read(count=10, block_ms=None):
                    got += [(stream, item[0].decode()) for item in items]
            return got
        finally:
            await source.close()

    got = asyncio.run(go())
    assert len(got) == len(entries) == len(set(got))
    calls = 0
    for node in cluster.primaries():
        with cluster.client(node) as plain:
            calls += int(plain.info("commandstats").get("cmdstat_xreadgroup", {}).get("calls", 0))
    # three reads over 2 slots: at most 2 commands each (the first read, of our own pending entries, too)
    assert calls <= 6


def test_drain_stores_every_entry_exactly_once(cluster: LocalCluster, client: redis.RedisCluster,
                                               store: Store, clickhouse_url: str) -> None:
    entries = spread(plain=60, tags=6, per_tag=10, per_stream=5)
    expected = add(client, entries)
    assert len(primaries_holding(cluster, [s for s, _ in entries])) == 3

    pipeline = drain(settings_for(cluster, clickhouse_url, max_inflight_rows=200))

    assert_stored_once(store, expected)
    assert pipeline.stats.read == len(entries)
    assert pipeline.stats.lost_with_stream == 0
    assert_nothing_pending(client)


def test_stream_names_that_are_not_utf8(cluster: LocalCluster, client: redis.RedisCluster, store: Store,
                                       clickhouse_url: str) -> None:
    """Key names are bytes: names that are not UTF-8 are routed, read and acknowledged like any other, their entries
    recorded as rejected (the contract's rule, as on one Redis) — nothing crashes — and the sync client (tail,
    status) addresses them too."""
    names = [b"flow_events:\xff\xfe", b"flow_events:{t\xff}:1", b"flow_events:{t\xff}:2"]
    for name in names:
        for n in range(3):
            client.xadd(name, fields("s-bytes", f"n{n}", T0 + n))

    pipeline = drain(settings_for(cluster, clickhouse_url))

    assert pipeline.stats.read == pipeline.stats.acked == 9
    _, rows = store.query("SELECT reason FROM flowtrack.rejected_events")
    assert len(rows) == 9 and all(r[0].startswith("stream key is not valid UTF-8") for r in rows)
    assert all(client.xpending(name, GROUP)["pending"] == 0 for name in names)
    sync = connect_sync(Settings(redis_url=cluster.url))
    try:
        found = sorted(k.decode("utf-8", "surrogateescape") for k in sync.scan_iter(match="flow_events:*"))
        assert [sync.xlen(name) for name in found] == [3, 3, 3]
    finally:
        sync.close()


def test_own_pending_entries_are_read_again_after_a_restart(cluster: LocalCluster, client: redis.RedisCluster,
                                                            store: Store, clickhouse_url: str) -> None:
    entries = spread(plain=10, tags=3, per_tag=4, per_stream=3)
    expected = add(client, entries)
    settings = settings_for(cluster, clickhouse_url)
    streams = sorted({s for s, _ in entries})
    for stream in streams:  # a previous life of this consumer read everything, then died before storing
        client.xgroup_create(stream, GROUP, id="0")
        client.xreadgroup(GROUP, settings.consumer, {stream: ">"})
    assert sum(client.xpending(s, GROUP)["pending"] for s in streams) == len(entries)

    pipeline = drain(settings)

    assert pipeline.stats.read == len(entries)  # re-read from our own pending list, not claimed
    assert_stored_once(store, expected)
    assert_nothing_pending(client)


def test_entries_of_a_dead_consumer_are_claimed(cluster: LocalCluster, client: redis.RedisCluster, store: Store,
                                                clickhouse_url: str) -> None:
    entries = spread(plain=6, tags=2, per_tag=3, per_stream=4)
    expected = add(client, entries)
    streams = sorted({s for s, _ in entries})
    for stream in streams:
        client.xgroup_create(stream, GROUP, id="0")
        client.xreadgroup(GROUP, "dead-worker", {stream: ">"}, count=2)
    assert sum(client.xpending(s, GROUP)["pending"] for s in streams) == 2 * len(streams)

    drain(settings_for(cluster, clickhouse_url, claim_idle_ms=200, claim_interval_s=0.1))

    assert_stored_once(store, expected)
    assert_nothing_pending(client)


def test_entries_deleted_while_pending_are_rejected_on_every_primary(cluster: LocalCluster,
                                                                     client: redis.RedisCluster, store: Store,
                                                                     clickhouse_url: str) -> None:
    """XDEL of pending entries (ours and a dead consumer's) on streams of every primary: recorded as rejected
    ('deleted'), out of the pending list, the rest stored; the drain ends."""
    entries = spread(plain=6, tags=0, per_tag=0, per_stream=4)
    expected = add(client, entries)
    streams = sorted({s for s, _ in entries})
    assert len(primaries_holding(cluster, streams)) == 3
    settings = settings_for(cluster, clickhouse_url, claim_idle_ms=100, claim_interval_s=0.1)
    deleted: set[tuple[str, str]] = set()
    for stream in streams:
        client.xgroup_create(stream, GROUP, id="0")
        ours: Any = client.xreadgroup(GROUP, settings.consumer, {stream: ">"}, count=2)
        theirs: Any = client.xreadgroup(GROUP, "dead-worker", {stream: ">"}, count=2)
        for reply in (ours, theirs):
            entry_id = reply[0][1][0][0].decode()
            client.xdel(stream, entry_id)
            deleted.add((stream, entry_id))

    drain(settings, timeout_s=30)

    _, rows = store.query("SELECT source_stream, source_id, reason FROM flowtrack.rejected_events")
    assert {(r[0], r[1]) for r in rows} == deleted
    assert all("deleted" in r[2] for r in rows)
    assert len(stored_ids(store)) == len(expected) - len(deleted) == len(set(stored_ids(store)))
    assert all(client.xpending(s, GROUP)["pending"] == 0 for s in streams)


def test_touch_and_uncount_reach_every_primary(cluster: LocalCluster, client: redis.RedisCluster) -> None:
    """Keep-alive (XCLAIM JUSTID: idle time reset) and the outage's delivery take-back (RETRYCOUNT) on entries of
    streams on every primary."""
    entries = spread(plain=6, tags=1, per_tag=3, per_stream=2)
    add(client, entries)
    streams = sorted({s for s, _ in entries})
    settings = settings_for(cluster, "chdb://unused", streams=tuple(streams))

    async def go() -> None:
        source = Source(settings)
        try:
            await source.discover(force=True)
            held: dict[str, list[str]] = {}
            for _ in range(2):  # pending re-read (nothing yet), then the entries
                for stream, items in await source.read(count=10, block_ms=None):
                    held.setdefault(stream, []).extend(item[0].decode() for item in items)
            assert sum(map(len, held.values())) == len(entries)
            for stream in streams:  # delivered 3 times in all, idle for a while
                client.xclaim(stream, GROUP, settings.consumer, 0, held[stream], retrycount=3, idle=60_000)
            await source.touch(held)
            assert all(row["time_since_delivered"] < 30_000 for stream in streams
                       for row in client.xpending_range(stream, GROUP, "-", "+", 100))
            await source.uncount_delivery({3: held})
            assert {row["times_delivered"] for stream in streams
                    for row in client.xpending_range(stream, GROUP, "-", "+", 100)} == {2}
        finally:
            await source.close()

    asyncio.run(go())


def test_trim_removes_what_the_group_acknowledged_on_every_primary(cluster: LocalCluster,
                                                                   client: redis.RedisCluster, store: Store,
                                                                   clickhouse_url: str) -> None:
    entries = spread(plain=9, tags=3, per_tag=3, per_stream=4)
    expected = add(client, entries)
    streams = sorted({s for s, _ in entries})

    settings = settings_for(cluster, clickhouse_url, trim_enabled=True, trim_interval_s=0.0)
    assert len(primaries_holding(cluster, streams)) == 3
    runs = [drain(settings), drain(settings)]  # the second trims at its first step what the first acked after its last

    assert_stored_once(store, expected)
    assert sum(run.stats.trimmed for run in runs) == len(entries)
    assert all(client.xlen(stream) == 0 for stream in streams)


# -- slots moving ----------------------------------------------------------------------------------

def _other_primary(cluster: LocalCluster, slot: int) -> Any:
    owner = cluster.primary_for_slot(slot)
    return next(node for node in cluster.primaries() if node is not owner)


def test_slots_migrated_between_two_drains(cluster: LocalCluster, client: redis.RedisCluster, store: Store,
                                           clickhouse_url: str) -> None:
    """The same worker (its client's slot map now stale) drains again after slots moved: MOVED is followed by reads,
    acks and group commands alike."""
    first = spread(plain=8, tags=2, per_tag=5, per_stream=3)
    expected = add(client, first)
    settings = settings_for(cluster, clickhouse_url)
    slots = sorted(key_slots([s for s, _ in first]), key=lambda slot: -len(key_slots([s for s, _ in first])[slot]))

    async def go() -> list[Pipeline]:
        source = Source(settings)
        try:
            runs = [Pipeline(settings, source=source)]
            assert await asyncio.wait_for(runs[0].run(drain=True), 60)
            moved = 0
            for slot in slots[:4]:  # both tags' slots and two plain streams' slots
                moved += await asyncio.to_thread(cluster.migrate_slot, slot, _other_primary(cluster, slot))
            assert moved == 5 + 5 + 1 + 1
            second = [(stream, fields(f"{stream}-second", f"m{n}", T0 + 100 + n)) for stream, _ in first[::3]
                      for n in range(2)]
            expected.update(add(client, second))
            runs.append(Pipeline(settings, source=source))
            assert await asyncio.wait_for(runs[1].run(drain=True), 60)
            return runs
        finally:
            await source.close()

    runs = asyncio.run(go())

    assert_stored_once(store, expected)
    assert runs[1].stats.read == len(expected) - len(first)
    assert all(run.stats.lost_with_stream == 0 for run in runs)
    assert_nothing_pending(client)


def test_slots_migrated_while_the_worker_reads(cluster: LocalCluster, client: redis.RedisCluster, store: Store,
                                               clickhouse_url: str) -> None:
    """Slots holding streams (plain and hash-tagged) move key by key while the worker reads and new entries
    arrive: the worker meets ASK, TRYAGAIN, MOVED and UNBLOCKED replies; every entry is stored once."""
    before = spread(plain=20, tags=4, per_tag=10, per_stream=20)
    expected = add(client, before)
    streams = sorted({s for s, _ in before})
    by_slot = key_slots(streams)
    # every hash tag's slot (10 streams each: multi-key reads) and 8 plain streams' slots
    slots = sorted(by_slot, key=lambda slot: -len(by_slot[slot]))[:12]
    # small reads, so the worker is still reading when the keys move
    settings = settings_for(cluster, clickhouse_url, block_ms=100, read_count=5, max_inflight_rows=50)
    done = threading.Event()
    failures: list[BaseException] = []
    written: set[str] = set()

    def migrate() -> None:
        try:
            for slot in slots:
                cluster.migrate_slot(slot, _other_primary(cluster, slot), keys_per_step=1, between_steps_s=0.05)
        except BaseException as exc:  # the assertion below reports it
            failures.append(exc)

    def write() -> None:
        with redis.RedisCluster.from_url(cluster.url, protocol=2) as writer:
            n = 0
            while not done.is_set():
                batch = [(stream, fields(f"{stream}-live", f"l{n}", T0 + 1000 + n)) for stream in streams[n % 7::7]]
                written.update(add(writer, batch))
                n += 1
                time.sleep(0.01)

    async def go() -> Pipeline:
        pipeline = Pipeline(settings)
        run = asyncio.create_task(pipeline.run())
        threads = [threading.Thread(target=migrate), threading.Thread(target=write)]
        for thread in threads:
            thread.start()
        await asyncio.to_thread(threads[0].join)
        done.set()
        await asyncio.to_thread(threads[1].join)
        pipeline.request_stop()
        await run
        await pipeline.close()
        return pipeline

    pipeline = asyncio.run(go())
    assert not failures, failures
    assert sum(pipeline.source.redirects.values()) > 0, "the worker never met a moving slot: the test tests nothing"
    final = drain(settings)  # whatever the first run had not finished when stopped
    expected |= written
    assert_stored_once(store, expected)
    assert pipeline.stats.lost_with_stream == final.stats.lost_with_stream == 0
    _, rejected = store.query("SELECT count() FROM flowtrack.rejected_events")
    assert rejected[0][0] == 0
    assert_nothing_pending(client)


def test_a_blocked_read_whose_slot_moves_is_not_a_lost_stream(cluster: LocalCluster, client: redis.RedisCluster,
                                                               store: Store, clickhouse_url: str) -> None:
    """Streams of one hash tag: the caught-up worker blocks on them (one slot, one blocking read); MIGRATE deletes
    the keys on the source, which answers the blocked read UNBLOCKED. That is a move, not a deletion: the worker
    finds the streams on their new primary, reports no loss and reads what arrives there."""
    first = [(f"flow_events:{{blk}}:{u}", fields(f"blk-{u}", f"n{n}", T0 + n)) for u in range(3) for n in range(5)]
    expected = add(client, first)
    (slot,) = key_slots([s for s, _ in first])
    settings = settings_for(cluster, clickhouse_url, streams=("flow_events:{blk}:*",), block_ms=3000)

    async def go() -> Pipeline:
        pipeline = Pipeline(settings)
        run = asyncio.create_task(pipeline.run())
        try:
            await _until(lambda: store.scalar("SELECT count() FROM flowtrack.flow_events") == len(first))
            await asyncio.sleep(0.5)  # caught up: the read now blocks for up to 3 s
            await asyncio.to_thread(cluster.migrate_slot, slot, _other_primary(cluster, slot))
            second = [(stream, fields(f"{stream}-after", f"a{n}", T0 + 50 + n)) for stream, _ in first[::5]
                      for n in range(3)]
            expected.update(add(client, second))
            await _until(lambda: store.scalar("SELECT count() FROM flowtrack.flow_events") == len(expected))
        finally:
            pipeline.request_stop()
            await run
            await pipeline.close()
        return pipeline

    pipeline = asyncio.run(go())

    assert_stored_once(store, expected)
    assert pipeline.stats.lost_with_stream == 0
    assert store.scalar("SELECT count() FROM flowtrack.rejected_events") == 0
    assert sorted(pipeline.source.streams) == sorted({s for s, _ in first})  # none dropped as gone
    assert_nothing_pending(client)


async def _until(check: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_slots_moving_to_a_node_that_owned_no_slot(cluster: LocalCluster, client: redis.RedisCluster, store: Store,
                                                   clickhouse_url: str) -> None:
    """A primary added to the cluster owns no slot, so the worker's slot map (CLUSTER SLOTS) does not list it; the
    first key of a slot moving there answers ASK with its address: the worker adds the node and follows."""
    entries = [(f"flow_events:{{new}}:{u}", fields(f"new-{u}", f"n{n}", T0 + n)) for u in range(3) for n in range(4)]
    expected = add(client, entries)
    (slot,) = key_slots([s for s, _ in entries])
    owner = cluster.primary_for_slot(slot)
    newcomer = RedisServer(port=cluster_port(), extra_args=[
        "--cluster-enabled", "yes", "--cluster-node-timeout", str(cluster.node_timeout_ms)])
    newcomer.start()
    try:
        with cluster.client(cluster.nodes[0]) as first:
            first.execute_command("CLUSTER MEET", "127.0.0.1", newcomer.port)
        cluster.nodes.append(newcomer)
        LocalCluster._wait(lambda: all(int(cluster.cluster_info(n)["cluster_known_nodes"]) == len(cluster.nodes)
                                       for n in cluster.nodes), 30, "the new node to be known")
        cluster.wait_ok()  # the newcomer too knows who serves every slot

        async def go() -> dict[str, int]:
            # named, not a pattern: a SCAN of the primaries the map knows would not see the moved key until the move
            # completes (discovery finds it then; here the ASK path is what is tested)
            source = Source(settings_for(cluster, clickhouse_url, streams=tuple(sorted({s for s, _ in entries}))))
            try:
                await source.open()
                await asyncio.to_thread(cluster.migrate_slot, slot, newcomer, 1, 0.0, 1)  # 1 of 3 keys moved
                pipeline = Pipeline(source.settings, source=source)
                assert await asyncio.wait_for(pipeline.run(drain=True), 60)
                return source.redirects
            finally:
                await source.close()

        redirects = asyncio.run(go())
        assert redirects.get("ASK", 0) > 0, redirects
        assert_stored_once(store, expected)
    finally:
        cluster.migrate_slot(slot, newcomer)  # finish the half-done move, then back home
        cluster.migrate_slot(slot, owner)
        cluster.nodes.remove(newcomer)
        newcomer_id = cluster.node_id(newcomer)
        newcomer.cleanup()
        for node in cluster.nodes:
            with cluster.client(node) as plain:
                plain.execute_command("CLUSTER FORGET", newcomer_id)
        cluster.wait_ok()


# -- least privilege -------------------------------------------------------------------------------

@contextlib.contextmanager
def acl_users(cluster: LocalCluster) -> Iterator[None]:
    """The documented worker and producer users on every node (ACLs are per node, not replicated)."""
    for node in cluster.nodes:
        with cluster.client(node) as admin:
            admin.execute_command("ACL", "SETUSER", "worker", "reset", "on", ">worker-secret",
                                  *WORKER_CLUSTER_ACL_RULES.split())
            admin.execute_command("ACL", "SETUSER", "producer", "reset", "on", ">producer-secret",
                                  *PRODUCER_CLUSTER_ACL_RULES.split())
    try:
        yield
    finally:
        for node in cluster.nodes:
            with cluster.client(node) as admin:
                admin.execute_command("ACL", "DELUSER", "worker", "producer")


def test_the_acl_rules_are_enough_on_a_cluster(cluster: LocalCluster, client: redis.RedisCluster, store: Store,
                                               clickhouse_url: str) -> None:
    """The documented rules, set on every node, let the producer detect the cluster and write, and the worker read,
    acknowledge, claim and trim — with a slot frozen mid-migration, so that ASKING (and TRYAGAIN) are met too."""
    port = cluster.primaries()[1].port
    tagged = [(f"flow_events:{{acl}}:{u}", fields(f"acl-{u}", f"n{n}", T0 + n)) for u in range(3) for n in range(4)]
    expected_tagged = add(client, tagged)
    (slot,) = key_slots([s for s, _ in tagged])
    target = _other_primary(cluster, slot)
    assert cluster.migrate_slot(slot, target, keys_per_step=1, stop_after_keys=1) == 1  # 1 of 3 streams moved

    async def go() -> tuple[int, dict[str, int]]:
        producer = await connect(Settings(redis_url=f"redis://producer:producer-secret@127.0.0.1:{port}/0"))
        assert is_cluster(producer)
        try:
            sent = await produce(producer, ProduceConfig(users=12, seed=3), count=400)  # type: ignore[arg-type]
        finally:
            await producer.aclose()
        settings = settings_for(cluster, clickhouse_url, url=f"redis://worker:worker-secret@127.0.0.1:{port}/0",
                                trim_enabled=True, trim_interval_s=0.0, claim_interval_s=0.1)
        pipeline = Pipeline(settings)
        try:
            assert await asyncio.wait_for(pipeline.run(drain=True), 60)
        finally:
            await pipeline.close()
        return sent, pipeline.source.redirects

    try:
        with acl_users(cluster):
            sent, redirects = asyncio.run(go())
    finally:
        cluster.migrate_slot(slot, target)  # finish the move
    assert redirects.get("ASK", 0) > 0 and redirects.get("TRYAGAIN", 0) > 0, redirects
    assert store.scalar("SELECT count() FROM flowtrack.flow_events") == sent + len(tagged)
    assert expected_tagged <= set(stored_ids(store))
    streams = [k.decode() for k in client.scan_iter(match="flow_events:*", _type="stream")]
    assert len(primaries_holding(cluster, streams)) == 3
    assert all(client.xpending(s, GROUP)["pending"] == 0 for s in streams)


# -- failover (last: it changes which nodes are primaries; the killed node comes back as a replica) ----------------

def test_a_primary_killed_mid_run_is_waited_out(cluster: LocalCluster, client: redis.RedisCluster, store: Store,
                                                clickhouse_url: str) -> None:
    """SIGKILL of a primary while the worker reads and acknowledges: its replica takes over (~2-4 s), the worker's
    calls to it fail meanwhile (SourceUnavailableError, backoff, recover) and then go to the new primary. Every
    entry (replicated before the kill, so Redis itself lost none) and every entry written after is stored once."""
    entries = spread(plain=30, tags=3, per_tag=10, per_stream=20)
    expected = add(client, entries)
    victim = cluster.primary_for_slot(next(iter(key_slots([entries[0][0]]))))
    for node in cluster.primaries():
        with cluster.client(node) as plain:
            assert plain.execute_command("WAIT", 1, 5000) >= 1  # every entry is on a replica too
    settings = settings_for(cluster, clickhouse_url, read_count=10, max_inflight_rows=100, retry_max_s=0.5)

    async def go() -> Pipeline:
        pipeline = Pipeline(settings)
        run = asyncio.create_task(pipeline.run())
        try:
            await _until(lambda: store.scalar("SELECT count() FROM flowtrack.flow_events") > 0)
            await asyncio.to_thread(cluster.kill_primary, victim)
            with redis.RedisCluster.from_url(cluster.primaries()[0].url, protocol=2) as writer:
                expected.update(add(writer, [(stream, fields(f"{stream}-after", "a", T0 + 99))
                                             for stream, _ in entries[::20]]))
            await _until(lambda: store.scalar("SELECT count() FROM flowtrack.flow_events") >= len(expected), 60)
        finally:
            pipeline.request_stop()
            await run
            await pipeline.close()
        return pipeline

    try:
        pipeline = asyncio.run(go())
    finally:
        victim.start()  # rejoins as a replica of the node that took over
        cluster.wait_ok()
    assert pipeline.stats.source_failures > 0, "the worker never met the failover: the test tests nothing"
    assert_stored_once(store, expected)
    assert pipeline.stats.lost_with_stream == 0
    with redis.RedisCluster.from_url(cluster.url, protocol=2) as fresh:
        assert_nothing_pending(fresh)
