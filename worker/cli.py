"""flowtrack command line: thin wrappers that turn options into Settings and call the stage modules."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from worker.errors import ConfigError, FlowtrackError, StoreLockedError
from worker.settings import Settings

app = typer.Typer(
    name="flowtrack",
    help="Watch and query the interaction flows of LLM chat and agent platforms: "
    "Redis Streams -> ClickHouse -> Grafana and the terminal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

RedisUrl = Annotated[str | None, typer.Option("--redis-url", help="Redis URL [env FLOWTRACK_REDIS_URL]")]
ClickhouseUrl = Annotated[str | None, typer.Option(
    "--clickhouse-url", help="chdb:///abs/path (embedded) or http(s)://user:pass@host:8123/flowtrack; "
    "default: the embedded store in ./.flowtrack [env FLOWTRACK_CLICKHOUSE_URL]")]
Streams = Annotated[str | None, typer.Option(
    "--streams", help="comma-separated stream names and glob patterns [env FLOWTRACK_STREAMS]")]
Group = Annotated[str | None, typer.Option("--group", help="consumer group [env FLOWTRACK_GROUP]")]
Consumer = Annotated[str | None, typer.Option(
    "--consumer", help="consumer name, stable per replica (default: hostname) [env FLOWTRACK_CONSUMER]")]
LogLevel = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error")]


def load_settings(**overrides: Any) -> Settings:
    if isinstance(overrides.get("streams"), str):
        overrides["streams"] = tuple(s.strip() for s in overrides["streams"].split(",") if s.strip())
    return Settings.from_env(overrides=overrides)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def guarded_command(func: F) -> F:
    """Turn flowtrack's own errors into one clear line and an exit code, not a traceback."""
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            raise fail(str(exc), 2) from None
        except StoreLockedError as exc:
            raise fail(str(exc), 3) from None
        except FlowtrackError as exc:
            raise fail(str(exc), 1) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@guarded_command
def run(
    drain: Annotated[bool, typer.Option(
        "--drain", help="process everything currently in the streams (pending included), then exit 0")] = False,
    redis_url: RedisUrl = None, clickhouse_url: ClickhouseUrl = None, streams: Streams = None,
    group: Group = None, consumer: Consumer = None,
    batch_max_rows: Annotated[int | None, typer.Option(help="flush a batch at this many entries")] = None,
    batch_max_wait_s: Annotated[float | None, typer.Option(
        help="flush a batch when its oldest entry is this old")] = None,
    claim_idle_ms: Annotated[int | None, typer.Option(help="reclaim entries idle this long on dead consumers")] = None,
    max_deliveries: Annotated[int | None, typer.Option(help="reject an entry delivered more often than this")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="serve /metrics and /healthz on this port (0 = off)")] = None,
    log_level: LogLevel = "info",
) -> None:
    """Run the worker: consume the streams through the consumer group into ClickHouse.

    Without --drain it runs until SIGTERM/SIGINT, then finishes the in-flight batch and exits 0.
    """
    setup_logging(log_level)
    settings = load_settings(redis_url=redis_url, clickhouse_url=clickhouse_url, streams=streams, group=group,
                             consumer=consumer, batch_max_rows=batch_max_rows, batch_max_wait_s=batch_max_wait_s,
                             claim_idle_ms=claim_idle_ms, max_deliveries=max_deliveries, metrics_port=metrics_port)
    from worker.pipeline import run_worker

    ok = asyncio.run(run_worker(settings, drain=drain))
    if not ok:
        raise typer.Exit(1)


@app.command()
@guarded_command
def migrate(clickhouse_url: ClickhouseUrl = None, log_level: LogLevel = "info") -> None:
    """Apply schemas/clickhouse migrations to the store (idempotent; `run` does it at start too)."""
    setup_logging(log_level)
    from worker.store import Store

    store = Store.open(load_settings(clickhouse_url=clickhouse_url))
    applied = store.migrate()
    console.print(f"{store.description}: " + (f"applied {', '.join(applied)}" if applied else "schema up to date"))


