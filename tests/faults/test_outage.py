"""Outages: the store cannot write for a while (embedded: the disk is full), Redis dies and comes back with its
AOF, the consumer group disappears. Each is waited out: nothing acknowledged meanwhile, nothing turned into a
reject, the backlog drains afterwards."""

from __future__ import annotations

import time

import pytest

from .conftest import MakeRun
from .harness import Tally, assert_clean, store_exec, wait_for

pytestmark = pytest.mark.faults


def test_store_write_fails_then_recovers(fault_run: MakeRun) -> None:
    """The embedded store's writes fail (every file write of the worker beyond 1 byte gets EFBIG, as on a full
    disk) for 4 s while 20k events arrive; then the disk has room again. With a server URL the same test runs
    against the server (the client's writes fail the same way before reaching it)."""
    run = fault_run("store writes fail 4 s (disk full), then recover")
    wl = run.workload
    w = run.worker("w1")
    run.wait_consuming(w)
    wl.produce(run.client, 2000)
    run.wait_caught_up(60, w)
    w.set_disk_full(True)
    acked_before = run.state().acked
    producer, _ = wl.produce_in_background(run.client, 20_000, rate_per_s=10_000, malformed_every=53)
    time.sleep(4)
    s = run.state()
    run.notes.append(f"during the outage: acked {s.acked - acked_before}, pending {s.pending}, lag {s.lag}")
    if s.acked != acked_before:
        run.failures.append(f"{s.acked - acked_before} entries acknowledged while the store could not write")
    if not w.log_has("store unavailable"):
        run.failures.append("the worker never reported the store outage")
    w.set_disk_full(False)
    back = time.monotonic()
    producer.join(60)
    run.wait_caught_up(120, w)
    recovery = time.monotonic() - back
    run.stop_workers(w)
    # chDB can finish the rollup's INSERT ... SELECT while the file-size limit makes its files unwritable; that part
    # is set aside as broken when the store is next opened, and the next start rebuilds it (Store._heal_broken_rollup,
    # tests/test_layout.py). Check the store as that next start leaves it.
    store_exec(run.store_url(), [])
    result = run.finish()
    result.recovery_s = round(recovery, 2)
    assert_clean(result, (w,))


def test_store_unwritable_at_start_then_recovers(fault_run: MakeRun) -> None:
    """The worker (re)starts while its existing store cannot write (disk full): it must wait with backoff, not
    exit, and work normally once the disk has room."""
    run = fault_run("store unwritable at start, then recovers")
    wl = run.workload
    store_exec(run.store_url(), [])  # an existing, migrated store (a fresh one: see the test below)
    wl.produce(run.client, 10_000, malformed_every=71)
    w = run.worker("w1", disk_full=True)
    time.sleep(3)
    survived = w.alive
    if survived:
        w.set_disk_full(False)
    else:
        run.failures.append(f"worker exited {w.process.poll() if w.process else '?'} during the outage "
                            "instead of waiting it out")
        w = run.worker("w1-restarted")
    recovery = run.wait_caught_up(120, w)
    run.stop_workers(w)
    result = run.finish()
    result.recovery_s = round(recovery, 2)
    assert_clean(result, tuple(run.workers))


MIGRATE_UNCLASSIFIED = ("bug: Store.migrate errors are not classified: a store that fails while being migrated "
                        "crashes `run` (OSError traceback, exit 1) instead of being waited out")
OWN_RECLAIM = ("bug: during a store outage the worker XAUTOCLAIMs its own in-flight entries, bumping their delivery "
               "count; its replacement then rejects good events as poison")


