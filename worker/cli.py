"""flowtrack command line: thin wrappers that turn options into Settings and call the stage modules."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from redis.exceptions import NoPermissionError
from rich.console import Console

from worker.errors import ConfigError, FlowtrackError, StoreLockedError
from worker.settings import Settings, redact_url

MAX_LIMIT = 1_000_000  # rows a listing may ask for (the store's LIMIT takes a UInt32; more would not fit a terminal)


def _above_zero(value: float | None) -> float | None:
    """A rate or a duration: a finite number above 0 (NaN passes click's ranges, and inf never ends)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a finite number above 0")
    return value

app = typer.Typer(
    name="flowtrack",
    help="Watch and query the interaction flows of LLM chat and agent platforms: "
    "Redis Streams -> ClickHouse -> Grafana and the terminal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def stdout_to_devnull() -> None:
    """The reader of our output went away (`| head`): point stdout at /dev/null so nothing more (not even
    the interpreter's final flush) complains about it."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class PipeConsole(Console):
    """rich exits 1 when stdout is a closed pipe; that is how `flowtrack tail | head -1` ends: exit 0."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        stdout_to_devnull()
        raise SystemExit(0)


console = PipeConsole()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

RedisUrl = Annotated[str | None, typer.Option("--redis-url", help="Redis URL [env FLOWTRACK_REDIS_URL]")]
ClickhouseUrl = Annotated[str | None, typer.Option(
    "--clickhouse-url", help="chdb:///abs/path (embedded) or http(s)://user:pass@host:8123/flowtrack; "
    "default: the embedded store in ./.flowtrack [env FLOWTRACK_CLICKHOUSE_URL; a server's cluster: "
    "env FLOWTRACK_CLICKHOUSE_CLUSTER=<remote_servers name>]")]
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
    from rich.text import Text

    from worker.views import visible

    # Messages quote user input and stored data: escaped, never read as markup.
    err_console.print(Text.assemble(("error:", "bold red"), " ", visible(message)), soft_wrap=True)
    return typer.Exit(code)


def quiet_closed_stdout() -> typer.Exit:
    """A closed stdout is how pipes end (`| head -1`), not an error: exit 0, quietly."""
    stdout_to_devnull()
    return typer.Exit(0)


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
        except BrokenPipeError:
            raise quiet_closed_stdout() from None
        except NoPermissionError as exc:  # the Redis user lacks a command or a key: one line, as `produce` says it
            raise fail(f"Redis refused a command: {exc} (the commands flowtrack needs: README, \"Least privilege\")",
                       1) from None

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
    max_deliveries: Annotated[int | None, typer.Option(
        help="deliveries before an entry is re-delivered in ever smaller groups (4096 ... 1); delivered alone once "
             "more without being acknowledged, it is rejected as poison")] = None,
    max_inflight_bytes: Annotated[int | None, typer.Option(
        help="at most this many bytes of entries read and not yet acknowledged")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="serve /metrics and /healthz on this port (0 = off)")] = None,
    log_level: LogLevel = "info",
) -> None:
    """Run the worker: consume the streams through the consumer group into ClickHouse.

    Without --drain it runs until SIGTERM/SIGINT, then finishes the in-flight batch and exits 0.
    """
    setup_logging(log_level)
    settings = load_settings(redis_url=redis_url, clickhouse_url=clickhouse_url, streams=streams, group=group,
                             consumer=consumer, batch_max_rows=batch_max_rows, batch_max_wait_s=batch_max_wait_s,
                             claim_idle_ms=claim_idle_ms, max_deliveries=max_deliveries,
                             max_inflight_bytes=max_inflight_bytes, metrics_port=metrics_port)
    from worker.pipeline import run_worker

    ok = asyncio.run(run_worker(settings, drain=drain))
    if not ok:
        raise fail("the drain did not finish: stopped before every stream was read and nothing was pending "
                   "(what it stored is acknowledged; run it again to go on)")


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
    count: Annotated[int | None, typer.Option(help="events to write (default: until Ctrl-C)", min=1)] = None,
    rate: Annotated[float | None, typer.Option(help="events per second (default: as fast as possible)",
                                               callback=_above_zero)] = None,
    users: Annotated[int, typer.Option(help="distinct users", min=1)] = 20,
    shape: Annotated[str, typer.Option(help="entry shape: flat, json (a `data` field) or mixed")] = "flat",
    single_stream: Annotated[bool, typer.Option(
        "--single-stream", help="write everything to `flow_events` (user_id in the entry) "
        "instead of one stream per user")] = False,
    error_ratio: Annotated[float, typer.Option(help="share of sessions that end in an error")] = 0.08,
    seed: Annotated[int | None, typer.Option(help="random seed, for reproducible flows")] = None,
    shard_tags: Annotated[int | None, typer.Option(
        "--shard-tags", help="name per-user streams flow_events:{sNN}:<user> over this many hash tags, so a worker "
        "reads many users' streams per command on a Redis Cluster (default: 64 on a cluster, 0 = "
        "flow_events:<user> on a plain Redis)")] = None,
    redis_url: RedisUrl = None,
) -> None:
    """Write realistic synthetic agent flows (users, sessions, trees of LLM/tool steps) to Redis Streams.

    FLOWTRACK_REDIS_URL may name a plain Redis or any node of a Redis Cluster (found out from the server)."""
    if shape not in ("flat", "json", "mixed"):
        raise fail("--shape must be flat, json or mixed", 2)
    if shard_tags is not None and not 0 <= shard_tags <= 100:
        raise fail("--shard-tags must be between 0 and 100", 2)
    from dataclasses import replace

    from redis.exceptions import RedisClusterException, RedisError

    from worker.producer import CLUSTER_SHARD_TAGS, ProduceConfig, ProgressLine, refusal
    from worker.producer import produce as produce_events
    from worker.redisclient import connect, is_cluster
    from worker.source import guarded

    settings = load_settings(redis_url=redis_url)
    config = ProduceConfig(users=users, shape=shape, stream_per_user=not single_stream,  # type: ignore[arg-type]
                           error_ratio=error_ratio, seed=seed)

    progress = ProgressLine(sys.stderr)
    where = redact_url(settings.redis_url)

    async def _go() -> int:
        nonlocal config, where
        redis = await guarded(lambda: connect(settings))  # a plain Redis or a cluster, as the server says
        if is_cluster(redis):
            tags = CLUSTER_SHARD_TAGS if shard_tags is None else shard_tags
            where = f"the Redis Cluster at {where}" + (f" (streams flow_events:{{sNN}}:<user>, {tags} tags)"
                                                      if tags and config.stream_per_user else "")
        else:
            tags = shard_tags or 0
        config = replace(config, shard_tags=tags)
        try:
            return await guarded(lambda: produce_events(redis, config, count=count, rate_per_s=rate,
                                                        on_progress=progress))
        finally:
            await redis.aclose()

    try:
        sent = asyncio.run(_go())
    except KeyboardInterrupt:
        sent = -1
    except (RedisError, RedisClusterException) as exc:  # refused (ACL, wrong type, OOM…): one line, not a traceback
        raise fail(f"Redis refused the entries: {refusal(exc)}") from None
    finally:
        progress.finish()
    console.print(f"produced {sent if sent >= 0 else 'events until interrupted'} to {where}", soft_wrap=True)


