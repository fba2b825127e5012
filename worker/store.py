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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import clickhouse_connect

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


def schema_dir() -> Path:
    """Migrations ship inside the wheel as worker/_schemas; in a checkout they are ../schemas."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_schemas" / "clickhouse", here.parent / "schemas" / "clickhouse"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("schemas/clickhouse not found next to the worker package")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or schema_dir()
    migrations = []
    for path in sorted(directory.glob("[0-9][0-9][0-9]_*.sql")):
        version = int(path.name[:3])
        text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("--"))
        statements = tuple(s.strip() for s in _STATEMENT_SPLIT.split(text) if s.strip())
        migrations.append(Migration(version, path.stem, statements))
    return migrations


class Store:
    """A clickhouse-connect client plus what flowtrack needs of it; thread-safe for one caller at a time."""

    def __init__(self, client: Any, description: str, embedded: bool) -> None:
        self.client = client
        self.description = description
        self.embedded = embedded
        self._lock = threading.Lock()

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: Settings) -> Store:
        path = settings.embedded_store_path
        if path is not None:
            return _open_embedded(path)
        url = settings.clickhouse_url or ""
        tls: dict[str, Any] = {"ca_cert": settings.tls_ca_file} if settings.tls_ca_file else {}
        try:
            client = clickhouse_connect.get_client(
                dsn=url, connect_timeout=5, send_receive_timeout=60, autogenerate_session_id=False, **tls,
            )
        except Exception as exc:  # clickhouse-connect raises several unrelated types for "down"
            raise StoreUnavailableError(f"cannot reach ClickHouse at {redact_url(url)}: {connect_reason(exc)}") from exc
        return cls(client, f"ClickHouse {redact_url(url)}", embedded=False)

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
            self.client.command(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
            self.client.command(
                f"CREATE TABLE IF NOT EXISTS {DATABASE}.schema_migrations "
                "(version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
                "ENGINE = ReplacingMergeTree ORDER BY version"
            )
            done = {row[0] for row in self.client.query(
                f"SELECT version FROM {DATABASE}.schema_migrations").result_rows}  # noqa: S608 (constant)
            applied = []
            for migration in load_migrations():
                if migration.version in done:
                    continue
                for statement in migration.statements:
                    self.client.command(statement)
                self.client.insert(f"{DATABASE}.schema_migrations", [[migration.version, migration.name]],
                                   column_names=["version", "name"])
                applied.append(migration.name)
                log.info("applied migration %s", migration.name)
            return applied

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
            self.client.command(sql, parameters=parameters)

    def insert(self, table: str, columns: Sequence[Sequence[Any]], column_names: Sequence[str],
               settings: dict[str, Any] | None = None) -> None:
        with self._lock:
            context = self.client.create_insert_context(table=table, column_names=list(column_names),
                                                        column_oriented=True, settings=settings)
            try:
                context.data = list(columns)
                self.client.data_insert(context)
            finally:
                # clickhouse-connect's InsertContext references itself (a bound method in an attribute), so
                # it and the whole batch it holds would wait for a full GC pass instead of being freed now:
                # tens of MB per batch, hundreds while draining a backlog. Break the cycle.
                vars(context).clear()


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
        path.mkdir(parents=True, exist_ok=True)
        holder = embedded_store_holder(path)
        if holder is not None:
            raise StoreLockedError(_LOCK_HINT.format(path=path, pid=holder))
        engine_said: list[str] = []
        try:
            with _stderr_captured(engine_said):
                client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
        except Exception as exc:
            holder = embedded_store_holder(path)
            said = " ".join(" ".join(engine_said).split())
            if holder is not None or "lock" in str(exc).lower() or "Cannot lock file" in said:
                raise StoreLockedError(_LOCK_HINT.format(path=path, pid=holder or "")) from exc
            raise StoreUnavailableError(f"cannot open the embedded store {path}: {exc} {said[:300]}") from exc
        if any(engine_said):  # not about a failure: pass it on as it came
            sys.stderr.write("".join(engine_said))
        store = Store(client, f"embedded store {path}", embedded=True)
        _embedded_stores[key] = store
        return store


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
