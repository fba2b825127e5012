"""Harness of the fault suite: a private redis-server, a known workload, worker processes, and the checker.

What is expected is known exactly: every entry the harness XADDs is recorded with its stream entry id, so the
set of valid event ids (explicit ``event_id`` for a third of them, the worker's deterministic derivation from
stream + entry id for the rest), of malformed entries and of entries ClickHouse will refuse is fixed before a
worker starts. After the workers exited, the store is read back in a subprocess (chDB: one process per store)
and compared:

- produced   = valid events written to the streams (malformed and poison entries not included)
- stored     = valid events visible in ``flowtrack.flow_events``
- lost       = produced - stored
- duplicates = visible rows beyond the first per event id (+ rejected rows beyond the first per entry, + ids
               visible in more than one store when competing workers each own a store)
- handed_over_copies = ids visible once in each of two stores because a SIGKILLed worker had stored them without
               acknowledging (they were pending on it at the kill) and the worker that reclaimed them stored them
               again in a store of its own: at-least-once delivery, which one shared store shows once (FINAL).
               Counted apart, not as duplicates, only for ids the scenario names (``FaultRun.handed_over``)
- rejected   = distinct entries in ``flowtrack.rejected_events``; must be exactly the malformed + poison ones
- pending    = entries still pending in the group afterwards (must be 0); unread = lag (must be 0)

Competing workers and chDB: an embedded store can be opened by one process only, so competing workers each get
their own store path and the checker reads the union. That proves the Redis side (no entry is processed by two
workers: an id in two stores is a duplicate) but not ClickHouse's dedup across writers; with
``FLOWTRACK_TEST_CLICKHOUSE_URL`` set, every worker shares that server instead (its ``flowtrack`` database is
emptied first; run that against a scratch server only).
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from worker.normalize import derive_event_id, mapping_digest
from worker.producer import ProduceConfig, encode, generate_flows, interleave
from worker.redisserver import RedisServer, find_redis_server

ROOT = Path(__file__).resolve().parents[2]
CHECKER = Path(__file__).resolve().parent / "checker.py"
SERVER_URL_ENV = "FLOWTRACK_TEST_CLICKHOUSE_URL"
REPORT_ENV = "FLOWTRACK_FAULTS_REPORT"
GROUP = "flowtrack"
STREAM_PREFIX = "flow_events"
Key = tuple[str, str]
# an entry to write: stream, fields, kind ("valid", "malformed", "poison"), explicit event id
Planned = tuple[str, dict[str, str], str, str | None]
AnyRedis = redis.Redis | redis.RedisCluster

# Fast failure detection for the suite: reclaim after 1 s idle, short backoff, small batches (many batches,
# many kill points), short blocks.
FAST_ENV: dict[str, str] = {
    "FLOWTRACK_CLAIM_IDLE_MS": "1000",
    "FLOWTRACK_CLAIM_INTERVAL_S": "0.5",
    "FLOWTRACK_BATCH_MAX_ROWS": "2000",
    "FLOWTRACK_BATCH_MAX_WAIT_S": "0.2",
    "FLOWTRACK_MAX_INFLIGHT_ROWS": "8000",
    "FLOWTRACK_READ_COUNT": "1000",
    "FLOWTRACK_BLOCK_MS": "200",
    "FLOWTRACK_RETRY_INITIAL_S": "0.1",
    "FLOWTRACK_RETRY_MAX_S": "1.0",
    "FLOWTRACK_SOCKET_TIMEOUT_S": "5",
    "FLOWTRACK_STREAM_RESCAN_S": "1",
}


# -- redis-server ----------------------------------------------------------------------------------
def _version(executable: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(g) for g in match.groups()) if match else ()


def pick_redis_server() -> str:
    """The newest redis-server available (Redis 7 reports deleted-while-pending ids and group lag)."""
    candidates = {find_redis_server()}
    for path in ("/usr/bin/redis-server", "/usr/local/bin/redis-server", shutil.which("redis-server")):
        if path and Path(path).exists():
            candidates.add(path)
    return max(candidates, key=_version)


def redis_server(data_dir: Path, appendonly: bool = False) -> RedisServer:
    data_dir.mkdir(parents=True, exist_ok=True)
    return RedisServer(data_dir=data_dir, appendonly=appendonly, executable=pick_redis_server())


# -- the workload ----------------------------------------------------------------------------------
MALFORMED: tuple[dict[str, str], ...] = (
    {"node_id": "n-1", "event_type": "llm_call"},                      # no session_id
    {"data": "{this is not json"},                                     # broken envelope
    {"session_id": "s-bad", "node_id": "n-1", "event_type": ""},       # empty event_type
    {"data": "[1, 2, 3]"},                                             # envelope is not an object
    {"session_id": "x" * 300, "node_id": "n-1", "event_type": "llm_call"},  # session_id too long
)


@dataclass
class Workload:
    """Everything the harness wrote, with the fate each entry must meet."""

    seed: int
    users: int = 8
    expected: dict[str, Key] = field(default_factory=dict)   # valid event id -> its entry
    malformed: set[Key] = field(default_factory=set)         # must be rejected by the normalizer
    poison: set[Key] = field(default_factory=set)            # valid-looking, refused by ClickHouse
    poison_ids: set[str] = field(default_factory=set)
    streams: set[str] = field(default_factory=set)
    written: int = 0
    _events: Iterator[tuple[Any, dict[str, str]]] | None = None
    _rng: random.Random | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def produced(self) -> int:
        return len(self.expected)

    @property
    def expected_rejected(self) -> set[Key]:
        return self.malformed | self.poison

    def produce(self, client: AnyRedis, count: int, malformed_every: int = 0, poison_every: int = 0,
                chunk: int = 1000, rate_per_s: float | None = None,
                stop: threading.Event | None = None) -> int:
        """XADD ``count`` entries (valid events, every n-th malformed / poison), recording each one.

        With ``rate_per_s`` the entries are paced (chunks of rate/20); ``stop`` ends production early.
        """
        started = time.monotonic()
        if rate_per_s:
            chunk = max(1, min(chunk, int(rate_per_s / 20)))
        if self._events is None:
            config = ProduceConfig(users=self.users, shape="mixed", stream_per_user=True,
                                   stream_prefix=STREAM_PREFIX, seed=self.seed)
            self._events = interleave(config, generate_flows(config))
            self._rng = random.Random(self.seed + 7)
        assert self._rng is not None
        done = 0
        while done < count and not (stop is not None and stop.is_set()):
            n = min(chunk, count - done)
            plan = self._plan(n, malformed_every, poison_every)
            self._record(self._send(client, plan))
            done += n
            if rate_per_s:
                ahead_s = done / rate_per_s - (time.monotonic() - started)
                if ahead_s > 0:
                    time.sleep(ahead_s)
        return done

    def stream_for(self, user_id: str) -> str:
        return f"{STREAM_PREFIX}:{user_id}"

    def _plan(self, n: int, malformed_every: int, poison_every: int) -> list[Planned]:
        """The next ``n`` entries to write: (stream, fields, kind, explicit event id)."""
        assert self._events is not None and self._rng is not None
        plan: list[Planned] = []
        with self._lock:
            for _ in range(n):
                self.written += 1
                seq = self.written
                flow, event = next(self._events)
                stream = self.stream_for(flow.user_id)
                if malformed_every and seq % malformed_every == 0:
                    plan.append((stream, dict(MALFORMED[seq % len(MALFORMED)]), "malformed", None))
                    continue
                shape = "json" if self._rng.random() < 0.5 else "flat"
                fields = encode(event, shape, True)  # type: ignore[arg-type]
                if poison_every and seq % poison_every == 0:
                    event_id = f"poison-{self.seed}-{seq}"
                    fields = encode({**event, "event_id": event_id, "poison": "1"}, "flat", True)
                    plan.append((stream, fields, "poison", event_id))
                elif seq % 3 == 0:
                    event_id = f"ev-{self.seed}-{seq}"
                    plan.append((stream, encode({**event, "event_id": event_id}, shape, True),  # type: ignore[arg-type]
                                 "valid", event_id))
                else:
                    plan.append((stream, fields, "valid", None))
        return plan

    def _send(self, client: AnyRedis, plan: list[Planned]) -> list[tuple[Planned, Any]]:
        """XADD the plan in one pipeline; (entry, the id the server acknowledged) for each."""
        pipe = client.pipeline(transaction=False)
        for stream, fields, _, _ in plan:
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
        return list(zip(plan, pipe.execute(), strict=True))

    def _record(self, acknowledged: list[tuple[Planned, Any]]) -> None:
        with self._lock:
            for (stream, fields, kind, event_id), raw_id in acknowledged:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                key = (stream, entry_id)
                self.streams.add(stream)
                if kind == "malformed":
                    self.malformed.add(key)
                elif kind == "poison":
                    self.poison.add(key)
                    self.poison_ids.add(event_id or "")
                else:
                    derived = derive_event_id(stream, entry_id, mapping_digest(fields))  # type: ignore[arg-type]
                    self.expected[event_id or derived] = key

    def produce_in_background(self, client: AnyRedis, count: int, rate_per_s: float,
                              **kwargs: Any) -> tuple[threading.Thread, threading.Event]:
        stop = threading.Event()
        thread = threading.Thread(target=self.produce, args=(client, count),
                                  kwargs={"rate_per_s": rate_per_s, "stop": stop, **kwargs}, daemon=True)
        thread.start()
        return thread, stop


# -- worker processes ------------------------------------------------------------------------------
def worker_env(redis_url: str, clickhouse_url: str, consumer: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWTRACK_")}
    env.update(FAST_ENV)
    env.update(FLOWTRACK_REDIS_URL=redis_url, FLOWTRACK_CLICKHOUSE_URL=clickhouse_url,
               FLOWTRACK_CONSUMER=consumer, FLOWTRACK_GROUP=GROUP)
    env.update(extra)
    return env


class Worker:
    """``python -m worker.cli run [--drain]`` as a child process; its log is copied line by line to a file."""

    def __init__(self, name: str, env: Mapping[str, str], log_dir: Path, drain: bool = False,
                 log_level: str = "info", disk_full: bool = False) -> None:
        self.name = name
        self.disk_full = disk_full
        self.env = dict(env)
        self.drain = drain
        self.log_path = log_dir / f"worker-{name}.log"
        self.log_level = log_level
        self.lines: list[str] = []
        self.process: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None
        self.started_at = 0.0
        self.ended_at: float | None = None

    def start(self) -> Worker:
        args = [sys.executable, "-m", "worker.cli", "run", "--log-level", self.log_level]
        if self.drain:
            args.append("--drain")
        self.started_at = time.monotonic()
        # stdout/stderr through a pipe, not a file: the store-write fault limits file sizes of the process.
        self.process = subprocess.Popen(args, env=self.env, cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT,
                                        preexec_fn=_no_file_growth if self.disk_full else None)
        self._pump = threading.Thread(target=self._copy_log, daemon=True)
        self._pump.start()
        return self

    def _copy_log(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with self.log_path.open("a", encoding="utf-8") as out:
            out.write(f"--- start {self.name} pid {self.process.pid} drain={self.drain}\n")
            for raw in self.process.stdout:
                line = raw.decode("utf-8", "replace")
                self.lines.append(line)
                out.write(line)
                out.flush()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_has(self, needle: str) -> bool:
        return any(needle in line for line in list(self.lines))

    def set_disk_full(self, full: bool) -> None:
        """Make every file write of the worker beyond 1 byte fail with EFBIG (or stop that): to the process,
        the store's disk is full. Soft limit only, so it can be lifted again without privileges."""
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (1 if full else hard, hard))

    def kill(self) -> None:
        """SIGKILL: no cleanup, no last batch, no acks."""
        if self.alive:
            os.kill(self.pid, signal.SIGKILL)
        self.wait(30)

    def terminate(self) -> None:
        if self.alive:
            os.kill(self.pid, signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        try:
            rc = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.name} still running after {timeout_s}s\n{self.tail()}") from None
        if self._pump is not None:
            self._pump.join(10)
        if self.ended_at is None:
            self.ended_at = time.monotonic()
        return rc

    def stop_quietly(self) -> None:
        if self.alive:
            self.kill()

    def tail(self, lines: int = 40) -> str:
        return f"--- log of worker {self.name} ({self.log_path}):\n" + "".join(self.lines[-lines:])


