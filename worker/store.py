"""The ClickHouse store: opening a client (embedded chDB or a server), migrations, queries.

One code path for both targets: clickhouse-connect's ``chdb://`` backend runs the embedded engine
in-process; ``http(s)://`` talks to a server.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver import options as _driver_options

from worker.clusterddl import ClusterDDL, cluster_ddl_for, local_name
from worker.errors import (
    ConfigError,
    FlowtrackError,
    StoreLockedError,
    StoreRejectedError,
    StoreUnavailableError,
)
from worker.settings import Settings, redact_url

log = logging.getLogger(__name__)

DATABASE = "flowtrack"
_STATEMENT_SPLIT = re.compile(r";\s*(?:\n|$)")
_LOCK_HINT = (
    "The embedded store {path} is in use by another process{pid} (probably a running `flowtrack run` or "
    "`flowtrack demo`). chDB allows one process per store. Stop that process, or point both at a ClickHouse "
    "server with FLOWTRACK_CLICKHOUSE_URL=http://user:pass@host:8123/flowtrack."
)
# chDB allows one engine per process, so every user of a path in a process shares one Store (one client and
# the lock that serializes it: the engine's connection is not to be used from two threads at once).
_embedded_stores: dict[str, Store] = {}
_embedded_lock = threading.Lock()

# Settings of every write (inserts, migrations, recomputes, purges). Tables are partitioned by the week of the
# events' own time, which the contract lets span 1970..2200: a batch over more than 100 weeks is valid input, and
# the engine's default limit would refuse it (and every recompute or migration reading it) like an outage, retried
# for ever. The parts such a write creates are merged like any others.
# optimize_on_insert = 0: by default the engine collapses the copies of a key within each inserted block (a
# ReplacingMergeTree merge pass, row by row, over every column of every insert and of its materialized views): a
# third of an events insert's CPU (README, "Where the time goes"). The sink sends one copy per event identity per
# insert (sink.last_copies); copies in other inserts are collapsed by every reader (FINAL, argMax per key) and merges.
WRITE_SETTINGS: dict[str, Any] = {"max_partitions_per_insert_block": 0, "optimize_on_insert": 0}


def _without_dataframe_libraries() -> None:
    """Tell clickhouse-connect that pandas and numpy are absent, unless something in this process resolved them.

    flowtrack inserts plain column lists and reads rows, never DataFrames or arrays, but clickhouse-connect's insert
    asks whether the data is a pandas DataFrame or a numpy array, which imports them wherever they are installed
    (chDB's dependencies install both): pandas is ~0.15 s of a worker's start-up and ~35 MB of its RSS, numpy
    ~15 MB, for nothing (README, "Benchmark"; tests/test_store_footprint.py)."""
    for name in ("pd", "np"):
        if name not in vars(_driver_options):
            setattr(_driver_options, name, None)


_without_dataframe_libraries()


@contextmanager
def _without_pyarrow() -> Iterator[None]:
    """Open the embedded engine without importing pyarrow (and numpy with it), unless this process has already.

    chDB's connection module imports pyarrow whenever it is installed (chDB's dependencies install it), for
    Arrow APIs flowtrack never calls, and degrades to "no Arrow" when the import fails. That import is ~40 MB of
    a worker's peak RSS, a tenth of the 500 MB budget (README, "Benchmark"; tests/test_store_footprint.py).
    A ``None`` in ``sys.modules`` makes the import fail; the entry is removed afterwards, so pyarrow stays
    importable for anything else in the process (chDB's own Arrow APIs stay off in this process)."""
    if "pyarrow" in sys.modules:
        yield
        return
    sys.modules["pyarrow"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("pyarrow", False) is None:
            del sys.modules["pyarrow"]


def schema_dir() -> Path:
    """Migrations ship inside the wheel as worker/_schemas; in a checkout they are ../schemas."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_schemas" / "clickhouse", here.parent / "schemas" / "clickhouse"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("schemas/clickhouse not found next to the worker package")


_GUARD_PREFIX = "-- only-if:"
_CLUSTER_DOESNT_EXIST = 701
_SINGLE_NODE_BOOKKEEPING = (
    f"CREATE DATABASE IF NOT EXISTS {DATABASE}",
    f"CREATE TABLE IF NOT EXISTS {DATABASE}.schema_migrations "
    "(version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
    "ENGINE = ReplacingMergeTree ORDER BY version",
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]
    # A query returning a number: when it returns 0 the statements are skipped (the migration is still recorded).
    # Lets a migration that copies and swaps tables run only while the old layout is in place, so a re-run after
    # a crash between its statements does not swap back.
    only_if: str | None = None


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or schema_dir()
    migrations = []
    for path in sorted(directory.glob("[0-9][0-9][0-9]_*.sql")):
        version = int(path.name[:3])
        lines = path.read_text().splitlines()
        guards = [line[len(_GUARD_PREFIX):].strip() for line in lines if line.startswith(_GUARD_PREFIX)]
        text = "\n".join(line for line in lines if not line.lstrip().startswith("--"))
        statements = tuple(s.strip() for s in _STATEMENT_SPLIT.split(text) if s.strip())
        migrations.append(Migration(version, path.stem, statements, guards[0] if guards else None))
    return migrations


# Retention: the TTL each table gets from FLOWTRACK_RETENTION_DAYS (the column is the row's time; the partitioned
# tables drop whole weekly parts, ttl_only_drop_parts = 1). Tombstones in sessions carry their deletion time as
# last_event_at, so they outlive the rows they hide.
RETENTION_COLUMNS = {
    "events": "ts",
    "events_by_time": "ts",
    "session_spans": "end_ts",
    "sessions": "last_event_at",
    "rejected": "received_at",
}
# The rollup rows of the sessions a condition on session_totals picks, versioned by the recompute's start time (the
# latest recompute wins): the worker's recompute (worker/rollup.py), the start-up catch-up and the heal below. One
# statement, so every writer fills every rollup column (a column left out would be reset to its default).
RECOMPUTE_SESSIONS_WHERE = (
    "INSERT INTO flowtrack.sessions (user_id, session_id, started_at, last_event_at, closed_at, event_count, "
    "error_count, end_count, path, computed_at, is_deleted) "
    "SELECT user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count, end_count, path, "
    "now64(6), 0 FROM flowtrack.session_totals WHERE "
)
# A worker recomputes the sessions of acknowledged batches shortly after (worker/rollup.py); what a stopped worker
# left pending is recomputed at the next start: every session with events stored since 10 minutes before the
# latest recompute (an insert that began before a recompute can finish after it; inserts time out well within).
_RECENT = "(SELECT max(computed_at) FROM flowtrack.sessions) - INTERVAL 10 MINUTE"
CATCH_UP_WINDOW = (  # constants only
    f"SELECT DISTINCT session_id FROM flowtrack.events_by_time WHERE ingested_at >= {_RECENT}"  # noqa: S608
)
# Recomputed this many at a time, as the worker's own recompute (rollup.CHUNK_SESSIONS): ten minutes of a draining
# backlog are hundreds of thousands of sessions, and one statement over 300k of them peaked at 1.4 GB.
CATCH_UP_CHUNK_SESSIONS = 5000
# The recompute of a chunk of sessions, by the worker's rollup (worker/rollup.py) and by the start-up catch-up.
RECOMPUTE_SESSIONS = RECOMPUTE_SESSIONS_WHERE + "session_id IN {sessions:Array(String)}"
# (user, session) pairs left without any event (their rows were purged) get a tombstone that hides their row.
# Its last_event_at is the deletion time, so retention removes it after the row it hides.
TOMBSTONES = (
    "INSERT INTO flowtrack.sessions (user_id, session_id, last_event_at, computed_at, is_deleted) "
    "SELECT pair.1, pair.2, now64(3), now64(6), 1 "
    "FROM (SELECT arrayJoin({pairs:Array(Tuple(String, String))}) AS pair) "
    "WHERE pair NOT IN (SELECT user_id, session_id FROM flowtrack.session_totals "
    "WHERE session_id IN {sessions:Array(String)})"
)
# Sessions of a chunk that session_spans (one row per rollup row written: by primary key, narrow) gives more than one
# user: the only ones that can hold a row for a user none of their events names any more (events re-sent, same
# event ids, under another user). Those pairs get a tombstone; a session that really has two users keeps both rows.
_SEVERAL_USERS = (
    "SELECT session_id, groupUniqArray(user_id) FROM flowtrack.session_spans "
    "WHERE session_id IN {sessions:Array(String)} GROUP BY session_id HAVING uniqExact(user_id) > 1"
)
# An embedded engine killed mid-insert (kill -9, OOM) can leave an insert half done: the ``events`` part written, the
# part its materialized view writes to ``events_by_time`` not. A successor re-inserting those entries into the same
# store heals it; one reclaiming them into a store of its own never does, and the rows would stay missing from
# every time-ordered panel and from the rollup. So at start, events stored in the catch-up window (read from the
# parts written since) whose time-ordered copy is missing get it, before the catch-up recomputes their sessions.
HEAL_EVENTS_BY_TIME = (  # constants only
    "INSERT INTO flowtrack.events_by_time "  # noqa: S608
    "(ts, session_id, event_id, user_id, node_id, parent_id, event_type, is_end, is_error, ingested_at) "
    "SELECT ts, session_id, event_id, user_id, node_id, parent_id, event_type, is_end, is_error, ingested_at "
    "FROM flowtrack.events "
    "WHERE _part IN (SELECT name FROM system.parts WHERE database = 'flowtrack' AND table = 'events' AND active "
    f"AND toDateTime64(modification_time, 6, 'UTC') + INTERVAL 1 SECOND >= {_RECENT}) "
    f"AND ingested_at >= {_RECENT} "
    "AND (session_id, event_id, ingested_at) NOT IN (SELECT session_id, event_id, ingested_at "
    f"FROM flowtrack.events_by_time WHERE ingested_at >= {_RECENT})"
)
_BROKEN_ROLLUP_PARTS = (
    "SELECT table, name FROM system.detached_parts WHERE database = 'flowtrack' "
    "AND table IN ('sessions', 'session_spans') AND startsWith(name, 'broken') ORDER BY table, name"
)
# Parts of the stored rows (not derived ones) the engine set aside as broken: their rows are gone from every view.
_BROKEN_STORED_PARTS = (
    "SELECT table, name, path FROM system.detached_parts WHERE database = 'flowtrack' "
    "AND table IN ('events', 'events_by_time', 'rejected') AND startsWith(name, 'broken') ORDER BY table, name"
)
_REBUILD_SLICES = 16
_REBUILD_SESSIONS = RECOMPUTE_SESSIONS_WHERE + (  # noqa: S608 (constants only)
    "session_id IN (SELECT DISTINCT session_id FROM flowtrack.events "
    "WHERE cityHash64(session_id) % {slices:UInt32} = {part:UInt32})"
)


# How often a worker's embedded engine is asked to return the memory it freed (Store.return_freed_memory).
RETURN_FREED_MEMORY_INTERVAL_S = 0.5


def broken_parts_message(broken: Sequence[tuple[str, str, str]]) -> str:
    """What a broken stored part means and how to get its rows back (README, "Reliability")."""
    tables = sorted({table for table, _, _ in broken})
    return (f"{len(broken)} part(s) of {', '.join(f'{DATABASE}.{t}' for t in tables)} were set aside by the engine as "
            f"broken: the rows they held are missing from every view. Store again what Redis still holds (a new "
            f"group from the oldest entry, without the engine's dedup of batches it has seen; copies collapse): "
            f"FLOWTRACK_GROUP=flowtrack-recover FLOWTRACK_GROUP_START_ID=0 FLOWTRACK_INSERT_DEDUPLICATE=false "
            f"flowtrack run --drain; then, with no worker running, delete "
            f"{', '.join(path for _, _, path in broken[:3])}{' …' if len(broken) > 3 else ''}")


def _quoted(text: str) -> str:
    """A ClickHouse string literal (for the part names the engine itself listed; DDL takes no parameters)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


_TTL_IN_ENGINE = re.compile(r"\bTTL\s+(.*?)(?:\s+SETTINGS\b|$)", re.DOTALL)


def retention_ttl(column: str, days: int) -> str:
    """The TTL of a DateTime64 column, computed in DateTime64: through a 32-bit DateTime a time after 2106-02-07
    wrapped (2150 expired in 2013) and its rows were dropped at the next merge, though the contract takes times up to
    2200."""
    return f"{column} + toIntervalDay({days})"


class Store:
    """A clickhouse-connect client plus what flowtrack needs of it; thread-safe for one caller at a time."""

    def __init__(self, client: Any, description: str, embedded: bool, retention_days: int | None = None,
                 cluster: ClusterDDL | None = None, connect: Callable[[], Any] | None = None) -> None:
        self.client = client
        # Opens another client to the same store (companion()); None: this store has only the client it was given.
        self._connect = connect
        self._companion: Store | None = None
        self._companion_lock = threading.Lock()
        self.description = description
        self.embedded = embedded
        # Applied as TTLs by migrate(); None keeps everything.
        self.retention_days = retention_days
        # FLOWTRACK_CLICKHOUSE_CLUSTER: the rules that give migrations and run-time DDL their cluster form (an empty
        # template: migrate() and the run-time statements replay the migrations on copies of it).
        self.cluster = cluster
        self._cluster_runtime: ClusterDDL | None = None
        self._cluster_write_settings: dict[str, Any] | None = None
        self._lock = threading.Lock()
        # (table, column names) -> the column types of an insert, asked of the server once: without them every
        # insert would first run a DESCRIBE (a query per batch). Forgotten by migrate(), which may change them.
        self._insert_types: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._memory_returned_at = 0.0  # monotonic time of the last return_freed_memory() that ran
        self._can_return_memory = embedded

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: Settings) -> Store:
        path = settings.embedded_store_path
        if path is not None:
            store = _open_embedded(path)
            store.retention_days = settings.retention_days
            return store
        url = settings.clickhouse_url or ""
        tls: dict[str, Any] = {"ca_cert": settings.tls_ca_file} if settings.tls_ca_file else {}

        def connect() -> Any:
            try:
                return clickhouse_connect.get_client(
                    dsn=url, connect_timeout=5, send_receive_timeout=60, autogenerate_session_id=False, **tls,
                )
            except Exception as exc:  # clickhouse-connect raises several unrelated types for "down"
                raise StoreUnavailableError(
                    f"cannot reach ClickHouse at {redact_url(url)}: {connect_reason(exc)}") from exc

        cluster = ClusterDDL(settings.clickhouse_cluster) if settings.clickhouse_cluster else None
        where = f" (cluster {settings.clickhouse_cluster})" if cluster else ""
        return cls(connect(), f"ClickHouse {redact_url(url)}{where}", embedded=False,
                   retention_days=settings.retention_days, cluster=cluster, connect=connect)

    def companion(self) -> Store:
        """The same store over a connection of its own, for a thread whose queries must not wait for this store's
        (the session rollup's recomputes beside the sink's inserts: README, "ClickHouse relations"). Each Store
        runs one query at a time; the engine runs both at once. Itself when no other connection can be opened.
        Opened once, then shared: every sink of this store recomputes over the same second connection."""
        if self._connect is None:
            return self
        with self._companion_lock:
            if self._companion is None:
                self._companion = Store(self._connect(), f"{self.description} (second connection)", self.embedded,
                                        self.retention_days, self.cluster)
            return self._companion

    def close(self) -> None:
        if not self.embedded:
            self.client.close()

    # -- schema ----------------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        """Apply every migration not yet recorded; statements are idempotent, so a race is harmless.

        Raises StoreUnavailableError for transient failures (the caller waits them out) and ConfigError when
        ClickHouse refuses a migration statement itself.
        """
        try:
            return self._migrate()
        except FlowtrackError:
            raise
        except Exception as exc:
            error = classify(exc)
            if isinstance(error, StoreRejectedError):
                raise ConfigError(f"migrating {self.description} failed: {error}") from exc
            raise StoreUnavailableError(f"migrating {self.description}: {error}") from exc

    def _migrate(self) -> list[str]:
        with self._lock:
            self._insert_types.clear()
            plan = self._fresh_cluster_ddl()
            settings = self._write_settings()  # on a cluster: checks it exists before anything is created
            # Every migration is turned into its cluster form before any runs (a statement without a cluster rule
            # stops migrate here); the plan sees the applied ones too: it tracks which tables are sharded.
            planned = [(migration, plan.transform_all(migration.statements) if plan else list(migration.statements),
                        plan.guard(migration.only_if) if plan and migration.only_if else migration.only_if)
                       for migration in load_migrations()]
            for statement in plan.bookkeeping() if plan else _SINGLE_NODE_BOOKKEEPING:
                self.client.command(statement)
            done = {row[0] for row in self.client.query(
                f"SELECT version FROM {DATABASE}.schema_migrations").result_rows}  # noqa: S608 (constant)
            applied = []
            for migration, statements, guard in planned:
                if migration.version in done:
                    continue
                if guard is None or int(self.client.command(guard)):
                    for statement in statements:
                        self.client.command(statement, settings=settings)
                self.client.insert(f"{DATABASE}.schema_migrations", [[migration.version, migration.name]],
                                   column_names=["version", "name"], settings=settings)
                applied.append(migration.name)
                log.info("applied migration %s", migration.name)
            self._apply_retention()
            if self.embedded and plan is None:
                self.client.command(HEAL_EVENTS_BY_TIME, settings=settings)
            self._catch_up_sessions(settings)
            # The heal works around chDB finishing an INSERT … SELECT it could not write (embedded only). A server
            # reports such a failure; replicas fetch broken parts from each other; and the writer user of the
            # compose setup has no grant on system.detached_parts.
            if self.embedded and plan is None:
                self._heal_broken_rollup()
                broken = self._broken_stored_parts_locked()
                if broken:
                    log.error("%s", broken_parts_message(broken))
            return applied

    def _catch_up_sessions(self, settings: dict[str, Any]) -> None:
        """Recompute the sessions a stopped worker may have left pending (CATCH_UP_WINDOW), in chunks."""
        sessions = sorted(row[0] for row in self.client.query(CATCH_UP_WINDOW).result_rows)
        if len(sessions) > CATCH_UP_CHUNK_SESSIONS:
            log.info("catching up the rollup of %d sessions", len(sessions))
        for start in range(0, len(sessions), CATCH_UP_CHUNK_SESSIONS):
            self._recompute_sessions_locked(sessions[start:start + CATCH_UP_CHUNK_SESSIONS], settings)

    def recompute_sessions(self, sessions: Sequence[str]) -> None:
        """The rollup rows of these sessions recomputed from their events (one statement: give a bounded chunk),
        then tombstones for users they no longer name."""
        with self._lock:
            self._recompute_sessions_locked(sessions, self._write_settings())

    def _recompute_sessions_locked(self, sessions: Sequence[str], settings: dict[str, Any]) -> None:
        self.client.command(self._for_cluster(RECOMPUTE_SESSIONS), parameters={"sessions": list(sessions)},
                            settings=settings)
        self._tombstone_moved_users_locked(sessions, settings)

    def _tombstone_moved_users_locked(self, sessions: Sequence[str], settings: dict[str, Any]) -> None:
        """Best effort: the recompute itself is done, and a rollup part the engine could not read (written on a full
        disk, rebuilt at the next start: _heal_broken_rollup) must not stop the worker's recomputes nor its start;
        the next recompute of the session tries again."""
        try:
            several = self.client.query(_SEVERAL_USERS, parameters={"sessions": list(sessions)}).result_rows
            if several:
                pairs = sorted((user, session) for session, users in several for user in users)
                self.client.command(self._for_cluster(TOMBSTONES), settings=settings, parameters={
                    "pairs": pairs, "sessions": sorted(session for session, _ in several)})
        except Exception as exc:
            log.warning("could not check the recomputed sessions for users they no longer name: %s", exc)

    def broken_stored_parts(self) -> list[tuple[str, str, str]]:
        """(table, part, directory) of every part of events, events_by_time or rejected that the engine set aside as
        broken (embedded stores: chDB was seen to commit a merged part it could not write on a disk filling and
        freeing again, and to detach it at the next start). A server's detached parts are its operator's: []."""
        if not self.embedded:
            return []
        with self._lock:
            return self._broken_stored_parts_locked()

    def _broken_stored_parts_locked(self) -> list[tuple[str, str, str]]:
        return [(str(table), str(name), str(path))
                for table, name, path in self.client.query(_BROKEN_STORED_PARTS).result_rows]

    def _heal_broken_rollup(self) -> None:
        """Rebuild the session rollup when the engine set rollup parts aside as broken at start.

        The rollup is written by INSERT … SELECT inside the engine, and chDB was seen to finish such an insert
        without an error while its files could not be written (a full disk, or a file-size limit): the part is
        found broken at the next start and detached, and the sessions it held would be missing for good — the
        start-up catch-up only covers the last minutes. The rollup is derived data, so rebuild it from the events
        (in slices, to bound memory) and drop the broken parts, so a heal happens once."""
        broken = self.client.query(_BROKEN_ROLLUP_PARTS).result_rows
        if not broken:
            return
        log.warning("%d session-rollup part(s) were found broken at start (%s); rebuilding the rollup from the "
                    "events", len(broken), ", ".join(f"{table}/{name}" for table, name in broken))
        for part in range(_REBUILD_SLICES):
            self.client.command(_REBUILD_SESSIONS, parameters={"slices": _REBUILD_SLICES, "part": part},
                                settings=self._write_settings())
        for table, name in broken:
            self.client.command(f"ALTER TABLE {DATABASE}.{table} DROP DETACHED PART {_quoted(name)}",
                                settings={"allow_drop_detached": 1})

    def _apply_retention(self) -> None:
        """Make every table's TTL match retention_days (None: no TTL); a table already right is left alone."""
        for table, column in RETENTION_COLUMNS.items():
            current = self._current_ttl(table)
            wanted = None if self.retention_days is None else retention_ttl(column, self.retention_days)
            if current == wanted:
                continue
            if wanted is None:
                self.client.command(self._for_cluster(f"ALTER TABLE {DATABASE}.{table} REMOVE TTL"))
            else:
                self.client.command(self._for_cluster(f"ALTER TABLE {DATABASE}.{table} MODIFY TTL {wanted}"))
            log.info("retention of %s.%s: %s", DATABASE, table, wanted or "keep forever")

    def _current_ttl(self, table: str) -> str | None:
        """The table's TTL expression as ClickHouse prints it, or None (on a cluster: its local table's)."""
        physical = local_name(table) if self.cluster else table
        engine = str(self.client.command(
            "SELECT engine_full FROM system.tables WHERE database = {db:String} AND name = {table:String}",
            parameters={"db": DATABASE, "table": physical}))
        found = _TTL_IN_ENGINE.search(engine)
        return found.group(1).strip() if found else None

    # -- queries ---------------------------------------------------------------------------------
    def query(self, sql: str, parameters: dict[str, Any] | None = None,
              settings: dict[str, Any] | None = None) -> tuple[list[str], list[Sequence[Any]]]:
        with self._lock:
            result = self.client.query(sql, parameters=parameters, settings=settings)
        return list(result.column_names), list(result.result_rows)

    def scalar(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        _, rows = self.query(sql, parameters)
        return rows[0][0] if rows else None

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> None:
        with self._lock:
            self.client.command(self._for_cluster(sql), parameters=parameters, settings=self._write_settings())

    def return_freed_memory(self) -> None:
        """Give the memory the embedded engine freed back to the operating system, at most every
        RETURN_FREED_MEMORY_INTERVAL_S.

        chDB's allocator (jemalloc, as ClickHouse configures it) keeps freed pages for seconds before returning
        them; a worker draining a backlog frees tens of MB per batch (insert blocks, merges, the rollup's
        recompute), so the retained pages pile up into its peak RSS (~35 MB of ~510 draining 1M entries,
        README "Benchmark"). A purge costs a few ms. Not for a server: purging is a server-wide SYSTEM command,
        the server's own business; nor for an engine that refuses it (built without jemalloc)."""
        if not self._can_return_memory:
            return
        now = time.monotonic()
        if now - self._memory_returned_at < RETURN_FREED_MEMORY_INTERVAL_S:
            return
        self._memory_returned_at = now
        try:
            with self._lock:
                self.client.command("SYSTEM JEMALLOC PURGE")
        except Exception as exc:  # not worth failing a batch for: stop trying
            self._can_return_memory = False
            log.debug("the embedded engine does not return freed memory on request: %s", exc)

    def insert(self, table: str, columns: Sequence[Sequence[Any]], column_names: Sequence[str],
               settings: dict[str, Any] | None = None) -> None:
        with self._lock:
            settings = {**self._write_settings(), **(settings or {})}
            key = (table, tuple(column_names))
            context = self.client.create_insert_context(table=table, column_names=list(column_names),
                                                        column_types=self._insert_types.get(key),
                                                        column_oriented=True, settings=settings)
            self._insert_types[key] = context.column_types
            try:
                context.data = list(columns)
                self.client.data_insert(context)
            finally:
                # clickhouse-connect's InsertContext references itself (a bound method in an attribute), so
                # it and the whole batch it holds would wait for a full GC pass instead of being freed now:
                # tens of MB per batch, hundreds while draining a backlog. Break the cycle.
                vars(context).clear()

    def insert_block(self, table: str, column_names: Sequence[str], block: bytes,
                     settings: dict[str, Any] | None = None) -> None:
        """Insert rows already encoded as one ClickHouse Native block (worker/_fastpath.c builds them)."""
        with self._lock:
            settings = {**self._write_settings(), **(settings or {})}
            self.client.raw_insert(table, list(column_names), insert_block=block, settings=settings, fmt="Native")

    # -- cluster (FLOWTRACK_CLICKHOUSE_CLUSTER) -----------------------------------------------------
    def _fresh_cluster_ddl(self) -> ClusterDDL | None:
        if self.cluster is None:
            return None
        return ClusterDDL(self.cluster.cluster, on_cluster=self.cluster.on_cluster,
                          replicated=self.cluster.replicated)

    def _for_cluster(self, sql: str) -> str:
        """DELETE/ALTER/TRUNCATE of a sharded table: its local tables, on every node (README, "ClickHouse
        cluster"); everything else unchanged."""
        if self.cluster is None:
            return sql
        if self._cluster_runtime is None:
            template = self.cluster
            self._cluster_runtime = cluster_ddl_for(template.cluster, (m.statements for m in load_migrations()),
                                                    on_cluster=template.on_cluster, replicated=template.replicated)
        return self._cluster_runtime.runtime(sql)

    def _write_settings(self) -> dict[str, Any]:
        """WRITE_SETTINGS for every write; on a cluster also these: every write waits until it is stored on every
        replica of its shard: synchronous Distributed inserts, and a quorum of all replicas. The session rollup reads
        whichever replica the Distributed table picks right after an insert (worker/rollup.py); with a smaller quorum
        that replica could lack the part and the recompute would miss its events for good. IN/JOIN subqueries over
        Distributed tables run once on the initiator (GLOBAL): correct whatever they are keyed by. Applied to writes
        only: readers get what they need from their profile (deploy/clickhouse/cluster/users-cluster.xml), and a
        readonly user may not send settings."""
        if self.cluster is None:
            return dict(WRITE_SETTINGS)
        if self._cluster_write_settings is None:
            replicas = self._replicas_per_shard()
            self._cluster_write_settings = {
                "distributed_foreground_insert": 1,
                "distributed_product_mode": "global",
                # A recompute's `session_id IN […]` reads only the shards that hold those sessions.
                "optimize_skip_unused_shards": 1,
                # A purge (DELETE of refused rows) is done on every replica before the recompute that follows it.
                "lightweight_deletes_sync": 2,
                **({"insert_quorum": replicas} if replicas > 1 else {}),
                **WRITE_SETTINGS,
            }
        return self._cluster_write_settings

    def _replicas_per_shard(self) -> int:
        """Asked of the nodes themselves (one row per replica, then per shard, from system.one, which every user may
        read): the writer has no grant on system.clusters. Every replica must answer, as every write will need."""
        assert self.cluster is not None
        name = self.cluster.cluster  # a validated cluster name (letters, digits, _ . -): safe inside quotes
        try:
            replicas = int(self.client.command(
                f"SELECT count() FROM clusterAllReplicas('{name}', system.one)"))  # noqa: S608
            shards = int(self.client.command(f"SELECT count() FROM cluster('{name}', system.one)"))  # noqa: S608
        except Exception as exc:
            if error_code(exc) == _CLUSTER_DOESNT_EXIST:
                raise ConfigError(f"{self.description}: the server has no cluster named {name!r} "
                                  "(FLOWTRACK_CLICKHOUSE_CLUSTER must name a cluster of its remote_servers)") from exc
            raise
        if shards < 1 or replicas % shards:
            raise ConfigError(f"cluster {name!r} has {replicas} replicas over {shards} shards; flowtrack writes with a "
                              "quorum of every replica of a shard, which needs the same number in every shard")
        return replicas // shards


class _DropDriverNoise(logging.Filter):
    """clickhouse-connect logs "Unexpected Http Driver Exception" before raising the error flowtrack
    reports itself (one line, with the cause): drop the duplicate, keep every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unexpected Http Driver Exception")


logging.getLogger("clickhouse_connect.driver._backend.http_sync").addFilter(_DropDriverNoise())
_OS_ERROR = re.compile(r"\[Errno -?\d+\] [^\"')]+")


def connect_reason(exc: BaseException) -> str:
    """Why a server could not be reached, short: the operating system's reason when there is one."""
    found = _OS_ERROR.search(str(exc))
    return found.group(0) if found else " ".join(str(exc).split())[:300]


def _open_embedded(path: Path) -> Store:
    key = str(path)
    with _embedded_lock:
        store = _embedded_stores.get(key)
        if store is not None:
            return store
        if _embedded_stores:
            other = next(iter(_embedded_stores))
            raise StoreLockedError(f"this process already uses the embedded store {other}; "
                                   f"chDB allows one store path per process (asked for {path})")
        _require_chdb(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in the way, /proc, no permission: the URL names no usable directory
            raise ConfigError(f"the embedded store {path} cannot be a directory: {exc.strerror or exc}") from None
        holder = embedded_store_holder(path)
        if holder is not None:
            raise StoreLockedError(_LOCK_HINT.format(path=path, pid=holder))
        engine_said: list[str] = []
        try:
            with _stderr_captured(engine_said):
                client = _embedded_client(path)
        except Exception as exc:
            holder = embedded_store_holder(path)
            said = " ".join(" ".join(engine_said).split())
            if holder is not None or "lock" in str(exc).lower() or "Cannot lock file" in said:
                raise StoreLockedError(_LOCK_HINT.format(path=path, pid=holder or "")) from exc
            raise StoreUnavailableError(f"cannot open the embedded store {path}: {exc} {said[:300]}") from exc
        if any(engine_said):  # not about a failure: pass it on as it came
            sys.stderr.write("".join(engine_said))
        store = Store(client, f"embedded store {path}", embedded=True, connect=partial(_connect_embedded, path))
        _embedded_stores[key] = store
        return store


def _embedded_client(path: Path) -> Any:
    """A clickhouse-connect client of the embedded engine at path (chDB: any number per path, one path per process)."""
    with _without_pyarrow():
        return clickhouse_connect.get_client(dsn=f"chdb://{path}")


def _connect_embedded(path: Path) -> Any:
    """One more client of an engine this process has opened already (Store.companion)."""
    try:
        return _embedded_client(path)
    except Exception as exc:
        raise StoreUnavailableError(f"cannot open another connection to the embedded store {path}: {exc}") from exc


def _require_chdb(path: Path) -> None:
    """The slim install (the worker image: pip's `server` extra, no chdb) has no embedded engine: say so,
    instead of clickhouse-connect's hint to install itself."""
    import importlib.util

    if importlib.util.find_spec("chdb") is None:  # permanent, not a transient outage: exit 2, no retries
        raise ConfigError(
            f"the embedded store ({path}) needs chDB, which this install leaves out: `pip install chdb`, "
            "or point FLOWTRACK_CLICKHOUSE_URL / --clickhouse-url at a ClickHouse server (http(s)://…)")


@contextmanager
def _stderr_captured(into: list[str]) -> Iterator[None]:
    """Collect what the engine writes to file descriptor 2 while it starts.

    chDB reports a store held by another process ("Cannot lock file …/status") on stderr itself, besides
    raising; the caller turns that into one clear message instead of letting the raw line through.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            into.append(sink.read().decode("utf-8", "replace"))


def embedded_store_holder(path: Path) -> str | None:
    """" (pid N)" (or "") when another process holds the embedded store at path, else None.

    ClickHouse takes an exclusive flock on <path>/status while an engine runs there; chDB reports
    a conflict only on stderr and with a generic exception, so probe the lock ourselves.
    """
    status = path / "status"
    try:
        fd = os.open(status, os.O_RDONLY)
    except OSError:
        return None  # no status file: nobody runs an engine there
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = re.search(rb"PID:\s*(\d+)", os.pread(fd, 256, 0))
            return f" (pid {pid.group(1).decode()})" if pid else ""
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ClickHouse error codes that say "this data is wrong", as opposed to "the store is unwell".
DATA_ERROR_CODES = frozenset({
    6, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131, 321, 395, 469,
})
# "Code: 395. DB::Exception…" (native, chDB) is preferred over "…exception, code: 395" (HTTP).
_ERROR_CODE_PATTERNS = (re.compile(r"Code: (\d+)"), re.compile(r"code: (\d+)"))


def classify(exc: BaseException) -> StoreRejectedError | StoreUnavailableError:
    """Data errors (the rows are wrong) vs outages (the store is unwell); unknown errors count as outages,
    because retrying is safe while rejecting good data is not."""
    code = error_code(exc)
    message = " ".join(str(exc).split())[:500]
    if code in DATA_ERROR_CODES or isinstance(exc, TypeError | ValueError | UnicodeError | OverflowError):
        return StoreRejectedError(message)
    return StoreUnavailableError(message)


def error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    for pattern in _ERROR_CODE_PATTERNS:
        found = pattern.search(str(exc))
        if found:
            return int(found.group(1))
    return None
