"""Benchmark: flowtrack against the bare XREADGROUP+XACK floor and a naive per-event consumer, in one run.

``flowtrack bench`` starts a private redis-server, writes N events of one shape (``--shape``: flat-epoch,
flat-iso, json, or mixed, the default: every contract shape and a few invalid entries) over per-user streams,
then measures over that same backlog (a fresh consumer group per measurement, so each reads the identical data):

- floor: a bare XREADGROUP + XACK loop doing no processing at all (same client library, same count);
- pipeline: ``flowtrack run --drain`` as K subprocesses into fresh embedded stores, timed like the floor from the
  first read (the first XREADGROUP Redis serves) to the exit of the last worker, its start-up (process, engine,
  migrations, stream discovery) reported beside; then checks that every produced entry is stored exactly once (read
  back with ``flowtrack sql``);
- naive: read one entry, normalize it, insert it, ack it (on a subset, rate extrapolated);
- latency: a worker running while a producer writes at a steady rate; p50/p99 of ``ingested_at - ts``; then,
  caught up, the worker's CPU while idle and the time to store one event added to a random stream (probes);
- memory: peak RSS (ru_maxrss) of every worker process.

With ``--redis-cluster-shards N`` all of it runs against a private Redis Cluster of N primaries (no replicas: the
throughput is the primaries', a replica only copies) instead of one redis-server; the workers get nothing but one
node's URL. On a cluster the streams are hash-tagged (``bench_events:{sNN}:<user>``, as ``flowtrack produce`` names
them there) and the floor reads slot by slot (one XREADGROUP may only name keys of one slot). With ``--redis-url`` it
runs on a Redis (or any node of a cluster) of the user's that holds no bench keys, and deletes its streams afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import gc
import io
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis
import redis.asyncio as aioredis
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Table

from worker.clusterstreams import cursors_by_slot
from worker.errors import FlowtrackError
from worker.normalize import printable
from worker.producer import CLUSTER_SHARD_TAGS, ProduceConfig, Shape, produce, stream_for
from worker.rediscluster import LocalCluster
from worker.redisserver import RedisServer, find_redis_server
from worker.settings import Settings, redact_url

FLOOR_GROUP = "bench-floor"
FLOOR_GC_OFF_GROUP = "bench-floor-gc-off"
PIPELINE_GROUP = "bench-pipeline"
NAIVE_GROUP = "bench-naive"
LATENCY_GROUP = "bench-latency"
BACKLOG_PREFIX = "bench_events"
GROUP_CHUNK = 2000  # commands per pipeline when touching every stream
PROGRESS_SAMPLE = 1000  # streams polled for the progress bar while a worker drains
LIVE_PREFIX = "bench_live"
BENCH_PREFIXES = (BACKLOG_PREFIX, LIVE_PREFIX)  # every key a run writes (on a Redis of the user's: deleted after)
PROBE_PREFIX = "probe-"  # session ids of the probe events (the latency queries spell it out)

Progress = Callable[[str, int, int], None]  # (phase, done, total)


# The target (pipeline >= min_ratio x floor) is set at the default size. Below it the end of a drain (the last
# batch's write, the final rollup recompute, the engine's shutdown) weighs on a short window, so a ratio from a
# smaller backlog judges those fixed costs, not the throughput: no PASS/FAIL on it.
VERDICT_MIN_EVENTS = 400_000
# The throughput targets: pipeline/floor at least MIN_RATIO on the default backlog (400k events over 100 streams),
# and MANY_STREAMS_MIN_RATIO from MANY_STREAMS streams on (150k events over 50,000: reads, claims and keep-alives
# over that many keys are the work measured there), judged from MANY_STREAMS_VERDICT_MIN_EVENTS events.
MIN_RATIO = 0.7
MANY_STREAMS = 10_000
MANY_STREAMS_MIN_RATIO = 0.5
MANY_STREAMS_VERDICT_MIN_EVENTS = 150_000


def default_min_ratio(streams: int) -> float:
    return MANY_STREAMS_MIN_RATIO if streams >= MANY_STREAMS else MIN_RATIO


def default_verdict_min_events(streams: int) -> int:
    return MANY_STREAMS_VERDICT_MIN_EVENTS if streams >= MANY_STREAMS else VERDICT_MIN_EVENTS


PASS, FAIL, NO_VERDICT = "PASS", "FAIL", "NO VERDICT"
BENCH_SHAPES = ("flat-epoch", "flat-iso", "json", "mixed")


@dataclass
class BenchConfig:
    events: int = 400_000
    streams: int = 100
    workers: int = 1
    rate: float = 5000.0
    latency_s: float = 20.0  # 0 = skip the latency phase
    naive_events: int = 3000
    naive_max_s: float = 15.0  # 0 = skip the naive baseline
    min_ratio: float = MIN_RATIO  # default_min_ratio(streams) from the command line
    seed: int = 7
    keep: bool = False
    verdict_min_events: int = VERDICT_MIN_EVENTS  # fewer events: throughput not judged (0 = always judge)
    shape: Shape = "mixed"
    invalid_ratio: float = 0.03  # mixed shape only: entries written to be rejected
    idle_s: float = 10.0  # CPU of the caught-up worker measured over this long (0 = skip, with the probes)
    probes: int = 30  # single events added to random streams of a caught-up worker, one at a time
    max_p99_ms: float = 1000.0  # latency and probe p99 above this fail the verdict
    max_idle_cpu_pct: float = 5.0
    max_rss_mb: float = 500.0
    redis_cluster_shards: int = 0  # > 0: a private Redis Cluster of this many primaries (no replicas)
    redis_url: str | None = None  # a Redis (or cluster node) of the user's instead of a private one


@dataclass
class PhaseResult:
    events: int = 0
    seconds: float = 0.0
    events_per_s: float = 0.0


@dataclass
class PipelineResult(PhaseResult):
    # seconds/events_per_s: from the workers' first XREADGROUP to the exit of the last, like the floor's window
    # (which starts at its first read too); before that, start-up: process, engine, migrations, stream discovery.
    startup_s: float = 0.0
    seconds_with_startup: float = 0.0
    workers: int = 1
    exit_codes: list[int] = field(default_factory=list)
    peak_rss_mb: float = 0.0  # the largest worker
    peak_rss_mb_each: list[float] = field(default_factory=list)


@dataclass
class NaiveResult(PhaseResult):
    extrapolated: bool = False
    note: str = ""


@dataclass
class LatencyResult:
    rate: float = 0.0
    duration_s: float = 0.0
    produced: int = 0
    stored: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    peak_rss_mb: float = 0.0
    idle_s: float = 0.0
    idle_cpu_pct: float = 0.0  # of one core, caught up, nothing arriving
    probes: int = 0
    probes_stored: int = 0
    probe_p50_ms: float = 0.0
    probe_p99_ms: float = 0.0
    note: str = "ingested_at is stamped when the batch write starts; ts by the producer's wall clock"


@dataclass
class Verification:
    ok: bool = False
    produced: int = 0
    stored_rows: int = 0
    visible_rows: int = 0
    missing: int = 0
    duplicated: int = 0
    unexpected: int = 0
    rejected: int = 0
    expected_rejected: int = 0  # entries the producer wrote to break the contract
    wrongly_rejected: int = 0  # rejected although valid, or invalid and stored


@dataclass
class BenchResult:
    events: int
    streams: int
    shape: str
    streams_with_entries: int
    redis_server: str
    produce: PhaseResult
    floor: PhaseResult
    floor_gc_off: PhaseResult
    floor_count_per_stream: int
    pipeline: PipelineResult
    verification: Verification
    naive: NaiveResult | None
    latency: LatencyResult | None
    pipeline_over_floor: float
    pipeline_over_naive: float | None
    min_ratio: float
    passed: bool
    verdict: str = PASS  # PASS, FAIL, or NO VERDICT (exactly once held, but too few events to judge throughput)
    verdict_min_events: int = VERDICT_MIN_EVENTS
    failures: list[str] = field(default_factory=list)  # every target missed, in words

    def to_json(self) -> str:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2).decode()


# -- helpers -----------------------------------------------------------------------------------------
def pick_redis_server() -> tuple[str, str]:
    """The newest redis-server available (XINFO lag needs Redis >= 7); returns (path, version)."""
    candidates: list[str] = []
    with contextlib.suppress(FlowtrackError):
        candidates.append(find_redis_server())
    for directory in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]:
        path = os.path.join(directory, "redis-server")
        if os.access(path, os.X_OK):
            candidates.append(path)
    best: tuple[tuple[int, ...], str, str] | None = None
    for path in dict.fromkeys(candidates):
        version = _redis_version(path)
        if version is None:
            continue
        key = tuple(int(p) for p in version.split(".") if p.isdigit())
        if best is None or key > best[0]:
            best = (key, path, version)
    if best is None:
        raise FlowtrackError("no working redis-server found")
    return best[1], best[2]


def _redis_version(path: str) -> str | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return None


BenchRedis = aioredis.Redis | aioredis.RedisCluster


@contextlib.contextmanager
def own_heap_only() -> Iterator[None]:
    """Run a consumer loop in this process as if it were a process of its own, for the collector.

    The bench keeps every produced entry id and the invalid ones (~400k objects at the default size) to verify
    exactly-once afterwards. A consumer of its own holds none of that. But each full collection during the loop
    would scan all of it, and that cost the floor 25-35 % on this machine (README, "Benchmark"). So the bench's
    heap is frozen (gc.freeze) for the loop's duration; the loop's own garbage is collected as usual. The pipeline
    needs none of this: it runs in a subprocess."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@functools.cache
