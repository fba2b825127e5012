"""The normalize fast path (issue 6) gives exactly what the checked path gives, or defers to it.

``Normalizer._build_fast`` must return the same FlowEvent as ``_build_checked`` whenever it returns one,
and must return None whenever the checked path would reject; the same for the fast field decoding.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from worker import normalize as nz
from worker.normalize import FlowEvent, Normalizer, Rejection

STREAMS = ("flow_events:42", "flow_events", "flow_events:", "x:" + "u" * 300, "a:b:7")
# Producers may choose ids (XADD key <ms>-<seq>): with no timestamp field, times up to 2^64 - 1 ms.
ENTRY_IDS = ("1700000000000-0", "1700000000123-7", "0-1", "7258118399999-0", "7258118400000-0",
             "999999999999999999-0", "9223372036854775808-0", "18446744073709551615-18446744073709551615")
ID_VALUES: list[Any] = [None, "", " ", "\t\n", "a", "n-1", "é😀", "x" * 256, "x" * 257, 7, True, 1.5, ["a"],
                        {"a": 1}]
TYPE_VALUES: list[Any] = [None, "", " ", "llm_call", "flow_completed", "error", "t" * 128, "t" * 129, 3]
TS_VALUES: list[Any] = [None, "", "0", "1700000000", "1700000000123", "99999999999", "100000000000",
                        "7258118399999", "7258118400000", "0001700000000", "\uff11\uff17\uff10\uff10",
                        "12345678901234567", " 1700000000 ", "-5", "1.5", "2024-01-02T03:04:05Z", "nan",
                        1700000000, 1.7e12, True,
                        # the common forms' shortcut (_common_timestamp_ms) and what it must leave to the checked
                        # parse: whitespace only one of float()/strip() knows, exponents with a '-' at index 4,
                        # underscores, non-finite and overflowing numbers, out-of-range values, bad calendar dates
                        "2026-11-24T10:31:05.123Z", "2026-11-24T10:31:05.123+02:00", "2026-11-24T10:31:05",
                        "2026-11-24T10:31:05Z ", " 2026-11-24T10:31:05Z", "2026-13-01T00:00:00Z", "1700000000.5",
                        " 1.5\x1c", "123e-5", "1_000.5", "inf", "-inf", "1e400", "-1.5", "7258118399.9995",
                        "1969-12-31T23:59:59Z", "2200-01-01T00:00:00Z", 2 ** 63, -1.5, 1e300, 7258118400.0,
                        float("nan"), 1700000000.1234567]


PLAIN: dict[str, list[Any]] = {"session_id": ["s-1", "é😀"], "node_id": ["n-1", "llm-1.tool-2"],
                               "event_type": ["llm_call", "flow_completed", "error"], "user_id": ["42", None],
                               "parent_id": ["msg-1", None, ""], "timestamp": ["1700000000123", "1700000000"],
                               "event_id": [None, "e-1"]}


def _record(rng: random.Random) -> dict[str, Any]:
    record: dict[str, Any] = {}
    odd = rng.random() < 0.5  # half the records are plain except for (usually) one odd field
    for name, values in (("session_id", ID_VALUES), ("node_id", ID_VALUES), ("event_type", TYPE_VALUES),
                         ("user_id", ID_VALUES), ("parent_id", ID_VALUES), ("timestamp", TS_VALUES),
                         ("event_id", ID_VALUES)):
        value = rng.choice(values) if odd and rng.random() < 0.3 else rng.choice(PLAIN[name])
        if value is not None or rng.random() < 0.5:
            record[name] = value
    if "node_id" in record and rng.random() < 0.1:
        record["parent_id"] = record["node_id"]
    for i in range(rng.choice((0, 1, 3))):
        record[f"attr{i}"] = rng.choice(("v", "", "ü", 5, None, [1, 2], {"k": "v"}))
    return record


def _checked(normalizer: Normalizer, stream: str, entry_id: str, record: dict[str, Any]) -> FlowEvent | str:
    try:
        return normalizer._build_checked(stream, entry_id, record, nz.joined_mapping(record))
    except nz._Reject as exc:
        return f"rejected: {exc}"


@pytest.mark.parametrize("seed", range(8))
def test_fast_build_agrees_with_checked_build(seed: int) -> None:
    rng = random.Random(seed)
    normalizer = Normalizer()
    fast_hits = 0
    for _ in range(3000):
        stream, entry_id, record = rng.choice(STREAMS), rng.choice(ENTRY_IDS), _record(rng)
        checked = _checked(normalizer, stream, entry_id, record)
        try:
            fast = normalizer._build_fast(stream, entry_id, record, nz.joined_mapping(record))
        except nz._Reject as exc:  # only the attribute limit may reject from the fast path
            assert checked == f"rejected: {exc}"
            continue
        if fast is not None:
            fast_hits += 1
            assert type(fast) is FlowEvent
            assert fast == checked, (stream, entry_id, record)
    assert fast_hits > 50  # the generator does reach the fast path


def test_fast_decode_agrees_with_checked_decode() -> None:
    cases: list[dict[Any, Any]] = [
        {b"session_id": b"s", b"node_id": b"n", b"event_type": b"t"},
        {b"session_id": "s", b"node_id": b"n"},                      # str value
        {"session_id": b"s"},                                        # str key
        {b"session_id": b"\xff"},                                    # invalid UTF-8 value
        {b"\xfe": b"x"},                                             # invalid UTF-8 key
        {b"session_id": bytearray(b"s")},                            # bytearray value
        {b"data": b'{"session_id": "s", "node_id": "n", "event_type": "t", "k": [1]}'},
        {b"payload": b"[1]"},
        {b"big": b"x" * nz.MAX_ENTRY_BYTES},                         # over the limit with its key
        {b"big": b"x" * (nz.MAX_ENTRY_BYTES - 3)},                   # exactly at the limit
        {"é" * 10: b"x" * (nz.MAX_ENTRY_BYTES - 15)},
    ]
    for fields in cases:
        try:
            expected: Any = nz._unwrap(nz._decode_fields(fields))
        except nz._Reject as exc:
            expected = f"rejected: {exc}"
        try:
            got: Any = nz._decode_entry(fields)
        except nz._Reject as exc:
            got = f"rejected: {exc}"
        assert got == expected, fields


def test_whole_entries_normalize_the_same_through_either_path() -> None:
    normalizer = Normalizer(end_event_types=("flow_completed",), error_event_types=("error",))
    rng = random.Random(99)
    for _ in range(2000):
        record = _record(rng)
        fields = {k.encode(): v.encode() for k, v in record.items() if isinstance(v, str)}
        stream, entry_id = rng.choice(STREAMS), rng.choice(ENTRY_IDS)
        item = normalizer.normalize(stream, entry_id, fields)
        decoded = nz._unwrap(nz._decode_fields(fields))
        checked = _checked(normalizer, stream, entry_id, decoded)
        if isinstance(item, Rejection):
            assert isinstance(checked, str) and checked == f"rejected: {item.reason}"
        else:
            assert item == checked


class PythonOnly(Normalizer):
    native = None


def _as_entry(record: dict[str, Any], rng: random.Random) -> list[bytes]:
    """A record as Redis would hand it over: flat text fields, or a ``data``/``payload`` JSON envelope (with a flat
    field or two beside it), sometimes with a repeated name or a hostile byte."""
    if rng.random() < 0.5:
        pairs = [part.encode() for key, value in record.items() if isinstance(value, str) for part in (key, value)]
    else:
        envelope = rng.choice(("data", "payload"))
        pairs = [envelope.encode(), nz.orjson.dumps(record)]
        if rng.random() < 0.1 and record:  # a key the document repeats, at the top or one level down
            key = rng.choice(sorted(record))
            copy = nz.orjson.dumps({key: record[key]})[1:-1]
            repeat = copy if rng.random() < 0.5 else b'"n":{' + copy + b"," + copy + b"}"
            pairs[1] = pairs[1][:-1] + b"," + repeat + b"}"
        if rng.random() < 0.3:
            pairs += [b"user_id", rng.choice((b"7", b"", b" "))]
    roll = rng.random()
    if roll < 0.05:
        pairs += [b"attr0", b"\xff"]             # not UTF-8
    elif roll < 0.1:
        pairs += [b"k\x00", b"v"]                # a NUL inside a name
    elif roll < 0.15 and pairs:
        pairs += pairs[:2]                       # a repeated name
    elif roll < 0.17:
        pairs += [b"big", b"x" * nz.MAX_ENTRY_BYTES]
    return pairs


@pytest.mark.skipif(Normalizer.native is None, reason="the C hot path is not built here (no C compiler); "
                    "tests/test_fastpath_build.py fails where a compiler is present and it was not built")
@pytest.mark.parametrize("seed", range(6))
def test_the_c_hot_path_gives_what_the_python_path_gives(seed: int) -> None:
    """Whole entries, flat and enveloped, odd and plain: the same event or the same rejection with or without the C
    hot path, and the C path does take the plain ones."""
    rng = random.Random(1000 + seed)
    with_c, python = Normalizer(), PythonOnly()
    native = Normalizer.native
    assert native is not None
    native_hits = 0
    for _ in range(3000):
        stream, entry_id = rng.choice(STREAMS), rng.choice(ENTRY_IDS)
        pairs = _as_entry(_record(rng), rng)
        got = with_c.normalize_pairs(stream, entry_id, list(pairs))
        assert got == python.normalize_pairs(stream, entry_id, list(pairs)), (stream, entry_id, pairs)
        if pairs:
            direct = native(stream, entry_id, list(pairs), nz.join_entry(pairs), with_c.end_types,
                            with_c.error_types)
            if direct is not None:
                native_hits += 1
                assert type(direct) is FlowEvent and direct == got
    assert native_hits > 300


_STREAM = "flow_events:7"
needs_c = pytest.mark.skipif(Normalizer.native is None, reason="the C hot path is not built here (no C compiler)")


@needs_c
def test_the_c_content_digest_is_blake2b_at_every_length() -> None:
    """Derived ids carry a BLAKE2b digest of the entry's bytes, computed in C: the same as hashlib's over entry sizes
    across one, two and three 128-byte blocks and their exact boundaries, and over bytes that are not ASCII."""
    with_c, python = Normalizer(), PythonOnly()
    base = [b"session_id", b"s", b"node_id", b"n", b"event_type", b"t", b"pad"]
    for size in [*range(0, 420), 1023, 1024, 1025]:
        pairs = [*base, ("é" * (size // 2) + "x" * (size % 2)).encode()]
        got = with_c.normalize_pairs("flow_events:7", "1700000000000-0", list(pairs))
        assert isinstance(got, FlowEvent) and got == python.normalize_pairs("flow_events:7", "1700000000000-0",
                                                                            list(pairs)), size
        assert got.event_id.endswith(nz.content_digest(nz.join_entry(pairs)))


@needs_c
@pytest.mark.parametrize("seed", range(3))
def test_the_c_iso_parse_gives_what_fromisoformat_gives(seed: int) -> None:
    """ISO-8601 text parsed in C (its common forms) gives the Python path's ms, or defers to it: random dates (leap
    days, month ends, bad days), times, fractions of 0 to 8 digits, Z / offsets / naive, odd separators."""
    rng = random.Random(seed)
    with_c, python = Normalizer(), PythonOnly()
    native = Normalizer.native
    assert native is not None
    taken = 0
    for n in range(4000):
        year = rng.choice((1969, 1970, 1971, 2000, 2024, 2026, 2100, 2199, 2200, rng.randint(1, 9999)))
        month, day = rng.randint(0, 13), rng.choice((1, 28, 29, 30, 31, 32, rng.randint(0, 31)))
        hour, minute, second = rng.randint(0, 24), rng.randint(0, 60), rng.choice((0, 59, 60, rng.randint(0, 59)))
        sep = rng.choice("TTTT t_")
        fraction = rng.choice(("", "", ".", "." + "".join(rng.choice("0123456789")
                                                          for _ in range(rng.randint(1, 8)))))
        zone = rng.choice(("", "Z", "Z", "z", "+02:00", "-05:30", "+23:59", "+24:00", "+0200", "+02:00:30",
                           f"{rng.choice('+-')}{rng.randint(0, 25):02d}:{rng.randint(0, 61):02d}"))
        text = f"{year:04d}-{month:02d}-{day:02d}{sep}{hour:02d}:{minute:02d}:{second:02d}{fraction}{zone}"
        pairs = [b"session_id", b"s", b"node_id", b"n", b"event_type", b"t", b"timestamp", text.encode()]
        entry_id = f"1700000000000-{n}"
        got = with_c.normalize_pairs("flow_events:7", entry_id, list(pairs))
        assert got == python.normalize_pairs("flow_events:7", entry_id, list(pairs)), text
        direct = native(_STREAM, entry_id, list(pairs), nz.join_entry(pairs), with_c.end_types, with_c.error_types)
        if direct is not None:
            assert direct == got, text
            taken += 1
    assert taken > 400  # the C parse takes the common forms itself


@needs_c
def test_field_names_past_the_c_name_cache_still_come_out_right() -> None:
    """The C path shares short field names through a bounded cache: more distinct names than it holds, and names
    longer than it takes, still give what the Python path gives."""
    with_c, python = Normalizer(), PythonOnly()
    base = [b"session_id", b"s", b"node_id", b"n", b"event_type", b"t"]
    for n in range(5000):
        name = (f"k{n}-" + "x" * (n % 70)).encode() if n % 10 else ("é" * 600 + str(n)).encode()
        pairs = [*base, name, b"v", b"k0-", b"same"]
        got = with_c.normalize_pairs("flow_events:7", f"1700000000000-{n}", list(pairs))
        assert isinstance(got, FlowEvent) and got == python.normalize_pairs("flow_events:7", f"1700000000000-{n}",
                                                                            list(pairs))
        assert got.attributes[name.decode()] == "v"


@needs_c
@pytest.mark.parametrize("seed", range(3))
def test_a_batch_filled_in_c_holds_what_the_python_loop_puts_in_it(seed: int) -> None:
    """fill_batch in C and in Python over the same reply (flat, enveloped, hostile, empty entries): the same events,
    rejections, ids, sizes and stopping points, also when the batch runs out of rows or bytes midway."""
    rng = random.Random(2000 + seed)
    items: list[Any] = [[f"{1700000000000 + n}-{n % 3}".encode(), _as_entry(_record(rng), rng)] for n in range(400)]
    items += [[b"1800000000000-0", []], (b"1800000000000-1", [b"session_id", b"s"])]  # empty; a tuple, as it may come
    with_c, python = Normalizer(), PythonOnly()
    assert with_c.native is nz._native_normalize_pairs  # so with_c.fill_batch is the C one
    for rows_left, bytes_left in [(10**9, 10**12), (37, 10**12), (10**9, 5000), (1, 1)]:
        filled = []
        for normalizer in (with_c, python):
            lists: tuple[list[Any], list[Any], list[str]] = ([], [], [])
            stops = []
            start = 0
            while start < len(items):
                start, rows, size, largest = normalizer.fill_batch(_STREAM, items, start, rows_left, bytes_left,
                                                                   *lists)
                assert rows >= 1
                stops.append((start, rows, size, largest))
            filled.append((lists, stops))
        assert filled[0] == filled[1], (rows_left, bytes_left)
        (events, rejections, ids), _ = filled[0]
        assert len(events) + len(rejections) == len(ids) == len(items) and events and rejections
