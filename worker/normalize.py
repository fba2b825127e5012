"""Normalize: one Redis stream entry -> a typed FlowEvent, or a Rejection with a precise reason.

Pure: no I/O, no clock, no exceptions escape. The event contract lives in
``schemas/flow_event.schema.json`` and ``DESIGN.md``; every rule here has a table-driven test.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

MAX_ID_CHARS = 256
MAX_EVENT_TYPE_CHARS = 128
MAX_ATTRIBUTES = 256
MAX_ENTRY_BYTES = 1 << 20
# JSON nesting the contract accepts in a ``data``/``payload`` envelope (the envelope object is level 1): orjson
# writes values nested at most 254 deep, and every nested attribute value is written back as JSON text.
MAX_JSON_DEPTH = 255
# The raw entry kept with a rejection of an oversized entry: each value cut to this many chars, at most this many
# fields, so a 10 MB entry is not stored (nor held) whole; the original size stays in the raw and the reason.
MAX_RAW_VALUE_CHARS = 1024
MAX_RAW_FIELDS = 256
# Bytes of the content digest appended to derived event ids (hex: twice as many chars).
CONTENT_DIGEST_BYTES = 6
KEY_NOT_UTF8 = "stream key is not valid UTF-8"
# Epoch values below this are seconds, above it milliseconds (1e11 s is the year 5138, 1e11 ms is 1973).
SECONDS_MS_BOUNDARY = 100_000_000_000
# DateTime64(3) comfortably holds 1970..2200; anything outside is a producer bug.
MAX_TS_MS = 7_258_118_400_000

RESERVED = frozenset(("session_id", "node_id", "event_type", "user_id", "parent_id", "timestamp", "event_id"))
ENVELOPE_FIELDS = ("data", "payload")


class FlowEvent(NamedTuple):
    """One normalized event; field order is the column order of ``flowtrack.events``."""

    event_id: str
    user_id: str
    session_id: str
    node_id: str
    parent_id: str
    event_type: str
    ts_ms: int
    attributes: dict[str, str]
    source_stream: str
    source_id: str
    is_end: int
    is_error: int


class Rejection(NamedTuple):
    source_stream: str
    source_id: str
    reason: str
    raw: str


class _Reject(Exception):
    """Internal control flow: carries a rejection reason out of nested helpers."""


def derive_event_id(stream: str, entry_id: str, digest: str) -> str:
    """Deterministic id for entries without ``event_id``: a redelivered entry (same bytes) keeps its id.

    ``<stream>/<entry id>/<content digest>``: the stream and entry id say where the event came from; the digest of
    the entry's exact bytes (``content_digest``) tells apart two entries that reuse one id after Redis lost its
    data (FLUSHDB, a failover without AOF, a restore), which would otherwise merge into one visible event.
    """
    return f"{stream}/{entry_id}/{digest}"


_blake2b = hashlib.blake2b
# An entry's exact bytes in one string: its names and values joined by NUL, in Redis' order. Built once per entry
# on the hot path, where it also gives the entry's size (len - fields + 1) and feeds the content digest.
join_entry = b"\x00".join


def content_digest(joined: bytes) -> str:
    """Hex digest of an entry's exact bytes (``join_entry`` of [name, value, name, value, …], as Redis sends them).

    ~0.35 us per small entry (blake2b; README, "Reliability"). 48 bits: two different entries under one reused
    entry id collide with probability 2**-48.
    """
    return _blake2b(joined, digest_size=CONTENT_DIGEST_BYTES).hexdigest()


def joined_mapping(fields: Mapping[Any, Any]) -> bytes:
    """``join_entry`` of an entry given as a mapping (the checked path, replays): the same bytes as the pairs Redis
    sent; str names and values count as their UTF-8 bytes (surrogate-escaped bytes as the original bytes)."""
    return join_entry([as_bytes(part) for item in fields.items() for part in item])


def mapping_digest(fields: Mapping[Any, Any]) -> str:
    return content_digest(joined_mapping(fields))


def as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogateescape")


def pairs_to_dict(pairs: list[Any] | None) -> dict[Any, Any]:
    """[name, value, name, value, …] -> {name: value} (empty for a deleted entry)."""
    if not pairs:
        return {}
    return dict(zip(pairs[::2], pairs[1::2], strict=False))


def entry_id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


_LONE_SURROGATE = re.compile("[\udc80-\udcff]")


def raw_json(fields: Mapping[Any, Any]) -> str:
    """The entry as JSON text, for the rejected relation; never fails, and is reversible (``parse_raw``).

    Bytes that are not UTF-8 are kept exactly: decoded with ``surrogateescape`` (each such byte 0xNN becomes the
    lone surrogate U+DCNN) and written as the JSON escape ``\\udcNN``, which valid UTF-8 text never produces (a
    literal backslash is itself escaped). A replay thus re-checks the very bytes the original check saw.
    An entry over MAX_ENTRY_BYTES is kept truncated, as ``["truncated", <original bytes>, {fields, cut}]``.
    """
    size = sum(len(k) + len(v) for k, v in fields.items() if isinstance(k, bytes | str) and isinstance(v, bytes | str))
    if size > MAX_ENTRY_BYTES:
        cut = {raw_text(k)[:MAX_RAW_VALUE_CHARS]: raw_text(v)[:MAX_RAW_VALUE_CHARS]
               for k, v in list(fields.items())[:MAX_RAW_FIELDS]}
        return _dumps_reversible(["truncated", size, cut])
    return _dumps_reversible({raw_text(k): raw_text(v) for k, v in fields.items()})


REPEATED_RAW_TAG = "repeated"


def raw_pairs_json(pairs: Sequence[Any]) -> str:
    """An entry that repeats a field name, for the rejected relation: ``["repeated", [name, value, name, value, …]]``
    (a JSON object could keep one value per name), reversible like ``raw_json``; over MAX_ENTRY_BYTES, cut as
    ``raw_json`` cuts (MAX_RAW_FIELDS pairs of MAX_RAW_VALUE_CHARS each)."""
    texts = [raw_text(part) for part in pairs]
    if sum(map(len, texts)) > MAX_ENTRY_BYTES:
        texts = [text[:MAX_RAW_VALUE_CHARS] for text in texts[:2 * MAX_RAW_FIELDS]]
    return _dumps_reversible([REPEATED_RAW_TAG, texts])


def _repeats_a_name(pairs: Sequence[Any]) -> bool:
    names = pairs[::2]
    try:
        return len(set(names)) != len(names)
    except TypeError:  # not names Redis sent: the checked path says what is wrong
        return False


def _repeated_name_reason(parts: Sequence[str]) -> str:
    """Names the first name met a second time."""
    names = parts[::2]
    seen: set[str] = set()
    for repeated in names:
        if repeated in seen:
            break
        seen.add(repeated)
    return (f"field {repeated[:64]!r} appears {names.count(repeated)} times in the entry: Redis keeps every copy, "
            "and which value is meant is not known")


def _dumps_reversible(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # lone surrogates (bytes that are not UTF-8): escape them, reversibly
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def parse_raw(raw: str) -> Any:
    """Inverse of ``raw_json``: the stdlib parser, because it turns ``\\udcNN`` back into the lone surrogate."""
    return json.loads(raw)


def raw_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def is_text(key: str) -> bool:
    """False for a key decoded with surrogateescape from bytes that are not UTF-8."""
    return key.isascii() or _LONE_SURROGATE.search(key) is None


def stored_key(key: str) -> str:
    """The key as stored in ClickHouse: exactly, when it is text; else with its odd bytes as \\xNN."""
    return key if is_text(key) else printable(key)


def printable(key: str) -> str:
    """A Redis key or name for people and for ClickHouse: bytes that are not UTF-8 as \\xNN, control characters
    as \\xNN / \\uNNNN, so a hostile key can neither break an encoder nor drive a terminal."""
    if key.isascii() and key.isprintable():
        return key
    text = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


class Normalizer:
    """Holds the configuration that classifies events; ``normalize`` is a pure function of its input."""

    # worker/_fastpath.c's normalize_pairs, or None where it was not built (set at the end of this module): it
    # returns the event _build_fast would, or None for anything else, which the Python path then decides.
    native: Callable[..., Any] | None = None

    def __init__(self, end_event_types: Iterable[str] = ("flow_completed",),
                 error_event_types: Iterable[str] = ("error",)) -> None:
        self.end_types = frozenset(end_event_types)
        self.error_types = frozenset(error_event_types)

    def normalize(self, stream: str, entry_id: str, fields: Mapping[Any, Any] | None) -> FlowEvent | Rejection:
        if fields is None:
            return Rejection(stored_key(stream), entry_id,
                             "entry was deleted from the stream before it was processed", "{}")
        if not is_text(stream):
            return reject_key(stream, entry_id, raw_json(fields))
        try:
            record = _decode_entry(fields)
            return self._build(stream, entry_id, record, joined_mapping(fields))
        except _Reject as exc:
            return Rejection(stream, entry_id, str(exc), raw_json(fields))
        except Exception as exc:  # defensive: a bug here must reject one entry, not stop the stream
            return Rejection(stream, entry_id, f"internal normalize error: {type(exc).__name__}: {exc}",
                             raw_json(fields))

    def normalize_pairs(self, stream: str, entry_id: str, pairs: list[bytes] | None,
                        joined: bytes | None = None) -> FlowEvent | Rejection:
        """The same as ``normalize``, for fields as Redis sends them: a flat [name, value, name, value, …] list.

        The worker's hot path: the C hot path (``native``) first, where it was built; then decoding straight
        from the reply list in C-level loops skips building a bytes dict per entry first. Anything unusual
        (invalid UTF-8, an oversized entry) takes the checked path. The caller checks the stream key once per
        stream (``is_text``), not here once per entry; ``joined`` is ``join_entry(pairs)`` when the caller has
        built it already (it counts the entry's bytes with it).
        """
        native = self.native
        if native is not None and pairs:
            if joined is None:
                joined = join_entry(pairs)
            event = native(stream, entry_id, pairs, joined, self.end_types, self.error_types)
            if event is not None:
                return event  # type: ignore[no-any-return]
        return self._normalize_pairs_python(stream, entry_id, pairs, joined)

    def fill_batch(self, stream: str, items: list[Any], start: int, rows_left: int, bytes_left: int,
                   events: list[FlowEvent], rejections: list[Rejection], ids: list[str]) -> tuple[int, int, int, int]:
        """A read's new entries of one stream, ``items[start:]`` as Redis sent them ([id, [name, value, …]]), into a
        batch: each normalized (``normalize_pairs``) and appended to ``events`` or ``rejections``, its id to ``ids``,
        while the batch has rows and bytes left (checked before each entry, as ``Batch.full``). Returns (where it
        stopped, entries added, their bytes as read, the largest entry's). In C where the hot path was built."""
        if self.native is not None and self.native is _native_normalize_pairs:
            return _fastpath.fill_batch(stream, items, start, rows_left, bytes_left, events,  # type: ignore[no-any-return]
                                        rejections, ids, self._normalize_pairs_python, self.end_types,
                                        self.error_types)
        normalize = self.normalize_pairs
        index, rows, size_total, largest = start, 0, 0, 0
        while index < len(items) and rows < rows_left and size_total < bytes_left:
            raw_id, fields = items[index]
            entry_id = raw_id.decode()
            joined = join_entry(fields)  # the entry's exact bytes: its size here, its digest in normalize
            size = len(joined) - len(fields) + 1
            largest = max(largest, size)
            item = normalize(stream, entry_id, fields, joined)
            (events if type(item) is FlowEvent else rejections).append(item)  # type: ignore[arg-type]
            ids.append(entry_id)
            index += 1
            rows += 1
            size_total += size
        return index, rows, size_total, largest

    def _normalize_pairs_python(self, stream: str, entry_id: str, pairs: list[bytes] | None,
                                joined: bytes | None) -> FlowEvent | Rejection:
        """normalize_pairs without the C hot path: what it does where the C hot path returns None."""
        if not pairs:
            return self.normalize(stream, entry_id, None)
        if _repeats_a_name(pairs):  # before anything makes a dict of the pairs (invalid UTF-8, oversized entries too)
            return Rejection(stream, entry_id, _repeated_name_reason([raw_text(p) for p in pairs]),
                             raw_pairs_json(pairs))
        if joined is None:
            joined = join_entry(pairs)
        try:
            # One decode of the joined entry instead of one per name and value (valid UTF-8 as a whole exactly when
            # every part is: the NUL between parts ends any multi-byte sequence); a NUL inside a name or value
            # splits into more parts than there are: decode them one by one.
            parts = joined.decode().split("\x00")
            if len(parts) != len(pairs):
                parts = list(map(_decode_bytes, pairs))
            decoded = iter(parts)
            flat = dict(zip(decoded, decoded, strict=True))  # one iterator, taken in pairs: no slice copies
            oversized = len(joined) - len(pairs) + 1 > MAX_ENTRY_BYTES
        except (TypeError, ValueError):  # UnicodeDecodeError is a ValueError; so is an odd-length list
            oversized = True
        if oversized:
            return self.normalize(stream, entry_id, pairs_to_dict(pairs))
        try:
            return self._build(stream, entry_id, _unwrap(flat), joined)
        except _Reject as exc:
            return Rejection(stream, entry_id, str(exc), raw_json(pairs_to_dict(pairs)))
        except Exception as exc:  # defensive: a bug here must reject one entry, not stop the stream
            return Rejection(stream, entry_id, f"internal normalize error: {type(exc).__name__}: {exc}",
                             raw_json(pairs_to_dict(pairs)))

    def _build(self, stream: str, entry_id: str, record: dict[str, Any],
               content: bytes) -> FlowEvent:
        event = self._build_fast(stream, entry_id, record, content)
        return event if event is not None else self._build_checked(stream, entry_id, record, content)

    def _build_fast(self, stream: str, entry_id: str, record: dict[str, Any],
                    content: bytes) -> FlowEvent | None:
        """The common, valid case without per-field helper calls; None = let ``_build_checked`` decide.

        Returns an event only when every field is of the plain shape that ``_build_checked`` accepts
        unchanged, so both paths give identical results (the normalize tests run against both).
        """
        get = record.get
        session_id = get("session_id")
        node_id = get("node_id")
        event_type = get("event_type")
        if not (type(session_id) is str and type(node_id) is str and type(event_type) is str
                and 0 < len(session_id) <= MAX_ID_CHARS and 0 < len(node_id) <= MAX_ID_CHARS
                and 0 < len(event_type) <= MAX_EVENT_TYPE_CHARS
                and not session_id.isspace() and not node_id.isspace() and not event_type.isspace()):
            return None
        user_id = get("user_id")
        if user_id is None or user_id == "":
            _, sep, user_id = stream.rpartition(":")
            if not sep or not user_id or len(user_id) > MAX_ID_CHARS:
                return None
        elif type(user_id) is not str or len(user_id) > MAX_ID_CHARS or user_id.isspace():
            return None
        parent_id = get("parent_id")
        if parent_id is None:
            parent_id = ""
        elif type(parent_id) is not str or len(parent_id) > MAX_ID_CHARS or parent_id == node_id:
            return None
        stamp = get("timestamp")
        if stamp is None or stamp == "":
            ts_ms = entry_id_ms(entry_id)
            if ts_ms >= MAX_TS_MS:
                return None
        elif type(stamp) is str and len(stamp) <= 16 and stamp.isascii() and stamp.isdigit():
            ts_ms = int(stamp)
            if ts_ms < SECONDS_MS_BOUNDARY:
                ts_ms *= 1000
            if ts_ms >= MAX_TS_MS:
                return None
        else:
            # ISO-8601 text, epoch seconds with a fraction, JSON numbers: the same computation as the checked parse
            # without the checks around it (half its cost); anything else, and every rejection, is the checked
            # parse's to give.
            common_ms = _common_timestamp_ms(stamp)
            if common_ms is not None:
                ts_ms = common_ms
            else:
                try:
                    ts_ms = _timestamp_ms(stamp, entry_id)
                except _Reject:
                    return None
        event_id = get("event_id")
        if event_id is None or event_id == "" or (type(event_id) is str and event_id.isspace()):
            # derive_event_id and content_digest, inlined on the hot path
            event_id = f"{stream}/{entry_id}/{_blake2b(content, digest_size=CONTENT_DIGEST_BYTES).hexdigest()}"
        elif type(event_id) is not str or len(event_id) > MAX_ID_CHARS:
            return None
        attributes = _attributes(record)
        # tuple.__new__ directly: the NamedTuple's own __new__ is a Python function (half the cost of the call)
        return _new_tuple(FlowEvent, (
            event_id, user_id, session_id, node_id, parent_id, event_type, ts_ms, attributes,
            stream, entry_id, int(event_type in self.end_types), int(event_type in self.error_types),
        ))

    def _build_checked(self, stream: str, entry_id: str, record: dict[str, Any],
                       content: bytes) -> FlowEvent:
        session_id = _required_str(record, "session_id", MAX_ID_CHARS)
        node_id = _required_str(record, "node_id", MAX_ID_CHARS)
        event_type = _required_str(record, "event_type", MAX_EVENT_TYPE_CHARS)
        user_id = _user_id(record.get("user_id"), stream)
        parent_id = _parent_id(record.get("parent_id"))
        if parent_id == node_id:
            raise _Reject("parent_id equals node_id (a node cannot be its own parent)")
        ts_ms = _timestamp_ms(record.get("timestamp"), entry_id)
        event_id = _event_id(record.get("event_id"), stream, entry_id, content)
        attributes = _attributes(record)
        return FlowEvent(
            event_id, user_id, session_id, node_id, parent_id, event_type, ts_ms, attributes,
            stream, entry_id, int(event_type in self.end_types), int(event_type in self.error_types),
        )


_decode_bytes = bytes.decode  # strict UTF-8; TypeError for anything but bytes
_new_tuple = tuple.__new__
_fromisoformat = datetime.fromisoformat
_FLOAT_INFINITIES = (float("inf"), float("-inf"))


def _decode_entry(fields: Mapping[Any, Any]) -> dict[str, Any]:
    """Both entry shapes -> one dict of str keys; flat values are str, JSON values keep their type."""
    try:
        # Fast path: what Redis returns (bytes keys and values, valid UTF-8, well under the size limit).
        flat = {_decode_bytes(k): _decode_bytes(v) for k, v in fields.items()}
        if sum(map(len, fields)) + sum(map(len, fields.values())) > MAX_ENTRY_BYTES:
            flat = _decode_fields(fields)  # the exact size and message
    except (TypeError, UnicodeDecodeError):
        flat = _decode_fields(fields)  # str or other values, or a precise UTF-8 rejection
    return _unwrap(flat)


def _decode_fields(fields: Mapping[Any, Any]) -> dict[str, Any]:
    size = 0
    flat: dict[str, Any] = {}
    for key, value in fields.items():
        k = _utf8(key, "a field name")
        if isinstance(value, bytes):
            size += len(value)
            flat[k] = _utf8(value, f"field {k!r}")
        else:
            if isinstance(value, str):
                size += len(value)  # chars: a lower bound of the UTF-8 size, no encoding cost
            flat[k] = value
        size += len(k)
    if size > MAX_ENTRY_BYTES:
        raise _Reject(f"entry is {size} bytes, over the {MAX_ENTRY_BYTES}-byte limit (raw kept truncated: "
                      f"{MAX_RAW_VALUE_CHARS} chars per value, {MAX_RAW_FIELDS} fields)")
    return flat


def _unwrap(flat: dict[str, Any]) -> dict[str, Any]:
    """The envelope shape (one ``data``/``payload`` JSON field) merged into the flat fields."""
    if "session_id" in flat:
        return flat
    if "data" in flat:  # ENVELOPE_FIELDS in order, without a generator on the hot path
        envelope = "data"
    elif "payload" in flat:
        envelope = "payload"
    else:
        return flat
    text = flat.pop(envelope)
    try:
        decoded = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):
            raise _Reject(too_deep(f"field {envelope!r}")) from None
        raise _Reject(f"field {envelope!r} is not valid JSON: {exc}") from None
    if isinstance(decoded, dict) and _LONG_DIGIT_RUN.search(text):
        decoded = _exact_json(text, envelope)
    if not isinstance(decoded, dict):
        raise _Reject(f"field {envelope!r} must hold a JSON object, got {type(decoded).__name__}")
    if _json_key_tokens(text) != _object_keys(decoded):  # a JSON parser keeps one value of a repeated key
        raise _Reject(_repeated_key_reason(text, envelope))
    # Flat fields beside the envelope act as defaults (e.g. a producer-wide user_id).
    flat.update(decoded)
    return flat


# orjson reads an integer beyond 64 bits as a float (123456789012345678901234567890 -> 1.2345678901234568e+29):
# a document with a run of 20 digits is read again by the json module, whose integers are exact.
_LONG_DIGIT_RUN = re.compile(r"[0-9]{20}")


# Every string of a JSON document, and whether a colon follows it (then it is a key). Outside strings a document has
# no quote, so matches found one after another are exactly its strings, escaped quotes included.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"([ \t\n\r]*:)?', re.DOTALL)


def _json_key_tokens(text: str) -> int:
    """How many keys a valid JSON document spells out, repeated ones included."""
    return sum(map(bool, _JSON_STRING.findall(text)))


def _object_keys(value: Any) -> int:
    """How many keys the parsed document kept, in objects at any depth (a loop: documents nest 1,024 deep)."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += len(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


class _RepeatedKey(Exception):
    def __init__(self, key: str, times: int) -> None:
        super().__init__(key)
        self.key, self.times = key, times


def _no_repeated_key(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The first key (in document order) an object repeats, with its count; one pass (an object may hold 100,000
    keys: counting each key's copies one by one was quadratic)."""
    counts = Counter(key for key, _ in pairs)
    if len(counts) < len(pairs):
        repeated = next(key for key, _ in pairs if counts[key] > 1)
        raise _RepeatedKey(repeated, counts[repeated])
    return dict(pairs)


def _repeated_key_reason(text: str, envelope: str) -> str:
    """A key repeated in one object of the document (the first object found with one, innermost first): a JSON
    parser keeps one of its values and drops the others without a word, so the entry is rejected, its raw intact."""
    try:
        json.loads(text, object_pairs_hook=_no_repeated_key)
    except _RepeatedKey as repeated:
        return (f"key {repeated.key[:64]!r} appears {repeated.times} times in one object of field {envelope!r}: "
                "which value is meant is not known")
    except (RecursionError, ValueError):
        pass
    return f"a key appears more than once in one object of field {envelope!r}: which value is meant is not known"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _exact_json(text: str, envelope: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise _Reject(too_deep(f"field {envelope!r}")) from None
    except ValueError as exc:
        raise _Reject(f"field {envelope!r} is not valid JSON: {exc}") from None


def _utf8(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise _Reject(f"{what} is not valid UTF-8") from None


def _required_str(record: Mapping[str, Any], name: str, max_chars: int) -> str:
    value = record.get(name)
    if value is None:
        raise _Reject(f"missing required field {name!r}")
    if not isinstance(value, str):
        raise _Reject(f"{name} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise _Reject(f"{name} is empty")
    if len(value) > max_chars:
        raise _Reject(f"{name} is {len(value)} chars, over the {max_chars}-char limit")
    return value


def _user_id(value: Any, stream: str) -> str:
    if value is None or value == "":
        _, sep, tail = stream.rpartition(":")
        if not sep or not tail:
            raise _Reject("missing user_id: no user_id field and the stream key has no ':<user>' suffix")
        if len(tail) > MAX_ID_CHARS:
            raise _Reject(f"user_id is {len(tail)} chars, over the {MAX_ID_CHARS}-char limit")
        return tail
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _Reject(f"user_id must be an integer or a string, got {_json_type(value)}")
    text = str(value)
    if not text.strip():
        raise _Reject("user_id is blank")
    if len(text) > MAX_ID_CHARS:
        raise _Reject(f"user_id is {len(text)} chars, over the {MAX_ID_CHARS}-char limit")
    return text


def _parent_id(value: Any) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise _Reject(f"parent_id must be a string or null, got {_json_type(value)}")
    if len(value) > MAX_ID_CHARS:
        raise _Reject(f"parent_id is {len(value)} chars, over the {MAX_ID_CHARS}-char limit")
    return value


def _event_id(value: Any, stream: str, entry_id: str, content: bytes) -> str:
    if value is None or value == "" or (isinstance(value, str) and value.isspace()):
        # blank = absent: a shared blank id would merge unrelated events into one
        return derive_event_id(stream, entry_id, content_digest(content))
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _Reject(f"event_id must be a string or an integer, got {_json_type(value)}")
    text = str(value)
    if len(text) > MAX_ID_CHARS:
        raise _Reject(f"event_id is {len(text)} chars, over the {MAX_ID_CHARS}-char limit")
    return text


def _timestamp_ms(value: Any, entry_id: str) -> int:
    if value is None or value == "":
        # A producer may choose the entry id (XADD key <ms>-<seq>): its time obeys the same range as a timestamp's.
        ms = entry_id_ms(entry_id)
        if not 0 <= ms < MAX_TS_MS:
            raise _Reject(f"no timestamp, and the entry id's time ({ms} ms) is outside 1970-01-01..2200-01-01")
        return ms
    if isinstance(value, bool):
        raise _Reject("timestamp must be ISO-8601 or epoch seconds/milliseconds, got a boolean")
    if isinstance(value, int | float):
        ms = _epoch_to_ms(float(value))
    elif isinstance(value, str):
        ms = _parse_timestamp_text(_plain_timestamp_text(value.strip()))
    else:
        raise _Reject(f"timestamp must be ISO-8601 or epoch seconds/milliseconds, got {_json_type(value)}")
    if not 0 <= ms < MAX_TS_MS:
        raise _Reject(f"timestamp {value!r} is outside 1970-01-01..2200-01-01")
    return ms


def _is_plain_timestamp_text(text: str) -> bool:
    """Printable ASCII without '_': float() would also read digits of other scripts (fullwidth "123") and '_' between
    digits ("1_700_000_000"), and fromisoformat stops at a NUL (reading "…Z\\x00junk" as "…Z"), so a text only a
    Python parser's leniency makes a time is rejected instead of stored as one."""
    return text.isascii() and text.isprintable() and "_" not in text


def _plain_timestamp_text(text: str) -> str:
    if _is_plain_timestamp_text(text):
        return text
    raise _Reject(f"timestamp {text[:64]!r} is neither ISO-8601 nor epoch seconds/milliseconds")


def _common_timestamp_ms(stamp: Any) -> int | None:
    """``_timestamp_ms`` for the common forms, computed the same way (the same ``float()``, ``fromisoformat``,
    rounding and bounds), or None: anything else, or anything it would reject, is left to it.

    ISO-8601 text is parsed as given: ``fromisoformat`` refuses surrounding whitespace, so whenever it accepts the
    text, the checked parse (which strips first) parses the very same string. ``float()`` ignores surrounding
    whitespace, as the checked parse does by stripping it (a character only one of them treats as whitespace makes
    this one give up)."""
    kind = type(stamp)
    if kind is str:
        if not _is_plain_timestamp_text(stamp):
            return None  # the checked parse decides (it rejects it unless only surrounding whitespace made it so)
        if stamp[4:5] == "-" and stamp[:4].isdigit():  # the checked parse skips float() for these, so does this
            try:
                parsed = _fromisoformat(stamp)
            except ValueError:
                return None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)  # naive timestamps are UTC by contract
            ms = round(parsed.timestamp() * 1000)
            return ms if 0 <= ms < MAX_TS_MS else None
        try:
            number = float(stamp)
        except ValueError:
            return None
    elif kind is int or kind is float:  # not bool: the checked parse rejects booleans
        try:
            number = float(stamp)
        except OverflowError:
            return None
    else:
        return None
    if number != number or number in _FLOAT_INFINITIES:
        return None
    ms = round(number * 1000) if abs(number) < SECONDS_MS_BOUNDARY else round(number)
    return ms if 0 <= ms < MAX_TS_MS else None


def _epoch_to_ms(number: float) -> int:
    if number != number or number in (float("inf"), float("-inf")):
        raise _Reject("timestamp is not a finite number")
    if abs(number) < SECONDS_MS_BOUNDARY:
        return round(number * 1000)
    return round(number)


def _parse_timestamp_text(text: str) -> int:
    if not (text[4:5] == "-" and text[:4].isdigit()):  # "2026-…" is never a number: skip float()'s exception
        try:
            return _epoch_to_ms(float(text))
        except ValueError:
            pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise _Reject(f"timestamp {text[:64]!r} is neither ISO-8601 nor epoch seconds/milliseconds") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)  # naive timestamps are UTC by contract
    return round(parsed.timestamp() * 1000)


def _attributes(record: Mapping[str, Any]) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for key, value in record.items():
        if key in RESERVED:
            continue
        if isinstance(value, str):
            attributes[key] = value
            continue
        try:
            attributes[key] = orjson.dumps(value).decode()
        except orjson.JSONEncodeError as exc:
            if "Recursion limit" in str(exc):
                raise _Reject(too_deep(f"attribute {key!r}")) from None
            if "64-bit" not in str(exc):
                raise _Reject(f"attribute {key!r} cannot be written as JSON: {exc}") from None
            # an integer beyond 64 bits (read exactly by _exact_json): the json module writes it exactly
            attributes[key] = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if len(attributes) > MAX_ATTRIBUTES:
        raise _Reject(f"{len(attributes)} attributes, over the {MAX_ATTRIBUTES} limit")
    return attributes


def too_deep(where: str) -> str:
    """One reason for JSON nested deeper than the contract allows, whichever parser or writer noticed it."""
    return f"JSON nested deeper than {MAX_JSON_DEPTH} levels: {where}"


def reject_key(stream: str, entry_id: str, raw: str) -> Rejection:
    """An entry of a stream whose key is not UTF-8: the contract's ids are text, so it cannot become an event.
    ``source_stream`` holds the key with its odd bytes as \\xNN (ClickHouse and terminals get text only)."""
    shown = printable(stream)
    return Rejection(shown, entry_id, f"{KEY_NOT_UTF8} (source_stream shows its bytes as \\xNN): {shown}", raw)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", float: "a number", int: "an integer",
            bool: "a boolean"}.get(type(value), type(value).__name__)


def _load_native() -> Any:
    """worker/_fastpath (the C hot path), configured with the Python pieces it calls, or None where it was not
    built."""
    try:
        from worker import _fastpath  # type: ignore[attr-defined]
    except ImportError:
        return None
    _fastpath.configure(FlowEvent, _common_timestamp_ms, orjson.loads, orjson.dumps)
    return _fastpath


_fastpath = _load_native()
_native_normalize_pairs = _fastpath.normalize_pairs if _fastpath is not None else None
Normalizer.native = _native_normalize_pairs
# An insert (events, rejections) as one Native block and its dedup token, built in C (worker/sink.py); None: built
# in Python. native_block(rows, ((name, type), ...) in field order, stamp column, stamp ms) -> (block, token) | None.
native_block: Callable[[list[Any], tuple[tuple[str, str], ...], str, int], tuple[bytes, str] | None] | None = (
    _fastpath.native_block if _fastpath is not None else None)
