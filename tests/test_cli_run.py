"""The real command, as a subprocess: ``flowtrack run --drain`` over an untuned corpus (issue 2's DONE-WHEN),
SIGTERM mid-run, ``migrate`` idempotence, ``--help`` and configuration errors.

The worker gets nothing but ``FLOWTRACK_*`` variables and a fresh embedded store; results are read back
through ``flowtrack sql`` in another subprocess after the worker exited (chDB: one process per store).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from conftest import ROOT, cli_env, run_cli, sql_json, xadd_all

from worker.redisserver import RedisServer

GROUP = "flowtrack"
END, ERROR = "flow_completed", "error"
SEED = int(os.environ.get("FLOWTRACK_TEST_SEED", str(random.SystemRandom().randrange(1 << 30))))


def fresh_store(tmp_path: Path) -> str:
    return f"chdb://{(tmp_path / 'store').resolve()}"


# -- the corpus: entries plus the model of what must land ------------------------------------------

@dataclass
class Expected:
    """What one valid entry must become (event_id None = derived from the entry, checked by source)."""

    user_id: str
    session_id: str
    node_id: str
    parent_id: str
    event_type: str
    ts_ms: int | None  # None: the entry id's milliseconds
    event_id: str | None = None


@dataclass
class Corpus:
    entries: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    valid: list[Expected | None] = field(default_factory=list)  # per entry; None = malformed
    reasons: list[str | None] = field(default_factory=list)  # per entry; reason substring of a malformed one

    def add(self, stream: str, fields: dict[str, str], expected: Expected | None, reason: str | None = None) -> None:
        assert (expected is None) != (reason is None)
        self.entries.append((stream, fields))
        self.valid.append(expected)
        self.reasons.append(reason)


def _iso(ts_ms: int, offset_min: int | None) -> str:
    tz = UTC if offset_min is None else timezone(timedelta(minutes=offset_min))
    dt = datetime.fromtimestamp(ts_ms // 1000, tz)
    text = dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ts_ms % 1000:03d}"
    if offset_min is None:
        return text
    sign = "+" if offset_min >= 0 else "-"
    return f"{text}{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}"


TS_FORMS = ("iso_z", "iso_offset", "iso_naive", "date_only", "epoch_s", "epoch_s_float", "epoch_ms", "absent")
EXACT_TS_FORMS = ("iso_z", "iso_offset", "iso_naive", "epoch_s_float", "epoch_ms")  # keep the exact instant


def render_timestamp(rng: random.Random, ts_ms: int, json_shape: bool, exact: bool = False
                     ) -> tuple[Any, int | None]:
    """(value to put in the entry or None for absent, the instant it must be stored as)."""
    form = rng.choice(EXACT_TS_FORMS if exact else TS_FORMS)
    if form == "iso_z":
        return _iso(ts_ms, None) + "Z", ts_ms
    if form == "iso_offset":
        return _iso(ts_ms, rng.choice((-480, -150, 60, 330, 765))), ts_ms
    if form == "iso_naive":
        return _iso(ts_ms, None), ts_ms
    if form == "date_only":
        day = ts_ms - ts_ms % 86_400_000
        return datetime.fromtimestamp(day / 1000, UTC).strftime("%Y-%m-%d"), day
    if form == "epoch_s":
        seconds = ts_ms // 1000
        return (seconds if json_shape else str(seconds)), seconds * 1000
    if form == "epoch_s_float":
        text = f"{ts_ms // 1000}.{ts_ms % 1000:03d}"
        return (float(text) if json_shape else text), ts_ms
    if form == "epoch_ms":
        return (ts_ms if json_shape else str(ts_ms)), ts_ms
    return None, None


def encode(rng: random.Random, stream: str, body: dict[str, Any], shape: str | None = None) -> dict[str, str]:
    shape = shape or rng.choice(("flat", "data", "payload"))
    if shape == "flat":
        return {k: v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in body.items()}
    return {shape: orjson.dumps(body).decode()}


USERS = ("1", "42", "ユーザー", "user-é")


def build_corpus(seed: int) -> Corpus:
    rng = random.Random(seed)
    corpus = Corpus()
    base_ms = 1_700_000_000_000 + rng.randrange(10**10)

    def emit(session: str, user: str, node: str, parent: str, event_type: str, ts_ms: int,
             event_id: str | None = None, shape: str | None = None, stream: str | None = None,
             extra: Mapping[str, Any] | None = None) -> None:
        stream = stream or rng.choice(("flow_events", f"flow_events:{user}"))
        json_shape = shape != "flat" if shape else rng.random() < 0.6
        body: dict[str, Any] = {"session_id": session, "node_id": node, "event_type": event_type}
        if stream == "flow_events" or rng.random() < 0.3:
            body["user_id"] = int(user) if user.isdigit() and json_shape and rng.random() < 0.5 else user
        if parent or rng.random() < 0.2:
            body["parent_id"] = parent if parent or not json_shape else rng.choice(("", None))
        value, stored_ms = render_timestamp(rng, ts_ms, json_shape, exact=event_id is not None)
        if value is not None:
            body["timestamp"] = value
        if event_id is not None:
            body["event_id"] = event_id
        body.update(extra or {})
        chosen = shape or (rng.choice(("data", "payload")) if json_shape else "flat")
        corpus.add(stream, encode(rng, stream, body, chosen),
                   Expected(user, session, node, parent, event_type, stored_ms, event_id))

    # realistic agent flows, interleaved, of every status
    flows: list[list[tuple[Any, ...]]] = []
    for n in range(rng.randint(25, 40)):
        user = rng.choice(USERS)
        session = rng.choice((f"s-{seed}-{n}", f"séance-{n}-🧵", f"会話-{n}"))
        clock = base_ms + rng.randrange(10**7)
        steps: list[tuple[Any, ...]] = [(session, user, "msg", "", "user_message", clock)]
        parent = "msg"
        for turn in range(rng.randint(1, 4)):
            llm = rng.choice((f"llm-{turn}", f"nœud-llm-{turn}"))
            clock += rng.randint(1, 500)
            steps.append((session, user, llm, parent, "llm_call", clock))
            for t in range(rng.randint(0, 3)):
                clock += rng.randint(1, 500)
                steps.append((session, user, f"{llm}.tool-{t}", llm, "tool_call", clock))
                clock += rng.randint(1, 500)
                steps.append((session, user, f"{llm}.tool-{t}", llm, "tool_result", clock))
            clock += rng.randint(1, 500)
            steps.append((session, user, llm, parent, "llm_response", clock))
            parent = llm
        ending = rng.random()
        clock += rng.randint(1, 500)
        if ending < 0.25:
            steps.append((session, user, "err", parent, ERROR, clock))
        elif ending < 0.8:
            steps.append((session, user, "end", "msg", END, clock))
        flows.append(steps)
    cursors = [0] * len(flows)
    while any(c < len(f) for c, f in zip(cursors, flows, strict=True)):
        i = rng.choice([i for i, f in enumerate(flows) if cursors[i] < len(f)])
        session, user, node, parent, event_type, ts = flows[i][cursors[i]]
        emit(session, user, node, parent, event_type, ts,
             extra={"model": rng.choice(("gpt-4o", "claude")), "tokens": rng.randint(1, 999),
                    "meta": {"k": ["ü", 1, None]}})
        cursors[i] += 1

    # a deep tree (hundreds of levels) and a wide one (one root, a thousand children)
    deep_user, wide_user = rng.choice(USERS), rng.choice(USERS)
    for i in range(rng.randint(300, 400)):
        emit(f"deep-{seed}", deep_user, f"d{i}", f"d{i - 1}" if i else "", "llm_call", base_ms + i)
    emit(f"wide-{seed}", wide_user, "root", "", "user_message", base_ms)
    for i in range(rng.randint(1000, 1200)):
        emit(f"wide-{seed}", wide_user, f"c{i}", "root", "tool_call", base_ms + 1 + i)
    emit(f"wide-{seed}", wide_user, "done", "root", END, base_ms + 5000)

    # explicit event ids, some delivered two or three times (other shape, other stream, other ts form)
    dup_user = rng.choice(USERS)
    for i in range(30):
        ts = base_ms + 7 * i
        event_type = ERROR if i == 29 else "tool_call"
        for _ in range(1 + (i % 3)):
            emit(f"dups-{seed}", dup_user, f"x{i}", "" if i == 0 else "x0", event_type, ts, event_id=f"evt-{seed}-{i}")

    # malformed entries, each with the reason it must be stored with
    malformed: list[tuple[str, dict[str, str], str]] = [
        ("flow_events:1", {"node_id": "n", "event_type": "t"}, "missing required field 'session_id'"),
        ("flow_events:1", {"session_id": "s", "event_type": "t"}, "missing required field 'node_id'"),
        ("flow_events:1", {"session_id": "s", "node_id": "n"}, "missing required field 'event_type'"),
        ("flow_events", {"session_id": "s", "node_id": "n", "event_type": "t"}, "missing user_id"),
        ("flow_events:1", {"data": "{not json"}, "is not valid JSON"),
        ("flow_events:42", {"payload": '["a", "list"]'}, "must hold a JSON object"),
        ("flow_events:42", {"data": '{"session_id": 7, "node_id": "n", "event_type": "t"}'},
         "session_id must be a string"),
        ("flow_events:42", {"session_id": "s", "node_id": "n", "event_type": "t", "timestamp": "next tuesday"},
         "neither ISO-8601 nor epoch"),
        ("flow_events:42", {"data": '{"session_id":"s","node_id":"n","event_type":"t","timestamp":true}'},
         "got a boolean"),
        ("flow_events:42", {"data": '{"session_id":"s","node_id":"n","event_type":"t","timestamp":{"a":1}}'},
         "got an object"),
        ("flow_events:42", {"session_id": "s", "node_id": "n", "event_type": "t", "timestamp": "-1700000000"},
         "outside 1970-01-01..2200-01-01"),
        ("flow_events:42", {"session_id": "s", "node_id": "n", "event_type": "t", "timestamp": "NaN"},
         "not a finite number"),
        ("flow_events:42", {"session_id": "s", "node_id": "n", "event_type": "t", "parent_id": "n"},
         "parent_id equals node_id"),
        ("flow_events:42", {"session_id": "s" * 257, "node_id": "n", "event_type": "t"}, "over the 256-char limit"),
        ("flow_events:42", {"session_id": "s", "node_id": "n", "event_type": "t" * 129}, "over the 128-char limit"),
        ("flow_events:42", {"session_id": "s", "node_id": "n", "event_type": "t",
                            **{f"a{i}": "v" for i in range(300)}}, "over the 256 limit"),
        ("flow_events:1", {"session_id": "s", "node_id": "n", "event_type": "t", "blob": "x" * (1 << 20)},
         "byte limit"),
        ("flow_events:1", {"session_id": "", "node_id": "n", "event_type": "t"}, "session_id is empty"),
        ("flow_events", {"data": '{"session_id":"s","node_id":"n","event_type":"t","user_id":1.5}'},
         "user_id must be an integer or a string"),
    ]
    for stream, fields, reason in malformed:
        position = rng.randrange(len(corpus.entries) + 1)
        corpus.entries.insert(position, (stream, fields))
        corpus.valid.insert(position, None)
        corpus.reasons.insert(position, reason)
    # invalid UTF-8 cannot live in a str dict: added separately by push_corpus
    return corpus


INVALID_UTF8 = ("flow_events:1", {b"session_id": b"\xff\xfe", b"node_id": b"n", b"event_type": b"t"},
                "not valid UTF-8")


def push_corpus(client: redis.Redis, corpus: Corpus) -> list[str]:
    ids = xadd_all(client, corpus.entries)
    stream, fields, reason = INVALID_UTF8
    raw_id: Any = client.xadd(stream, fields)  # type: ignore[arg-type]
    corpus.entries.append((stream, {}))
    corpus.valid.append(None)
    corpus.reasons.append(reason)
    return [*ids, raw_id.decode()]


def expected_sessions(corpus: Corpus, ids: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    seen: dict[tuple[str, str], set[str]] = {}
    for (stream, _), entry_id, exp in zip(corpus.entries, ids, corpus.valid, strict=True):
        if exp is None:
            continue
        key = (exp.user_id, exp.session_id)
        identity = exp.event_id or f"{stream}/{entry_id}"
        ts = exp.ts_ms if exp.ts_ms is not None else int(entry_id.split("-")[0])
        s = out.setdefault(key, {"event_count": 0, "error_count": 0, "ends": 0, "started": ts, "last": ts,
                                 "closed": None})
        if identity in seen.setdefault(key, set()):
            continue
        seen[key].add(identity)
        s["event_count"] += 1
        s["started"], s["last"] = min(s["started"], ts), max(s["last"], ts)
        if exp.event_type in (END, ERROR):
            s["closed"] = ts if s["closed"] is None else max(s["closed"], ts)
        s["error_count"] += exp.event_type == ERROR
        s["ends"] += exp.event_type == END
    for s in out.values():
        s["status"] = "failed" if s["error_count"] else "completed" if s["ends"] else "active"
        s["ended"] = None if s["status"] == "active" else s["closed"]
    return out


def iso_ms(text: str | None) -> int | None:
    if text is None:
        return None
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return round(dt.timestamp() * 1000)


def assert_nothing_pending(client: redis.Redis, streams: set[str]) -> None:
    for stream in streams:
        assert int(client.xpending(stream, GROUP)["pending"]) == 0, stream
        newest: Any = client.xrevrange(stream, count=1)
        group = next(g for g in client.xinfo_groups(stream) if g["name"] == GROUP.encode())
        assert group["last-delivered-id"] == newest[0][0], f"{stream}: entries left unread"


# -- DONE-WHEN -------------------------------------------------------------------------------------

def test_done_when_untuned_corpus_through_run_drain(redis_server: RedisServer, redis_client: redis.Redis,
                                                    tmp_path: Path) -> None:
    note = f"(corpus seed {SEED}; rerun with FLOWTRACK_TEST_SEED={SEED})"
    corpus = build_corpus(SEED)
    ids = push_corpus(redis_client, corpus)
    store_url = fresh_store(tmp_path)
    env = cli_env(redis_server.url, store_url, FLOWTRACK_CONSUMER="done-when")

    proc = run_cli(["run", "--drain"], env, timeout_s=240)
    assert proc.returncode == 0

    # every valid event exactly once, with its exact values
    got = sql_json("SELECT event_id, user_id, session_id, node_id, parent_id, event_type, "
                   "toUnixTimestamp64Milli(ts) AS ts_ms, source_stream, source_id FROM flowtrack.flow_events",
                   store_url)
    by_source = {(r["source_stream"], r["source_id"]): r for r in got}
    by_event_id = {r["event_id"]: r for r in got}
    assert len(by_event_id) == len(got), f"an event is visible more than once {note}"
    expected_explicit: dict[str, Expected] = {}
    derived = 0
    for (stream, _), entry_id, exp in zip(corpus.entries, ids, corpus.valid, strict=True):
        if exp is None:
            assert (stream, entry_id) not in by_source, f"malformed entry {entry_id} stored as an event {note}"
            continue
        if exp.event_id is not None:
            expected_explicit[exp.event_id] = exp
            continue
        derived += 1
        row = by_source.get((stream, entry_id))
        assert row is not None, f"{stream}/{entry_id} missing from flow_events {note}"
        want_ts = exp.ts_ms if exp.ts_ms is not None else int(entry_id.split("-")[0])
        assert (row["user_id"], row["session_id"], row["node_id"], row["parent_id"], row["event_type"],
                row["ts_ms"]) == (exp.user_id, exp.session_id, exp.node_id, exp.parent_id, exp.event_type,
                                  want_ts), f"{stream}/{entry_id} {note}"
    for event_id, exp in expected_explicit.items():
        row = by_event_id.get(event_id)
        assert row is not None, f"{event_id} missing {note}"
        assert (row["user_id"], row["session_id"], row["node_id"], row["parent_id"], row["event_type"],
                row["ts_ms"]) == (exp.user_id, exp.session_id, exp.node_id, exp.parent_id, exp.event_type,
                                  exp.ts_ms), f"{event_id} {note}"
    assert len(got) == derived + len(expected_explicit), note

    # every malformed entry in rejected_events, with its reason
    rejected = sql_json("SELECT source_stream, source_id, reason FROM flowtrack.rejected_events", store_url)
    by_key = {(r["source_stream"], r["source_id"]): r["reason"] for r in rejected}
    assert len(by_key) == len(rejected), f"a rejected entry is visible more than once {note}"
    want_rejected = {(stream, entry_id): reason for (stream, _), entry_id, reason
                     in zip(corpus.entries, ids, corpus.reasons, strict=True) if reason is not None}
    assert set(by_key) == set(want_rejected), note
    for key, reason in want_rejected.items():
        assert reason in by_key[key], f"{key}: {by_key[key]!r} lacks {reason!r} {note}"

    # every session with its exact count, status and timing
    sessions = sql_json("SELECT user_id, session_id, event_count, error_count, status, "
                        "toUnixTimestamp64Milli(started_at) AS started, toUnixTimestamp64Milli(last_event_at) "
                        "AS last, if(ended_at IS NULL, NULL, toUnixTimestamp64Milli(assumeNotNull(ended_at))) "
                        "AS ended, duration_ms FROM flowtrack.flow_sessions", store_url)
    got_sessions = {(r["user_id"], r["session_id"]): r for r in sessions}
    assert len(got_sessions) == len(sessions), note
    want_sessions = expected_sessions(corpus, ids)
    assert set(got_sessions) == set(want_sessions), note
    for key, want in want_sessions.items():
        row = got_sessions[key]
        assert (row["event_count"], row["error_count"], row["status"], row["started"], row["last"],
                row["ended"]) == (want["event_count"], want["error_count"], want["status"], want["started"],
                                  want["last"], want["ended"]), f"{key} {note}"
        end = want["ended"] if want["ended"] is not None else want["last"]
        assert row["duration_ms"] == end - want["started"], f"{key} {note}"
    assert {s["status"] for s in want_sessions.values()} == {"active", "completed", "failed"}

    # the deep and wide trees as flow_nodes
    nodes = sql_json("SELECT session_id, count() AS n, countIf(parent_id = '') AS roots FROM flowtrack.flow_nodes "
                     "WHERE session_id IN ({d:String}, {w:String}) GROUP BY session_id", store_url,
                     d=f"deep-{SEED}", w=f"wide-{SEED}")
    counts = {r["session_id"]: (r["n"], r["roots"]) for r in nodes}
    deep_n = sum(1 for e in corpus.valid if e is not None and e.session_id == f"deep-{SEED}")
    wide_n = sum(1 for e in corpus.valid if e is not None and e.session_id == f"wide-{SEED}")
    assert counts == {f"deep-{SEED}": (deep_n, 1), f"wide-{SEED}": (wide_n, 1)}, note

    # nothing pending in the group
    assert_nothing_pending(redis_client, {s for s, _ in corpus.entries})


# -- SIGTERM mid-run -------------------------------------------------------------------------------

class Producer(threading.Thread):
    """Writes flat events to a few per-user streams until stopped; remembers every (stream, id) it wrote."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url, protocol=2)
        self.written: list[tuple[str, str]] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set():
                chunk = [(f"flow_events:{k % 5}", {"session_id": f"s-{(k // 50) % 40}", "node_id": f"n-{k}",
                                                   "event_type": "llm_call", "seq": str(k)}) for k in range(n, n + 50)]
                ids = xadd_all(self.client, chunk)
                self.written.extend((s, i) for (s, _), i in zip(chunk, ids, strict=True))
                n += len(chunk)
                time.sleep(0.01)
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            self.client.close()


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _acked_something(client: redis.Redis) -> bool:
    for i in range(5):
        stream = f"flow_events:{i}"
        if not client.exists(stream):
            continue
        for group in client.xinfo_groups(stream):
            if group["name"] == GROUP.encode() and group["last-delivered-id"] != b"0-0":
                return True
    return False


