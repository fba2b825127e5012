"""The fault suite against a real Redis Cluster: 3 primaries x 1 replica on loopback ports, the workers given
nothing but FLOWTRACK_REDIS_URL naming one node. A primary SIGKILLed mid-run (its replica promoted), slots holding
streams migrated while the worker reads (ASK windows, then a rebalance-like move of many slots), a worker
SIGKILLed and replaced, two workers competing. Each: every valid event visible exactly once, nothing pending or
unread, and what Redis itself lost in an asynchronous failover counted apart (clusterharness's module doc)."""

from __future__ import annotations

import time

import pytest
from redis.crc import key_slot

from worker.normalize import derive_event_id, mapping_digest

from .clusterharness import ClusterFaultRun, ClusterWorkload, Kill, entry_ms, redis_dropped, resolve
from .conftest import MakeClusterRun
from .harness import Worker, assert_clean, pending_by_consumer, pending_entries, read_store, wait_for

pytestmark = pytest.mark.faults


def wait_acked(run: ClusterFaultRun, more_than: int, *workers: Worker) -> None:
    wait_for(lambda: run.state().acked > more_than, 60, f"more than {more_than} acknowledged", interval_s=0.05,
             workers=workers)


@pytest.mark.parametrize("cut_s", [0.0, 1.0], ids=["replica-in-sync", "replica-cut-1s"])
def test_cluster_kill_primary_mid_run(cluster_run: MakeClusterRun, cut_s: float) -> None:
    """A primary is SIGKILLed while the producer writes and the worker reads and acks;
    its replica is promoted. With ``cut_s`` the replica stopped receiving ``cut_s`` before the kill: what the primary
    acknowledged meanwhile (XADDs, and the worker's reads and acks) is gone on the promoted replica — Redis's loss,
    counted apart — and the group state there is rolled back (acked entries pending or unread again): nothing may
    show twice and nothing else may be missing."""
    label = f"replica cut off {cut_s:.0f}s before" if cut_s else "replica in sync"
    run = cluster_run(f"cluster: primary SIGKILLed mid-run ({label}), replica promoted", seed=11 + int(cut_s))
    wl = run.cluster_workload
    w = run.worker("w1")
    run.wait_consuming(w)
    producer, _ = wl.produce_in_background(run.client, 24_000, rate_per_s=4000, malformed_every=97, chunk=50)
    wait_acked(run, 3000, w)
    # in sync: the very node FLOWTRACK_REDIS_URL names (the running worker must not need it any more); cut off:
    # another primary
    seed = run.cluster.nodes[0]
    victim = seed if not cut_s else next(p for p in run.cluster.primaries() if p is not seed)
    streams = len(run.streams_on(victim))
    if cut_s:
        run.cut_replication(victim)
        time.sleep(cut_s)
    started = time.monotonic()
    promoted = run.kill_primary(victim)
    failover_s = time.monotonic() - started
    run.notes.append(f"primary :{victim.port} ({streams} streams) killed at {wl.written} written, replica "
                     f":{promoted.port} promoted in {failover_s:.1f}s")
    producer.join(60)
    recovery = run.wait_caught_up(120, w)
    run.stop_workers(w)
    result = run.finish()
    result.recovery_s = round(failover_s + recovery, 2)
    if cut_s:
        dropped = run.resolution.redis_dropped if run.resolution else 0
        assert dropped > 0, f"the cut-off primary lost nothing: the scenario proves less\n{result}"
    assert_clean(result, (w,))