@app.command()
@guarded_command
def demo(
    duration_s: Annotated[float | None, typer.Option(
        "--duration-s", help="stop after this many seconds (default: until Ctrl-C)", callback=_above_zero)] = None,
    rate: Annotated[float, typer.Option(help="synthetic events per second", callback=_above_zero)] = 300.0,
    users: Annotated[int, typer.Option(help="distinct synthetic users (one stream each)", min=1)] = 8,
    redis_url: Annotated[str | None, typer.Option(
        "--redis-url", help="use this Redis instead of a private one (keeps the streams for `flowtrack tail` "
        "and `flowtrack status`)")] = None,
    keep_redis: Annotated[bool, typer.Option(
        "--keep-redis", help="leave the private Redis running afterwards, for `flowtrack tail` and `status` "
        "(its URL and how to stop it are printed)")] = False,
    clickhouse_url: ClickhouseUrl = None,
) -> None:
    """The one-command tour: Redis, the store, a producer, the worker and a live dashboard.

    A private Redis (or --redis-url), the embedded store, a synthetic producer and
    the worker in one process, with a live dashboard (events/s, lag, latest events,
    the most recent flow as a tree) until Ctrl-C or --duration-s; then a summary and
    what to try next.
    """
    if keep_redis and redis_url:
        raise fail("--keep-redis keeps the private Redis; with --redis-url the streams already stay there", 2)
    setup_logging("warning")
    from worker.demo import run_demo

    run_demo(load_settings(clickhouse_url=clickhouse_url), duration_s=duration_s, rate_per_s=rate, console=console,
             redis_url=redis_url, users=users, keep_redis=keep_redis)


