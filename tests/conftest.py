"""Shared fixtures: a real redis-server per test on a free port, a real embedded ClickHouse (chDB).

chDB allows one store path per process, so in-process tests share one session store (truncated
between tests) and tests that run the worker as a subprocess give it its own store path and read
it back through `flowtrack sql` in another subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from worker.normalize import derive_event_id, mapping_digest
from worker.pipeline import Pipeline
from worker.redisserver import RedisServer
from worker.settings import Settings
from worker.store import Store

ROOT = Path(__file__).resolve().parent.parent
SERVER_URL_ENV = "FLOWTRACK_TEST_CLICKHOUSE_URL"
# With it, FLOWTRACK_TEST_CLICKHOUSE_URL names a node of this cluster (remote_servers name): the cluster tests
# (tests/test_clickhouse_cluster.py) run against it, and the single-node server tests skip (it holds the cluster
# layout).
CLUSTER_ENV = "FLOWTRACK_TEST_CLICKHOUSE_CLUSTER"
PUBLIC_TABLES = ("events", "rejected", "sessions", "session_spans", "events_by_time")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, protocol=2)
    yield client
    client.close()


def _targets() -> list[Any]:
    targets: list[Any] = ["embedded"]
    targets.append(pytest.param("server", marks=pytest.mark.skipif(
        not os.environ.get(SERVER_URL_ENV) or bool(os.environ.get(CLUSTER_ENV)),
        reason=f"set {SERVER_URL_ENV} (and not {CLUSTER_ENV}) to run against a single ClickHouse server")))
    return targets


@pytest.fixture(scope="session")
def embedded_store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"chdb://{tmp_path_factory.mktemp('store').resolve()}"


@pytest.fixture(params=_targets())
def clickhouse_url(request: pytest.FixtureRequest, embedded_store_url: str) -> str:
    return embedded_store_url if request.param == "embedded" else os.environ[SERVER_URL_ENV]


@pytest.fixture
def store(clickhouse_url: str) -> Store:
    """A migrated store with every flowtrack table emptied."""
    st = Store.open(Settings(clickhouse_url=clickhouse_url))
    st.migrate()
    for table in PUBLIC_TABLES:
        st.client.command(f"TRUNCATE TABLE IF EXISTS flowtrack.{table}")
    return st


def make_settings(redis_url: str, clickhouse_url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = dict(redis_url=redis_url, clickhouse_url=clickhouse_url, consumer="test-worker",
                                batch_max_wait_s=0.05, block_ms=50, claim_interval_s=0.5,
                                retry_initial_s=0.05, retry_max_s=0.5)
    base.update(overrides)
    return Settings(**base)


def drain(settings: Settings, timeout_s: float = 90) -> Pipeline:
    """One in-process ``run(drain=True)`` to completion; returns the closed pipeline (for its stats)."""

    async def go() -> Pipeline:
        pipeline = Pipeline(settings)
        try:
            ok = await asyncio.wait_for(pipeline.run(drain=True), timeout=timeout_s)
            assert ok, "drain run reported work left"
        finally:
            await pipeline.close()
        return pipeline

    return asyncio.run(go())


def xadd_all(client: redis.Redis, entries: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    ids = []
    pipe = client.pipeline(transaction=False)
    for stream, fields in entries:
        pipe.xadd(stream, dict(fields))
    for entry_id in pipe.execute():
        ids.append(entry_id.decode() if isinstance(entry_id, bytes) else entry_id)
    return ids


def derived_id(stream: str, entry_id: str, fields: Mapping[Any, Any]) -> str:
    """The event id the worker derives for an entry without event_id, from the fields given to XADD (redis-py
    sends str and numbers as their UTF-8 text, which is what ``mapping_digest`` hashes)."""
    return derive_event_id(stream, entry_id, mapping_digest(fields))


def cli_env(redis_url: str, clickhouse_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWTRACK_")}
    env.update(FLOWTRACK_REDIS_URL=redis_url, FLOWTRACK_CLICKHOUSE_URL=clickhouse_url)
    env.update(extra)
    return env


def run_cli(args: Sequence[str], env: Mapping[str, str], timeout_s: float = 120,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "worker.cli", *args], env=dict(env), capture_output=True,
                          text=True, timeout=timeout_s, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"flowtrack {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
    return proc


def sql_json(sql: str, clickhouse_url: str, **params: str) -> list[dict[str, Any]]:
    """Query a store owned by no live process, from a subprocess (chDB: one store per process)."""
    args = ["sql", sql, "--format", "json", "--clickhouse-url", clickhouse_url]
    for name, value in params.items():
        args += ["--param", f"{name}={value}"]
    proc = run_cli(args, env={k: v for k, v in os.environ.items() if not k.startswith("FLOWTRACK_")})
    result: list[dict[str, Any]] = json.loads(proc.stdout)
    return result