def test_cluster_takeover_by_stale_replica(cluster_run: MakeClusterRun) -> None:
    """A replica cut off for 2 s takes its primary's slots over (CLUSTER FAILOVER TAKEOVER, as an operator forcing
    a failover does): no connection fails, the worker only sees MOVED, yet the group state it finds there is the
    stale one — acks and deliveries of the last 2 s gone. Entries it had acked there must not stay pending, nothing
    may show twice; the XADDs the old primary acknowledged after the cut are Redis's loss."""
    run = cluster_run("cluster: stale replica takes over (no error, only MOVED)", seed=13)
    wl = run.cluster_workload
    w = run.worker("w1")
    run.wait_consuming(w)
    producer, _ = wl.produce_in_background(run.client, 12_000, rate_per_s=4000, malformed_every=97, chunk=50)
    wait_acked(run, 2000, w)
    victim = next(p for p in run.cluster.primaries() if p is not run.cluster.nodes[0])
    run.cut_replication(victim)
    producer.join(60)  # about 2 s of writes, reads and acks the replica never gets; then no XADD in flight
    started = time.monotonic()
    promoted = run.takeover(victim)
    run.notes.append(f"replica :{promoted.port} took over from :{victim.port} in {time.monotonic() - started:.1f}s")
    wl.produce(run.client, 8000, rate_per_s=4000, malformed_every=97, chunk=50)
    recovery = run.wait_caught_up(60, w)
    run.stop_workers(w)
    result = run.finish()
    result.recovery_s = round(recovery, 2)
    assert run.resolution is not None and run.resolution.redis_dropped > 0, "the takeover lost nothing: proves less"
    assert_clean(result, (w,))


def test_cluster_reshard_while_running(cluster_run: MakeClusterRun) -> None:
    """While events arrive: the slot of a hash-tagged pair moves one key per step with pauses (one stream already on
    the target, the other still on the source: ASK, and TRYAGAIN for a read over both), then a plain stream's slot,
    then a rebalance-like move of 600 slots (streams among them) from one primary to another."""
    run = cluster_run("cluster: reshard while running (ASK windows + 600-slot rebalance)", seed=2)
    wl = run.cluster_workload
    w = run.worker("w1")
    run.wait_consuming(w)
    producer, _ = wl.produce_in_background(run.client, 24_000, rate_per_s=3000, malformed_every=89, chunk=50)
    wait_acked(run, 2000, w)
    primaries = run.cluster.primaries()
    tagged = next(s for s in wl.all_streams() if "{" in s)
    plain = next(s for s in wl.all_streams() if "{" not in s)
    moved = 0
    for stream in (tagged, plain):
        slot = key_slot(stream.encode())
        source = run.cluster.primary_for_slot(slot)
        target = next(p for p in primaries if p is not source)
        moved += run.cluster.migrate_slot(slot, target, keys_per_step=1, between_steps_s=0.5)
    run.notes.append(f"2 slots holding streams moved key by key ({moved} keys)")
    # rebalance-like: the 600 slots around a stream-holding slot of the busiest primary go to the least busy one
    busiest = max(primaries, key=lambda p: len(run.streams_on(p)))
    idlest = min(primaries, key=lambda p: len(run.streams_on(p)))
    anchor = key_slot(run.streams_on(busiest)[0].encode())
    owned = sorted(s for first, last, port in run.cluster.slot_ranges() if port == busiest.port
                   for s in range(first, last + 1))
    around = sorted(owned, key=lambda s: abs(s - anchor))[:600]
    started = time.monotonic()
    keys = sum(run.cluster.migrate_slot(slot, idlest) for slot in around)
    run.notes.append(f"600 slots :{busiest.port} -> :{idlest.port} ({keys} streams) in "
                     f"{time.monotonic() - started:.1f}s")
    assert keys > 0 and moved > 0, "the reshard moved no stream: it proves nothing"
    producer.join(60)
    recovery = run.wait_caught_up(120, w)
    run.stop_workers(w)
    result = run.finish()
    result.recovery_s = round(recovery, 2)
    assert_clean(result, (w,))


