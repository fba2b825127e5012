"""Two and three workers competing in one consumer group, while a producer writes."""

from __future__ import annotations

import time

import pytest

from .conftest import MakeRun
from .harness import assert_clean, read_store, wait_for

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("workers", [2, 3])
def test_competing_workers(fault_run: MakeRun, workers: int) -> None:
    """N workers share the group while 30k events arrive; then SIGTERM. Each worker has its own embedded store
    (chDB: one process per store) unless a server URL is set, so an event id found in two stores means two
    workers processed the same entry. The claim idle time is long (60 s): no legitimate reclaim can happen."""
    run = fault_run(f"{workers} workers competing in one group", seed=workers)
    wl = run.workload
    stores = tuple(f"store{i}" for i in range(workers))
    ws = [run.worker(f"competitor-{i}", stores[i], FLOWTRACK_CLAIM_IDLE_MS="60000") for i in range(workers)]
    for w in ws:
        run.wait_consuming(w)
    producer, _ = wl.produce_in_background(run.client, 30_000, rate_per_s=10_000, malformed_every=89)
    producer.join(60)
    wait_for(lambda: (s := run.state()).lag == 0 and s.pending == 0, 120, "the group to catch up",
             interval_s=0.1, workers=tuple(ws))
    caught_up = time.monotonic()
    for w in ws:
        w.terminate()
    codes = [w.wait(30) for w in ws]
    assert codes == [0] * workers, [w.tail() for w in ws]
    if not run.server_url:
        shares = [len(read_store(run.store_url(s))["event_ids"]) for s in stores]
        run.notes.append("events per worker: " + ", ".join(map(str, shares)))
        assert all(shares), f"a worker got no work, so this did not compete: {shares}"
    result = run.finish(stores, recovery_from=caught_up)
    result.recovery_s = 0.0
    assert_clean(result, tuple(ws))