@app.command()
@guarded_command
def produce(
    count: Annotated[int | None, typer.Option(help="events to write (default: until Ctrl-C)")] = None,
    rate: Annotated[float | None, typer.Option(help="events per second (default: as fast as possible)")] = None,
    users: Annotated[int, typer.Option(help="distinct users")] = 20,
    shape: Annotated[str, typer.Option(help="entry shape: flat, json (a `data` field) or mixed")] = "flat",
    single_stream: Annotated[bool, typer.Option(
        "--single-stream", help="write everything to `flow_events` (user_id in the entry) "
        "instead of one stream per user")] = False,
    error_ratio: Annotated[float, typer.Option(help="share of sessions that end in an error")] = 0.08,
    seed: Annotated[int | None, typer.Option(help="random seed, for reproducible flows")] = None,
    redis_url: RedisUrl = None,
) -> None:
    """Write realistic synthetic agent flows (users, sessions, trees of LLM/tool steps) to Redis Streams."""
    if shape not in ("flat", "json", "mixed"):
        raise fail("--shape must be flat, json or mixed", 2)
    from worker.producer import ProduceConfig
    from worker.producer import produce as produce_events
    from worker.source import connect

    settings = load_settings(redis_url=redis_url)
    config = ProduceConfig(users=users, shape=shape, stream_per_user=not single_stream,  # type: ignore[arg-type]
                           error_ratio=error_ratio, seed=seed)

    async def _go() -> int:
        redis = connect(settings)
        try:
            return await produce_events(redis, config, count=count, rate_per_s=rate,
                                        on_progress=lambda n: err_console.print(f"\rsent {n}", end=""))
        finally:
            await redis.aclose()

    try:
        sent = asyncio.run(_go())
    except KeyboardInterrupt:
        sent = -1
    err_console.print()
    console.print(f"produced {sent if sent >= 0 else 'events until interrupted'} to {settings.redis_url}")


@app.command()
@guarded_command
def demo(
    duration_s: Annotated[float | None, typer.Option(
        "--duration-s", help="stop after this many seconds (default: until Ctrl-C)")] = None,
    rate: Annotated[float, typer.Option(help="synthetic events per second")] = 300.0,
    clickhouse_url: ClickhouseUrl = None,
) -> None:
    """The one-command tour: a private Redis, the embedded store, a synthetic producer, the worker and a
    live terminal view, until Ctrl-C (or --duration-s); then a summary and what to try next."""
    setup_logging("warning")
    from worker.demo import run_demo

    run_demo(load_settings(clickhouse_url=clickhouse_url), duration_s=duration_s, rate_per_s=rate, console=console)


@app.command()
@guarded_command
def sql(
    statement: Annotated[str, typer.Argument(help="a read-only statement; bind values as {name:Type}")],
    param: Annotated[list[str] | None, typer.Option(
        "--param", "-p", help="name=value for a {name:Type} placeholder (repeatable)")] = None,
    output: Annotated[str, typer.Option("--format", "-f", help="table, csv or json")] = "table",
    clickhouse_url: ClickhouseUrl = None,
) -> None:
    """Run read-only ad-hoc SQL against the store, e.g.
    flowtrack sql "SELECT status, count() FROM flowtrack.flow_sessions GROUP BY status"."""
    from worker.query import format_csv, format_json, parse_params, run_read_only
    from worker.store import Store

    if output not in ("table", "csv", "json"):
        raise fail("--format must be table, csv or json", 2)
    store = Store.open(load_settings(clickhouse_url=clickhouse_url))
    columns, rows = run_read_only(store, statement, parse_params(param or []))
    if output == "json":
        sys.stdout.write(format_json(columns, rows) + "\n")
    elif output == "csv":
        sys.stdout.write(format_csv(columns, rows))
    else:
        from worker.views import print_table

        print_table(console, columns, rows)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
