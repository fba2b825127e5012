"""Restarts during a store outage (issue 10, item 3): an orchestrator's liveness probe restarts an unhealthy worker
again and again while ClickHouse cannot write. No restart may count as a delivery attempt: after more restarts
than FLOWTRACK_MAX_DELIVERIES, once the store is back, every event is stored once and nothing is rejected."""

from __future__ import annotations

import time

import pytest

from .conftest import MakeRun
from .harness import FaultRun, Worker, assert_clean, store_exec, wait_for

pytestmark = pytest.mark.faults

MAX_DELIVERIES = "2"
RESTARTS = 5  # more than MAX_DELIVERIES + 1: each one used to cost every pending entry one delivery


def _hit_the_outage(run: FaultRun, w: Worker, timeout_s: float = 60) -> None:
    """Until the worker has met the outage (a failed insert, or a failed migration it retries)."""
    wait_for(lambda: w.log_has("store unavailable") or w.log_has("retrying in") or not w.alive, timeout_s,
             f"worker {w.name} to meet the outage", workers=(w,))
    if not w.alive:
        run.failures.append(f"worker {w.name} exited during the outage instead of waiting it out")


def _restart_during_outage(run: FaultRun, consumer: str) -> None:
    for attempt in range(RESTARTS):
        w = run.worker(consumer, disk_full=True, FLOWTRACK_MAX_DELIVERIES=MAX_DELIVERIES)
        _hit_the_outage(run, w)
        time.sleep(0.5)  # a little longer in the outage: more failed inserts, more keepalive rounds
        w.kill()  # the liveness probe's restart: SIGKILL, no cleanup
        run.notes.append(f"restart {attempt + 1}: pending {run.state().pending}")


def test_restarts_while_the_store_cannot_write_reject_nothing(fault_run: MakeRun) -> None:
    """The worker reads a backlog, the disk fills up under it (inserts fail), and it is killed and restarted
    five times during the outage (its own pending entries are re-read at every start); then the disk has room."""
    run = fault_run("store outage, worker restarted 5 times")
    wl = run.workload
    w = run.worker("w1", FLOWTRACK_MAX_DELIVERIES=MAX_DELIVERIES)
    run.wait_consuming(w)
    w.set_disk_full(True)
    wl.produce(run.client, 3000, malformed_every=97)
    wait_for(lambda: run.state().pending > 0 and w.log_has("store unavailable"), 60,
             "entries held during the outage", workers=(w,))
    w.kill()
    _restart_during_outage(run, "w1")
    back = time.monotonic()
    run.drain("w1", FLOWTRACK_MAX_DELIVERIES=MAX_DELIVERIES)
    result = run.finish(recovery_from=back)
    assert_clean(result, tuple(run.workers))


def test_restarts_before_the_store_was_ever_usable_reject_nothing(fault_run: MakeRun) -> None:
    """An existing store that cannot write from the first start on, a backlog, restarts during the outage; a
    second consumer's entries wait in the group too (a peer that died earlier). Nothing may be read and then
    counted against the entries while nothing can be stored."""
    run = fault_run("store unwritable from start, worker restarted 5 times")
    wl = run.workload
    store_exec(run.store_url(), [])  # an existing, migrated store
    wl.produce(run.client, 2000, malformed_every=89)
    peer = run.worker("peer", FLOWTRACK_MAX_DELIVERIES=MAX_DELIVERIES, disk_full=True)
    _hit_the_outage(run, peer)
    peer.kill()
    _restart_during_outage(run, "w1")
    back = time.monotonic()
    run.drain("w1", FLOWTRACK_MAX_DELIVERIES=MAX_DELIVERIES, FLOWTRACK_CLAIM_IDLE_MS="300")
    result = run.finish(recovery_from=back)
    assert_clean(result, tuple(run.workers))