def _no_file_growth() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))


# -- watching progress through Redis ---------------------------------------------------------------
@dataclass
class GroupState:
    streams: int = 0
    length: int = 0
    read: int = 0        # entries delivered to the group at least once (Redis 7 entries-read)
    pending: int = 0
    lag: int = 0

    @property
    def acked(self) -> int:
        return self.read - self.pending


def group_state(client: AnyRedis, group: str = GROUP) -> GroupState:
    state = GroupState()
    for key in client.scan_iter(match=f"{STREAM_PREFIX}*", count=1000, _type="stream"):
        state.streams += 1
        state.length += int(client.xlen(key))
        try:
            groups = client.xinfo_groups(key)
            last_generated = client.xinfo_stream(key)["last-generated-id"]
        except redis.ResponseError:
            continue
        ours = [info for info in groups
                if (info["name"].decode() if isinstance(info["name"], bytes) else info["name"]) == group]
        if not ours:
            # no worker has found this stream yet: every entry in it is unread (not "caught up" with lag 0)
            state.lag += int(client.xlen(key))
        for info in ours:
            state.pending += int(info["pending"])
            state.read += int(info.get("entries-read") or 0)
            lag = info.get("lag")
            if lag is None:  # Redis 7 cannot always tell (e.g. after loading an AOF): compare ids instead
                lag = 0 if info["last-delivered-id"] == last_generated else 1
            state.lag += int(lag)
    return state


