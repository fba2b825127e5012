"""Configuration: the only module that reads the environment.

Every setting is a ``FLOWTRACK_*`` variable and can be overridden by a CLI option
(the CLI passes its options as ``overrides``). Units are in the names.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redis.connection import parse_url

from worker.clusterddl import valid_cluster_name
from worker.errors import ConfigError

DEFAULT_STREAMS = ("flow_events", "flow_events:*")
MAX_SECONDS = 365 * 86400  # any duration setting; beyond it the socket and timer APIs overflow
_START_ID = re.compile(r"^(\$|\d{1,20}(-\d{1,20})?)$")
_DB_PATH = re.compile(r"^/?(\d+)?/?$")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
DEFAULT_STORE_DIR = ".flowtrack"


def default_consumer_name() -> str:
    """Stable per host/replica, so a restarted worker re-reads its own pending entries."""
    return socket.gethostname() or "flowtrack"


def _split_csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://localhost:6379/0"
    # None = the embedded chDB store in ./.flowtrack/
    clickhouse_url: str | None = None
    # A cluster of the server's remote_servers: `migrate` creates Replicated local tables and Distributed tables
    # under the public names ON CLUSTER (README, "ClickHouse cluster"). None = a single server (or chDB).
    clickhouse_cluster: str | None = None
    streams: tuple[str, ...] = DEFAULT_STREAMS
    group: str = "flowtrack"
    consumer: str = field(default_factory=default_consumer_name)
    # CA bundle for rediss:// and https:// connections (credentials go in the URLs: redis://user:pass@host)
    tls_ca_file: str | None = None
    # Where a new consumer group starts: "0" = the oldest entry, "$" = only new entries.
    group_start_id: str = "0"

    # Reading
    read_count: int = 2000
    block_ms: int = 200
    stream_rescan_s: float = 2.0

    # Batching: a batch is flushed at max_rows or when its oldest entry waited max_wait_s.
    # 20k rows: each insert creates a part in every table, merged again later, so halving the inserts of a backlog
    # takes ~15 % off its drain (README, "Benchmark"); a live worker's batches are smaller (max_wait_s ends them).
    batch_max_rows: int = 20000
    batch_max_wait_s: float = 0.25
    # Backpressure: at most this many entries read but not yet acknowledged. Two batches: one being
    # written while the next one fills; more only adds memory (and GC work) without adding overlap.
    max_inflight_rows: int = 40000
    # ... and at most this many bytes of entries (names + values as read): entries can be large (a 10 MB one
    # costs as much as 50k small ones). A batch flushes at half of it; reads shrink their COUNT after large
    # entries (README, "Reliability").
    # 64 MiB: entries of a few KB (prompts, completions) reach it before max_inflight_rows, so their working set stays
    # near what 20k rows of them used to be; 20 KB entries peaked at 1.4 GB under the former 256 MiB, 631 MB now.
    max_inflight_bytes: int = 64 * 1024 * 1024

    # Reliability
    claim_idle_ms: int = 60000
    claim_interval_s: float = 5.0
    max_deliveries: int = 10
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0
    socket_timeout_s: float = 10.0
    trim_enabled: bool = False
    # false: inserts skip the engine's dedup of re-sent batches (the rows still collapse, on event_id): for storing
    # again what the engine lost (README, "Reliability": a broken part), whose batches' tokens it still remembers.
    insert_deduplicate: bool = True
    trim_interval_s: float = 30.0

    # Which event types close a flow (end) or mark it failed (error).
    end_event_types: tuple[str, ...] = ("flow_completed",)
    error_event_types: tuple[str, ...] = ("error",)

    # Retention: events, session rollups and rejected entries older than this many days are dropped (TTLs set
    # by `flowtrack migrate` and at `run` start; whole weekly parts go). None = keep forever.
    retention_days: int | None = None

    # Observability
    metrics_port: int = 0  # 0 = no HTTP server
    unhealthy_after_s: float = 30.0

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
    ) -> Settings:
        """Build settings from ``FLOWTRACK_<NAME>`` variables, then apply non-None overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"FLOWTRACK_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, f.type, raw)
        settings = cls(**values)
        clean = {k: v for k, v in (overrides or {}).items() if v is not None}
        if clean:
            settings = replace(settings, **clean)
        settings.validate()
        return settings

    def validate(self) -> None:
        self._validate_numbers()
        if not self.streams:
            raise ConfigError("FLOWTRACK_STREAMS is empty: name at least one stream or pattern")
        if self.batch_max_rows < 1 or self.read_count < 1:
            raise ConfigError("batch_max_rows and read_count must be at least 1")
        if self.retention_days is not None and self.retention_days < 1:
            raise ConfigError("FLOWTRACK_RETENTION_DAYS must be at least 1 (unset keeps everything)")
        if self.max_deliveries < 1:
            raise ConfigError("max_deliveries must be at least 1 (the first delivery is never poison)")
        if self.max_inflight_rows < self.batch_max_rows:
            raise ConfigError("max_inflight_rows must be at least batch_max_rows")
        if self.max_inflight_bytes < 1024 * 1024:
            raise ConfigError("max_inflight_bytes must be at least 1 MiB (1048576)")
        if self.block_ms >= self.socket_timeout_s * 1000:
            raise ConfigError("block_ms must be shorter than socket_timeout_s, or reads time out")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"FLOWTRACK_REDIS_URL must be redis://, rediss:// or unix://, got {self.redis_url!r}")
        try:
            parts = urlsplit(self.redis_url)
            parts.port  # noqa: B018 -- raises ValueError on a bad port or bad brackets
            parse_url(self.redis_url)  # type: ignore[no-untyped-call]  # ValueError on a bad ?db= or ?socket_timeout=
        except ValueError as exc:
            raise ConfigError(f"FLOWTRACK_REDIS_URL {redact_url(self.redis_url)} is not a valid URL: {exc}"
                              ) from None
        if parts.scheme != "unix" and not _DB_PATH.match(parts.path):  # redis-py reads /abc as database 0
            raise ConfigError(f"FLOWTRACK_REDIS_URL {redact_url(self.redis_url)}: the path must be a database "
                              f"number (/0, /1, …), not {parts.path!r}")
        url = self.clickhouse_url
        if url is not None and not url.startswith(("chdb://", "http://", "https://")):
            raise ConfigError(
                f"FLOWTRACK_CLICKHOUSE_URL must be chdb:///path, http(s)://user:pass@host:8123/db; got {url!r}"
            )
        if url is not None and url.startswith(("http://", "https://")):
            try:
                clickhouse = urlsplit(url)
                host, _ = clickhouse.hostname, clickhouse.port
            except ValueError as exc:
                raise ConfigError(f"FLOWTRACK_CLICKHOUSE_URL {redact_url(url)} is not a valid URL: {exc}"
                                  ) from None
            if not host:
                raise ConfigError(f"FLOWTRACK_CLICKHOUSE_URL {redact_url(url)} names no host")
        self._validate_cluster()

    def _validate_numbers(self) -> None:
        """Durations finite and positive (a zero interval spun a core, NaN silently disabled reclaiming and made
        /healthz fail for ever, a huge one overflowed the socket API), counts and ports in range."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_s") and not (isinstance(value, float | int) and 0 < value <= MAX_SECONDS):
                raise ConfigError(f"FLOWTRACK_{f.name.upper()}={value!r} must be a number of seconds above 0 and at "
                                  f"most {MAX_SECONDS:,} (a year)")
        if self.retry_max_s < self.retry_initial_s:
            raise ConfigError("FLOWTRACK_RETRY_MAX_S must be at least FLOWTRACK_RETRY_INITIAL_S")
        if self.claim_idle_ms < 1 or self.block_ms < 1:
            raise ConfigError("FLOWTRACK_CLAIM_IDLE_MS and FLOWTRACK_BLOCK_MS must be at least 1 (a claim at 0 ms "
                              "takes entries a live worker has just read; BLOCK 0 waits for ever)")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"FLOWTRACK_METRICS_PORT={self.metrics_port} is not a port (0 = off, 1..65535)")
        if not self.group or not self.consumer:
            raise ConfigError("FLOWTRACK_GROUP and FLOWTRACK_CONSUMER must not be empty")
        if not _START_ID.match(self.group_start_id):
            raise ConfigError(f"FLOWTRACK_GROUP_START_ID={self.group_start_id!r} must be 0 (the oldest entry), $ (only "
                              "new ones) or an entry id (<ms> or <ms>-<seq>)")

    def _validate_cluster(self) -> None:
        name = self.clickhouse_cluster
        if name is None:
            return
        if not valid_cluster_name(name):
            raise ConfigError(f"FLOWTRACK_CLICKHOUSE_CLUSTER={name!r} is not a cluster name (letters, digits, _ . -)")
        if self.embedded_store_path is not None:
            raise ConfigError("FLOWTRACK_CLICKHOUSE_CLUSTER needs a ClickHouse server: set FLOWTRACK_CLICKHOUSE_URL="
                              "http(s)://user:pass@host:8123/flowtrack (the embedded store is one node)")

    @property
    def embedded_store_path(self) -> Path | None:
        """The absolute path of the embedded store, or None when a ClickHouse server is configured."""
        url = self.clickhouse_url
        if url is None:
            return Path(DEFAULT_STORE_DIR).resolve()
        if url.startswith("chdb://"):
            # clickhouse-connect reads chdb://./x as host ".", so resolve relative paths here.
            raw = url[len("chdb://") :]
            return Path(raw or DEFAULT_STORE_DIR).resolve()
        return None


def _parse(name: str, annotation: Any, raw: str) -> Any:
    kind = str(annotation)
    try:
        if "tuple" in kind:
            return _split_csv(raw)
        if kind == "bool":
            word = raw.strip().lower()
            if word not in _TRUE + _FALSE:  # "ture" must not quietly mean false
                raise ValueError(f"not one of {', '.join(_TRUE + _FALSE)}")
            return word in _TRUE
        if kind in ("int", "int | None"):
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"FLOWTRACK_{name.upper()}={raw!r} is not a valid {kind}") from exc
    return raw


def redact_url(url: str) -> str:
    """``url`` fit to print or log: a password in it becomes ``***`` (the user name stays, to tell accounts apart).
    A URL that does not parse shows nothing but its scheme (it is often in the message that says so)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.partition("://")[0] + "://… (unreadable)"
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()
