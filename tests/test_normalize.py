"""Table-driven tests of ``Normalizer.normalize``: every rule and every rejection reason of the event contract.

Entries are given the way redis-py returns them under RESP2 with ``decode_responses=False``: a dict of
bytes keys to bytes values.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from worker.normalize import (
    MAX_ATTRIBUTES,
    MAX_ENTRY_BYTES,
    MAX_EVENT_TYPE_CHARS,
    MAX_ID_CHARS,
    FlowEvent,
    Normalizer,
    Rejection,
    as_bytes,
    derive_event_id,
    mapping_digest,
    parse_raw,
)

STREAM = "flow_events"
USER_STREAM = "flow_events:42"
ENTRY_ID = "1700000000123-7"
ENTRY_MS = 1700000000123
BASE = {"session_id": "s-1", "node_id": "n-1", "event_type": "llm_call", "user_id": "7"}


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """Epoch milliseconds of a UTC calendar time (independent of the code under test)."""
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp() * 1000)


def flat(**fields: Any) -> dict[bytes, bytes]:
    """A flat entry as redis returns it: bytes keys, bytes values (str values are UTF-8 encoded)."""
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


def env(body: Any, field: str = "data", **beside: Any) -> dict[bytes, bytes]:
    """An envelope entry: one field holding JSON (plus optional flat fields beside it)."""
    text = body if isinstance(body, bytes | str) else orjson.dumps(body)
    out = flat(**beside)
    out[field.encode()] = text.encode() if isinstance(text, str) else text
    return out


def derived(stream: str, entry_id: str, fields: dict[bytes, bytes]) -> str:
    """The id derived for an entry without event_id: its place and a digest of its exact bytes."""
    return derive_event_id(stream, entry_id, mapping_digest(fields))


def base(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(BASE)
    for key, value in changes.items():
        if value is _DROP:
            fields.pop(key, None)
        else:
            fields[key] = value
    return fields


_DROP = object()


def normalize(fields: Any, stream: str = STREAM, entry_id: str = ENTRY_ID,
              normalizer: Normalizer | None = None) -> FlowEvent | Rejection:
    return (normalizer or Normalizer()).normalize(stream, entry_id, fields)


def accepted(fields: Any, stream: str = STREAM, entry_id: str = ENTRY_ID) -> FlowEvent:
    result = normalize(fields, stream, entry_id)
    assert isinstance(result, FlowEvent), f"expected an event, got {result}"
    return result


def rejected(fields: Any, stream: str = STREAM, entry_id: str = ENTRY_ID) -> Rejection:
    result = normalize(fields, stream, entry_id)
    assert isinstance(result, Rejection), f"expected a rejection, got {result}"
    assert result.source_stream == stream
    assert result.source_id == entry_id
    return result


# -- accepted entries: exact field values ----------------------------------------------------------

ACCEPT_CASES = [
    # (id, stream, fields, expected subset of FlowEvent fields)
    ("flat-minimal", STREAM, flat(**BASE),
     dict(user_id="7", session_id="s-1", node_id="n-1", parent_id="", event_type="llm_call", ts_ms=ENTRY_MS,
          attributes={}, source_stream=STREAM, source_id=ENTRY_ID, is_end=0, is_error=0)),
    ("flat-with-parent", STREAM, flat(**base(parent_id="n-0")), dict(parent_id="n-0", node_id="n-1")),
    ("flat-extra-fields-are-attributes", STREAM, flat(**base(model="gpt-4o", tokens="12")),
     dict(attributes={"model": "gpt-4o", "tokens": "12"})),
    ("data-envelope", STREAM, env(BASE),
     dict(user_id="7", session_id="s-1", node_id="n-1", event_type="llm_call", ts_ms=ENTRY_MS, attributes={})),
    ("payload-envelope", STREAM, env(BASE, field="payload"),
     dict(user_id="7", session_id="s-1", node_id="n-1", event_type="llm_call", attributes={})),
    ("envelope-json-user-id-int", STREAM, env(base(user_id=42)), dict(user_id="42")),
    ("envelope-flat-fields-are-defaults", STREAM,
     env(base(user_id=_DROP), user_id="99", channel="web"), dict(user_id="99", attributes={"channel": "web"})),
    ("envelope-overrides-flat-default", STREAM, env(base(user_id="5"), user_id="99"), dict(user_id="5")),
    ("data-is-attribute-when-session-id-is-flat", STREAM,
     flat(**base(data='{"session_id":"other","x":1}')),
     dict(session_id="s-1", attributes={"data": '{"session_id":"other","x":1}'})),
    ("data-envelope-wins-over-payload", STREAM,
     {b"data": orjson.dumps(BASE), b"payload": b"kept"}, dict(session_id="s-1", attributes={"payload": "kept"})),
    # user_id
    ("user-from-stream-key", USER_STREAM, flat(**base(user_id=_DROP)), dict(user_id="42")),
    ("user-from-last-key-segment", "app:flow_events:u-9", flat(**base(user_id=_DROP)), dict(user_id="u-9")),
    ("user-empty-field-falls-back-to-key", USER_STREAM, flat(**base(user_id="")), dict(user_id="42")),
    ("user-field-wins-over-key", USER_STREAM, flat(**base(user_id="7")), dict(user_id="7")),
    ("user-json-null-falls-back-to-key", USER_STREAM, env(base(user_id=None)), dict(user_id="42")),
    ("user-int-zero", STREAM, env(base(user_id=0)), dict(user_id="0")),
    # parent_id
    ("parent-absent-is-root", STREAM, flat(**base()), dict(parent_id="")),
    ("parent-empty-is-root", STREAM, flat(**base(parent_id="")), dict(parent_id="")),
    ("parent-null-is-root", STREAM, env(base(parent_id=None)), dict(parent_id="")),
    ("parent-json-string", STREAM, env(base(parent_id="root")), dict(parent_id="root")),
    # event_id
    ("event-id-explicit-string", STREAM, flat(**base(event_id="ev-1")), dict(event_id="ev-1")),
    ("event-id-explicit-int", STREAM, env(base(event_id=12345)), dict(event_id="12345")),
    ("event-id-empty-is-derived", STREAM, flat(**base(event_id="")),
     dict(event_id=derived(STREAM, ENTRY_ID, flat(**base(event_id=""))))),
    ("event-id-null-is-derived", STREAM, env(base(event_id=None)),
     dict(event_id=derived(STREAM, ENTRY_ID, env(base(event_id=None))))),
    ("event-id-absent-is-derived", STREAM, flat(**BASE), dict(event_id=derived(STREAM, ENTRY_ID, flat(**BASE)))),
    # attributes
    ("attr-nested-object-compact-json", STREAM, env(base(meta={"a": [1, 2], "b": {"c": None}})),
     dict(attributes={"meta": '{"a":[1,2],"b":{"c":null}}'})),
    ("attr-array", STREAM, env(base(tags=["x", "y"])), dict(attributes={"tags": '["x","y"]'})),
    ("attr-numbers-and-bools", STREAM, env(base(n=3, f=1.5, ok=True, no=False, nil=None)),
     dict(attributes={"n": "3", "f": "1.5", "ok": "true", "no": "false", "nil": "null"})),
    ("attr-unicode-kept", STREAM, env(base(text="Résumé 📈 日本語", nested={"é": "ü"})),
     dict(attributes={"text": "Résumé 📈 日本語", "nested": '{"é":"ü"}'})),
    ("attr-flat-unicode-kept", STREAM, flat(**base(text="naïve ✓")), dict(attributes={"text": "naïve ✓"})),
    ("attr-reserved-fields-not-attributes", STREAM,
     flat(**base(parent_id="p", timestamp="1700000000", event_id="e")), dict(attributes={})),
    # unicode ids
    ("unicode-ids", STREAM, flat(session_id="séance-🧵", node_id="nœud-1", event_type="tool_call", user_id="ユーザー",
                                 parent_id="racine-✓"),
     dict(session_id="séance-🧵", node_id="nœud-1", user_id="ユーザー", parent_id="racine-✓")),
    # limits, at the boundary (accepted)
    ("ids-at-256-chars", STREAM,
     flat(**base(session_id="s" * MAX_ID_CHARS, node_id="é" * MAX_ID_CHARS, parent_id="p" * MAX_ID_CHARS,
                 user_id="u" * MAX_ID_CHARS, event_id="e" * MAX_ID_CHARS)),
     dict(session_id="s" * MAX_ID_CHARS, node_id="é" * MAX_ID_CHARS, event_id="e" * MAX_ID_CHARS)),
    ("event-type-at-128-chars", STREAM, flat(**base(event_type="t" * MAX_EVENT_TYPE_CHARS)),
     dict(event_type="t" * MAX_EVENT_TYPE_CHARS)),
    ("attributes-at-limit", STREAM, flat(**base(**{f"a{i}": str(i) for i in range(MAX_ATTRIBUTES)})),
     dict(attributes={f"a{i}": str(i) for i in range(MAX_ATTRIBUTES)})),
]


@pytest.mark.parametrize(("stream", "fields", "expected"), [c[1:] for c in ACCEPT_CASES],
                         ids=[c[0] for c in ACCEPT_CASES])
def test_accepts(stream: str, fields: dict[bytes, bytes], expected: dict[str, Any]) -> None:
    event = accepted(fields, stream)
    actual = event._asdict()
    assert {k: actual[k] for k in expected} == expected


# -- timestamps ------------------------------------------------------------------------------------

TIMESTAMP_CASES = [
    ("iso-z", "2024-01-02T03:04:05Z", ms(2024, 1, 2, 3, 4, 5)),
    ("iso-z-millis", "2024-01-02T03:04:05.123Z", ms(2024, 1, 2, 3, 4, 5) + 123),
    ("iso-z-nanos", "2024-01-02T03:04:05.123456789Z", ms(2024, 1, 2, 3, 4, 5) + 123),
    ("iso-utc-offset", "2024-01-02T03:04:05+00:00", ms(2024, 1, 2, 3, 4, 5)),
    ("iso-positive-offset", "2024-01-02T08:34:05+05:30", ms(2024, 1, 2, 3, 4, 5)),
    ("iso-negative-offset", "2024-01-01T22:04:05-05:00", ms(2024, 1, 2, 3, 4, 5)),
    ("iso-naive-is-utc", "2024-01-02T03:04:05", ms(2024, 1, 2, 3, 4, 5)),
    ("iso-naive-space", "2024-01-02 03:04:05.250", ms(2024, 1, 2, 3, 4, 5) + 250),
    ("iso-date-only", "2024-01-02", ms(2024, 1, 2)),
    ("epoch-seconds-string", "1700000000", 1_700_000_000_000),
    ("epoch-seconds-float-string", "1700000000.5", 1_700_000_000_500),
    ("epoch-ms-string", "1700000000123", 1_700_000_000_123),
    ("epoch-string-whitespace", " 1700000000 ", 1_700_000_000_000),
    ("epoch-zero", "0", 0),
    ("absent-empty-uses-entry-id", "", ENTRY_MS),
]


@pytest.mark.parametrize(("value", "expected_ms"), [c[1:] for c in TIMESTAMP_CASES],
                         ids=[c[0] for c in TIMESTAMP_CASES])
def test_timestamp_text_forms(value: str, expected_ms: int) -> None:
    assert accepted(flat(**base(timestamp=value))).ts_ms == expected_ms
    # the same value inside a JSON envelope gives the same instant
    assert accepted(env(base(timestamp=value))).ts_ms == expected_ms


JSON_TIMESTAMP_CASES = [
    ("epoch-seconds-int", 1700000000, 1_700_000_000_000),
    ("epoch-seconds-float", 1700000000.25, 1_700_000_000_250),
    ("epoch-ms-int", 1700000000123, 1_700_000_000_123),
    ("epoch-ms-float", 1700000000123.0, 1_700_000_000_123),
    ("null-uses-entry-id", None, ENTRY_MS),
]


@pytest.mark.parametrize(("value", "expected_ms"), [c[1:] for c in JSON_TIMESTAMP_CASES],
                         ids=[c[0] for c in JSON_TIMESTAMP_CASES])
def test_timestamp_json_numbers(value: Any, expected_ms: int) -> None:
    assert accepted(env(base(timestamp=value))).ts_ms == expected_ms


def test_timestamp_absent_uses_entry_id_ms() -> None:
    assert accepted(flat(**BASE), entry_id="1712345678901-0").ts_ms == 1712345678901
    assert accepted(env(BASE), entry_id="1712345678902-3").ts_ms == 1712345678902


TIMESTAMP_REJECT_CASES = [
    ("garbage-text", flat(**base(timestamp="yesterday")), "neither ISO-8601 nor epoch"),
    ("garbage-iso-like", flat(**base(timestamp="2024-13-45T99:00:00Z")), "neither ISO-8601 nor epoch"),
    ("bool-true", env(base(timestamp=True)), "got a boolean"),
    ("bool-false", env(base(timestamp=False)), "got a boolean"),
    ("object", env(base(timestamp={"s": 1})), "got an object"),
    ("array", env(base(timestamp=[1700000000])), "got an array"),
    ("negative-seconds", env(base(timestamp=-1)), "outside 1970-01-01..2200-01-01"),
    ("negative-string", flat(**base(timestamp="-1700000000")), "outside 1970-01-01..2200-01-01"),
    ("before-1970-iso", flat(**base(timestamp="1969-12-31T23:59:59Z")), "outside 1970-01-01..2200-01-01"),
    ("after-2200-iso", flat(**base(timestamp="2200-01-01T00:00:00Z")), "outside 1970-01-01..2200-01-01"),
    ("after-2200-ms", env(base(timestamp=7_258_118_400_000)), "outside 1970-01-01..2200-01-01"),
    ("huge-number", env('{"session_id":"s","node_id":"n","event_type":"t","user_id":1,"timestamp":1e30}'),
     "outside 1970-01-01..2200-01-01"),
    ("nan-string", flat(**base(timestamp="nan")), "not a finite number"),
    ("inf-string", flat(**base(timestamp="inf")), "not a finite number"),
    ("minus-infinity-string", flat(**base(timestamp="-Infinity")), "not a finite number"),
    ("inf-overflowing-string", flat(**base(timestamp="1e400")), "not a finite number"),
    # Text that only Python's parsers' leniency reads as a time: other scripts' digits, '_' between digits (float()),
    # whatever follows a NUL (fromisoformat stops there), control characters.
    ("fullwidth-digits", flat(**base(timestamp="\uff11\uff17\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10")),
     "neither ISO-8601 nor epoch"),
    ("arabic-indic-digits", env(base(timestamp="\u0661\u0667\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660")),
     "neither ISO-8601 nor epoch"),
    ("underscored-digits", flat(**base(timestamp="1_700_000_000")), "neither ISO-8601 nor epoch"),
    ("iso-then-nul-and-junk", flat(**base(timestamp="2024-01-02T03:04:05Z\x00junk")), "neither ISO-8601 nor epoch"),
    ("epoch-then-nul", env(base(timestamp="1700000000\x00")), "neither ISO-8601 nor epoch"),
    ("iso-with-a-control-char", flat(**base(timestamp="2024-01-02T03:04\x0105Z")), "neither ISO-8601 nor epoch"),
]


@pytest.mark.parametrize(("fields", "reason"), [c[1:] for c in TIMESTAMP_REJECT_CASES],
                         ids=[c[0] for c in TIMESTAMP_REJECT_CASES])
def test_timestamp_rejections(fields: dict[bytes, bytes], reason: str) -> None:
    rejection = rejected(fields)
    assert rejection.reason.startswith("timestamp")
    assert reason in rejection.reason


def test_timestamp_just_inside_range() -> None:
    assert accepted(env(base(timestamp=7_258_118_399_999))).ts_ms == 7_258_118_399_999
    assert accepted(flat(**base(timestamp="2199-12-31T23:59:59.999Z"))).ts_ms == 7_258_118_399_999


# -- rejections: exact reasons ---------------------------------------------------------------------

REJECT_CASES = [
    # (id, stream, fields, exact reason or a stable substring prefixed with '~')
    ("missing-session-id", STREAM, flat(**base(session_id=_DROP)), "missing required field 'session_id'"),
    ("missing-node-id", STREAM, flat(**base(node_id=_DROP)), "missing required field 'node_id'"),
    ("missing-event-type", STREAM, flat(**base(event_type=_DROP)), "missing required field 'event_type'"),
    ("empty-session-id", STREAM, flat(**base(session_id="")), "session_id is empty"),
    ("blank-node-id", STREAM, flat(**base(node_id="   ")), "node_id is empty"),
    ("empty-event-type", STREAM, flat(**base(event_type="")), "event_type is empty"),
    ("session-id-int", STREAM, env(base(session_id=5)), "session_id must be a string, got an integer"),
    ("session-id-object", STREAM, env(base(session_id={"a": 1})), "session_id must be a string, got an object"),
    ("session-id-null", STREAM, env(base(session_id=None)), "missing required field 'session_id'"),
    ("node-id-array", STREAM, env(base(node_id=["a"])), "node_id must be a string, got an array"),
    ("event-type-bool", STREAM, env(base(event_type=True)), "event_type must be a string, got a boolean"),
    ("session-id-too-long", STREAM, flat(**base(session_id="s" * (MAX_ID_CHARS + 1))),
     "session_id is 257 chars, over the 256-char limit"),
    ("node-id-too-long", STREAM, flat(**base(node_id="é" * (MAX_ID_CHARS + 1))),
     "node_id is 257 chars, over the 256-char limit"),
    ("event-type-too-long", STREAM, flat(**base(event_type="t" * (MAX_EVENT_TYPE_CHARS + 1))),
     "event_type is 129 chars, over the 128-char limit"),
    ("parent-id-too-long", STREAM, flat(**base(parent_id="p" * (MAX_ID_CHARS + 1))),
     "parent_id is 257 chars, over the 256-char limit"),
    ("user-id-too-long", STREAM, flat(**base(user_id="u" * (MAX_ID_CHARS + 1))),
     "user_id is 257 chars, over the 256-char limit"),
    ("event-id-too-long", STREAM, flat(**base(event_id="e" * (MAX_ID_CHARS + 1))),
     "event_id is 257 chars, over the 256-char limit"),
    ("user-id-from-key-too-long", "flow_events:" + "u" * (MAX_ID_CHARS + 1), flat(**base(user_id=_DROP)),
     "user_id is 257 chars, over the 256-char limit"),
    # user_id
    ("no-user-anywhere", STREAM, flat(**base(user_id=_DROP)), "~missing user_id"),
    ("no-user-empty-field", STREAM, flat(**base(user_id="")), "~missing user_id"),
    ("no-user-trailing-colon-key", "flow_events:", flat(**base(user_id=_DROP)), "~missing user_id"),
    ("user-id-float", STREAM, env(base(user_id=4.5)), "user_id must be an integer or a string, got a number"),
    ("user-id-bool", STREAM, env(base(user_id=True)), "user_id must be an integer or a string, got a boolean"),
    ("user-id-object", STREAM, env(base(user_id={"id": 1})), "user_id must be an integer or a string, got an object"),
    ("user-id-blank", STREAM, flat(**base(user_id="  ")), "user_id is blank"),
    # parent_id
    ("parent-equals-node", STREAM, flat(**base(parent_id="n-1")), "~parent_id equals node_id"),
    ("parent-id-int", STREAM, env(base(parent_id=3)), "parent_id must be a string or null, got an integer"),
    # event_id
    ("event-id-float", STREAM, env(base(event_id=1.5)), "event_id must be a string or an integer, got a number"),
    ("event-id-bool", STREAM, env(base(event_id=False)), "event_id must be a string or an integer, got a boolean"),
    ("event-id-object", STREAM, env(base(event_id={})), "event_id must be a string or an integer, got an object"),
    # envelope
    ("data-invalid-json", STREAM, env("{not json"), "~field 'data' is not valid JSON"),
    ("payload-invalid-json", STREAM, env('{"session_id": "s"', field="payload"), "~field 'payload' is not valid JSON"),
    ("data-json-nan-literal", STREAM, env('{"session_id":"s","node_id":"n","event_type":"t","x":NaN}'),
     "~field 'data' is not valid JSON"),
    ("data-json-array", STREAM, env([BASE]), "field 'data' must hold a JSON object, got list"),
    ("data-json-string", STREAM, env('"s-1"'), "field 'data' must hold a JSON object, got str"),
    ("data-json-number", STREAM, env("42"), "field 'data' must hold a JSON object, got int"),
    ("data-json-null", STREAM, env("null"), "field 'data' must hold a JSON object, got NoneType"),
    ("data-object-missing-fields", STREAM, env({"node_id": "n", "event_type": "t"}),
     "missing required field 'session_id'"),
    ("no-recognized-fields", STREAM, flat(foo="bar"), "missing required field 'session_id'"),
    # encoding
    ("invalid-utf8-value", STREAM, flat(**base(note=b"ok \xff\xfe bad")), "field 'note' is not valid UTF-8"),
    ("invalid-utf8-session", STREAM, flat(**base(session_id=b"\xc3\x28")), "field 'session_id' is not valid UTF-8"),
    ("invalid-utf8-key", STREAM, {**flat(**BASE), b"k\xff": b"v"}, "a field name is not valid UTF-8"),
    ("invalid-utf8-in-envelope", STREAM, env(b'{"session_id":"\xff"}'), "field 'data' is not valid UTF-8"),
    # size
    ("too-many-attributes", STREAM, flat(**base(**{f"a{i}": "x" for i in range(MAX_ATTRIBUTES + 1)})),
     "257 attributes, over the 256 limit"),
    ("too-many-attributes-in-envelope", STREAM, env(base(**{f"a{i}": i for i in range(MAX_ATTRIBUTES + 1)})),
     "257 attributes, over the 256 limit"),
    ("entry-over-1mib", STREAM, flat(**base(blob="x" * MAX_ENTRY_BYTES)), "~over the 1048576-byte limit"),
    ("envelope-over-1mib", STREAM, env(base(blob="x" * MAX_ENTRY_BYTES)), "~over the 1048576-byte limit"),
]


@pytest.mark.parametrize(("stream", "fields", "reason"), [c[1:] for c in REJECT_CASES],
                         ids=[c[0] for c in REJECT_CASES])
def test_rejects(stream: str, fields: dict[bytes, bytes], reason: str) -> None:
    rejection = rejected(fields, stream)
    if reason.startswith("~"):
        assert reason[1:] in rejection.reason
    else:
        assert rejection.reason == reason
    # the raw entry is kept as a JSON object with one key per field, exactly (parse_raw restores odd bytes), or
    # truncated with its original size when the entry is over the size limit
    raw = parse_raw(rejection.raw)
    if isinstance(raw, list):
        assert raw[0] == "truncated" and raw[1] > MAX_ENTRY_BYTES
        raw = raw[2]
    else:
        assert {as_bytes(k): as_bytes(v) for k, v in raw.items()} == fields
    assert isinstance(raw, dict)
    assert len(raw) == len(fields)


def test_rejection_raw_is_the_entry_as_json() -> None:
    fields = flat(**base(session_id="", text="Résumé 📈"))
    raw = orjson.loads(rejected(fields).raw)
    assert raw == {**BASE, "session_id": "", "text": "Résumé 📈"}


def test_rejection_raw_survives_invalid_utf8() -> None:
    rejection = rejected(flat(**base(note=b"a\xffb", literal="a\\xffb\\udcff")))
    raw = parse_raw(rejection.raw)
    # reversible: the odd byte comes back as itself, and text that merely looks like an escape stays text
    assert as_bytes(raw["note"]) == b"a\xffb"
    assert raw["literal"] == "a\\xffb\\udcff"
    rejection.raw.encode("utf-8")  # strict: the raw is text that ClickHouse and terminals can take
    assert raw["session_id"] == "s-1"


def test_entry_size_counts_bytes_not_chars() -> None:
    # 3-byte characters: under the limit in chars, over it in bytes
    big = "€" * (MAX_ENTRY_BYTES // 3 + 10)
    assert len(big) < MAX_ENTRY_BYTES < len(big.encode())
    assert "byte limit" in rejected(flat(**base(blob=big))).reason


def test_entry_just_under_size_limit_is_accepted() -> None:
    fields = flat(**BASE)
    used = sum(len(k) + len(v) for k, v in fields.items()) + len(b"blob")
    fields[b"blob"] = b"x" * (MAX_ENTRY_BYTES - used)
    event = accepted(fields)
    assert len(event.attributes["blob"]) == MAX_ENTRY_BYTES - used


def test_deleted_entry_is_rejected_with_reason() -> None:
    rejection = normalize(None, USER_STREAM, "5-0")
    assert isinstance(rejection, Rejection)
    assert rejection == Rejection(USER_STREAM, "5-0", rejection.reason, "{}")
    assert "deleted" in rejection.reason


# -- derived event ids -----------------------------------------------------------------------------

def test_derived_event_id_is_deterministic_and_distinct() -> None:
    first = accepted(flat(**BASE), STREAM, "1-0").event_id
    again = accepted(flat(**BASE), STREAM, "1-0").event_id  # a redelivery: the same bytes
    assert first == again == derived(STREAM, "1-0", flat(**BASE))
    other_id = accepted(flat(**BASE), STREAM, "1-1").event_id
    other_stream = accepted(flat(**BASE), USER_STREAM, "1-0").event_id
    # an entry id reused with other content (Redis lost its data): another event, never merged into the first
    reused = accepted(flat(**base(node_id="other")), STREAM, "1-0").event_id
    reused_value = accepted(flat(**base(extra="b")), STREAM, "1-0").event_id
    reordered = accepted(flat(**{"node_id": "n-1", **BASE}), STREAM, "1-0").event_id  # other bytes: other entry
    assert len({first, other_id, other_stream, reused, reused_value, reordered}) == 6
    # no accidental collision between (stream, id) pairs that concatenate alike
    assert derive_event_id("a:1", "2-0", "d") != derive_event_id("a", ":12-0", "d")


def test_explicit_event_id_is_independent_of_position() -> None:
    a = accepted(flat(**base(event_id="dup")), STREAM, "1-0")
    b = accepted(env(base(event_id="dup")), USER_STREAM, "9-9")
    assert a.event_id == b.event_id == "dup"
    assert accepted(env(base(event_id=77)), STREAM, "1-0").event_id == accepted(
        flat(**base(event_id="77")), STREAM, "2-0").event_id


def test_blank_explicit_event_id_does_not_merge_unrelated_events() -> None:
    # A whitespace-only event_id would make every such entry "the same event" (all but one invisible).
    a = accepted(flat(**base(event_id="  ")), STREAM, "1-0")
    b = accepted(flat(**base(event_id="  ")), STREAM, "2-0")
    assert a.event_id != b.event_id
    assert a.event_id == derived(STREAM, "1-0", flat(**base(event_id="  ")))


def test_size_limit_applies_to_str_values_too() -> None:
    # normalize takes any mapping; decoded (str) values must not bypass the 1 MiB limit
    fields = {**BASE, "blob": "x" * (MAX_ENTRY_BYTES + 1)}
    assert "byte limit" in rejected(fields).reason
    assert accepted({**BASE, "small": "x"}).attributes == {"small": "x"}


# -- end / error classification --------------------------------------------------------------------

CLASSIFY_CASES = [
    ("default-end", None, None, "flow_completed", (1, 0)),
    ("default-error", None, None, "error", (0, 1)),
    ("default-other", None, None, "llm_call", (0, 0)),
    ("custom-end", ("session_closed", "done"), None, "done", (1, 0)),
    ("custom-end-replaces-default", ("done",), None, "flow_completed", (0, 0)),
    ("custom-error", None, ("tool_failed",), "tool_failed", (0, 1)),
    ("custom-error-replaces-default", None, ("tool_failed",), "error", (0, 0)),
    ("both", ("x",), ("x",), "x", (1, 1)),
]


@pytest.mark.parametrize(("ends", "errors", "event_type", "expected"), [c[1:] for c in CLASSIFY_CASES],
                         ids=[c[0] for c in CLASSIFY_CASES])
def test_end_and_error_types_are_configuration(ends: tuple[str, ...] | None, errors: tuple[str, ...] | None,
                                               event_type: str, expected: tuple[int, int]) -> None:
    kwargs: dict[str, Any] = {}
    if ends is not None:
        kwargs["end_event_types"] = ends
    if errors is not None:
        kwargs["error_event_types"] = errors
    event = normalize(flat(**base(event_type=event_type)), normalizer=Normalizer(**kwargs))
    assert isinstance(event, FlowEvent)
    assert (event.is_end, event.is_error) == expected


def test_normalize_never_raises_on_odd_input() -> None:
    odd: list[Any] = [{}, {b"": b""}, {b"data": b""}, {b"payload": b"[]"}, {b"session_id": b"\x00"},
                      {b"data": b"{}" * 10}, flat(**base(timestamp="\x00"))]
    for fields in odd:
        assert isinstance(normalize(fields), Rejection)


# -- the worker's hot path: fields as Redis sends them ([name, value, ...]) -------------------------
def _as_pairs(fields: Any) -> list[Any] | None:
    if fields is None:
        return None
    return [part for item in fields.items() for part in item]


def _redis_shaped(fields: Any) -> bool:
    return fields is None or (isinstance(fields, dict) and all(isinstance(k, bytes) for k in fields))


PAIR_CASES = [case for case in ([(c[0], c[1], c[2]) for c in ACCEPT_CASES]
                                + [(c[0], STREAM, c[1]) for c in TIMESTAMP_REJECT_CASES]
                                + [(c[0], c[1], c[2]) for c in REJECT_CASES]) if _redis_shaped(case[2])]


@pytest.mark.parametrize(("stream", "fields"), [c[1:] for c in PAIR_CASES], ids=[c[0] for c in PAIR_CASES])
def test_normalize_pairs_agrees_with_normalize(stream: str, fields: Any) -> None:
    expected = Normalizer().normalize(stream, ENTRY_ID, fields)
    got = Normalizer().normalize_pairs(stream, ENTRY_ID, _as_pairs(fields))
    assert got == expected


def test_integers_beyond_64_bits_in_a_json_payload_are_kept_exactly() -> None:
    """orjson reads them as floats (123456789012345678901234567890 -> 1.2345678901234568e+29): silently another
    value. Such documents are read exactly, in the C path as in the Python one."""
    document = ('{"session_id": "s", "node_id": "n", "event_type": "t", "big": 123456789012345678901234567890, '
                '"neg": -99999999999999999999, "nested": {"x": [18446744073709551616, 1.5]}, '
                '"u64": 18446744073709551615, "text": "123456789012345678901"}')
    expected = {"big": "123456789012345678901234567890", "neg": "-99999999999999999999",
                "nested": '{"x":[18446744073709551616,1.5]}', "u64": "18446744073709551615",
                "text": "123456789012345678901"}
    normalizer = Normalizer()
    event = normalizer.normalize("flow_events:1", "1700000000000-0", {"data": document})
    assert isinstance(event, FlowEvent) and event.attributes == expected
    pairs = normalizer.normalize_pairs("flow_events:1", "1700000000000-0", [b"payload", document.encode()])
    assert isinstance(pairs, FlowEvent) and pairs.attributes == expected
    for constant in ("NaN", "Infinity"):  # still not JSON, whichever parser reads the document
        bad = normalizer.normalize("flow_events:1", "1700000000000-0",
                                   {"data": document.replace('"u64": 18446744073709551615', f'"u64": {constant}')})
        assert isinstance(bad, Rejection) and "is not valid JSON" in bad.reason