def test_cluster_kill9_worker_another_takes_over(cluster_run: MakeClusterRun) -> None:
    """Two workers share the group; one is SIGKILLed mid-run with entries pending on it: the other claims them
    (idle 1 s); then the killed one is restarted under its name and re-reads its own pending entries. Each worker
    owns an embedded store, so what w1 stored but had not acked at the kill shows once in each store: counted
    apart (``handed_over_copies``), never any other id twice."""
    run = cluster_run("cluster: kill -9 a worker, another takes over, restart", seed=3)
    wl = run.cluster_workload
    w1, w2 = run.worker("w1", "store1"), run.worker("w2", "store2")
    run.wait_consuming(w1)
    run.wait_consuming(w2)
    producer, _ = wl.produce_in_background(run.client, 24_000, rate_per_s=4000, malformed_every=83, chunk=50)
    wait_acked(run, 4000, w1, w2)
    w1 = kill_while_holding(run, w1)
    killed_at = time.monotonic()
    took_over_s = wait_for(lambda: any("reclaimed" in line for line in w2.lines), 30,
                           "w2 to reclaim the killed worker's entries", workers=(w2,))
    run.notes.append(f"w2 reclaimed {time.monotonic() - killed_at:.1f} s after the kill")
    time.sleep(max(0.0, 2.5 - took_over_s))
    w1 = run.worker("w1", "store1")
    producer.join(60)
    recovery = run.wait_caught_up(120, w1, w2)
    run.stop_workers(w1, w2)
    claims = [line.strip().split("INFO worker.pipeline: ")[-1] for line in w2.lines if "reclaimed" in line]
    run.notes.append(f"w2: {'; '.join(claims) or 'no reclaim'}")
    assert claims, "w2 never took over the killed worker's entries: the scenario proves less"
    result = run.finish(("store1", "store2"))
    result.recovery_s = round(recovery, 2)
    assert_clean(result, (w1, w2))


def kill_while_holding(run: ClusterFaultRun, w1: Worker, attempts: int = 5) -> Worker:
    """SIGKILL w1 with entries pending on it. Which of two blocked readers gets the next entries is up to Redis,
    so w1 may hold nothing at a given moment; a kill then leaves nothing to take over and proves less. Wait until
    it holds some, kill, and look again once it is dead; if its last batch was acked in between, restart it and
    try again."""
    for attempt in range(1, attempts + 1):
        wait_for(lambda: pending_by_consumer(run.client).get("w1", 0) > 0, 30, "w1 to hold entries",
                 interval_s=0.01, workers=(w1,))
        w1.kill()
        held = pending_by_consumer(run.client)
        run.notes.append(f"kill {attempt}: w1 killed at {run.cluster_workload.written} written, pending {held}")
        if held.get("w1", 0) > 0:
            # What w1 may have stored in its own store before acking: w2 stores it again in another store.
            run.handed_over |= pending_entries(run.client, "w1")
            return w1
        w1 = run.worker("w1", "store1")
        run.wait_consuming(w1)
    raise AssertionError(f"w1 held no entries at any of {attempts} kills: {run.notes}")


def test_cluster_two_workers_competing(cluster_run: MakeClusterRun) -> None:
    """Two workers in one group across the cluster while 24k events arrive; no reclaim can happen (idle 60 s), so
    an event id in both stores means both processed one entry."""
    run = cluster_run("cluster: 2 workers competing in one group", seed=4)
    wl = run.cluster_workload
    ws = [run.worker(f"competitor-{i}", f"store{i}", FLOWTRACK_CLAIM_IDLE_MS="60000") for i in range(2)]
    for w in ws:
        run.wait_consuming(w)
    producer, _ = wl.produce_in_background(run.client, 24_000, rate_per_s=6000, malformed_every=89)
    producer.join(60)
    run.wait_caught_up(120, *ws)
    run.stop_workers(*ws)
    if not run.server_url:
        shares = [len(read_store(run.store_url(f"store{i}"))["event_ids"]) for i in range(2)]
        run.notes.append("events per worker: " + ", ".join(map(str, shares)))
        assert all(shares), f"a worker got no work, so this did not compete: {shares}"
    result = run.finish(("store0", "store1"))
    assert_clean(result, tuple(ws))