def pending_by_consumer(client: AnyRedis, group: str = GROUP) -> dict[str, int]:
    """Entries pending in the group per consumer, over every stream (XPENDING summaries)."""
    counts: dict[str, int] = {}
    for key in client.scan_iter(match=f"{STREAM_PREFIX}*", count=1000, _type="stream"):
        try:
            summary = client.xpending(key, group)
        except redis.ResponseError:
            continue
        for consumer in summary.get("consumers") or ():
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
            counts[name] = counts.get(name, 0) + int(consumer["pending"])
    return counts


def pending_entries(client: AnyRedis, consumer: str, group: str = GROUP) -> set[Key]:
    """(stream, entry id) of every entry pending on one consumer of the group, over every stream."""
    held: set[Key] = set()
    for key in client.scan_iter(match=f"{STREAM_PREFIX}*", count=1000, _type="stream"):
        try:
            rows = client.xpending_range(key, group, min="-", max="+", count=1_000_000, consumername=consumer)
        except redis.ResponseError:
            continue
        stream = key.decode() if isinstance(key, bytes) else key
        held.update((stream, row["message_id"].decode() if isinstance(row["message_id"], bytes)
                     else row["message_id"]) for row in rows)
    return held


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.02,
             workers: tuple[Worker, ...] = ()) -> float:
    """Poll until predicate() holds; returns the seconds waited. Fails with the workers' logs on timeout."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            logs = "\n".join(w.tail() for w in workers)
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{logs}")
        time.sleep(interval_s)
    return time.monotonic() - started


# -- reading the store back ------------------------------------------------------------------------
def read_store(clickhouse_url: str, events_relation: str = "flowtrack.flow_events") -> dict[str, Any]:
    """The checker, in its own process (never while a worker owns an embedded store)."""
    proc = subprocess.run([sys.executable, str(CHECKER), clickhouse_url, "--events-relation", events_relation],
                          capture_output=True, timeout=180, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"checker failed ({proc.returncode}): {proc.stderr.decode()[-3000:]}")
    result: dict[str, Any] = orjson.loads(proc.stdout)
    return result


def store_exec(clickhouse_url: str, statements: list[str]) -> None:
    """Run statements (DDL/DML) against a store from a subprocess, after `flowtrack migrate`-ing it."""
    code = (
        "import sys, json\n"
        "from worker.settings import Settings\n"
        "from worker.store import Store\n"
        "st = Store.open(Settings(clickhouse_url=sys.argv[1]))\n"
        "st.migrate()\n"
        "for s in json.loads(sys.argv[2]):\n"
        "    st.client.command(s)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, clickhouse_url, json.dumps(statements)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"store_exec failed: {proc.stderr[-3000:]}")


def reset_server_store(url: str) -> None:
    store_exec(url, ["DROP DATABASE IF EXISTS flowtrack SYNC"])


# -- the tally -------------------------------------------------------------------------------------
@dataclass
class Tally:
    scenario: str
    produced: int = 0
    stored: int = 0
    lost: int = 0
    duplicates: int = 0
    rejected: int = 0
    expected_rejected: int = 0
    rejected_missing: int = 0
    wrongly_rejected: int = 0
    unexpected_visible: int = 0
    session_skew: int = 0
    physical_copies: int = 0
    handed_over_copies: int = 0    # see the module doc: a killed worker's stored-but-unacked ids, one per store
    pending: int = 0
    unread: int = 0
    redis_lost: int = 0            # acknowledged XADDs Redis itself lost (asynchronous failover), never stored
    recovery_s: float = 0.0
    duration_s: float = 0.0
    expect: str = "clean"          # "clean", or "duplicates" for the negative control
    xfail: str = ""
    notes: str = ""
    failures: list[str] = field(default_factory=list)   # scenario-specific (a crash, a slow stop...)

    def problems(self) -> list[str]:
        found = list(self.failures)
        if self.lost:
            found.append(f"{self.lost} of {self.produced} valid events lost")
        if self.duplicates:
            found.append(f"{self.duplicates} duplicate rows visible")
        if self.rejected_missing:
            found.append(f"{self.rejected_missing} malformed/poison entries not in rejected_events")
        if self.wrongly_rejected:
            found.append(f"{self.wrongly_rejected} valid entries turned into rejects")
        if self.unexpected_visible:
            found.append(f"{self.unexpected_visible} event ids visible that should not be (poison or unknown)")
        if self.session_skew:
            found.append(f"flow_sessions event_count off by {self.session_skew}")
        if self.pending:
            found.append(f"{self.pending} entries still pending")
        if self.unread:
            found.append(f"{self.unread} entries never read (lag)")
        return found

    @property
    def ok(self) -> bool:
        if self.expect == "duplicates":
            return self.duplicates > 0
        if self.expect == "lost":
            return self.lost > 0
        return not self.problems()

    def record(self) -> None:
        path = os.environ.get(REPORT_ENV)
        if path:
            row = asdict(self) | {"ok": self.ok, "problems": self.problems()}
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(row) + "\n")


def tally(scenario: str, workload: Workload, snapshots: list[dict[str, Any]], client: AnyRedis | None,
          group: str = GROUP, handed_over: frozenset[Key] | set[Key] = frozenset()) -> Tally:
    """Compare what the stores hold (one snapshot per store) with what was written. ``handed_over``: entries
    whose one copy in each of two stores is at-least-once redelivery across separate stores (module doc)."""
    visible: Counter[str] = Counter()
    rejected: Counter[Key] = Counter()
    session_skew = 0
    physical_copies = 0
    stores_holding: Counter[str | Key] = Counter()
    for snap in snapshots:
        ids = snap["event_ids"]
        visible.update(ids)
        stores_holding.update(set(ids))
        keys = [(r[0], r[1]) for r in snap["rejected"]]
        rejected.update(keys)
        stores_holding.update(set(keys))
        session_skew += int(snap["session_event_sum"]) - len(set(ids))
        physical_copies += int(snap["physical_rows"]) - int(snap["physical_distinct"])
    handed_ids = [event_id for event_id, key in workload.expected.items() if key in handed_over]
    handed_over_copies = (sum(1 for e in handed_ids if visible[e] == 2 and stores_holding[e] == 2)
                          + sum(1 for k in handed_over if rejected[k] == 2 and stores_holding[k] == 2))
    expected = set(workload.expected)
    stored = len(expected & visible.keys())
    expected_rejected = workload.expected_rejected
    valid_keys = set(workload.expected.values())
    state = group_state(client, group) if client is not None else GroupState()
    return Tally(
        scenario=scenario,
        produced=len(expected),
        stored=stored,
        lost=len(expected) - stored,
        duplicates=sum(c - 1 for c in visible.values() if c > 1) + sum(c - 1 for c in rejected.values() if c > 1)
        - handed_over_copies,
        rejected=len(rejected),
        expected_rejected=len(expected_rejected),
        rejected_missing=len(expected_rejected - rejected.keys()),
        wrongly_rejected=len(valid_keys & rejected.keys()),
        unexpected_visible=len(visible.keys() - expected),
        session_skew=session_skew,
        physical_copies=physical_copies,
        handed_over_copies=handed_over_copies,
        pending=state.pending,
        unread=state.lag,
    )


def assert_clean(result: Tally, workers: tuple[Worker, ...] = ()) -> None:
    result.record()
    problems = result.problems()
    if problems:
        logs = "\n".join(w.tail(25) for w in workers)
        raise AssertionError(f"{result.scenario}: " + "; ".join(problems) + f"\n{result}\n{logs}")


# -- one scenario's world --------------------------------------------------------------------------
class FaultRun:
    """A private redis-server, a workload, store paths and the workers of one scenario; cleans up after."""

    poll_interval_s = 0.05  # how often the group state is read while waiting

    def __init__(self, scenario: str, base: Path, appendonly: bool = False, seed: int = 1) -> None:
        self.scenario = scenario
        self.dir = base
        self.redis = redis_server(base / "redis", appendonly=appendonly).start()
        self.client: AnyRedis = redis.Redis.from_url(self.redis.url, protocol=2, socket_timeout=10)
        self.workload: Workload = Workload(seed=seed)
        self.workers: list[Worker] = []
        self.server_url = os.environ.get(SERVER_URL_ENV) or None
        if self.server_url:
            reset_server_store(self.server_url)
        self.started = time.monotonic()
        self.notes: list[str] = []
        self.failures: list[str] = []
        # entries a SIGKILLed worker held unacknowledged (see ``tally``)
        self.handed_over: set[Key] = set()

    @property
    def redis_url(self) -> str:
        """What the workers get as FLOWTRACK_REDIS_URL."""
        return self.redis.url

    def store_url(self, name: str = "store") -> str:
        """An embedded store path of its own, or the shared server when one is configured."""
        return self.server_url or f"chdb://{(self.dir / name).resolve()}"

    def worker(self, consumer: str, store: str = "store", drain: bool = False, disk_full: bool = False,
               **env: str) -> Worker:
        w = Worker(consumer, worker_env(self.redis_url, self.store_url(store), consumer, **env), self.dir,
                   drain=drain, disk_full=disk_full)
        self.workers.append(w)
        return w.start()

    def drain(self, consumer: str, store: str = "store", timeout_s: float = 180, **env: str) -> Worker:
        """A `run --drain` worker to completion; it must exit 0."""
        w = self.worker(consumer, store, drain=True, **env)
        rc = w.wait(timeout_s)
        if rc != 0:
            raise AssertionError(f"drain worker {consumer} exited {rc}\n{w.tail()}")
        return w

    def state(self) -> GroupState:
        return group_state(self.client)

    def wait_caught_up(self, timeout_s: float, *workers: Worker) -> float:
        """Until the group has read something and has nothing unread or pending; returns the seconds waited."""
        return wait_for(lambda: (s := self.state()).lag == 0 and s.pending == 0 and s.read > 0, timeout_s,
                        "the group to catch up", interval_s=self.poll_interval_s, workers=workers)

    def stop_workers(self, *workers: Worker, timeout_s: float = 30) -> None:
        """SIGTERM them all, then wait: a worker that does not exit 0 is a failure of the scenario."""
        for w in workers:
            w.terminate()
        for w in workers:
            rc = w.wait(timeout_s)
            if rc != 0:
                self.failures.append(f"worker {w.name} exited {rc} on SIGTERM")

    def wait_consuming(self, w: Worker, timeout_s: float = 60) -> None:
        """Until the worker has opened and migrated its store and joined the group (it logs both; the store is
        prepared in the background while the first entries are read, so both lines are needed)."""
        wait_for(lambda: (w.log_has("consuming ") and w.log_has("store ready")) or not w.alive, timeout_s,
                 f"worker {w.name} to start", workers=(w,))
        if not w.alive:
            raise AssertionError(f"worker {w.name} exited early\n{w.tail()}")

    def pending_keys(self) -> set[Key]:
        keys: set[Key] = set()
        for stream in self.workload.streams:
            try:
                rows = self.client.xpending_range(stream, GROUP, min="-", max="+", count=1_000_000)
            except redis.ResponseError:
                continue
            keys.update((stream, r["message_id"].decode()) for r in rows)
        return keys

    def finish(self, stores: tuple[str, ...] = ("store",), recovery_from: float | None = None,
               events_relation: str = "flowtrack.flow_events", expect: str = "clean") -> Tally:
        for w in self.workers:
            if w.alive:
                raise AssertionError(f"worker {w.name} still running at the end\n{w.tail()}")
        urls = list(dict.fromkeys(self.store_url(s) for s in stores))
        snapshots = [read_store(u, events_relation) for u in urls]
        result = self.count(snapshots)
        result.expect = expect
        result.duration_s = round(time.monotonic() - self.started, 1)
        if recovery_from is not None:
            ends = [w.ended_at for w in self.workers if w.ended_at is not None]
            result.recovery_s = round(max(ends) - recovery_from, 2) if ends else 0.0
        result.notes = "; ".join(self.notes)
        result.failures = list(self.failures)
        return result

    def count(self, snapshots: list[dict[str, Any]]) -> Tally:
        """What the stores hold against what was written."""
        return tally(self.scenario, self.workload, snapshots, self.client, handed_over=self.handed_over)

    def close(self) -> None:
        for w in self.workers:
            w.stop_quietly()
        self.client.close()
        self.redis.cleanup()