def _is_cluster(url: str) -> bool:
    """The node says whether it belongs to a cluster (as the worker finds out: worker.redisclient)."""
    with redis.Redis.from_url(url, protocol=2, socket_timeout=30) as probe:
        return str(probe.info("cluster").get("cluster_enabled", 0)) == "1"


def _connect(url: str) -> BenchRedis:
    if _is_cluster(url):
        return aioredis.RedisCluster.from_url(url, protocol=2, decode_responses=False, socket_timeout=30,
                                              reinitialize_steps=0)
    return aioredis.Redis.from_url(url, protocol=2, decode_responses=False, socket_timeout=30)


def _owner(cluster: BenchRedis, stream: str) -> str:
    """``host:port`` of the primary serving the stream's slot."""
    node = cluster.get_node_from_key(stream) if isinstance(cluster, aioredis.RedisCluster) else None
    if node is None:
        raise FlowtrackError(f"no node of the cluster serves {stream}")
    return str(node.name)


def _node_url(url: str, node_name: str) -> str:
    """``url`` (its credentials, scheme, TLS) pointed at one node of the cluster (``host:port``)."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{node_name}", path="/0"))


def _worker_env(redis_url: str, store_url: str, streams: str, group: str, consumer: str) -> dict[str, str]:
    env = dict(os.environ)  # other FLOWTRACK_* settings (tuning) pass through to the workers
    env.update(FLOWTRACK_REDIS_URL=redis_url, FLOWTRACK_CLICKHOUSE_URL=store_url, FLOWTRACK_STREAMS=streams,
               FLOWTRACK_GROUP=group, FLOWTRACK_CONSUMER=consumer,
               FLOWTRACK_METRICS_PORT="0")  # K workers cannot share one metrics port
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker.cli", *args]


@dataclass
class _Child:
    """A worker subprocess whose peak RSS is taken from the kernel (ru_maxrss) when it is reaped."""

    proc: subprocess.Popen[bytes]
    stderr_path: Path
    returncode: int | None = None
    peak_rss_kb: int = 0

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid != 0:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.peak_rss_kb = usage.ru_maxrss
                self.proc.returncode = self.returncode
        return self.returncode

    def stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def _spawn(args: Sequence[str], env: dict[str, str], stderr_path: Path) -> _Child:
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(list(args), env=env, stdout=subprocess.DEVNULL, stderr=err,
                                cwd=Path(__file__).resolve().parent.parent)
    return _Child(proc, stderr_path)


def _sql_csv(store_url: str, sql: str) -> list[list[str]]:
    """Read an embedded store owned by no live process, from a subprocess (chDB: one store per process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWTRACK_")}
    proc = subprocess.run(_cli("sql", sql, "--format", "csv", "--clickhouse-url", store_url), env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise FlowtrackError(f"flowtrack sql failed ({proc.returncode}): {proc.stderr[-1500:]}")
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    return rows[1:]  # header


async def _group_progress(redis: BenchRedis, streams: Sequence[str], group: str) -> tuple[int, int]:
    """(entries delivered to the group, entries still pending) over the streams."""
    replies: list[Any] = []
    for start in range(0, len(streams), GROUP_CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for stream in streams[start:start + GROUP_CHUNK]:
                pipe.xinfo_groups(stream)
            replies.extend(await pipe.execute())
    delivered = pending = 0
    for stream_groups in replies:
        for info in stream_groups:
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            if name == group:
                read = info.get("entries-read")
                delivered += int(read) if read is not None else 0
                pending += int(info["pending"])
    return delivered, pending


async def _xreadgroup_calls(redis: BenchRedis) -> int:
    """XREADGROUP commands served so far (every primary of a cluster): the first one of a worker ends its start-up.
    On a Redis of the user's (--redis-url) other consumers' reads count too: the window then starts earlier (at
    worst at spawn, as it did before), never later."""
    if isinstance(redis, aioredis.RedisCluster):
        per_node: Any = await redis.info("commandstats", target_nodes=aioredis.RedisCluster.PRIMARIES)
        stats = list(per_node.values())
    else:
        stats = [await redis.info("commandstats")]
    return sum(int(node.get("cmdstat_xreadgroup", {}).get("calls", 0)) for node in stats)


async def _read_calls(url: str) -> int:
    redis = _connect(url)
    try:
        return await _xreadgroup_calls(redis)
    finally:
        await redis.aclose()


async def _create_groups(redis: BenchRedis, streams: Sequence[str], group: str) -> None:
    """The group on every stream (created empty if missing), in pipelined chunks: 50,000 streams in seconds."""
    for start in range(0, len(streams), GROUP_CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for stream in streams[start:start + GROUP_CHUNK]:
                pipe.xgroup_create(stream, group, id="0", mkstream=True)
            await pipe.execute()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the benchmark -----------------------------------------------------------------------------------
class Bench:
    def __init__(self, config: BenchConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress = progress or (lambda phase, done, total: None)
        self.workdir = Path(tempfile.mkdtemp(prefix="flowtrack-bench-"))
        self.settings = Settings.from_env()  # the workers' settings (tuning variables pass through)
        self.ids: list[tuple[str, str]] = []
        self.invalid: set[tuple[str, str]] = set()  # written to break the contract: rejected, not stored
        self.backlog_streams: list[str] = []  # every stream, with entries or not
        self.streams_with_entries = 0
        self.shard_tags = 0  # set from the server: per-user streams hash-tagged on a cluster (as `produce` names them)

    def run(self) -> BenchResult:
        if self.config.redis_url:
            return self._run_on(self.config.redis_url)
        executable, version = pick_redis_server()
        shards = self.config.redis_cluster_shards
        if shards:
            cluster = LocalCluster(primaries=shards, replicas=0, executable=executable)
            try:
                cluster.start()
                return self._run(cluster.url, f"{version} ({executable}), a cluster of {shards} "
                                              f"primar{'y' if shards == 1 else 'ies'}, no replicas")
            finally:
                cluster.cleanup()
                if not self.config.keep:
                    shutil.rmtree(self.workdir, ignore_errors=True)
        server = RedisServer(executable=executable, data_dir=self.workdir / "redis")
        (self.workdir / "redis").mkdir()
        try:
            server.start()
            return self._run(server.url, f"{version} ({executable})")
        finally:
            server.stop()
            if not self.config.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _run_on(self, url: str) -> BenchResult:
        """On a Redis of the user's (plain or cluster): it must hold no bench keys (they would be read and counted);
        the bench's streams are deleted afterwards unless --keep."""
        with redis.RedisCluster.from_url(url) if _is_cluster(url) else redis.Redis.from_url(url) as client:
            found = [key for prefix in BENCH_PREFIXES for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
            if found:
                raise FlowtrackError(f"{redact_url(url)} already holds {len(found)} bench key(s) (e.g. "
                                     f"{printable(found[0].decode('utf-8', 'surrogateescape'))}): a run needs none")
            version = str(client.info("server").get("redis_version", "?"))
        kind = "a Redis Cluster" if _is_cluster(url) else "Redis"
        try:
            return self._run(url, f"{version}, {kind} at {redact_url(url)}")
        finally:
            if not self.config.keep:
                self._delete_bench_keys(url)
                shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _delete_bench_keys(url: str) -> None:
        with redis.RedisCluster.from_url(url) if _is_cluster(url) else redis.Redis.from_url(url) as client:
            for prefix in BENCH_PREFIXES:
                for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                    client.unlink(key)

    def _run(self, url: str, redis_version: str) -> BenchResult:
        cfg = self.config
        self.shard_tags = CLUSTER_SHARD_TAGS if _is_cluster(url) else 0
        produced = asyncio.run(self._produce_backlog(url))
        count = max(1, min(self.settings.read_count, self.settings.max_inflight_rows // max(1, cfg.streams)))
        with own_heap_only():
            floor = asyncio.run(self._floor(url, count))
        floor_gc_off = self._floor_without_gc(url, count)
        pipeline, verification = self._pipeline(url)
        naive = None
        if cfg.naive_max_s > 0 and cfg.naive_events > 0:
            with own_heap_only():
                naive = asyncio.run(self._naive(url))
        latency = self._latency(url) if cfg.latency_s > 0 else None
        over_floor = pipeline.events_per_s / floor.events_per_s if floor.events_per_s else 0.0
        over_naive = pipeline.events_per_s / naive.events_per_s if naive and naive.events_per_s else None
        failures = missed_targets(cfg, over_floor, pipeline, latency)
        verdict = judge(verification.ok and all(c == 0 for c in pipeline.exit_codes), not failures,
                        cfg.events >= cfg.verdict_min_events)
        return BenchResult(cfg.events, cfg.streams, cfg.shape, self.streams_with_entries, redis_version, produced,
                           floor, floor_gc_off, count, pipeline, verification,
                           naive, latency, round(over_floor, 3), None if over_naive is None else round(over_naive, 1),
                           cfg.min_ratio, verdict == PASS, verdict, cfg.verdict_min_events, failures)

    # -- (0) the backlog ---------------------------------------------------------------------------
    async def _produce_backlog(self, url: str) -> PhaseResult:
        cfg = self.config
        redis = _connect(url)
        try:
            config = ProduceConfig(users=cfg.streams, shape=cfg.shape, stream_per_user=True,
                                   stream_prefix=BACKLOG_PREFIX, seed=cfg.seed, users_in_turn=True,
                                   invalid_ratio=cfg.invalid_ratio if cfg.shape == "mixed" else 0.0,
                                   shard_tags=self.shard_tags)
            started = time.perf_counter()
            sent = await produce(redis, config, count=cfg.events, pipeline_size=5000, record_ids=self.ids,
                                 record_invalid=self.invalid,
                                 on_progress=lambda n: self.progress("produce", n, cfg.events))
            seconds = time.perf_counter() - started
            self.streams_with_entries = len({stream for stream, _ in self.ids})
            # Every user's stream exists, like a platform's: sessions are longer than a few events, so with many
            # streams some hold none yet (they are created empty by the groups below, and still cost a worker).
            self.backlog_streams = [stream_for(config, str(user)) for user in range(1, cfg.streams + 1)]
        finally:
            await redis.aclose()
        return PhaseResult(sent, round(seconds, 3), round(sent / seconds, 1))

    # -- (a) the floor -----------------------------------------------------------------------------
    async def _floor(self, url: str, count: int, group: str = FLOOR_GROUP, phase: str = "floor") -> PhaseResult:
        if _is_cluster(url):
            return await self._floor_cluster(url, count, group, phase)
        redis = _connect(url)
        total = len(self.ids)
        # One read holds at most max_inflight_rows entries, like the worker's: with many streams (COUNT 1 each),
        # the streams are read in slices.
        per_read = max(1, self.settings.max_inflight_rows // count)
        slices = [{stream: ">" for stream in self.backlog_streams[start:start + per_read]}
                  for start in range(0, len(self.backlog_streams), per_read)]
        try:
            await _create_groups(redis, self.backlog_streams, group)
            done = 0
            started = time.perf_counter()
            empty_in_a_row = 0
            for targets in itertools.cycle(slices):
                if empty_in_a_row == len(slices):
                    break
                reply: Any = await redis.xreadgroup(group, "floor", targets, count=count)  # type: ignore[arg-type]
                if not reply:
                    empty_in_a_row += 1
                    continue
                empty_in_a_row = 0
                async with redis.pipeline(transaction=False) as pipe:
                    for stream, items in reply:
                        if items:
                            done += len(items)
                            pipe.xack(stream, group, *[entry_id for entry_id, _ in items])
                    await pipe.execute()
                self.progress(phase, done, total)
            seconds = time.perf_counter() - started
        finally:
            await redis.aclose()
        return PhaseResult(done, round(seconds, 3), round(done / seconds, 1))

    async def _floor_cluster(self, url: str, count: int, group: str, phase: str) -> PhaseResult:
        """The floor on a cluster, the least a Python consumer of one does: each turn, a node's XREADGROUPs (one per
        hash slot) in one pipeline to that node, then its XACKs likewise, the nodes in parallel; slices as above."""
        cluster = _connect(url)
        per_read = max(1, self.settings.max_inflight_rows // count)
        try:
            await _create_groups(cluster, self.backlog_streams, group)
            turns: list[dict[str, list[dict[str, str]]]] = []  # per slice: node name -> that node's slot reads
            for start in range(0, len(self.backlog_streams), per_read):
                by_node: dict[str, list[dict[str, str]]] = {}
                for part in cursors_by_slot({stream: ">" for stream in self.backlog_streams[start:start + per_read]}):
                    by_node.setdefault(_owner(cluster, next(iter(part))), []).append(part)
                turns.append(by_node)
        finally:
            await cluster.aclose()
        nodes = {name: aioredis.Redis.from_url(_node_url(url, name), protocol=2, decode_responses=False,
                                               socket_timeout=30) for turn in turns for name in turn}

        async def read_and_ack(node: aioredis.Redis, reads: list[dict[str, str]]) -> int:
            async with node.pipeline(transaction=False) as pipe:
                for targets in reads:
                    pipe.xreadgroup(group, "floor", targets, count=count)  # type: ignore[arg-type]
                replies = await pipe.execute()
            acked = 0
            async with node.pipeline(transaction=False) as pipe:
                for reply in replies:
                    for stream, items in reply or ():
                        if items:
                            acked += len(items)
                            pipe.xack(stream, group, *[entry_id for entry_id, _ in items])
                if acked:
                    await pipe.execute()
            return acked

        try:
            done = empty_in_a_row = 0
            started = time.perf_counter()
            for turn in itertools.cycle(turns):
                if empty_in_a_row == len(turns):
                    break
                got = sum(await asyncio.gather(*(read_and_ack(nodes[name], reads) for name, reads in turn.items())))
                empty_in_a_row = 0 if got else empty_in_a_row + 1
                done += got
                self.progress(phase, done, len(self.ids))
            seconds = time.perf_counter() - started
        finally:
            for node in nodes.values():
                await node.aclose()
        return PhaseResult(done, round(seconds, 3), round(done / seconds, 1))

    def _floor_without_gc(self, url: str, count: int) -> PhaseResult:
        """The same loop with the cyclic garbage collector off: informational, what is left of the floor
        once Python's collector stops scanning the large replies (a real worker cannot just switch it off)."""
        gc.collect()
        gc.disable()
        try:
            return asyncio.run(self._floor(url, count, FLOOR_GC_OFF_GROUP, "floor -gc"))
        finally:
            gc.enable()

    # -- (b) the pipeline --------------------------------------------------------------------------
    def _pipeline(self, url: str) -> tuple[PipelineResult, Verification]:
        cfg = self.config
        stores = [f"chdb://{self.workdir / f'store-pipeline-{i}'}" for i in range(cfg.workers)]
        reads_before = asyncio.run(_read_calls(url))
        started = time.perf_counter()
        children = [
            _spawn(_cli("run", "--drain", "--log-level", "warning"),
                   _worker_env(url, store, f"{BACKLOG_PREFIX}:*", PIPELINE_GROUP, f"bench-worker-{i}"),
                   self.workdir / f"pipeline-{i}.log")
            for i, store in enumerate(stores)]
        first_read = self._wait(children, url, PIPELINE_GROUP, "pipeline", reads_before)
        ended = time.perf_counter()
        reading_from = first_read if first_read is not None else started
        codes = [c.returncode if c.returncode is not None else -1 for c in children]
        for child in children:
            if child.returncode != 0:
                raise FlowtrackError(f"flowtrack run --drain exited {child.returncode}: {child.stderr_tail()}")
        rss = [round(c.peak_rss_kb / 1024, 1) for c in children]
        total = len(self.ids)
        seconds = ended - reading_from
        result = PipelineResult(total, round(seconds, 3), round(total / seconds, 1), round(reading_from - started, 3),
                                round(ended - started, 3), cfg.workers, codes, max(rss), rss)
        self.progress("verify", 0, 1)
        verification = self._verify(stores)
        self.progress("verify", 1, 1)
        return result, verification

    def _wait(self, children: list[_Child], url: str, group: str, phase: str, reads_before: int) -> float | None:
        """Reap the workers (ru_maxrss) while showing the group's progress; returns when the first worker read
        (its first XREADGROUP, seen within ~10 ms; None if none was seen)."""
        first_read: list[float] = []

        async def _watch() -> None:
            redis = _connect(url)
            # Progress from a sample of the streams (at most PROGRESS_SAMPLE), scaled: polling all 50,000 would
            # take CPU from the worker being measured.
            sample = self.backlog_streams[::len(self.backlog_streams) // PROGRESS_SAMPLE + 1]
            in_sample = set(sample)
            scale = len(self.ids) / max(1, sum(1 for stream, _ in self.ids if stream in in_sample))
            try:
                last = 0.0
                while any(c.poll() is None for c in children):
                    if not first_read and await _xreadgroup_calls(redis) > reads_before:
                        first_read.append(time.perf_counter())
                    now = time.monotonic()
                    if now - last >= 1.0:
                        last = now
                        with contextlib.suppress(Exception):
                            delivered, pending = await _group_progress(redis, sample, group)
                            done = min(len(self.ids), int(max(0, delivered - pending) * scale))
                            self.progress(phase, done, len(self.ids))
                    await asyncio.sleep(0.01)
            finally:
                await redis.aclose()

        asyncio.run(_watch())
        self.progress(phase, len(self.ids), len(self.ids))
        return first_read[0] if first_read else None

    def _verify(self, stores: Sequence[str]) -> Verification:
        """Every valid entry stored exactly once over all worker stores, nothing else; every entry written to
        break the contract rejected (once), and nothing else rejected."""
        stored: Counter[tuple[str, str]] = Counter()
        rejected: Counter[tuple[str, str]] = Counter()
        visible = 0
        for store in stores:
            for stream, entry_id in _sql_csv(store, "SELECT source_stream, source_id FROM flowtrack.events"):
                stored[(stream, entry_id)] += 1
            for stream, entry_id in _sql_csv(store, "SELECT source_stream, source_id FROM flowtrack.rejected_events"):
                rejected[(stream, entry_id)] += 1
            visible += int(_sql_csv(store, "SELECT count() FROM flowtrack.flow_events")[0][0])
        expected = set(self.ids) - self.invalid
        missing = sum(1 for key in expected if key not in stored)
        duplicated = sum(1 for key, n in stored.items() if n > 1) + sum(1 for n in rejected.values() if n > 1)
        unexpected = sum(1 for key in stored if key not in expected)
        wrongly_rejected = (sum(1 for key in rejected if key not in self.invalid)
                            + sum(1 for key in self.invalid if key not in rejected))
        ok = (missing == 0 and duplicated == 0 and unexpected == 0 and wrongly_rejected == 0
              and visible == len(expected) and sum(stored.values()) == len(expected))
        return Verification(ok, len(self.ids), sum(stored.values()), visible, missing, duplicated, unexpected,
                            sum(rejected.values()), len(self.invalid), wrongly_rejected)

    # -- (c) the naive consumer --------------------------------------------------------------------
    async def _naive(self, url: str) -> NaiveResult:
        """Read one entry, normalize it, insert it (one INSERT), ack it; on a subset, in this process."""
        from worker.normalize import FlowEvent, Normalizer
        from worker.sink import Sink
        from worker.store import Store

        cfg = self.config
        store = Store.open(Settings(clickhouse_url=f"chdb://{self.workdir / 'store-naive'}"))
        store.migrate()
        sink = Sink(store)
        normalizer = Normalizer()
        redis = _connect(url)
        target = min(cfg.naive_events, len(self.ids))
        done = 0
        try:
            await _create_groups(redis, self.backlog_streams, NAIVE_GROUP)
            started = time.perf_counter()
            deadline = started + cfg.naive_max_s
            streams = _cycle(sorted({stream for stream, _ in self.ids}))
            while done < target and time.perf_counter() < deadline:
                stream = next(streams)
                reply: Any = await redis.xreadgroup(NAIVE_GROUP, "naive", {stream: ">"}, count=1)
                if not reply or not reply[0][1]:
                    continue
                entry_id_raw, fields = reply[0][1][0]
                entry_id = entry_id_raw.decode()
                item = normalizer.normalize(stream, entry_id, fields)
                if isinstance(item, FlowEvent):
                    sink.write([item], [])
                else:
                    sink.write([], [item])
                await redis.xack(stream, NAIVE_GROUP, entry_id)
                done += 1
                if done % 20 == 0:
                    self.progress("naive", done, target)
            seconds = time.perf_counter() - started
        finally:
            await redis.aclose()
        self.progress("naive", target, target)
        rate = done / seconds if seconds else 0.0
        partial = done < len(self.ids)
        note = (f"measured on {done} of {len(self.ids)} events; rate extrapolated to the whole backlog "
                f"(~{len(self.ids) / rate:.0f} s)" if partial and rate else "")
        return NaiveResult(done, round(seconds, 3), round(rate, 1), partial, note)

    # -- (d) latency at a steady rate ----------------------------------------------------------------
    def _latency(self, url: str) -> LatencyResult:
        cfg = self.config
        store = f"chdb://{self.workdir / 'store-latency'}"
        live = ProduceConfig(stream_prefix=LIVE_PREFIX, shard_tags=self.shard_tags)
        streams = [stream_for(live, str(user)) for user in range(1, cfg.streams + 1)]

        async def _prepare() -> None:
            redis = _connect(url)
            try:  # known before the worker starts: no pattern re-scan delay
                await _create_groups(redis, streams, LATENCY_GROUP)
            finally:
                await redis.aclose()

        asyncio.run(_prepare())
        child = _spawn(_cli("run", "--log-level", "warning"),
                       _worker_env(url, store, f"{LIVE_PREFIX}:*", LATENCY_GROUP, "bench-latency"),
                       self.workdir / "latency.log")
        idle = _Idle()
        try:
            produced = asyncio.run(self._produce_live(url, streams, child))
            if cfg.idle_s > 0:
                idle = asyncio.run(self._idle_and_probes(url, streams, child))
        finally:
            if child.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 60
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if child.poll() is None:
                child.proc.kill()
                while child.poll() is None:
                    time.sleep(0.05)
        if child.returncode != 0:
            raise FlowtrackError(f"latency worker exited {child.returncode}: {child.stderr_tail()}")
        row = _sql_csv(store, "SELECT count(), "
                              "quantileExact(0.5)(toUnixTimestamp64Milli(ingested_at) - toUnixTimestamp64Milli(ts)), "
                              "quantileExact(0.99)(toUnixTimestamp64Milli(ingested_at) - toUnixTimestamp64Milli(ts)), "
                              "max(toUnixTimestamp64Milli(ingested_at) - toUnixTimestamp64Milli(ts)) "
                              "FROM flowtrack.flow_events WHERE session_id NOT LIKE 'probe-%'")[0]
        probe = _sql_csv(store, "SELECT count(), "
                                "quantileExact(0.5)(toUnixTimestamp64Milli(ingested_at) - toUnixTimestamp64Milli(ts)), "
                                "quantileExact(0.99)(toUnixTimestamp64Milli(ingested_at) - toUnixTimestamp64Milli(ts)) "
                                "FROM flowtrack.flow_events WHERE session_id LIKE 'probe-%'")[0]
        return LatencyResult(cfg.rate, cfg.latency_s, produced, int(row[0]), float(row[1]), float(row[2]),
                             float(row[3]), round(child.peak_rss_kb / 1024, 1), idle.seconds, idle.cpu_pct,
                             idle.probes, int(probe[0]), float(probe[1] or 0), float(probe[2] or 0))

    async def _idle_and_probes(self, url: str, streams: list[str], child: _Child) -> _Idle:
        """The caught-up worker: its CPU over ``idle_s`` with nothing arriving, then single events added to random
        streams one at a time (each stored before the next, so none waits behind another)."""
        cfg = self.config
        rng = random.Random(cfg.seed + 2)
        redis = _connect(url)
        try:
            await asyncio.sleep(1.0)  # the last batch's write and ack
            cpu_before, started = _cpu_seconds(child.proc.pid), time.monotonic()
            while time.monotonic() - started < cfg.idle_s:
                self.progress("idle", int(time.monotonic() - started), int(cfg.idle_s))
                await asyncio.sleep(0.5)
            seconds = time.monotonic() - started
            cpu_pct = 100 * (_cpu_seconds(child.proc.pid) - cpu_before) / seconds
            self.progress("idle", int(cfg.idle_s), int(cfg.idle_s))
            for n in range(cfg.probes):
                stream = rng.choice(streams)
                now_ms = int(time.time() * 1000)
                await redis.xadd(stream, {"session_id": f"{PROBE_PREFIX}{n}", "node_id": "probe",
                                          "event_type": "probe", "timestamp": str(now_ms)})
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and child.poll() is None:
                    _, pending = await _group_progress(redis, [stream], LATENCY_GROUP)
                    if pending == 0 and await _group_caught_up(redis, stream):
                        break
                    await asyncio.sleep(0.02)
                self.progress("probes", n + 1, cfg.probes)
                await asyncio.sleep(rng.uniform(0.05, 0.3))  # at a random point of the worker's cycle
            return _Idle(round(seconds, 2), round(cpu_pct, 2), cfg.probes)
        finally:
            await redis.aclose()

    async def _produce_live(self, url: str, streams: list[str], child: _Child) -> int:
        cfg = self.config
        redis = _connect(url)
        try:
            # Wait until the worker reads (its consumer appears in the group), so start-up is not latency.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if child.poll() is not None:
                    raise FlowtrackError(f"latency worker exited early: {child.stderr_tail()}")
                consumers = await redis.xinfo_consumers(streams[0], LATENCY_GROUP)
                if consumers:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            total = int(cfg.rate * cfg.latency_s)
            config = ProduceConfig(users=cfg.streams, shape=cfg.shape, stream_per_user=True,
                                   stream_prefix=LIVE_PREFIX, seed=cfg.seed + 1, shard_tags=self.shard_tags)
            sent = await produce(redis, config, count=total, rate_per_s=cfg.rate,
                                 on_progress=lambda n: self.progress("latency", n, total))
            # Let the worker catch up: nothing undelivered, nothing pending (checked less often over many streams:
            # each check reads every stream's group).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and child.poll() is None:
                delivered, pending = await _group_progress(redis, streams, LATENCY_GROUP)
                if delivered >= sent and pending == 0:
                    break
                await asyncio.sleep(max(0.1, len(streams) / 20_000))
            return sent
        finally:
            await redis.aclose()


@dataclass
class _Idle:
    seconds: float = 0.0
    cpu_pct: float = 0.0
    probes: int = 0


async def _group_caught_up(redis: BenchRedis, stream: str) -> bool:
    """The latency group has been delivered the stream's newest entry."""
    groups: Any = await redis.xinfo_groups(stream)
    newest: Any = await redis.xrevrange(stream, count=1)
    group = next((g for g in groups if g["name"] in (LATENCY_GROUP, LATENCY_GROUP.encode())), None)
    if group is None or not newest:
        return False
    return bool(group["last-delivered-id"] == newest[0][0])


def _cycle(items: Sequence[str]) -> Iterator[str]:
    while True:
        yield from items


def run_bench(config: BenchConfig, progress: Progress | None = None) -> BenchResult:
    return Bench(config, progress).run()


@contextlib.contextmanager
def progress_bar(console: Console) -> Iterator[Progress]:
    """A rich progress bar, one task per phase, fed by the benchmark's progress callback."""
    bar = RichProgress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                       transient=False)
    tasks: dict[str, TaskID] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total)
        bar.update(tasks[phase], completed=done, total=total)

    with bar:
        yield update


def missed_targets(cfg: BenchConfig, over_floor: float, pipeline: PipelineResult,
                   latency: LatencyResult | None) -> list[str]:
    """Every performance target the run missed, in words (empty: all met)."""
    missed = []
    if over_floor < cfg.min_ratio:
        missed.append(f"pipeline/floor {over_floor:.2f}x < {cfg.min_ratio:.2f}x")
    if pipeline.peak_rss_mb > cfg.max_rss_mb:
        missed.append(f"drain peak RSS {pipeline.peak_rss_mb:.0f} MB > {cfg.max_rss_mb:.0f} MB")
    if latency is not None:
        if latency.p99_ms > cfg.max_p99_ms:
            missed.append(f"latency p99 {latency.p99_ms:.0f} ms > {cfg.max_p99_ms:.0f} ms")
        if latency.stored < latency.produced:
            missed.append(f"latency: {latency.produced - latency.stored} of {latency.produced} events not stored")
        if latency.probes:
            if latency.idle_cpu_pct > cfg.max_idle_cpu_pct:
                missed.append(f"caught-up worker CPU {latency.idle_cpu_pct:.1f}% > {cfg.max_idle_cpu_pct:.1f}%")
            if latency.probe_p99_ms > cfg.max_p99_ms or latency.probes_stored < latency.probes:
                missed.append(f"new event on a random stream: p99 {latency.probe_p99_ms:.0f} ms "
                              f"({latency.probes_stored}/{latency.probes} stored), needs <= {cfg.max_p99_ms:.0f} ms")
    return missed


def judge(correct: bool, fast_enough: bool, big_enough: bool) -> str:
    """FAIL whenever exactly-once broke (at any size); the throughput ratio only counts at a size that can tell."""
    if not correct:
        return FAIL
    if not big_enough:
        return NO_VERDICT
    return PASS if fast_enough else FAIL


def report_table(result: BenchResult) -> Table:
    table = Table(title="flowtrack bench", show_header=False, title_justify="left")
    table.add_column("measure", style="bold")
    table.add_column("value")
    for label, value in format_report(result):
        style = {PASS: "green", FAIL: "red"}.get(value.split(":")[0], "yellow") if label == "result" else None
        table.add_row(label, value, style=style)
    return table


def format_report(result: BenchResult) -> list[tuple[str, str]]:
    """(label, value) rows for the terminal table."""
    rows = [
        ("events / streams", f"{result.events:,} {result.shape} events over {result.streams:,} per-user streams "
                             f"({result.streams_with_entries:,} with entries)"),
        ("redis-server", result.redis_server),
        ("produce", f"{result.produce.events_per_s:,.0f} ev/s"),
        ("floor: XREADGROUP+XACK", f"{result.floor.events_per_s:,.0f} ev/s ({result.floor.seconds:.2f} s, "
                                   f"COUNT {result.floor_count_per_stream} per stream)"),
        ("floor, GC off (info)", f"{result.floor_gc_off.events_per_s:,.0f} ev/s ({result.floor_gc_off.seconds:.2f} s)"),
        (f"pipeline: run --drain x{result.pipeline.workers}",
         f"{result.pipeline.events_per_s:,.0f} ev/s ({result.pipeline.seconds:.2f} s from its first read; "
         f"start-up {result.pipeline.startup_s:.2f} s before it)"),
    ]
    if result.naive is not None:
        label = "naive: 1 read/insert/ack" + (" (extrapolated)" if result.naive.extrapolated else "")
        rows.append((label, f"{result.naive.events_per_s:,.1f} ev/s ({result.naive.events} events, "
                            f"{result.naive.seconds:.1f} s)"))
    rows.append(("pipeline / floor", f"{result.pipeline_over_floor:.2f}x (needs >= {result.min_ratio:.2f}x)"))
    if result.pipeline_over_naive is not None:
        rows.append(("pipeline / naive", f"{result.pipeline_over_naive:,.0f}x"))
    v = result.verification
    rows.append(("exactly once", ("ok" if v.ok else "FAILED") + f": {v.stored_rows:,} rows stored, "
                 f"{v.visible_rows:,} visible, {v.missing} missing, {v.duplicated} duplicated, "
                 f"{v.rejected} rejected ({v.expected_rejected} written invalid, {v.wrongly_rejected} wrong)"))
    rows.append(("peak RSS (drain)", ", ".join(f"{mb:,.0f} MB" for mb in result.pipeline.peak_rss_mb_each)))
    if result.latency is not None:
        lat = result.latency
        rows.append((f"latency @ {lat.rate:,.0f} ev/s, {lat.duration_s:.0f} s",
                     f"p50 {lat.p50_ms:,.0f} ms, p99 {lat.p99_ms:,.0f} ms, max {lat.max_ms:,.0f} ms "
                     f"({lat.stored:,}/{lat.produced:,} stored; worker peak RSS {lat.peak_rss_mb:,.0f} MB)"))
        if lat.probes:
            rows.append(("caught-up worker", f"{lat.idle_cpu_pct:.1f}% of a core over {lat.idle_s:.0f} s; a new event "
                                             f"on a random stream stored in p50 {lat.probe_p50_ms:,.0f} ms, "
                                             f"p99 {lat.probe_p99_ms:,.0f} ms ({lat.probes_stored}/{lat.probes})"))
    if result.verdict == NO_VERDICT:
        rows.append(("result", f"{NO_VERDICT}: {result.events:,} events is too small to judge throughput (fixed costs "
                               f"dominate below {result.verdict_min_events:,}; see --verdict-min-events); exactly "
                               "once held"))
    else:
        rows.append(("result", result.verdict + "".join(f"; {miss}" for miss in result.failures)))
    return rows