def test_cluster_negative_control_deleted_before_stored_is_lost(cluster_run: MakeClusterRun) -> None:
    """Entries deleted from Redis before any worker read them must count as flowtrack's loss — also on the shard
    whose primary is then killed: the Redis-loss accounting only excuses a suffix of a dead primary's writes."""
    run = cluster_run("cluster NEGATIVE CONTROL: entries deleted before stored", seed=5)
    wl = run.cluster_workload
    wl.produce(run.client, 6000)
    # not the node the URL names: a worker started after its URL's node died cannot learn the topology
    victim = next(p for p in run.cluster.primaries() if p is not run.cluster.nodes[0])
    on_victim = set(run.streams_on(victim))
    # every 50th of the older 80 % (the youngest entries are what a failover may drop: not these)
    ours = sorted((key for key in wl.expected.values() if key[0] in on_victim), key=lambda k: entry_ms(k[1]))
    doomed = ours[:len(ours) * 4 // 5:50]
    for stream, entry_id in doomed:
        assert run.client.xdel(stream, entry_id) == 1
    run.kill_primary(victim)
    run.drain("w1")
    result = run.finish(expect="lost")
    result.notes += f"; {len(doomed)} entries XDELed on the killed primary's shard before any worker ran"
    result.record()
    assert result.lost == len(doomed), result
    assert result.redis_lost == 0 and result.duplicates == 0 and result.ok, result
    # and the same accounting on the real outcome, with nothing deleted, is clean apart from those
    assert set(result.problems()) == {f"{len(doomed)} of {result.produced} valid events lost"}, result.problems()


def test_cluster_accounting_excuses_only_a_suffix() -> None:
    """The Redis-loss rule on its own: a missing entry younger than every survivor of the dead primary is Redis's;
    an older one, one on another shard, one generated after the kill are not."""
    slot_a = key_slot(b"flow_events:a")
    assert key_slot(b"flow_events:b") != slot_a
    kill = Kill(frozenset({slot_a}), at_ms=1000, port=1)
    present = [("flow_events:a", "900-0"), ("flow_events:a", "1500-0"), ("flow_events:b", "990-0")]
    missing = [("flow_events:a", "950-0"), ("flow_events:a", "800-0"), ("flow_events:b", "995-0"),
               ("flow_events:a", "1200-0")]
    assert redis_dropped(missing, present, [kill]) == {("flow_events:a", "950-0")}
    assert redis_dropped(missing, present, []) == set()


def test_cluster_resolution_rules() -> None:
    """The expected set once the streams were read back: an entry applied without its reply must be stored too, an
    entry nobody planned is a failure, an acknowledged entry deleted from the middle of a stream stays expected
    (flowtrack's loss unless stored), one Redis dropped in a failover is Redis's loss unless stored."""
    wl = ClusterWorkload(seed=9)
    fields = [{"session_id": f"s{i}", "node_id": "n", "event_type": "llm_call"} for i in range(4)]
    stream = "flow_events:a"
    digests = [mapping_digest(f) for f in fields]
    for digest in digests:
        wl.planned[(stream, digest)] = ("valid", None)
    for i, entry_id in ((0, "100-0"), (1, "200-0"), (3, "950-0")):  # acknowledged; 2's reply never came
        wl.expected[derive_event_id(stream, entry_id, digests[i])] = (stream, entry_id)
    present = {(stream, "200-0"): digests[1], (stream, "300-0"): digests[2], (stream, "400-0"): "not-planned"}
    kill = Kill(frozenset({key_slot(stream.encode())}), at_ms=1000, port=1)
    res = resolve(wl, present, visible=set(), rejected=set(), kills=[kill])
    expected = set(res.expected.expected.values())
    assert (stream, "300-0") in expected                      # applied, reply lost: must be stored
    assert (stream, "100-0") in expected                      # deleted mid-stream (older than a survivor)
    assert (stream, "950-0") not in expected and res.redis_lost == 1 and res.redis_dropped == 1
    assert res.failures == ["1 entries in the streams match nothing the producer wrote"]
    stored = resolve(wl, present, visible={derive_event_id(stream, "950-0", digests[3])}, rejected=set(),
                     kills=[kill])
    assert stored.redis_lost == 0 and stored.redis_dropped == 1