def test_store_failing_during_migrate_is_waited_out(fault_run: MakeRun) -> None:
    """A brand-new store on a full disk: `run` must keep retrying (the migration) rather than crash. No data check
    here: chDB itself leaves a 1-byte metadata/flowtrack.sql behind when CREATE DATABASE hits EFBIG and reports
    success, so that store cannot be opened again by anyone (an engine problem, reported separately)."""
    run = fault_run("store fails during migrate (fresh store, disk full)")
    w = run.worker("w1", disk_full=True)
    time.sleep(4)
    alive = w.alive
    w.kill()
    row = Tally(run.scenario, duration_s=round(time.monotonic() - run.started, 1))
    if not alive:
        row.failures.append(f"worker crashed during the outage: {w.lines[-1].strip()[:120] if w.lines else ''}")
        row.xfail = MIGRATE_UNCLASSIFIED
    row.record()
    assert alive, f"worker exited during a store outage at start\n{w.tail(12)}"
    assert w.log_has("retrying"), w.tail(12)


def test_long_store_outage_then_worker_replaced(fault_run: MakeRun) -> None:
    """A store outage long enough for many claim rounds (claim idle 300 ms, interval 0.2 s, 6 s outage), then the
    worker is killed (as an orchestrator does with an unhealthy pod) and replaced once the store is back. The
    entries it held were never stored because of the outage, not because of themselves: none may be rejected."""
    run = fault_run("long store outage, then worker replaced")
    wl = run.workload
    fast = {"FLOWTRACK_CLAIM_IDLE_MS": "300", "FLOWTRACK_CLAIM_INTERVAL_S": "0.2"}
    w = run.worker("w1", **fast)
    run.wait_consuming(w)
    w.set_disk_full(True)
    wl.produce(run.client, 1500)
    time.sleep(6)
    s = run.state()
    run.notes.append(f"after the outage: pending {s.pending}, acked {s.acked}")
    w.kill()
    back = time.monotonic()
    run.drain("w2", **fast)
    result = run.finish(recovery_from=back)
    result.xfail = OWN_RECLAIM if result.wrongly_rejected else ""
    assert_clean(result, tuple(run.workers))


def test_redis_killed_and_restarted_with_aof(fault_run: MakeRun) -> None:
    """redis-server gets SIGKILL while the worker stores a 30k backlog, stays down 2 s, and restarts on the same
    port from its AOF (fsync always). The worker reconnects with backoff and finishes; more events arrive after."""
    run = fault_run("redis-server SIGKILL + restart (AOF)", appendonly=True)
    wl = run.workload
    wl.produce(run.client, 30_000, malformed_every=61)
    w = run.worker("w1")
    wait_for(lambda: run.state().acked > 3000, 60, "some progress", interval_s=0.01, workers=(w,))
    run.redis.kill()
    time.sleep(2)
    run.redis.start()
    back = time.monotonic()
    s = run.state()
    run.notes.append(f"after restart: pending {s.pending}, lag {s.lag}")
    wl.produce(run.client, 5_000, malformed_every=61)
    run.wait_caught_up(120, w)
    recovery = time.monotonic() - back
    if not w.alive:
        run.failures.append("the worker died during the Redis outage")
    run.stop_workers(w)
    result = run.finish()
    result.recovery_s = round(recovery, 2)
    assert_clean(result, (w,))


def test_group_destroyed_mid_run(fault_run: MakeRun) -> None:
    """The consumer group is destroyed on every stream while the worker runs (as after a Redis restarted empty
    of groups, or an operator mistake): the worker re-creates it (from the start of each stream) instead of
    crash-looping, and the re-read entries stay invisible as duplicates."""
    run = fault_run("consumer group destroyed mid-run")
    wl = run.workload
    wl.produce(run.client, 20_000, malformed_every=67)
    w = run.worker("w1")
    wait_for(lambda: run.state().acked > 4000, 60, "some progress", interval_s=0.01, workers=(w,))
    for stream in sorted(wl.streams):
        run.client.xgroup_destroy(stream, "flowtrack")
    gone = time.monotonic()
    wl.produce(run.client, 5_000, malformed_every=67)
    run.wait_caught_up(120, w)
    recovery = time.monotonic() - gone
    if not w.alive:
        run.failures.append("the worker died when the group disappeared")
    run.stop_workers(w)
    result = run.finish()
    result.recovery_s = round(recovery, 2)
    assert_clean(result, (w,))