def spawn_worker(args: list[str], env: Mapping[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "worker.cli", *args], env=dict(env), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_if_running(worker: subprocess.Popen[str]) -> None:
    """A test's last resort (in its finally): a worker it failed to stop does not outlive it."""
    if worker.poll() is None:
        worker.kill()
        worker.wait()


def test_sigterm_mid_run_exits_0_promptly_and_loses_nothing(redis_server: RedisServer, redis_client: redis.Redis,
                                                            tmp_path: Path) -> None:
    store_url = fresh_store(tmp_path)
    env = cli_env(redis_server.url, store_url, FLOWTRACK_CONSUMER="sigterm-worker")
    producer = Producer(redis_server.url)
    producer.start()
    worker = spawn_worker(["run"], env)
    try:
        wait_for(lambda: _acked_something(redis_client) or worker.poll() is not None, 60, "the worker to consume")
        assert worker.poll() is None, f"worker exited early: {worker.communicate()[1][-2000:]}"
        time.sleep(0.5)  # mid-run: batches in flight while the producer keeps writing
        sent_at = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=15)
        took = time.monotonic() - sent_at
    finally:
        kill_if_running(worker)
        producer.stop.set()
        producer.join(10)
    assert producer.error is None
    assert worker.returncode == 0, stderr[-3000:]
    assert took < 15
    assert "Traceback" not in stderr
    # the in-flight batch was finished and acknowledged: nothing left pending on the stopped consumer
    streams = {s for s, _ in producer.written}
    assert sum(int(redis_client.xpending(s, GROUP)["pending"]) for s in streams) == 0
    before = sql_json("SELECT count() AS n FROM flowtrack.flow_events", store_url)[0]["n"]
    assert 0 < before <= len(producer.written)

    proc = run_cli(["run", "--drain"], env, timeout_s=120)
    assert proc.returncode == 0

    rows = sql_json("SELECT source_stream, source_id, count() AS copies FROM flowtrack.flow_events "
                    "GROUP BY source_stream, source_id", store_url)
    stored = {(r["source_stream"], r["source_id"]): r["copies"] for r in rows}
    assert set(stored) == set(producer.written)
    assert set(stored.values()) == {1}
    totals = sql_json("SELECT count() AS n, uniqExact(event_id) AS ids FROM flowtrack.flow_events", store_url)
    assert totals == [{"n": len(producer.written), "ids": len(producer.written)}]
    sessions = sql_json("SELECT sum(event_count) AS n FROM flowtrack.flow_sessions", store_url)
    assert sessions == [{"n": len(producer.written)}]
    assert_nothing_pending(redis_client, streams)