@app.command()
@guarded_command
def sql(
    statement: Annotated[str, typer.Argument(help="a read-only statement; bind values as {name:Type}")],
    param: Annotated[list[str] | None, typer.Option(
        "--param", "-p", help="name=value for a {name:Type} placeholder (repeatable)")] = None,
    output: Annotated[str, typer.Option("--format", "-f", help="table, csv or json")] = "table",
    timeout_s: Annotated[float, typer.Option(
        "--timeout-s", help="embedded store: stop the statement after this long (a server's profile sets its own)"
    )] = 300.0,
    clickhouse_url: ClickhouseUrl = None,
) -> None:
    """Run read-only ad-hoc SQL against the store, e.g.
    flowtrack sql "SELECT status, count() FROM flowtrack.flow_sessions GROUP BY status".

    One reading statement (SELECT, WITH, DESCRIBE, SHOW, EXISTS, EXPLAIN), as the
    ClickHouse parser reads it, run on a read-only connection. Refused: writes, DDL,
    SETTINGS that lift readonly, several statements, INTO OUTFILE, and table
    functions that leave the store (file, url, s3, remote, mysql, executable, ...).
    Errors are ClickHouse's message on one line, positions counted in your text.
    Exit 0 ok; 1 the statement was refused or failed; 2 bad options; 3 the
    embedded store is in use by another process.
    """
    from worker.query import format_csv, format_json, parse_params, run_read_only
    from worker.store import Store

    if output not in ("table", "csv", "json"):
        raise fail("--format must be table, csv or json", 2)
    if not 0 < timeout_s < 1e7:
        raise fail("--timeout-s must be a positive number of seconds", 2)
    store = Store.open(load_settings(clickhouse_url=clickhouse_url))
    columns, rows = run_read_only(store, statement, parse_params(param or []), timeout_s)
    if output == "json":
        sys.stdout.write(format_json(columns, rows) + "\n")
    elif output == "csv":
        sys.stdout.write(format_csv(columns, rows))
    else:
        from worker.views import print_table

        print_table(console, columns, rows)


# --- terminal views (issue 5) ---
OutputFormat = Annotated[str, typer.Option("--format", "-f", help="table, json or csv")]


def _emit_records(columns: list[str], rows: list[Any], output: str) -> bool:
    """JSON/CSV to stdout for scripts; False when the caller should draw a table."""
    from worker.query import format_csv, format_json

    if output not in ("table", "json", "csv"):
        raise fail("--format must be table, json or csv", 2)
    if output == "json":
        sys.stdout.write(format_json(columns, rows) + "\n")
    elif output == "csv":
        sys.stdout.write(format_csv(columns, rows))
    return output != "table"


def _print_wide(renderable: Any) -> None:
    """Tables fit the terminal; piped output (scripts, docs) gets room instead of squeezed columns."""
    if console.is_terminal:
        console.print(renderable)
    else:
        PipeConsole(width=max(console.width, 160)).print(renderable)


def _print_lines(lines: list[Any], per_print: int = 500) -> None:
    """Long lines: cropped on a terminal, whole when piped (scripts, less -S).

    Lines go to rich in chunks: one print per line costs more than drawing the line (a 50k-node flow).
    """
    from rich.text import Text

    for start in range(0, len(lines), per_print):
        chunk = Text("\n").join(lines[start:start + per_print])
        if console.is_terminal:
            console.print(chunk, no_wrap=True, overflow="ellipsis")
        else:
            console.print(chunk, soft_wrap=True)


