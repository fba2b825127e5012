"""Negative controls: the checker must be able to fail. Rows inserted twice without the dedup safeguards must be
reported as duplicates, and rows hidden from it must be reported as lost."""

from __future__ import annotations

import pytest

from .conftest import MakeRun
from .harness import read_store, store_exec, tally

pytestmark = pytest.mark.faults

DOUBLE_INSERT = [
    # A plain MergeTree: no ReplacingMergeTree, no FINAL, no non_replicated_deduplication_window, no token.
    "CREATE TABLE flowtrack.events_plain AS flowtrack.events ENGINE = MergeTree ORDER BY event_id",
    "INSERT INTO flowtrack.events_plain SELECT * FROM flowtrack.events FINAL",
    "INSERT INTO flowtrack.events_plain SELECT * FROM flowtrack.events FINAL",
]


def test_negative_control_double_insert_is_caught(fault_run: MakeRun) -> None:
    run = fault_run("NEGATIVE CONTROL: inserted twice, no dedup")
    wl = run.workload
    wl.produce(run.client, 8000, malformed_every=97)
    run.drain("w1")
    clean = run.finish()
    assert clean.problems() == [], clean  # the real pipeline: clean

    store_exec(run.store_url(), DOUBLE_INSERT)
    doubled = tally(run.scenario, wl, [read_store(run.store_url(), "flowtrack.events_plain")], run.client)
    doubled.expect = "duplicates"
    doubled.notes = "same rows inserted twice into a plain MergeTree without token; checker must flag them"
    doubled.duration_s = clean.duration_s
    doubled.record()
    assert doubled.duplicates == wl.produced, doubled
    assert doubled.lost == 0 and doubled.ok, doubled
    assert any("duplicate" in p for p in doubled.problems())


def test_negative_control_hidden_rows_are_lost(fault_run: MakeRun) -> None:
    run = fault_run("NEGATIVE CONTROL: 2% of rows hidden")
    wl = run.workload
    wl.produce(run.client, 8000)
    run.drain("w1")
    lossy = "(SELECT event_id FROM flowtrack.flow_events WHERE cityHash64(event_id) % 50 != 0)"
    hidden = tally(run.scenario, wl, [read_store(run.store_url(), lossy)], run.client)
    hidden.expect = "lost"
    hidden.notes = "the checker reads a relation that drops ~2% of ids; it must report them lost"
    hidden.record()
    assert 0 < hidden.lost < wl.produced // 10, hidden
    assert hidden.duplicates == 0 and hidden.ok, hidden