def test_sigterm_while_redis_is_unreachable_at_start_exits_0(tmp_path: Path) -> None:
    from worker.redisserver import free_port

    env = cli_env(f"redis://127.0.0.1:{free_port()}/0", fresh_store(tmp_path))
    worker = spawn_worker(["run"], env)
    try:
        time.sleep(3)  # migrated, now backing off on Redis
        assert worker.poll() is None
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=15)
    finally:
        kill_if_running(worker)
    assert worker.returncode == 0, stderr[-2000:]


# -- migrate, help, configuration errors -----------------------------------------------------------

def test_migrate_twice_is_idempotent(tmp_path: Path) -> None:
    store_url = fresh_store(tmp_path)
    env = cli_env("redis://127.0.0.1:1/0", store_url)
    migrations = sorted(p.stem for p in (ROOT / "schemas" / "clickhouse").glob("[0-9][0-9][0-9]_*.sql"))
    assert migrations

    first = run_cli(["migrate"], env)
    first_out = "".join(first.stdout.split())  # rich wraps long lines
    assert all(name in first_out for name in migrations), first.stdout
    tables_before = sql_json("SELECT name, engine FROM system.tables WHERE database = 'flowtrack' ORDER BY name",
                             store_url)
    second = run_cli(["migrate"], env)
    second_out = " ".join(second.stdout.split())
    assert "schema up to date" in second_out
    assert not any(name in second_out for name in migrations)

    tables_after = sql_json("SELECT name, engine FROM system.tables WHERE database = 'flowtrack' ORDER BY name",
                            store_url)
    assert tables_after == tables_before
    names = {t["name"] for t in tables_after}
    assert {"flow_events", "flow_sessions", "flow_nodes", "rejected_events"} <= names
    applied = sql_json("SELECT name, count() AS n FROM flowtrack.schema_migrations GROUP BY name ORDER BY name",
                       store_url)
    assert applied == [{"name": m, "n": 1} for m in migrations]


