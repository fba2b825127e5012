"""Producer: a synthetic LLM platform writing realistic agent flows to Redis Streams.

Each session is a tree: a user message, LLM calls beneath it, tool calls beneath LLM calls (each
tool node gets a ``tool_call`` then a ``tool_result`` event, each LLM node an ``llm_call`` then an
``llm_response``), and a closing ``flow_completed`` or ``error``; some sessions are left open.
Sessions interleave the way concurrent users do. Used by the demo, the tests and the benchmark.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal, TextIO

import orjson
import redis.asyncio as aioredis

# "flat" is "flat-epoch" (flat fields, epoch-millisecond timestamps). "mixed" varies every entry the way real
# platforms differ: flat or a `data`/`payload` JSON envelope, ISO-8601 (Z, offsets, naive) or epoch s/ms
# timestamps, explicit or derived event ids, and (with ``invalid_ratio``) a few entries that break the contract.
Shape = Literal["flat", "flat-epoch", "flat-iso", "json", "mixed"]
SHAPES: tuple[str, ...] = ("flat", "flat-epoch", "flat-iso", "json", "mixed")
TOOLS = ("web_search", "sql_query", "calculator", "code_exec", "retrieve_docs", "send_email")
MODELS = ("gpt-4o", "claude-sonnet", "llama-3-70b", "mistral-large")
PROMPTS = ("Summarise this contract", "Plan a trip to Kyoto", "Why is my build failing?",
           "Translate to español", "Résumé des ventes 📈", "Write a SQL query for churn")


@dataclass
class FlowSpec:
    """One session's events in order, and what they should add up to once stored."""

    user_id: str
    session_id: str
    events: list[dict[str, str]] = field(default_factory=list)
    status: str = "active"


@dataclass
class ProduceConfig:
    users: int = 20
    shape: Shape = "flat"
    stream_per_user: bool = True
    stream_prefix: str = "flow_events"
    error_ratio: float = 0.08
    open_ratio: float = 0.05
    concurrent_sessions: int = 50
    seed: int | None = None
    invalid_ratio: float = 0.0  # share of entries (mixed shape only) written to be rejected
    users_in_turn: bool = False  # session n belongs to user n % users + 1: as many users' streams as possible
    shard_tags: int = 0  # > 0: per-user streams named `<prefix>:{sNN}:<user>`, NN one of this many hash tags


# On a Redis Cluster the producer names per-user streams with a hash tag, `flow_events:{s07}:42`: every stream of one
# tag lives in one hash slot, so a worker reads all of them with one XREADGROUP (a read may only name keys of one
# slot), instead of one command per user. 64 tags spread evenly over 2, 3 or 4 primaries of an evenly split slot map
# (CRC16 of `s00`..`s63`: 23/20/21 over 3; 16 tags give 8/4/4), and keep ~1.5 users per tag at 100 users; the
# user id stays the last `:` segment, where the contract reads it.
CLUSTER_SHARD_TAGS = 64


def _session_tree(rng: random.Random, user_id: str, session_id: str, start_ms: int,
                  error_ratio: float, open_ratio: float) -> FlowSpec:
    flow = FlowSpec(user_id, session_id)
    clock = start_ms

    def emit(node: str, parent: str, event_type: str, step_ms: int, **attrs: str) -> None:
        nonlocal clock
        clock += step_ms
        event = {"session_id": session_id, "node_id": node, "parent_id": parent, "event_type": event_type,
                 "timestamp": str(clock), "user_id": user_id}
        event.update(attrs)
        flow.events.append(event)

    root = "msg-1"
    emit(root, "", "user_message", 0, text=rng.choice(PROMPTS), channel=rng.choice(("web", "slack", "api")))
    fails = rng.random() < error_ratio
    stays_open = not fails and rng.random() < open_ratio
    parent = root
    for turn in range(rng.randint(1, 4)):
        llm = f"llm-{turn + 1}"
        model = rng.choice(MODELS)
        emit(llm, parent, "llm_call", rng.randint(5, 40), model=model)
        for t in range(rng.choice((0, 0, 1, 2, 3))):
            tool = f"{llm}.tool-{t + 1}"
            name = rng.choice(TOOLS)
            emit(tool, llm, "tool_call", rng.randint(5, 200), tool=name)
            emit(tool, llm, "tool_result", rng.randint(20, 1500), tool=name, ok="true")
        emit(llm, parent, "llm_response", rng.randint(200, 3000), model=model,
             tokens=str(rng.randint(20, 2000)))
        parent = llm
    if fails:
        emit("err-1", parent, "error", rng.randint(5, 50), message="upstream timeout", code="504")
        flow.status = "failed"
    elif not stays_open:
        emit("end", root, "flow_completed", rng.randint(1, 20))
        flow.status = "completed"
    return flow


