"""Demo: a private Redis, the embedded store, the synthetic producer and the worker in one process,
with a live terminal view, until Ctrl-C or a duration; then a summary and the next commands to try."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import replace

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from worker.pipeline import Pipeline
from worker.producer import ProduceConfig, produce
from worker.redisserver import RedisServer
from worker.settings import Settings
from worker.source import connect


def run_demo(settings: Settings, duration_s: float | None, rate_per_s: float, console: Console) -> None:
    console.print("[bold]flowtrack demo[/]: starting a private Redis and the embedded ClickHouse store…")
    with RedisServer() as server:
        demo_settings = replace(settings, redis_url=server.url, claim_idle_ms=5000)
        asyncio.run(_demo(demo_settings, duration_s, rate_per_s, console))


async def _demo(settings: Settings, duration_s: float | None, rate_per_s: float, console: Console) -> None:
    pipeline = Pipeline(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    redis = connect(settings)
    produced = [0]
    producer = asyncio.create_task(produce(
        redis, ProduceConfig(users=8, shape="mixed"), rate_per_s=rate_per_s, stop=stop,
        on_progress=lambda n: produced.__setitem__(0, n)))
    worker = asyncio.create_task(pipeline.run())
    started = time.monotonic()
    try:
        with Live(_view(pipeline, produced[0], 0.0, settings), console=console, refresh_per_second=4) as live:
            while not stop.is_set():
                if duration_s is not None and time.monotonic() - started >= duration_s:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=0.25)
                live.update(_view(pipeline, produced[0], time.monotonic() - started, settings))
    finally:
        stop.set()
        await producer
        pipeline.request_stop()
        await worker
        await pipeline.close()
        await redis.aclose()
    _summary(pipeline, produced[0], console)


def _view(pipeline: Pipeline, produced: int, elapsed_s: float, settings: Settings) -> Panel:
    stats = pipeline.stats
    table = Table.grid(padding=(0, 2))
    table.add_row("elapsed", f"{elapsed_s:5.1f}s")
    table.add_row("produced", f"{produced:,}")
    table.add_row("stored", f"{stats.stored:,}")
    table.add_row("rejected", f"{stats.rejected:,}")
    table.add_row("batches", f"{stats.batches:,}")
    table.add_row("events/s", f"{stats.stored / elapsed_s:,.0f}" if elapsed_s > 0 else "-")
    return Panel(Group(table), title="flowtrack demo (Ctrl-C to stop)")


def _summary(pipeline: Pipeline, produced: int, console: Console) -> None:
    store = pipeline.store
    _, rows = store.query(
        "SELECT status, count(), sum(event_count) FROM flowtrack.flow_sessions GROUP BY status ORDER BY status")
    table = Table(title="what landed in ClickHouse (flowtrack.flow_sessions)")
    for column in ("status", "sessions", "events"):
        table.add_column(column)
    for status, sessions, events in rows:
        table.add_row(str(status), f"{sessions:,}", f"{events:,}")
    console.print(table)
    console.print(f"produced {produced:,} events; stored {pipeline.stats.stored:,}, rejected "
                  f"{pipeline.stats.rejected:,}. The store is in {store.description}.")
    console.print('next: [bold]flowtrack sql "SELECT * FROM flowtrack.flow_sessions LIMIT 10"[/]')