@app.command()
@guarded_command
def tail(
    user: Annotated[str | None, typer.Option("--user", "-u", help="only this user's events")] = None,
    session: Annotated[str | None, typer.Option("--session", "-s", help="only this session's events")] = None,
    event_type: Annotated[list[str] | None, typer.Option(
        "--type", "-t", help="only this event type (repeatable)")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", help="first show entries from this time: 10m, 2h, 1d, ISO-8601 or epoch (default: only new "
        "ones)")] = None,
    count: Annotated[int | None, typer.Option("--count", "-n", help="exit after this many events", min=1)] = None,
    follow: Annotated[bool | None, typer.Option(
        "--follow/--no-follow", help="keep waiting for new events (default: follow, unless --since is given)")] = None,
    output: Annotated[str, typer.Option("--format", "-f", help="text, or json (one object per line)")] = "text",
    redis_url: RedisUrl = None, streams: Streams = None,
) -> None:
    """Live events as they arrive, read straight from the streams.

    Shows time, user, session, node <- parent, type and key attributes, for all users
    or filtered by --user, --session, --type; broken entries show as `rejected`.
    Reads with XREAD/XRANGE only, never through the consumer group: no pending
    entries, nothing taken from the worker. Follows until Ctrl-C; --since, --count
    and --no-follow bound it for scripts: flowtrack tail --since 10m --no-follow -f json
    """
    from worker.flows import REDIS_UNREACHABLE, parse_when
    from worker.redisclient import connect_sync
    from worker.tail import Tail, TailFilter
    from worker.views import tail_line, tail_record

    if output not in ("text", "json"):
        raise fail("--format must be text or json", 2)
    settings = load_settings(redis_url=redis_url, streams=streams)
    since_at = parse_when(since) if since else None
    keep_following = follow if follow is not None else since_at is None
    try:  # a plain Redis or any node of a cluster: the server says which
        client = connect_sync(settings)
    except REDIS_UNREACHABLE as exc:
        raise fail(f"Redis unreachable at {redact_url(settings.redis_url)}: {exc}") from None
    reader = Tail(client, settings, TailFilter(user, session, frozenset(event_type or ())))
    shown = 0

    def show(item: Any) -> bool:
        nonlocal shown
        if output == "json":
            import orjson

            sys.stdout.write(orjson.dumps(tail_record(item)).decode() + "\n")
            sys.stdout.flush()
        else:
            _print_lines([tail_line(item)])
        shown += 1
        return count is not None and shown >= count

    try:
        if since_at is not None:
            for item in reader.backlog(since_at):
                if show(item):
                    return
        if keep_following:
            if output == "text":
                err_console.print(f"[dim]following {', '.join(settings.streams)} on {redact_url(settings.redis_url)} "
                                  "(Ctrl-C to stop)[/]")
            for followed in reader.follow():
                if followed is not None and show(followed):
                    return
    except KeyboardInterrupt:
        pass
    except REDIS_UNREACHABLE as exc:
        raise fail(f"Redis unreachable at {redact_url(settings.redis_url)}: {exc}") from None
    finally:
        client.close()


@app.command()
@guarded_command
def history(
    user: Annotated[str | None, typer.Argument(help="the user whose sessions to list (default: all users)")] = None,
    since: Annotated[str, typer.Option(help="sessions started at or after: 2h, 7d, ISO-8601 or epoch")] = "7d",
    until: Annotated[str | None, typer.Option(help="sessions started before this time (default: now)")] = None,
    status: Annotated[str | None, typer.Option(help="only active, completed or failed sessions")] = None,
    sort: Annotated[str, typer.Option(
        help="started, ended, duration, events, errors, status, user or session")] = "started",
    ascending: Annotated[bool, typer.Option("--asc", help="ascending order (default: descending)")] = False,
    limit: Annotated[int, typer.Option(help="at most this many sessions", min=1, max=MAX_LIMIT)] = 100,
    output: OutputFormat = "table",
    clickhouse_url: ClickhouseUrl = None,
) -> None:
    """A user's sessions over a time range: start, end, duration, events, errors, status.

    Reads flowtrack.flow_sessions; sortable (--sort, --asc); --format json/csv for
    scripts. `ended` is empty while a session is active (its duration then runs to
    its last event). Without USER: all users.
    """
    from worker import flows
    from worker.store import Store
    from worker.views import history_table

    since_at = flows.parse_when(since)
    until_at = flows.parse_when(until) if until else None
    store = Store.open(load_settings(clickhouse_url=clickhouse_url))
    columns, rows = flows.history(store, user, since_at, until_at, status, sort, not ascending, limit)
    if _emit_records(columns, rows, output):
        return
    who = f"user {user}" if user is not None else "all users"
    _print_wide(history_table(rows, f"sessions of {who} since {since_at:%Y-%m-%d %H:%M} UTC, by {sort}"))
    console.print(f"[dim]{len(rows)} session(s)" + (f" (--limit {limit} reached)" if len(rows) >= limit else "")
                  + "[/]")


