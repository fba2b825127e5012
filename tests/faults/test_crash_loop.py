"""A crash loop: a worker killed again and again while it holds entries (an OOM, a liveness probe), restarted under
the same consumer name. Every restart re-reads its own pending entries and Redis counts a delivery each time, past
FLOWTRACK_MAX_DELIVERIES: the entries are narrowed (worker/poison.py), not rejected, and every good one lands."""

from __future__ import annotations

import time

import pytest
import redis

from .conftest import MakeRun
from .harness import GROUP, FaultRun, assert_clean, wait_for

pytestmark = pytest.mark.faults

MAX_DELIVERIES = "1"  # every re-read is past the limit: the rule used to reject them all at the first restart
LIVES = 4


def _deliveries(run: FaultRun, consumer: str) -> dict[tuple[str, str], int]:
    """Times delivered of every entry pending on ``consumer``."""
    counts: dict[tuple[str, str], int] = {}
    for stream in run.workload.streams:
        try:
            rows = run.client.xpending_range(stream, GROUP, min="-", max="+", count=1_000_000,
                                             consumername=consumer)
        except redis.ResponseError:  # the worker has not created the group on this stream yet
            continue
        counts.update(((stream, row["message_id"].decode()), int(row["times_delivered"])) for row in rows)
    return counts


def _delivered_since(run: FaultRun, consumer: str, before: dict[tuple[str, str], int]) -> bool:
    return any(count > before.get(key, 0) for key, count in _deliveries(run, consumer).items())


def test_a_crash_loop_rejects_no_good_entry(fault_run: MakeRun) -> None:
    """20k entries; the worker is SIGKILLed four times, each time right after a delivery and with its acks held
    back (CLIENT PAUSE WRITE), so it dies holding entries; then a fifth life drains. Every valid event is stored
    once and only the malformed entries are rejected, though the held ones were delivered up to five times with a
    limit of one."""
    run = fault_run(f"crash loop: SIGKILL while holding entries, {LIVES} lives, MAX_DELIVERIES={MAX_DELIVERIES}")
    wl = run.workload
    wl.produce(run.client, 20_000, malformed_every=97)
    for life in range(1, LIVES + 1):
        before = _deliveries(run, "w1")
        w = run.worker("w1", FLOWTRACK_MAX_DELIVERIES=MAX_DELIVERIES)
        wait_for(lambda before=before: _delivered_since(run, "w1", before), 60,  # type: ignore[misc]
                 f"life {life} to be delivered entries", interval_s=0.005, workers=(w,))
        run.client.execute_command("CLIENT", "PAUSE", "3000", "WRITE")  # its XACKs wait: it dies holding them
        try:
            time.sleep(0.3)
            w.kill()
        finally:
            run.client.execute_command("CLIENT", "UNPAUSE")
        held = _deliveries(run, "w1")
        run.notes.append(f"life {life}: {len(held)} held, most delivered {max(held.values(), default=0)} times")
    most = max(_deliveries(run, "w1").values(), default=0)
    back = time.monotonic()
    run.drain("w1", FLOWTRACK_MAX_DELIVERIES=MAX_DELIVERIES)
    result = run.finish(recovery_from=back)
    # Proof the loop did what a count-only rule punishes: entries held through several deaths, past the limit.
    assert most >= 3, f"the kills did not land while entries were held\n{result}"
    assert_clean(result, tuple(run.workers))
