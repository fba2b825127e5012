"""kill -9 of workers: at chosen points, repeatedly, with another consumer taking over."""

from __future__ import annotations

import random
import time

import pytest

from .conftest import MakeRun
from .harness import FaultRun, Worker, assert_clean, read_store, wait_for

pytestmark = pytest.mark.faults


def kill_between_insert_and_ack(run: FaultRun, w: Worker) -> int:
    """Freeze every Redis write (CLIENT PAUSE WRITE: XREADGROUP and XACK wait, XINFO/XPENDING do not), give
    the in-flight insert time to finish, SIGKILL the worker while its XACK waits, then unpause. Returns how many
    events are stored but still pending: proof the kill landed between insert and ack."""
    run.client.execute_command("CLIENT", "PAUSE", "4000", "WRITE")
    try:
        time.sleep(1.5)
        w.kill()
    finally:
        run.client.execute_command("CLIENT", "UNPAUSE")
    pending = run.pending_keys()
    visible = set(read_store(run.store_url())["event_ids"])
    by_key = {key: event_id for event_id, key in run.workload.expected.items()}
    return sum(1 for key in pending if by_key.get(key) in visible)


def test_kill9_at_points(fault_run: MakeRun) -> None:
    """Four workers die by SIGKILL, each at a different point, each succeeded by another; a fifth drains."""
    run = fault_run("kill -9 at points (read, insert, insert→ack, random)")
    wl = run.workload
    wl.produce(run.client, 30_000, malformed_every=101)
    total = wl.written

    # 1. right after the first XREADGROUP delivered entries, before anything was acknowledged
    w = run.worker("w1")
    wait_for(lambda: run.state().read > 0, 60, "first delivery", interval_s=0.005, workers=(w,))
    w.kill()
    s = run.state()
    run.notes.append(f"w1 killed after reading {s.read}, acked {s.acked}")

    # 2. same consumer name again (re-reads its own pending entries), killed while inserting
    w = run.worker("w1")
    base = run.state().acked
    wait_for(lambda: run.state().acked > base + 2000, 60, "w1 to store some", interval_s=0.01, workers=(w,))
    time.sleep(0.1)
    w.kill()
    run.notes.append(f"w1 again killed mid-run at acked {run.state().acked}")

    # 3. another consumer reclaims; killed between insert and ack
    w = run.worker("w2")
    base = run.state().acked
    wait_for(lambda: run.state().acked > base + 2000, 60, "w2 to store some", interval_s=0.01, workers=(w,))
    stored_unacked = kill_between_insert_and_ack(run, w)
    run.notes.append(f"w2 killed between insert and ack: {stored_unacked} stored but unacked")

    # 4. another one, killed at a random moment
    w = run.worker("w3")
    run.wait_consuming(w)
    time.sleep(random.Random(3).uniform(0.2, 1.5))
    w.kill()
    fault_end = time.monotonic()
    s = run.state()
    run.notes.append(f"w3 killed at random: read {s.read}/{total}, pending {s.pending}")

    run.drain("w4")
    result = run.finish(recovery_from=fault_end)
    assert stored_unacked > 0, f"the insert→ack kill did not land between insert and ack\n{result}"
    assert_clean(result, tuple(run.workers))


def test_done_when_60k_three_random_sigkills(fault_run: MakeRun) -> None:
    """Issue 3's DONE-WHEN: a 60k-event run (produced while the workers run), SIGKILL three times at random
    moments, each restart under a different consumer name with a short claim idle time (1 s), then a final
    drain: every valid event visible exactly once, every malformed entry rejected, nothing pending."""
    run = fault_run("DONE-WHEN: 60k, 3x SIGKILL at random, new consumer each", seed=60)
    wl = run.workload
    rng = random.Random(60_000)
    producer, _ = wl.produce_in_background(run.client, 60_000, rate_per_s=8_000, malformed_every=97)
    for i in range(3):
        w = run.worker(f"consumer-{i + 1}")
        run.wait_consuming(w)
        delay = rng.uniform(0.2, 1.5)
        time.sleep(delay)
        w.kill()
        s = run.state()
        run.notes.append(f"kill {i + 1} after {delay:.2f}s: written {wl.written}, acked {s.acked}, "
                         f"pending {s.pending}")
    fault_end = time.monotonic()
    producer.join(60)
    assert wl.written == 60_000
    run.drain("consumer-final")
    result = run.finish(recovery_from=fault_end)
    assert result.produced + len(wl.malformed) == 60_000
    assert_clean(result, tuple(run.workers))