@app.command()
@guarded_command
def show(
    session_id: Annotated[str, typer.Argument(help="the session to draw")],
    user: Annotated[str | None, typer.Option(help="the session's user, if ids repeat across users")] = None,
    attr_width: Annotated[int, typer.Option(help="fold attribute values longer than this (0 = never)")] = 40,
    output: Annotated[str, typer.Option("--format", "-f", help="tree or json (nodes with depth)")] = "tree",
    clickhouse_url: ClickhouseUrl = None,
) -> None:
    """One flow as a tree: type, start offset, duration; errors highlighted.

    Long attributes are folded (--attr-width). Deep flows keep their last levels of
    guides on screen and show the depth; nodes whose parent never arrived are marked
    orphan. --format json lists the nodes in display order with their depth.
    """
    from worker import flows
    from worker.store import Store
    from worker.views import flow_header, tree_lines

    if output not in ("tree", "json"):
        raise fail("--format must be tree or json", 2)
    store = Store.open(load_settings(clickhouse_url=clickhouse_url))
    flow = flows.load_flow(store, session_id, user)
    if flow is None:
        raise fail(f"no session {session_id!r} in {store.description} (try `flowtrack history`)", 1)
    placed = flows.place_nodes(flow.nodes, flow.started_at)
    if output == "json":
        import orjson

        sys.stdout.write(orjson.dumps(flows.flow_as_records(flow, placed)).decode() + "\n")
        return
    _print_lines([flow_header(flow), *tree_lines(placed, console.width, attr_width)])