def test_help_lists_the_commands() -> None:
    proc = run_cli(["--help"], env={k: v for k, v in os.environ.items() if not k.startswith("FLOWTRACK_")})
    commands = set()
    for line in proc.stdout.splitlines():  # rich box ("│ run   Run the worker…") or plain ("  run  Run…")
        match = re.match(r"(\w+)\s{2,}\S", line.strip().strip("│|").strip())
        if match:
            commands.add(match.group(1))
    for command in ("run", "migrate", "produce", "demo", "sql"):
        assert command in commands, proc.stdout


@pytest.mark.parametrize("url", [
    "localhost:6379",
    "http://127.0.0.1:6379/0",
    "redis://127.0.0.1:notaport/0",
    "redis://[::1/0",
], ids=["no-scheme", "http-scheme", "non-numeric-port", "unparsable"])
def test_bad_redis_url_is_a_clear_error_with_exit_code_2(url: str, tmp_path: Path) -> None:
    env = cli_env(url, fresh_store(tmp_path))
    proc = run_cli(["run", "--drain"], env, timeout_s=60, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "FLOWTRACK_REDIS_URL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_drain_says_what_it_waits_for_and_why_it_did_not_finish(redis_server: RedisServer,
                                                                  redis_client: redis.Redis, tmp_path: Path) -> None:
    """Entries pending on a dead consumer are claimed once idle for FLOWTRACK_CLAIM_IDLE_MS: the drain says it waits
    for that (it was silent), and stopped before, it exits 1 saying the drain did not finish (it said nothing)."""
    stream = "flow_events:1"
    xadd_all(redis_client, [(stream, {"session_id": "s", "node_id": f"n{i}", "event_type": "t"}) for i in range(5)])
    redis_client.xgroup_create(stream, GROUP, id="0")
    redis_client.xreadgroup(GROUP, "dead-consumer", {stream: ">"})
    env = cli_env(redis_server.url, fresh_store(tmp_path))
    worker = spawn_worker(["run", "--drain", "--claim-idle-ms", "60000"], env)
    try:
        deadline = time.monotonic() + 60
        lines: list[str] = []
        assert worker.stderr is not None
        while time.monotonic() < deadline and not any("pending on other consumers" in line for line in lines):
            lines.append(worker.stderr.readline())
        worker.send_signal(signal.SIGTERM)
        _, rest = worker.communicate(timeout=30)
    finally:
        kill_if_running(worker)
    stderr = "".join(lines) + rest
    assert "5 entries are pending on other consumers: waiting until they are idle for 60 s" in stderr, stderr
    assert worker.returncode == 1 and "error: the drain did not finish" in stderr and "Traceback" not in stderr


