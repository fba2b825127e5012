"""SIGTERM under load, and a stream trimmed with the safe trimming on."""

from __future__ import annotations

import time

import pytest

from .conftest import MakeRun
from .harness import assert_clean, wait_for

pytestmark = pytest.mark.faults


def test_sigterm_under_load(fault_run: MakeRun) -> None:
    """SIGTERM while 40k events pour in at 15k/s: the worker finishes its in-flight batch and exits 0 within 10 s,
    leaving nothing pending; another consumer later drains the rest."""
    run = fault_run("SIGTERM under load")
    wl = run.workload
    w = run.worker("w1")
    run.wait_consuming(w)
    producer, _ = wl.produce_in_background(run.client, 40_000, rate_per_s=15_000, malformed_every=77)
    wait_for(lambda: run.state().acked > 10_000, 60, "the worker to be busy", interval_s=0.01, workers=(w,))
    sent = time.monotonic()
    w.terminate()
    rc = w.wait(60)
    stop_s = time.monotonic() - sent
    pending = run.state().pending
    run.notes.append(f"stopped in {stop_s:.2f}s with exit {rc}, pending after stop {pending}")
    if rc != 0:
        run.failures.append(f"exit {rc} on SIGTERM")
    if stop_s > 10:
        run.failures.append(f"took {stop_s:.1f}s to stop")
    if pending:
        run.failures.append(f"{pending} entries left pending by the stopped worker")
    producer.join(60)
    run.drain("w2")
    result = run.finish()
    result.recovery_s = round(stop_s, 2)
    assert_clean(result, tuple(run.workers))


def test_safe_trimming(fault_run: MakeRun) -> None:
    """FLOWTRACK_TRIM_ENABLED with a 0.3 s interval, while: a worker dies by SIGKILL with entries pending (they
    must survive until reclaimed), and a second group `laggard` has read 50 entries per stream of the second
    half without acknowledging them and never reads more. Trimming must remove acknowledged history (or it
    proves nothing) and keep every entry the laggard has pending or not yet read."""
    run = fault_run("safe trimming on (dead consumer + laggard group)")
    wl = run.workload
    trim = {"FLOWTRACK_TRIM_ENABLED": "1", "FLOWTRACK_TRIM_INTERVAL_S": "0.3"}
    wl.produce(run.client, 15_000, malformed_every=59)
    w = run.worker("w1", **trim)
    wait_for(lambda: run.state().acked > 5000, 60, "w1 progress", interval_s=0.01, workers=(w,))
    w.kill()
    dead = run.state()
    run.notes.append(f"w1 killed with {dead.pending} pending")
    first_half_end = {s: run.client.xinfo_stream(s)["last-generated-id"].decode() for s in sorted(wl.streams)}
    for stream, last in first_half_end.items():
        run.client.xgroup_create(stream, "laggard", id=last)
    wl.produce(run.client, 15_000, malformed_every=59)
    laggard_pending: dict[str, str] = {}
    for stream in sorted(wl.streams):
        reply = run.client.xreadgroup("laggard", "slow", {stream: ">"}, count=50)
        laggard_pending[stream] = reply[0][1][0][0].decode()
    w2 = run.worker("w2", **trim)
    run.wait_caught_up(120, w2)
    time.sleep(1.0)  # a few more trim rounds after the last ack
    w2.terminate()
    if w2.wait(30) != 0:
        run.failures.append("w2 did not exit 0 on SIGTERM")
    length = sum(int(run.client.xlen(s)) for s in wl.streams)
    run.notes.append(f"stream length {length} of {wl.written} written")
    if length >= wl.written:
        run.failures.append("nothing was trimmed: the scenario proves nothing")
    # Every entry from the laggard's oldest pending one on must still be there, readable by the laggard.
    missing = 0
    every_key = set(wl.expected.values()) | wl.expected_rejected
    for stream, oldest in laggard_pending.items():
        present = {e[0].decode() for e in run.client.xrange(stream, min=oldest)}
        wanted = {i for s, i in every_key if s == stream and _id(i) >= _id(oldest)}
        missing += len(wanted - present)
    if missing:
        run.failures.append(f"{missing} entries the laggard group had pending or unread were trimmed")
    for worker in run.workers:
        if worker.log_has("were deleted from their streams"):
            run.failures.append(f"{worker.name} found pending entries deleted by trimming")
    pending_laggard = sum(int(run.client.xpending(s, "laggard")["pending"]) for s in wl.streams)
    run.notes.append(f"laggard still has {pending_laggard} pending")
    result = run.finish()
    assert_clean(result, tuple(run.workers))


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
