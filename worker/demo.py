"""Demo: a private Redis, the embedded store, the synthetic producer and the worker in one process,
with a live terminal dashboard, until Ctrl-C or a duration; then a summary and the next commands to try.

Everything runs in one process because chDB allows one process per store: the dashboard reads the
store through the pipeline's own Store, in a thread (``asyncio.to_thread``), with small queries over
the last seconds only, so inserts are never held up for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from worker import flows
from worker.errors import FlowtrackError
from worker.pipeline import Pipeline
from worker.producer import ProduceConfig, produce
from worker.redisclient import connect
from worker.redisserver import RedisServer
from worker.settings import Settings, redact_url
from worker.source import guarded
from worker.store import Store
from worker.views import TYPE_STYLES, data, flow_header, format_time, tree_lines

# A realistic producer makes mistakes now and then: one of these every BAD_EVERY_S seconds, so the
# rejected relation (and `flowtrack rejected`) has something to show.
BAD_ENTRIES = (
    {"session_id": "s-broken", "event_type": "llm_call", "model": "gpt-4o"},  # no node_id
    {"session_id": "s-broken", "node_id": "n1", "event_type": "tool_call", "timestamp": "yesterday"},
    {"data": '{"session_id": "s-broken", "node_id": "n2", "event_type": '},  # truncated JSON
)
BAD_EVERY_S = 3.0
TREE_LINES = 14


@dataclass
class Snapshot:
    """What the dashboard last read from the store (refreshed about once a second)."""

    latest: list[Sequence[Any]] = field(default_factory=list)
    flow: flows.Flow | None = None
    placed: list[flows.Placed] = field(default_factory=list)
    error: str = ""


@dataclass
class Counters:
    produced: int = 0
    bad: int = 0
    rates: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=40))

    def rate(self, now: float, stored: int) -> float:
        """Events stored per second over the last ~5 seconds."""
        self.rates.append((now, stored))
        while len(self.rates) > 2 and now - self.rates[0][0] > 5.0:
            self.rates.popleft()
        t0, s0 = self.rates[0]
        return (stored - s0) / (now - t0) if now > t0 else 0.0


@dataclass(frozen=True)
class DemoRedis:
    """The Redis the demo wrote to, as the live views (`tail`, `status`) need it after the demo."""

    url: str
    private: bool
    pid: int | None = None  # of a private redis-server left running (--keep-redis)


def run_demo(settings: Settings, duration_s: float | None, rate_per_s: float, console: Console,
             redis_url: str | None = None, users: int = 8, keep_redis: bool = False) -> None:
    store = Store.open(settings)  # fails here, plainly, if another process holds the embedded store
    # Per-user streams appear as the producer starts: re-scan often so they are read at once.
    demo_settings = replace(settings, claim_idle_ms=5000, stream_rescan_s=0.5)
    try:
        if redis_url:
            result = _run(replace(demo_settings, redis_url=redis_url), store, duration_s, rate_per_s, users,
                          console, f"Redis at {redact_url(redis_url)}")
            used = DemoRedis(redis_url, private=False)
        else:
            server = RedisServer(own_session=True).start()
            try:
                result = _run(replace(demo_settings, redis_url=server.url), store, duration_s, rate_per_s, users,
                              console, f"a private Redis at {server.url}")
            finally:
                if not keep_redis:
                    server.cleanup()  # only now: the worker has finished and acked what it stored
            pid = server.process.pid if keep_redis and server.process else None
            used = DemoRedis(server.url, private=True, pid=pid)
    except KeyboardInterrupt:  # Ctrl-C before the dashboard took over the signal
        console.print("interrupted")
        return
    _summary(*result, settings, console)
    next_steps(settings, used, store, console, flowtrack_command())


def _run(settings: Settings, store: Store, duration_s: float | None, rate_per_s: float, users: int,
         console: Console, where: str) -> tuple[Pipeline, Store, Counters]:
    console.print(f"[bold]flowtrack demo[/]: {escape(where)}, {store.description}, {rate_per_s:g} synthetic "
                  f"events/s from {users} users…", soft_wrap=True)
    pipeline, counters = asyncio.run(_demo(settings, store, duration_s, rate_per_s, users, console))
    return pipeline, store, counters


async def _demo(settings: Settings, store: Store, duration_s: float | None, rate_per_s: float, users: int,
                console: Console) -> tuple[Pipeline, Counters]:
    # a dead --redis-url fails here, plainly, instead of producing nothing
    redis = await guarded(lambda: connect(settings))
    pipeline = Pipeline(settings, store=store)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    counters = Counters()
    config = ProduceConfig(users=users, shape="mixed")
    # produce() only pipelines XADDs, which a cluster client routes per key (its annotation: producer.py)
    producer = asyncio.create_task(produce(
        redis, config, rate_per_s=rate_per_s, stop=stop,  # type: ignore[arg-type]
        on_progress=lambda n: setattr(counters, "produced", n)))
    saboteur = asyncio.create_task(_bad_entries(redis, config, stop, counters))
    worker = asyncio.create_task(pipeline.run())
    snapshot = Snapshot()
    refresher = asyncio.create_task(_refresh(store, snapshot, stop))
    producer.add_done_callback(lambda _: stop.set())  # a producer that fails (Redis gone) ends the demo
    started = time.monotonic()

    def elapsed() -> float:
        return time.monotonic() - started

    try:
        if console.is_terminal:
            with Live(_view(pipeline, counters, snapshot, 0.0, console.width), console=console,
                      refresh_per_second=4, transient=False) as live:
                while not await _tick(stop, duration_s, elapsed(), 0.25):
                    live.update(_view(pipeline, counters, snapshot, elapsed(), console.width))
        else:  # piped: one plain progress line a second
            while not await _tick(stop, duration_s, elapsed(), 1.0):
                stats = pipeline.stats
                console.print(f"{elapsed():5.1f}s  produced {counters.produced:,}  stored {stats.stored:,}  "
                              f"rejected {stats.rejected:,}  "
                              f"{counters.rate(time.monotonic(), stats.stored):,.0f} events/s", soft_wrap=True)
    finally:
        stop.set()
        await asyncio.gather(producer, saboteur, refresher, return_exceptions=True)
        pipeline.request_stop()
        await worker
        await pipeline.close()
        await redis.aclose()
    failure = producer.exception() if not producer.cancelled() else None
    if failure is not None:
        where = redact_url(settings.redis_url)
        raise FlowtrackError(f"the demo stopped: writing to Redis at {where} failed: {failure}")
    return pipeline, counters


async def _tick(stop: asyncio.Event, duration_s: float | None, elapsed_s: float, wait_s: float) -> bool:
    """Wait a little; True when the demo should end."""
    if stop.is_set() or (duration_s is not None and elapsed_s >= duration_s):
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=wait_s)
    return stop.is_set()


async def _bad_entries(redis: Any, config: ProduceConfig, stop: asyncio.Event, counters: Counters) -> None:
    index = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=BAD_EVERY_S)
        if stop.is_set():
            return
        await redis.xadd(f"{config.stream_prefix}:{index % config.users + 1}", BAD_ENTRIES[index % len(BAD_ENTRIES)])
        counters.bad += 1
        index += 1


async def _refresh(store: Store, snapshot: Snapshot, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.to_thread(_read_store, store, snapshot)
            snapshot.error = ""
        except Exception as exc:  # the schema may not exist in the first instants; keep the dashboard alive
            snapshot.error = " ".join(str(exc).split())[:120]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


def _read_store(store: Store, snapshot: Snapshot) -> None:
    """Two small reads of the last minute of the time-ordered copy (a key range; FINAL is partition-local there),
    then the most recent ended flow."""
    _, snapshot.latest = store.query(
        "SELECT ts, user_id, session_id, node_id, parent_id, event_type FROM flowtrack.events_by_time FINAL "
        "WHERE ts >= now64(3) - INTERVAL 30 SECOND ORDER BY ts DESC LIMIT 8")
    _, last = store.query(
        "SELECT session_id, user_id FROM flowtrack.events_by_time WHERE (is_end = 1 OR is_error = 1) "
        "AND ts >= now64(3) - INTERVAL 60 SECOND ORDER BY ts DESC LIMIT 1")
    if last:
        flow = flows.load_flow(store, str(last[0][0]), str(last[0][1]))
        if flow is not None:
            snapshot.flow, snapshot.placed = flow, flows.place_nodes(flow.nodes, flow.started_at)


def _view(pipeline: Pipeline, counters: Counters, snapshot: Snapshot, elapsed_s: float, width: int) -> Group:
    stats = pipeline.stats
    unread = max(0, counters.produced + counters.bad - stats.read)
    in_flight = max(0, stats.read - stats.acked)
    head = Table.grid(padding=(0, 3))
    for _ in range(4):
        head.add_column()
    head.add_row(f"elapsed [bold]{elapsed_s:5.1f}s[/]", f"produced [bold]{counters.produced:,}[/]",
                 f"stored [bold green]{stats.stored:,}[/]", f"rejected [bold red]{stats.rejected:,}[/]")
    head.add_row(f"events/s [bold]{counters.rate(time.monotonic(), stats.stored):,.0f}[/]",
                 f"lag [bold]{unread:,}[/] unread, {in_flight:,} in flight",
                 f"batches {stats.batches:,}", f"last insert {stats.last_insert_s * 1000:.0f}ms")
    latest = Table(box=None, padding=(0, 1), show_header=True, header_style="dim")
    for name in ("time (UTC)", "user", "session", "node ← parent", "type"):
        latest.add_column(name, no_wrap=True)
    for ts, user, session, node, parent, event_type in snapshot.latest:
        latest.add_row(format_time(ts, with_date=False), data(user), data(session),
                       data(f"{node} ← {parent}" if parent else node),
                       data(event_type, style=TYPE_STYLES.get(str(event_type), "")))
    parts: list[RenderableType] = [Panel(head, title="flowtrack demo — Ctrl-C to stop", border_style="cyan")]
    if not snapshot.latest:
        waiting = "waiting for the first batch to land…" if not snapshot.error else f"store: {snapshot.error}"
        parts.append(Panel(data(waiting, style="dim"), title="latest stored events"))
    else:
        parts.append(Panel(latest, title="latest stored events"))
    if snapshot.flow is not None:
        lines: list[RenderableType] = [flow_header(snapshot.flow)]
        tree = tree_lines(snapshot.placed, width - 4, attr_width=24)
        lines.extend(tree[:TREE_LINES])
        if len(tree) > TREE_LINES:
            lines.append(Text(f"… {len(tree) - TREE_LINES} more nodes", style="dim"))
        for line in lines:
            if isinstance(line, Text):
                line.no_wrap, line.overflow = True, "ellipsis"
        parts.append(Panel(Group(*lines), title="most recent finished flow"))
    return Group(*parts)


def _summary(pipeline: Pipeline, store: Store, counters: Counters, settings: Settings, console: Console) -> None:
    _, rows = store.query(
        "SELECT status, count(), sum(event_count) FROM flowtrack.flow_sessions GROUP BY status ORDER BY status")
    table = Table(title="what landed in ClickHouse (flowtrack.flow_sessions)", title_justify="left")
    for column in ("status", "sessions", "events"):
        table.add_column(column, justify="left" if column == "status" else "right")
    for status, sessions, events in rows:
        table.add_row(str(status), f"{sessions:,}", f"{events:,}")
    console.print(table)
    stats = pipeline.stats
    console.print(f"summary: produced {counters.produced:,} events (+{counters.bad} deliberately broken); "
                  f"stored {stats.stored:,}, rejected {stats.rejected:,}, in {stats.batches:,} batches "
                  f"over {stats.uptime_s:.1f}s. Data is in the {store.description}.", soft_wrap=True)


def flowtrack_command(argv0: str | None = None) -> str:
    """How to run flowtrack again, the way this one was launched: `flowtrack` when that is what PATH finds,
    else the script as it was typed (`.venv/bin/flowtrack`, valid from the same directory), else
    `python -m worker.cli` with this interpreter."""
    script = Path(argv0 if argv0 is not None else sys.argv[0])
    if script.name != "flowtrack":
        return f"{shlex.quote(sys.executable)} -m worker.cli"
    on_path = shutil.which("flowtrack")
    if on_path and Path(on_path).resolve() == script.resolve():
        return "flowtrack"
    return shlex.quote(str(script))


def next_steps(settings: Settings, redis: DemoRedis, store: Store, console: Console, command: str) -> None:
    """Commands that work as printed once the demo has exited."""
    _, last = store.query("SELECT user_id, session_id FROM flowtrack.events_by_time WHERE is_end = 1 OR is_error = 1 "
                          "ORDER BY ts DESC LIMIT 1")
    user, session = (str(last[0][0]), str(last[0][1])) if last else ("1", "SESSION_ID")
    store_opt = "" if settings.clickhouse_url is None else f" --clickhouse-url {shlex.quote(settings.clickhouse_url)}"
    alive = not (redis.private and redis.pid is None)  # a private Redis not kept stopped with the demo
    redis_opt = f" --redis-url {shlex.quote(redis.url)}" if alive else ""
    query = shlex.quote("SELECT status, count() FROM flowtrack.flow_sessions GROUP BY status")
    console.print("\n[bold]next, try[/] (once this command has exited: one process per embedded store):")
    for line in (f"{command} history {shlex.quote(user)}{store_opt}",
                 f"{command} show {shlex.quote(session)}{store_opt}",
                 f"{command} rejected{redis_opt}{store_opt}", f"{command} sql {query}{store_opt}"):
        console.print(f"  [bold cyan]{escape(line)}[/]", soft_wrap=True)
    if not alive:
        console.print(f"  live views read the streams, and the private Redis stopped with the demo: run "
                      f"[bold]{escape(command)} demo --keep-redis[/] to leave it running afterwards, or "
                      f"[bold]{escape(command)} demo --redis-url redis://HOST:PORT/0[/] with a Redis of your own; "
                      f"while a demo runs, [bold]{escape(command)} tail --redis-url URL[/] (the URL it prints "
                      f"first) works in another shell.", soft_wrap=True)
        return
    if redis.private:
        console.print(f"  live views: the private Redis is still running at {escape(redis.url)} (pid {redis.pid}; "
                      f"stop it with [bold]kill {redis.pid}[/]):", soft_wrap=True)
    else:
        console.print(f"  live views: the streams stay in {escape(redis.url)}:", soft_wrap=True)
    for line in (f"{command} tail{redis_opt} --since 10m", f"{command} status{redis_opt}{store_opt}"):
        console.print(f"  [bold cyan]{escape(line)}[/]", soft_wrap=True)