def generate_flows(config: ProduceConfig, sessions: int | None = None) -> Iterator[FlowSpec]:
    """Whole flows, one after another (tests use these to know what should land)."""
    rng = random.Random(config.seed)
    made = 0
    while sessions is None or made < sessions:
        user_id = str(made % config.users + 1 if config.users_in_turn else rng.randint(1, config.users))
        session_id = f"s-{uuid.UUID(int=rng.getrandbits(128)).hex[:16]}"
        start = int(time.time() * 1000) - rng.randint(0, 5000)
        yield _session_tree(rng, user_id, session_id, start, config.error_ratio, config.open_ratio)
        made += 1


def interleave(config: ProduceConfig, flows: Iterator[FlowSpec]) -> Iterator[tuple[FlowSpec, dict[str, str]]]:
    """Events of many concurrent sessions, interleaved; each session's own order is kept."""
    rng = random.Random(None if config.seed is None else config.seed + 1)
    active: list[tuple[FlowSpec, int]] = []
    exhausted = False
    while True:
        while not exhausted and len(active) < config.concurrent_sessions:
            flow = next(flows, None)
            if flow is None:
                exhausted = True
                break
            active.append((flow, 0))
        if not active:
            return
        index = rng.randrange(len(active))
        flow, position = active[index]
        yield flow, flow.events[position]
        if position + 1 < len(flow.events):
            active[index] = (flow, position + 1)
        else:
            active[index] = active[-1]
            active.pop()


def shard_tag(user_id: str, tags: int) -> str:
    """The user's hash tag, ``s`` + a number below ``tags``: numeric ids in turn (users 1..N fill the tags evenly),
    others by CRC32."""
    number = int(user_id) if user_id.isdigit() else zlib.crc32(user_id.encode("utf-8", "surrogateescape"))
    return f"s{number % tags:02d}"


def stream_for(config: ProduceConfig, user_id: str) -> str:
    if not config.stream_per_user:
        return config.stream_prefix
    if config.shard_tags > 0:
        return f"{config.stream_prefix}:{{{shard_tag(user_id, config.shard_tags)}}}:{user_id}"
    return f"{config.stream_prefix}:{user_id}"


def encode(event: dict[str, str], shape: Literal["flat", "json"], per_user_stream: bool) -> dict[str, str]:
    """An event as stream entry fields, in one of the two contract shapes."""
    body = dict(event)
    if per_user_stream:
        body.pop("user_id", None)  # the stream key carries it
    if not body.get("parent_id"):
        body.pop("parent_id", None)
    if shape == "json":
        return {"data": orjson.dumps(body).decode()}
    return body


OFFSETS = (timezone(timedelta(hours=2)), timezone(timedelta(hours=-5)), timezone(timedelta(hours=5, minutes=30)))
# (what a broken producer writes, how to break the entry): each is a contract breach with its own reason
INVALID_KINDS = ("no_session", "bad_timestamp", "bad_json", "self_parent", "json_array", "blank_type")