def test_a_metrics_port_in_use_is_one_line_not_a_traceback(redis_server: RedisServer, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = cli_env(redis_server.url, fresh_store(tmp_path))
        proc = run_cli(["run", "--drain", "--metrics-port", str(port)], env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "cannot serve metrics on" in proc.stderr and f":{port} (FLOWTRACK_METRICS_PORT)" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("variable", "value"), [
    ("CLAIM_INTERVAL_S", "0"), ("CLAIM_INTERVAL_S", "nan"), ("CLAIM_INTERVAL_S", "-1"),  # a spinning or dead loop
    ("UNHEALTHY_AFTER_S", "nan"), ("UNHEALTHY_AFTER_S", "-5"),  # /healthz 503 for ever
    ("SOCKET_TIMEOUT_S", "inf"), ("SOCKET_TIMEOUT_S", "1e30"), ("BATCH_MAX_WAIT_S", "0"),
    ("STREAM_RESCAN_S", "nan"), ("TRIM_INTERVAL_S", "0"), ("RETRY_INITIAL_S", "-1"), ("RETRY_MAX_S", "0.01"),
    ("CLAIM_IDLE_MS", "0"), ("CLAIM_IDLE_MS", "-100"), ("BLOCK_MS", "0"),  # claims a live peer's entries
    ("METRICS_PORT", "70000"), ("METRICS_PORT", "-1"), ("GROUP_START_ID", "abc"),
    ("TRIM_ENABLED", "ture"),
    ("REDIS_URL", "redis://127.0.0.1:6379/abc"), ("REDIS_URL", "redis://127.0.0.1:6379/0?socket_timeout=abc"),
    ("CLICKHOUSE_URL", "https://[::1"), ("CLICKHOUSE_URL", "http:///flowtrack"),
])
def test_a_setting_out_of_its_range_is_a_configuration_error(variable: str, value: str) -> None:
    from worker.errors import ConfigError
    from worker.settings import Settings

    env = {f"FLOWTRACK_{variable}": value}
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env)
    assert variable in str(raised.value) or "FLOWTRACK" in str(raised.value) or "bool" in str(raised.value)