@app.command()
@guarded_command
def status(
    max_lag: Annotated[int, typer.Option(help="unhealthy when a stream has more unread entries than this",
                                         min=0)] = 10000,
    claim_idle_ms: Annotated[int | None, typer.Option(
        help="unhealthy when pending entries are idle longer than this [env FLOWTRACK_CLAIM_IDLE_MS]")] = None,
    no_store: Annotated[bool, typer.Option(
        "--no-store", help="check Redis only (e.g. while a worker holds the embedded store)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="the report as JSON")] = False,
    redis_url: RedisUrl = None, clickhouse_url: ClickhouseUrl = None, streams: Streams = None, group: Group = None,
) -> None:
    """Pipeline health: streams, group, lag, pending, consumers, rejected; exit code says.

    Every stream and the worker's group (length, lag, pending, stale pending,
    consumers and their idle time), and the store (events, sessions, freshness,
    rejected entries by reason). Exit 0 healthy; 1 unhealthy (Redis or store
    unreachable, lag over --max-lag, pending entries idle over the claim
    threshold); 3 nothing wrong found, but the embedded store is held by another
    process, so it was not checked (try --no-store).
    """
    from worker.flows import collect_status
    from worker.views import status_view

    settings = load_settings(redis_url=redis_url, clickhouse_url=clickhouse_url, streams=streams, group=group,
                             claim_idle_ms=claim_idle_ms)
    report = collect_status(settings, max_lag, check_store=not no_store)
    if as_json:
        import orjson

        sys.stdout.write(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_wide(status_view(report))
    if report.store_locked:  # said once, on stderr; exit 3 only when nothing else is wrong
        message = f"{report.store_error} The store was not checked; to check Redis only: flowtrack status --no-store."
        raise fail(message, 1 if report.problems else 3)
    if not report.healthy:
        raise typer.Exit(1)


@app.command()
@guarded_command
def rejected(
    entries: Annotated[list[str] | None, typer.Argument(
        help="STREAM ID...: these entries of one stream (to list, or with --replay to replay)")] = None,
    replay: Annotated[bool, typer.Option(
        "--replay", help="re-add the chosen entries to their stream, for the worker to read again")] = False,
    stream: Annotated[str | None, typer.Option(help="only entries of this stream")] = None,
    reason: Annotated[str | None, typer.Option(help="only entries whose reason contains this text")] = None,
    since: Annotated[str | None, typer.Option(help="only entries rejected since: 1h, 7d, ISO-8601")] = None,
    replay_all: Annotated[bool, typer.Option(
        "--all", help="with --replay and no filter: replay every one (--limit per run; run again for the rest)"
    )] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="replay even entries the current contract still rejects (they come back as rejections "
        "with today's reason)")] = False,
    again: Annotated[bool, typer.Option(
        "--again", help="replay entries already replayed once more (e.g. their replay was deleted before the "
        "worker read it); still visible once")] = False,
    limit: Annotated[int, typer.Option(help="at most this many entries", min=1, max=MAX_LIMIT)] = 50,
    output: OutputFormat = "table",
    redis_url: RedisUrl = None, clickhouse_url: ClickhouseUrl = None,
) -> None:
    """Rejected entries with their reasons; --replay sends chosen ones through again.

    Lists flowtrack.rejected_events, newest first, with the raw entry (folded).
    After a contract fix, --replay re-adds chosen entries to their stream with their
    original event_id and timestamp pinned (a replay is visible once, however often
    it runs) and a replayed_from attribute. Entries the current contract still
    rejects are skipped (--force sends them anyway); replays are recorded, shown
    in the `replayed` column, and not repeated (--again repeats them).
    E.g. flowtrack rejected --replay flow_events:7 1700000000000-0
    or   flowtrack rejected --replay --reason delivered
    """
    from worker import flows
    from worker.store import Store
    from worker.views import rejected_table, replay_table

    ids: list[str] = []
    if entries:
        if stream is not None:
            raise fail("give the stream either as the first argument or as --stream, not both", 2)
        stream, ids = entries[0], entries[1:]
        if not ids:
            raise fail("give entry ids after the stream: STREAM ID [ID...]", 2)
    if (force or again) and not replay:
        raise fail("--force and --again only change what --replay does", 2)
    if replay and not (ids or stream or reason or since or replay_all):
        raise fail("--replay needs entries (STREAM ID...), a filter (--stream/--reason/--since) or --all", 2)
    settings = load_settings(redis_url=redis_url, clickhouse_url=clickhouse_url)
    store = Store.open(settings)
    rows = flows.list_rejected(store, stream, ids, reason, flows.parse_when(since) if since else None,
                               max(limit, len(ids)))
    from worker.redisclient import connect_sync

    where = redact_url(settings.redis_url)
    client = None
    try:
        try:
            client = connect_sync(settings)  # a plain Redis or any node of a cluster: the server says which
            if not replay:
                flows.mark_queued_replays(client, rows)
        except flows.REDIS_UNREACHABLE as exc:
            if replay:
                raise fail(f"Redis unreachable at {where}: {exc}") from None
            err_console.print(f"[dim]Redis unreachable at {where}: queued replays not shown[/]")
        if not replay:
            records = [[r.received_at, r.source_stream, r.source_id, r.reason, r.raw, r.replayed] for r in rows]
            if _emit_records([*flows.REJECTED_COLUMNS, "replayed"], records, output):
                return
            _print_wide(rejected_table(rows))
            console.print(f"[dim]{len(rows)} entr{'y' if len(rows) == 1 else 'ies'}"
                          + (f" (--limit {limit} reached)" if len(rows) >= limit else "") + "[/]")
            return
        assert client is not None  # connected, or the replay failed above
        found = {r.source_id for r in rows}
        try:
            outcomes = flows.replay(store, client, settings, rows, force=force, again=again)
        except flows.REDIS_UNREACHABLE as exc:
            raise fail(f"Redis unreachable at {where}: {exc}") from None
    finally:
        if client is not None:
            client.close()
    outcomes += [flows.ReplayOutcome(stream or "", i, "not found", "no such rejected entry")
                 for i in ids if i not in found]
    columns = ["source_stream", "source_id", "action", "new_id", "event_id", "detail"]
    records = [[o.source_stream, o.source_id, o.action, o.new_id, o.event_id, o.detail] for o in outcomes]
    if not _emit_records(columns, records, output):
        _print_wide(replay_table(outcomes))
        done = sum(o.action == "replayed" for o in outcomes)
        console.print(f"{done} replayed, {len(outcomes) - done} not. The worker reads them like any entry "
                      "(none running? `flowtrack run --drain`).", soft_wrap=True)
    if len(rows) >= limit and not ids:
        # More may match: say so (a replayed entry is skipped when run again, so running it again goes on).
        err_console.print(f"[yellow]--limit {limit} reached:[/] more rejected entries may match; run it again "
                          "(replayed ones are skipped) or raise --limit", soft_wrap=True)
    from worker.source import matches

    unread = sorted({o.source_stream for o in outcomes if o.action == "replayed"
                     and not matches(settings.streams, o.source_stream)})
    if unread:
        from rich.text import Text

        from worker.views import visible

        # Stream names are Redis bytes: shown escaped, never read as markup.
        err_console.print(Text.assemble(("warning:", "yellow"), " ", visible(
            f"{', '.join(unread)} not in FLOWTRACK_STREAMS ({','.join(settings.streams)}): the worker will not read "
            "them")), soft_wrap=True)
    if any(o.action in ("still invalid", "not replayed", "not found") for o in outcomes):
        raise typer.Exit(1)


# --- benchmarks: ingest (issue 6) and queries (issue 9) ---
bench_app = typer.Typer(invoke_without_command=True, no_args_is_help=False)
app.add_typer(bench_app, name="bench")


@bench_app.callback()
@guarded_command
def bench(
    ctx: typer.Context,
    events: Annotated[int, typer.Option("--events", "-n", help="events in the backlog", min=1)] = 400_000,
    streams: Annotated[int, typer.Option(help="per-user streams the events are spread over", min=1)] = 100,
    workers: Annotated[int, typer.Option(help="`run --drain` worker processes in one consumer group", min=1)] = 1,
    rate: Annotated[float, typer.Option(help="events/s of the steady-rate latency phase",
                                        callback=_above_zero)] = 5000.0,
    latency_s: Annotated[float, typer.Option("--latency-s", help="length of the latency phase (0 = skip)")] = 20.0,
    naive_events: Annotated[int, typer.Option(help="events the naive per-event consumer handles at most")] = 3000,
    naive_max_s: Annotated[float, typer.Option(
        "--naive-max-s", help="time limit of the naive consumer; its rate is extrapolated (0 = skip)")] = 15.0,
    min_ratio: Annotated[float | None, typer.Option(
        help="PASS when pipeline/floor is at least this (default: 0.7; 0.5 with 10,000 streams or more)",
        callback=_above_zero)] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="exit 1 on FAIL (a target missed: ratio, p99, idle CPU, RSS; or not exactly once), 3 on NO "
        "VERDICT (exactly once held, but too few events to judge throughput)")] = False,
    verdict_min_events: Annotated[int | None, typer.Option(
        help="fewer events: throughput is not judged, fixed costs would dominate (0 = always judge; "
             "default: 400000, 150000 with 10,000 streams or more)", min=0)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")] = False,
    keep: Annotated[bool, typer.Option("--keep", help="keep the temporary stores and logs")] = False,
    shape: Annotated[str, typer.Option(
        help="entries: flat-epoch, flat-iso (ISO-8601 Z), json (a `data` field) or mixed (every contract shape, "
             "ISO-8601 with Z/offsets/naive, epoch s and ms, explicit and derived ids, a few percent invalid)")
    ] = "mixed",
    idle_s: Annotated[float, typer.Option(
        "--idle-s", help="after the latency phase: CPU of the caught-up worker over this long, then probes "
        "(0 = skip)")] = 10.0,
    probes: Annotated[int, typer.Option(help="single events added to random streams of the caught-up worker")] = 30,
    max_p99_ms: Annotated[float, typer.Option(help="FAIL when the latency or probe p99 is above this",
                                              callback=_above_zero)] = 1000.0,
    max_idle_cpu_pct: Annotated[float, typer.Option(help="FAIL when the caught-up worker uses more CPU (%)",
                                                    callback=_above_zero)] = 5.0,
    max_rss_mb: Annotated[float, typer.Option(help="FAIL when a draining worker's peak RSS is above this",
                                              callback=_above_zero)] = 500.0,
    redis_cluster_shards: Annotated[int, typer.Option(
        "--redis-cluster-shards", help="run on a private Redis Cluster of this many primaries (no replicas: "
        "throughput only) instead of one redis-server; the workers get one node's URL (0 = one redis-server)")] = 0,
    redis_url: Annotated[str | None, typer.Option(
        "--redis-url", help="run on this Redis or Redis Cluster node instead of a private one (it must hold no "
        "bench_events:*/bench_live:* keys; the bench's are deleted afterwards unless --keep)")] = None,
) -> None:
    """Benchmark against the bare XREADGROUP+XACK floor and a naive consumer, in one run, on a private Redis:
    throughput, exactly-once check, event->stored latency at a steady rate, the caught-up worker's CPU and
    reaction to a new event, peak RSS of the workers.

    `flowtrack bench queries` times the dashboard, alert and terminal-view queries instead."""
    if ctx.invoked_subcommand is not None:
        return
    from worker.bench import (
        BENCH_SHAPES,
        NO_VERDICT,
        BenchConfig,
        default_min_ratio,
        default_verdict_min_events,
        progress_bar,
        report_table,
        run_bench,
    )

    if events < 1 or streams < 1 or workers < 1:
        raise fail("--events, --streams and --workers must be at least 1", 2)
    if not 0 <= redis_cluster_shards <= 16:
        raise fail("--redis-cluster-shards must be between 0 and 16", 2)
    if redis_url and redis_cluster_shards:
        raise fail("--redis-url and --redis-cluster-shards: one or the other (the latter starts a private cluster)", 2)
    if shape not in BENCH_SHAPES:
        raise fail(f"--shape must be one of {', '.join(BENCH_SHAPES)}", 2)
    if min_ratio is None:
        min_ratio = default_min_ratio(streams)
    if verdict_min_events is None:
        verdict_min_events = default_verdict_min_events(streams)
    config = BenchConfig(events=events, streams=streams, workers=workers, rate=rate, latency_s=latency_s,
                         naive_events=naive_events, naive_max_s=naive_max_s, min_ratio=min_ratio, keep=keep,
                         verdict_min_events=verdict_min_events, shape=shape,  # type: ignore[arg-type]
                         idle_s=idle_s, probes=probes, max_p99_ms=max_p99_ms, max_idle_cpu_pct=max_idle_cpu_pct,
                         max_rss_mb=max_rss_mb, redis_cluster_shards=redis_cluster_shards, redis_url=redis_url)
    with progress_bar(err_console) as progress:
        result = run_bench(config, progress)
    if as_json:
        sys.stdout.write(result.to_json() + "\n")
    else:
        console.print(report_table(result))
    if check and not result.passed:
        raise typer.Exit(3 if result.verdict == NO_VERDICT else 1)