def iso_timestamp(ts_ms: int, form: str = "z") -> str:
    """ts_ms as ISO-8601: "z" (2026-11-24T10:31:05.123Z), "offset" (+02:00 and others), "naive" (UTC by
    contract), "z-seconds" (no fraction)."""
    moment = datetime.fromtimestamp(ts_ms // 1000, UTC).replace(microsecond=(ts_ms % 1000) * 1000)
    if form == "offset":
        return moment.astimezone(OFFSETS[ts_ms % len(OFFSETS)]).isoformat(timespec="milliseconds")
    if form == "naive":
        return moment.replace(tzinfo=None).isoformat(timespec="milliseconds")
    if form == "z-seconds":
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _varied_timestamp(rng: random.Random, ts_ms: int, in_json: bool) -> str | int | float:
    # Millisecond precision in every form: the latency phase measures ingested_at - ts.
    form = rng.random()
    if form < 0.45:
        return iso_timestamp(ts_ms, "z")
    if form < 0.55:
        return iso_timestamp(ts_ms, "offset")
    if form < 0.62:
        return iso_timestamp(ts_ms, "naive")
    if form < 0.82:
        return ts_ms if in_json else str(ts_ms)
    seconds = f"{ts_ms / 1000:.3f}"
    return float(seconds) if in_json else seconds


def encode_entry(event: dict[str, str], shape: Shape, per_user_stream: bool, rng: random.Random,
                 invalid_ratio: float = 0.0) -> tuple[dict[str, str], bool]:
    """An event as stream entry fields in ``shape``; (fields, whether the contract accepts them)."""
    if shape in ("flat", "flat-epoch"):
        return encode(event, "flat", per_user_stream), True
    if shape == "json":
        return encode(event, "json", per_user_stream), True
    if shape == "flat-iso":
        return encode({**event, "timestamp": iso_timestamp(int(event["timestamp"]))}, "flat",
                      per_user_stream), True
    return _mixed_entry(event, per_user_stream, rng, invalid_ratio)


def _mixed_entry(event: dict[str, str], per_user_stream: bool, rng: random.Random,
                 invalid_ratio: float) -> tuple[dict[str, str], bool]:
    body: dict[str, Any] = dict(event)
    if per_user_stream and rng.random() < 0.8:
        body.pop("user_id", None)
    if not body.get("parent_id"):
        body.pop("parent_id", None)
    envelope = rng.choice(("", "", "data", "payload"))  # half flat, half a JSON envelope
    body["timestamp"] = _varied_timestamp(rng, int(event["timestamp"]), in_json=bool(envelope))
    if rng.random() < 0.3:
        body["event_id"] = f"evt-{rng.getrandbits(64):016x}"
    if envelope and "tokens" in body and rng.random() < 0.5:
        body["tokens"] = int(body["tokens"])  # JSON keeps its types; stored as JSON text
    if envelope and rng.random() < 0.2:
        body["usage"] = {"prompt": rng.randint(1, 500), "cached": rng.random() < 0.5}
    if invalid_ratio and rng.random() < invalid_ratio:
        return _break(body, envelope, rng), False
    if not envelope:
        return {k: str(v) for k, v in body.items()}, True
    return {envelope: orjson.dumps(body).decode()}, True


def _break(body: dict[str, Any], envelope: str, rng: random.Random) -> dict[str, str]:
    kind = rng.choice(INVALID_KINDS)
    if kind == "no_session":
        body.pop("session_id")
    elif kind == "bad_timestamp":
        body["timestamp"] = "yesterday at noon"
    elif kind == "self_parent":
        body["parent_id"] = body["node_id"]
    elif kind == "blank_type":
        body["event_type"] = "  "
    elif kind == "bad_json":
        return {"data": orjson.dumps(body).decode()[:-1]}
    elif kind == "json_array":
        return {"payload": orjson.dumps([body]).decode()}
    if not envelope:
        return {k: str(v) for k, v in body.items()}
    return {envelope: orjson.dumps(body).decode()}


async def produce(redis: aioredis.Redis | aioredis.RedisCluster, config: ProduceConfig, count: int | None = None,
                  rate_per_s: float | None = None, pipeline_size: int = 500,
                  on_progress: Callable[[int], None] | None = None,
                  stop: asyncio.Event | None = None,
                  record_ids: list[tuple[str, str]] | None = None,
                  record_invalid: set[tuple[str, str]] | None = None) -> int:
    """XADD events until ``count`` (None = until stopped), at ``rate_per_s`` (None = as fast as possible).

    ``record_ids``, when given, receives the (stream, entry id) of every entry written, in order;
    ``record_invalid`` those written to break the contract (``config.invalid_ratio``).
    """
    rng = random.Random(config.seed)
    sent = 0
    started = time.monotonic()
    flows = interleave(config, generate_flows(config))
    while count is None or sent < count:
        if stop is not None and stop.is_set():
            break
        chunk = pipeline_size if count is None else min(pipeline_size, count - sent)
        if rate_per_s:
            chunk = max(1, min(chunk, int(rate_per_s / 20) or 1))
        keys: list[str] = []
        valid: list[bool] = []
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(chunk):
                flow, event = next(flows)
                if rate_per_s:
                    # Live mode: stamp events with the wall clock so ingest lag is meaningful.
                    event = {**event, "timestamp": str(int(time.time() * 1000))}
                fields, ok = encode_entry(event, config.shape, config.stream_per_user, rng, config.invalid_ratio)
                key = stream_for(config, flow.user_id)
                keys.append(key)
                valid.append(ok)
                pipe.xadd(key, fields)  # type: ignore[arg-type]
            ids = await pipe.execute()
        written = [(key, _text(entry_id)) for key, entry_id in zip(keys, ids, strict=True)]
        if record_ids is not None:
            record_ids.extend(written)
        if record_invalid is not None:
            record_invalid.update(key for key, ok in zip(written, valid, strict=True) if not ok)
        sent += chunk
        if on_progress is not None:
            on_progress(sent)
        if rate_per_s:
            ahead_s = sent / rate_per_s - (time.monotonic() - started)
            if ahead_s > 0:
                await asyncio.sleep(ahead_s)
    return sent


class ProgressLine:
    """`produce` progress on stderr: one line rewritten in place on a terminal; piped, whole lines at most once a
    second (a log, not a run of carriage returns)."""

    def __init__(self, stream: TextIO, interval_s: float = 1.0) -> None:
        self.stream = stream
        self.in_place = stream.isatty()
        self.interval_s = interval_s
        self._last_at = float("-inf")
        self._shown = 0

    def __call__(self, sent: int) -> None:
        now = time.monotonic()
        if self.in_place:
            self.stream.write(f"\rsent {sent:,}")
        elif now - self._last_at >= self.interval_s:
            self.stream.write(f"sent {sent:,}\n")
            self._last_at = now
        else:
            return
        self._shown = sent
        self.stream.flush()

    def finish(self) -> None:
        """End the in-place line, so what follows starts on its own."""
        if self.in_place and self._shown:
            self.stream.write("\n")
            self.stream.flush()


def refusal(exc: Exception) -> str:
    """Redis's own words for a refused entry, without redis-py's "Command # 1 (XADD …) of pipeline caused
    error:" wrapper (which quotes the entry's fields)."""
    text = " ".join(str(exc).split())
    _, found, reason = text.partition("of pipeline caused error: ")
    return (reason if found else text).strip("()',\" ")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