@pytest.mark.parametrize("args", [
    ["produce", "--count", "5", "--rate", "nan"], ["produce", "--users", "0"], ["demo", "--duration-s", "nan"],
    ["demo", "--rate", "inf"], ["bench", "--rate", "nan"], ["history", "--since", "nan"],
    ["history", "--since", "99999999999999999999d"], ["tail", "--since", "1e30", "--no-follow"],
    ["history", "--limit", "4294967296"], ["rejected", "--limit", "-1"], ["tail", "--count", "0"],
    ["status", "--max-lag", "-1"], ["run", "--drain", "--metrics-port", "70000"], ["run", "--drain", "--group", ""],
    # a target of NaN is never missed: the bench said PASS whatever it measured
    ["bench", "--min-ratio", "nan"], ["bench", "--max-p99-ms", "nan"], ["bench", "--max-idle-cpu-pct", "nan"],
    ["bench", "--max-rss-mb", "nan"], ["bench", "--verdict-min-events", "-1"],
])
def test_an_option_out_of_its_range_is_refused_in_one_line(args: list[str], redis_server: RedisServer,
                                                           tmp_path: Path) -> None:
    """Values that gave tracebacks, wrapped silently (a --limit of 2**32 listed nothing) or never ended."""
    from typer.testing import CliRunner

    from worker.cli import app

    result = CliRunner().invoke(app, args, env=cli_env(redis_server.url, fresh_store(tmp_path)))
    assert result.exit_code == 2, (args, result.output[-1500:])
    assert "Traceback" not in result.output


def test_a_redis_database_or_store_directory_that_cannot_be_is_a_configuration_error(
        redis_server: RedisServer, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from worker.cli import app

    runner = CliRunner()
    no_db = runner.invoke(app, ["status", "--no-store"], env=cli_env(f"{redis_server.url.rsplit('/', 1)[0]}/99999",
                                                                      fresh_store(tmp_path)))
    assert no_db.exit_code == 2 and "DB index is out of range" in no_db.output, no_db.output[-1500:]
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    for path in (blocked, blocked / "below"):  # a process of its own: chDB opens one store path per process
        proc = run_cli(["history", "--since", "1d"], cli_env(redis_server.url, f"chdb://{path}"), check=False)
        assert proc.returncode == 2 and "cannot be a directory" in proc.stderr, proc.stderr[-1500:]
        assert "Traceback" not in proc.stderr
