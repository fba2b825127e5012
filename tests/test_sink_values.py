"""Every value of a stored batch lands exactly as the normalizer built it, whatever its characters or timestamp
(1970..2200, so one batch may span hundreds of weekly partitions), and a re-inserted batch is dropped: with the
events insert built by clickhouse-connect in Python and as a Native block in C (worker/_fastpath.c) alike."""

from __future__ import annotations

import random
from typing import Any

import pytest

from worker import sink as sink_module
from worker.normalize import FlowEvent, Rejection, native_block
from worker.sink import EVENT_BLOCK_COLUMNS, REJECTION_BLOCK_COLUMNS, Sink
from worker.store import Store

MAX_TS_MS = 7258118400000  # 2200-01-01, the contract's bound (exclusive)

HARD_TEXT = [
    "", " ", "plain", 'quote " and \\ backslash', "\x00nul\x00", "".join(map(chr, range(1, 32))) + "\x7f",
    "tab\tnewline\nreturn\r", "ünïcödé", "日本語のテキスト", "emoji 🧠🔧", "rtl \u202e override", "\u2028\u2029",
    "{\"json\": [1, 2]}", "x" * 70_000, "\ufeffbom", "\U0010ffff",
]


@pytest.fixture(params=["python", "c"], autouse=True)
def insert_encoding(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test once with the insert built in Python, once with the C hot path's Native block."""
    if request.param == "python":
        monkeypatch.setattr(sink_module, "native_block", None)
    elif native_block is None:
        pytest.skip("the C hot path is not built here (no C compiler)")
    return str(request.param)


def stored_row(store: Store, event_id: str) -> list[Any]:
    _, rows = store.query(
        "SELECT event_id, user_id, session_id, node_id, parent_id, event_type, toUnixTimestamp64Milli(ts), attributes, "
        "source_stream, source_id, is_end, is_error FROM flowtrack.events WHERE event_id = {e:String}",
        {"e": event_id})
    assert len(rows) == 1, (event_id, rows)
    return list(rows[0])


def hard_events() -> list[FlowEvent]:
    rng = random.Random(7)
    stamps = [0, 1, 999, 1000, 1001, 59_999, 86_400_000, 1_732_528_265_123, MAX_TS_MS - 1,
              *(rng.randrange(0, MAX_TS_MS) for _ in range(300))]
    events = []
    for n, ts_ms in enumerate(stamps):
        text = HARD_TEXT[n % len(HARD_TEXT)]
        attributes = {text[:100] or "k": text, f"a{n}": str(ts_ms), "nested": '{"a": {"b": null}}'} if n % 3 else {}
        events.append(FlowEvent(f"e{n}-{text[:20]}", f"u{text[:50]}", f"s{n % 7}", f"n{n}{text[:30]}",
                                "" if n % 4 == 0 else f"p{text[:10]}", "llm_call" if n % 2 else f"t{text[:30]}",
                                ts_ms, attributes, f"flow_events:{n % 3}", f"{1000 + n}-{n}", n % 2, n % 5 == 0))
    return events


def test_every_value_is_stored_exactly_in_a_batch_over_centuries(store: Store, insert_encoding: str) -> None:
    events = hard_events()
    if insert_encoding == "c":
        assert native_block is not None
        assert native_block(events, EVENT_BLOCK_COLUMNS, "ingested_at", 0) is not None  # the C block, not the fallback
    result = Sink(store).write(events, [])
    assert result.stored == len(events) and not result.rejected
    for event in events:
        assert stored_row(store, event.event_id) == [*event[:10], *(int(v) for v in event[10:])], event.event_id


def test_every_millisecond_of_a_second_comes_back_as_itself(store: Store) -> None:
    base = 1_764_000_000_000
    events = [FlowEvent(f"ms-{ms}", "u", "s-ms", f"n{ms}", "", "step", base + ms, {}, "flow_events", f"1-{ms}", 0, 0)
              for ms in range(1000)]
    Sink(store).write(events, [])
    _, rows = store.query("SELECT toUnixTimestamp64Milli(ts) - {b:Int64} FROM flowtrack.events "
                          "WHERE session_id = 's-ms' ORDER BY 1", {"b": base})
    assert [r[0] for r in rows] == list(range(1000))


def test_a_reinserted_batch_is_dropped_and_another_composition_is_not(store: Store) -> None:
    events = hard_events()[:20]
    sink = Sink(store)
    sink.write(events, [])
    sink.write(events, [])  # same rows, same token: dropped by the engine
    count = "SELECT count() FROM flowtrack.events WHERE event_id IN {ids:Array(String)}"
    ids = {"ids": [e.event_id for e in events]}
    assert store.scalar(count, ids) == 20
    sink.write(events[:10], [])  # another entry set: a new insert (copies FINAL hides)
    assert store.scalar(count, ids) == 30
    assert store.scalar("SELECT count() FROM flowtrack.flow_events WHERE event_id IN {ids:Array(String)}", ids) == 20


def hard_rejections() -> list[Rejection]:
    return [Rejection(f"flow_events:{text[:40]}", f"{1000 + n}-{n}", f"reason {n}: {text}",
                      f'{{"raw": "{text[:200]}"}}') for n, text in enumerate(HARD_TEXT * 3)]


def test_every_rejection_is_stored_exactly_and_a_reinserted_one_is_dropped(store: Store, insert_encoding: str) -> None:
    rejections = hard_rejections()
    if insert_encoding == "c":
        assert native_block is not None
        assert native_block(rejections, REJECTION_BLOCK_COLUMNS, "received_at", 0) is not None  # not the fallback
    sink = Sink(store)
    sink.write([], rejections)
    sink.write([], rejections)  # same rows, same token: dropped by the engine
    _, rows = store.query("SELECT source_stream, source_id, reason, raw FROM flowtrack.rejected ORDER BY source_id")
    assert sorted(map(tuple, rows)) == sorted(rejections)
    sink.write([], rejections[:5])  # another set: a new insert (copies FINAL hides)
    assert store.scalar("SELECT count() FROM flowtrack.rejected") == len(rejections) + 5
    assert store.scalar("SELECT count() FROM flowtrack.rejected_events") == len(rejections)


def test_the_c_block_refuses_what_it_cannot_encode(insert_encoding: str) -> None:
    if insert_encoding == "python":
        pytest.skip("about the C block")
    assert native_block is not None
    good = hard_rejections()[:3]
    with pytest.raises(ValueError, match="Nullable"):
        native_block(good, (("a", "Nullable(String)"),) * 4, "received_at", 0)
    with pytest.raises(TypeError):
        native_block(good, ("source_stream", "String"), "received_at", 0)  # type: ignore[arg-type]
    # rows it cannot encode (another width, a value of another type): None, and the sink builds those in Python
    assert native_block([(*good[0], "extra")], REJECTION_BLOCK_COLUMNS, "received_at", 0) is None
    odd = Rejection("flow_events", "1-1", "reason", "raw")._replace(raw=b"bytes")  # type: ignore[arg-type]
    assert native_block([odd], REJECTION_BLOCK_COLUMNS, "received_at", 0) is None
    event = hard_events()[1]
    assert native_block([event._replace(is_end=300)], EVENT_BLOCK_COLUMNS, "ingested_at", 0) is None
    assert native_block([event._replace(attributes=[("k", "v")])], EVENT_BLOCK_COLUMNS, "ingested_at", 0) is None
