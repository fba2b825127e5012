"""Every shape `flowtrack bench --shape` writes (flat-epoch, flat-iso, json, mixed) normalizes through the fast
path to exactly what the checked path gives: the same events, the same rejections with the same reasons
(issue 11). The fast path is also taken for the common valid entries of every shape, not just flat epoch-ms."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from worker.normalize import FlowEvent, Normalizer, Rejection
from worker.producer import ProduceConfig, encode_entry, generate_flows, interleave


class CheckedOnly(Normalizer):
    """The checked path alone: the fast paths (C and Python) always defer."""

    native = None

    def _build_fast(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        return None


class CountingFast(Normalizer):
    """The fast path under test, counting the entries it takes: the C hot path (then the Python fast path behind
    it), or the Python fast path alone."""

    def __init__(self, hot_path: str = "python") -> None:
        super().__init__()
        self.fast_hits = 0
        self.native_hits = 0
        native = Normalizer.native if hot_path == "c" else None
        if hot_path == "c":
            assert native is not None, "the C hot path is not built"

        def counted(*args: Any) -> FlowEvent | None:
            assert native is not None
            event: FlowEvent | None = native(*args)
            self.fast_hits += event is not None
            self.native_hits += event is not None
            return event

        self.native = counted if native is not None else None

    def _build_fast(self, *args: Any, **kwargs: Any) -> FlowEvent | None:
        event = super()._build_fast(*args, **kwargs)
        self.fast_hits += event is not None
        return event


HOT_PATHS = ["python", pytest.param("c", marks=pytest.mark.skipif(
    Normalizer.native is None, reason="the C hot path is not built here (no C compiler); "
    "tests/test_fastpath_build.py fails where a compiler is present and it was not built"))]


def _entries(shape: str, count: int, seed: int) -> list[tuple[str, str, list[bytes], bool]]:
    config = ProduceConfig(users=50, shape=shape, seed=seed,  # type: ignore[arg-type]
                           invalid_ratio=0.05 if shape == "mixed" else 0.0)
    rng = random.Random(seed)
    out = []
    for n, (flow, event) in enumerate(interleave(config, generate_flows(config))):
        if n == count:
            break
        fields, valid = encode_entry(event, config.shape, True, rng, config.invalid_ratio)
        pairs = [part.encode() for item in fields.items() for part in item]
        out.append((f"flow_events:{flow.user_id}", f"{1_700_000_000_000 + n}-{n % 3}", pairs, valid))
    return out


@pytest.mark.parametrize("hot_path", HOT_PATHS)
@pytest.mark.parametrize("shape", ["flat-epoch", "flat-iso", "json", "mixed"])
def test_every_shape_normalizes_the_same_through_either_path(shape: str, hot_path: str) -> None:
    fast, checked = CountingFast(hot_path), CheckedOnly()
    entries = _entries(shape, 4000, seed=len(shape))
    for stream, entry_id, pairs, valid in entries:
        got = fast.normalize_pairs(stream, entry_id, list(pairs))
        expected = checked.normalize_pairs(stream, entry_id, list(pairs))
        assert got == expected, (pairs, got, expected)
        assert isinstance(got, FlowEvent) == valid, (pairs, got)
    valid_count = sum(valid for *_, valid in entries)
    assert fast.fast_hits >= 0.95 * valid_count  # ISO-8601 and JSON values no longer leave the fast path
    if hot_path == "c":
        assert fast.native_hits >= 0.95 * valid_count  # and the C hot path takes them
    if shape == "mixed":
        assert valid_count < len(entries)  # the mixed shape does hold invalid entries


STAMPS: list[Any] = [
    "2026-11-24T10:31:05.123Z", "2026-11-24T10:31:05Z", "2026-11-24T10:31:05.123+02:00", "2026-11-24T10:31:05-05:00",
    "2026-11-24T10:31:05.123456Z", "2026-11-24T10:31:05.1235Z", "2026-11-24 10:31:05", "2026-11-24",
    "2026-11-24T10:31:05.123", "20261124T103105Z", " 2026-11-24T10:31:05Z ", "2026-11-24T10:31:05.123z",
    "2026-13-01T00:00:00Z", "2026-11-24T25:00:00Z", "1969-12-31T23:59:59Z", "1970-01-01T00:00:00Z",
    "2199-12-31T23:59:59.999Z", "2200-01-01T00:00:00Z", "2026-11-24T10:31:05+14:00", "1234-", "2026-",
    "2026-11-24Tnoon", "1700000000.5", "1700000000.1234", "1e9", "-1", "inf", "nan", "1_700_000_000",
    "\uff12\uff10\uff12\uff16-11-24", "\uff11\uff17\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10",
    "2026-11-24T10:31:05Z\x00junk", "1700000000\x00", "2026-11-24T10:31:05.123Z\x00", "17\x0000000000",
    "\u30001700000000\u3000", "\t1700000000 ", "2026-11-24T10:31:05\x7fZ", "+1700000000",
    1700000000, 1700000000123, 1.7e9, 1700000000.25, -5, 0, 7258118400000, True,
    None, "", [1], {"a": 1},
]


@pytest.mark.parametrize("hot_path", HOT_PATHS)
@pytest.mark.parametrize("envelope", ["", "data", "payload"])
def test_timestamp_forms_agree_and_reject_alike(envelope: str, hot_path: str) -> None:
    fast, checked = CountingFast(hot_path), CheckedOnly()
    for n, stamp in enumerate(STAMPS):
        body: dict[str, Any] = {"session_id": "s-1", "node_id": "n-1", "event_type": "llm_call", "timestamp": stamp}
        if envelope:
            fields = {envelope: orjson.dumps(body).decode()}
        elif isinstance(stamp, str):
            fields = body
        else:
            continue  # flat fields are text only
        pairs = [part.encode() for item in fields.items() for part in item]
        entry_id = f"1700000000000-{n}"
        got = fast.normalize_pairs("flow_events:7", entry_id, list(pairs))
        expected = checked.normalize_pairs("flow_events:7", entry_id, list(pairs))
        assert got == expected, (stamp, got, expected)
        if stamp in ("2026-11-24T10:31:05.123Z", "2026-11-24T10:31:05.123+02:00", "2026-11-24T10:31:05.123"):
            assert isinstance(got, FlowEvent)
            offset_ms = 2 * 3_600_000 if stamp.endswith("+02:00") else 0
            assert got.ts_ms == 1_795_516_265_123 - offset_ms
        if stamp in ("2026-13-01T00:00:00Z", "1969-12-31T23:59:59Z", "2200-01-01T00:00:00Z", "2026-11-24Tnoon"):
            assert isinstance(got, Rejection) and "timestamp" in got.reason


@pytest.mark.parametrize("pairs", [
    [b"session_id", b"s\x00x", b"node_id", b"n", b"event_type", b"t"],           # a NUL inside a value
    [b"session_id", b"s", b"no\x00de", b"n", b"node_id", b"n", b"event_type", b"t"],  # inside a name
    [b"session_id", b"s", b"node_id", b"\xc3", b"event_type", b"\xa9t"],          # invalid across a boundary
    [b"session_id", b"s", b"node_id", b"n", b"event_type", b"t\xff"],             # invalid value
    [b"session_id", b"s", b"node_id", b"n", b"event_type", b"", b"k", b""],       # empty values
    [b"data", b'{"session_id": "s", "node_id": "n", "event_type": "t", "z": "\\u0000"}'],
])
@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_the_joined_decode_gives_what_the_per_field_decode_gives(pairs: list[bytes], hot_path: str) -> None:
    normalizer = CountingFast(hot_path)
    got = normalizer.normalize_pairs("flow_events:7", "1700000000000-0", list(pairs))
    expected = normalizer.normalize("flow_events:7", "1700000000000-0", dict(zip(pairs[::2], pairs[1::2],
                                                                                 strict=True)))
    assert got == expected


@pytest.mark.parametrize("pairs", [
    [b"session_id", b"A", b"session_id", b"B", b"node_id", b"n", b"event_type", b"t"],  # a contract field, twice
    [b"session_id", b"s", b"node_id", b"n", b"event_type", b"t", b"note", b"x", b"note", b"y"],  # an attribute
    [b"session_id", b"s", b"node_id", b"n", b"event_type", b"t", b"note", b"x", b"note", b"x"],  # equal copies
    [b"data", b'{"session_id": "s", "node_id": "n", "event_type": "t"}', b"data", b"{}"],  # the envelope
    [b"session_id", b"s", b"node_id", b"\xff", b"node_id", b"n", b"event_type", b"t"],  # a copy not UTF-8
])
@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_an_entry_repeating_a_field_name_is_rejected_with_every_value_kept(pairs: list[bytes], hot_path: str) -> None:
    """Redis keeps every copy of a repeated name (XADD k * a 1 a 2); a dict of them would keep the last alone and
    silently drop the rest (a session id, an attribute). Rejected instead, the raw keeping every pair in order."""
    from worker.normalize import parse_raw

    got = CountingFast(hot_path).normalize_pairs("flow_events:7", "1700000000000-0", list(pairs))
    assert isinstance(got, Rejection)
    assert "appears 2 times in the entry" in got.reason
    assert parse_raw(got.raw) == ["repeated", [part.decode("utf-8", "surrogateescape") for part in pairs]]
    assert got == CheckedOnly().normalize_pairs("flow_events:7", "1700000000000-0", list(pairs))


_CONTRACT = '"session_id": "s", "node_id": "n", "event_type": "t"'


@pytest.mark.parametrize(("document", "key"), [
    ('{"session_id": "A", "session_id": "B", "node_id": "n", "event_type": "t"}', "session_id"),  # a contract field
    ('{' + _CONTRACT + ', "note": "x", "note": "y"}', "note"),  # an attribute
    ('{' + _CONTRACT + ', "note": "x", "note": "x"}', "note"),  # equal copies
    ('{' + _CONTRACT + ', "meta": {"a": 1, "b": {"c": 1, "c": 2}}}', "c"),  # in a nested object
    ('{' + _CONTRACT + ', "steps": [{"a": 1}, {"a": 2, "a": 3}]}', "a"),  # in an object inside an array
    ('{' + _CONTRACT + ', "k\\u0061": 1, "ka": 2}', "ka"),  # the same key spelled with an escape
    ('{' + _CONTRACT + ', "q\\"": 1 , "q\\""\n\t :2}', 'q"'),  # a key with an escaped quote, blanks before ':'
    ('{' + _CONTRACT + ', "→": "é", "→": 2}', "→"),  # text of 2-byte characters
    ('{' + _CONTRACT + ', "😀": 1, "x": "😀\\"", "😀": 2}', "😀"),  # text of 4-byte characters
])
@pytest.mark.parametrize("envelope", [b"data", b"payload"])
@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_a_json_document_repeating_a_key_is_rejected_with_the_document_kept(
        document: str, key: str, envelope: bytes, hot_path: str) -> None:
    """A JSON parser keeps one value of a key an object repeats and drops the rest without a word (a session id, an
    attribute, a nested value): the class of a repeated field name, one level down. Rejected on every path, naming the
    key; the raw keeps the document as sent."""
    from worker.normalize import parse_raw

    pairs = [envelope, document.encode()]
    got = CountingFast(hot_path).normalize_pairs("flow_events:7", "1700000000000-0", list(pairs))
    assert isinstance(got, Rejection), got
    assert got.reason.startswith(f"key {key!r} appears ")
    assert f"in one object of field {envelope.decode()!r}" in got.reason
    assert parse_raw(got.raw) == {envelope.decode(): document}
    assert got == CheckedOnly().normalize_pairs("flow_events:7", "1700000000000-0", list(pairs))


@pytest.mark.parametrize("document", [
    '{' + _CONTRACT + ', "a": {"k": 1}, "b": {"k": 2}, "k": [{"k": 3}, {"k": 4}]}',  # one key in several objects
    '{' + _CONTRACT + ', "x": "a\\":b", "y": ":", "z": "\\\\"}',  # quotes, colons, backslashes inside strings
    '{' + _CONTRACT + ', "at": "2026-11-24T10:31:05.123Z", "note": "{\\"k\\": 1, \\"k\\": 2}"}',  # JSON as text
    '{' + _CONTRACT + ', "→": "😀\\\\", "😀": {"→": ":"}}',  # wide characters
])
@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_json_documents_without_a_repeated_key_are_stored_alike(document: str, hot_path: str) -> None:
    pairs = [b"data", document.encode()]
    fast = CountingFast(hot_path)
    got = fast.normalize_pairs("flow_events:7", "1700000000000-0", list(pairs))
    assert type(got) is FlowEvent, got
    assert got == CheckedOnly().normalize_pairs("flow_events:7", "1700000000000-0", list(pairs))
    assert fast.fast_hits == 1


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_an_oversized_entry_repeating_a_name_is_rejected_with_its_raw_cut(hot_path: str) -> None:
    """Over the size limit the entry took a path of its own, which made a dict of it first: the 1 MiB value was dropped
    silently and the entry stored. Rejected as repeating a name, its raw cut as an oversized entry's is."""
    from worker.normalize import MAX_ENTRY_BYTES, MAX_RAW_VALUE_CHARS, parse_raw

    pairs = [b"session_id", b"s", b"node_id", b"n", b"event_type", b"t", b"big", b"x" * MAX_ENTRY_BYTES, b"big", b"y"]
    got = CountingFast(hot_path).normalize_pairs("flow_events:7", "1700000000000-0", list(pairs))
    assert isinstance(got, Rejection) and "field 'big' appears 2 times" in got.reason
    tag, parts = parse_raw(got.raw)
    assert tag == "repeated" and parts[7] == "x" * MAX_RAW_VALUE_CHARS and parts[9] == "y"