@bench_app.command("queries")
@guarded_command
def bench_queries(
    events: Annotated[int, typer.Option("--events", "-n", help="events in the store", min=1,
                                        max=10_000_000_000)] = 10_000_000,
    store_path: Annotated[str | None, typer.Option(
        "--store", help="where the bench store is kept and reused (default: ./.flowtrack-bench/<events>)")] = None,
    repeat: Annotated[int, typer.Option(help="runs of each query (best and median reported)")] = 3,
    seed: Annotated[int, typer.Option(help="seed of the synthetic data")] = 7,
    check: Annotated[bool, typer.Option("--check", help="exit 1 when a target of issue 9 is missed")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")] = False,
) -> None:
    """Time every dashboard panel, variable and alert query and the history/show/status/demo queries.

    Builds (or reuses) an embedded store of N events shaped like real flows, loaded in worker-sized
    batches; runs each query at its dashboard's default range and over 30 days; reports best-of-3,
    median, rows/bytes read and peak memory, per-dashboard p50/p95/max and the live dashboard's refresh.
    """
    from pathlib import Path

    from worker.bench import progress_bar
    from worker.benchqueries import report_tables, run_queries
    from worker.benchstore import ensure_store

    if events < 1 or repeat < 1:
        raise fail("--events and --repeat must be at least 1", 2)
    path = Path(store_path) if store_path else Path(".flowtrack-bench") / str(events)
    with progress_bar(err_console) as progress:
        store, info = ensure_store(path, events, seed, progress, load_settings())
        result = run_queries(store, info, repeat, progress)
    if as_json:
        sys.stdout.write(result.to_json() + "\n")
    else:
        for table in report_tables(result):
            _print_wide(table)
    if check and not result.passed:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
