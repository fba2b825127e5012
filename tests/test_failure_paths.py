"""Failure paths a new user meets, driven as a user drives the CLI: one clear line and a documented exit code,
never a traceback, never a verdict that contradicts the exit code, and output that suits where it goes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from tests.conftest import ROOT, cli_env, drain, make_settings, run_cli, xadd_all
from worker.cli import app
from worker.redisserver import RedisServer, free_port
from worker.store import Store


def one_error_line(stderr: str) -> str:
    """The CLI's `error: …` message (rich may wrap it); asserts it is the only thing on stderr."""
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("error: ") and stderr.count("error: ") == 1, stderr
    return " ".join(stderr.split())


# -- produce ---------------------------------------------------------------------------------------
@pytest.fixture
def acl_redis(redis_server: RedisServer, redis_client: redis.Redis) -> RedisServer:
    redis_client.execute_command("ACL", "SETUSER", "reader", "on", ">reader-pw", "~*", "+ping", "+xrange")
    return redis_server


def test_produce_without_a_usable_redis_says_why_in_one_line(acl_redis: RedisServer) -> None:
    port = acl_redis.port
    cases = {
        f"redis://127.0.0.1:{free_port()}/0": "Redis unavailable",  # nothing listens
        f"redis://reader:wrong@127.0.0.1:{port}/0": "invalid username-password",  # refused login
        f"redis://reader:reader-pw@127.0.0.1:{port}/0": "no permissions to run the 'xadd' command",  # ACL
    }
    for url, reason in cases.items():
        proc = run_cli(["produce", "--count", "50", "--redis-url", url], cli_env(url, "chdb:///unused"), check=False)
        assert proc.returncode == 1, (url, proc.stdout, proc.stderr)
        assert reason in one_error_line(proc.stderr), (url, proc.stderr)
        assert "produced" not in proc.stdout
        assert "reader-pw" not in proc.stderr  # the password in the URL is not echoed


def test_a_redis_user_without_a_command_the_worker_needs_is_one_line_not_a_traceback(
        acl_redis: RedisServer, tmp_path: Path) -> None:
    """An ACL without XGROUP CREATE (or SCAN, XINFO, XACK revoked mid-run): an 84-line traceback (found by review)."""
    url = f"redis://reader:reader-pw@127.0.0.1:{acl_redis.port}/0"
    env = cli_env(url, f"chdb://{tmp_path / 'store'}", FLOWTRACK_STREAMS="flow_events:1")
    for args in (["run", "--drain", "--log-level", "warning"], ["status", "--no-store"]):
        proc = run_cli(args, env, check=False)
        assert proc.returncode == 1, (args, proc.stderr[-2000:])
        line = one_error_line(proc.stderr)
        assert "Redis refused a command" in line and "no permissions" in line, line
        assert "reader-pw" not in proc.stderr


def test_no_command_prints_a_redis_password(acl_redis: RedisServer, redis_client: redis.Redis) -> None:
    """produce, tail and status name the Redis they talk to; a password in its URL is never shown."""
    redis_client.execute_command("ACL", "SETUSER", "writer", "on", ">s3cret-pw", "~*", "&*", "+@all")
    url = f"redis://writer:s3cret-pw@127.0.0.1:{acl_redis.port}/0"
    env = cli_env(url, "chdb:///unused")
    for args in (["produce", "--count", "5"], ["status", "--no-store"], ["status", "--no-store", "--json"],
                 ["tail", "--count", "1", "--no-follow"]):
        proc = run_cli(args, env, check=False)
        assert "s3cret-pw" not in proc.stdout + proc.stderr, (args, proc.stdout, proc.stderr)
    produced = run_cli(["produce", "--count", "5"], env)
    assert "writer:***@127.0.0.1" in " ".join(produced.stdout.split())


def test_produce_progress_is_whole_lines_when_piped(redis_server: RedisServer) -> None:
    env = cli_env(redis_server.url, "chdb:///unused")
    proc = run_cli(["produce", "--count", "3000", "--rate", "2000"], env)
    assert "\r" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(re.fullmatch(r"sent [\d,]+", line) for line in lines), proc.stderr  # not run together
    assert proc.stderr.endswith("\n")
    assert len(lines) <= 3  # about one a second over ~1.5 s, not one per pipeline chunk
    assert proc.stdout.strip() == f"produced 3000 to {redis_server.url}"


# -- status while another process holds the embedded store ------------------------------------------
@pytest.fixture
def held_store(tmp_path: Path) -> Iterator[tuple[str, int]]:
    store_url = f"chdb://{tmp_path / 'held'}"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom worker.settings import Settings\nfrom worker.store import "
         f"Store\nStore.open(Settings(clickhouse_url={store_url!r})).migrate()\nprint('ready', flush=True)\n"
         "time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        yield store_url, holder.pid
    finally:
        holder.kill()
        holder.wait(10)


def test_status_with_a_held_store_says_so_once_and_never_healthy(redis_server: RedisServer,
                                                                 held_store: tuple[str, int]) -> None:
    store_url, pid = held_store
    env = cli_env(redis_server.url, store_url, COLUMNS="200")
    text = run_cli(["status"], env, check=False)
    assert text.returncode == 3, (text.stdout, text.stderr)
    message = one_error_line(text.stderr)
    assert message.count(f"(pid {pid})") == 1 and "flowtrack status --no-store" in message
    assert "healthy" not in text.stdout.lower() and f"pid {pid}" not in text.stdout  # said once, on stderr
    assert "streams and group" in text.stdout  # what was checked is still shown

    as_json = run_cli(["status", "--json"], env, check=False)
    assert as_json.returncode == 3
    report = json.loads(as_json.stdout)
    assert report["healthy"] is False and report["verdict"] == "unknown" and report["store"]["locked"] is True


def test_status_says_each_error_once_and_unhealthy_wins_over_a_held_store(held_store: tuple[str, int]) -> None:
    store_url, pid = held_store
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    proc = run_cli(["status"], cli_env(dead_redis, store_url, COLUMNS="200"), check=False)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)  # a problem found: unhealthy, whatever the store
    assert proc.stdout.count("Error 111") == 1 and "UNHEALTHY" in proc.stdout, proc.stdout
    assert one_error_line(proc.stderr).count(f"(pid {pid})") == 1
    assert json.loads(run_cli(["status", "--json"], cli_env(dead_redis, store_url), check=False).stdout)[
        "verdict"] == "unhealthy"

    no_store = run_cli(["status", "--no-store"], cli_env(dead_redis, store_url, COLUMNS="200"), check=False)
    assert no_store.returncode == 1 and no_store.stdout.count("Error 111") == 1, no_store.stdout


# -- rejected --replay --force / --again ------------------------------------------------------------
def test_force_replays_a_still_invalid_entry_once_and_again_repeats(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    broken = xadd_all(redis_client, [("flow_events:4", {"session_id": "s-bad", "event_type": "llm_call"})])[0]
    drain(make_settings(redis_server.url, clickhouse_url))
    env = cli_env(redis_server.url, clickhouse_url)

    def replay(*options: str) -> tuple[str, int]:
        result = CliRunner().invoke(app, ["rejected", "--replay", "flow_events:4", broken, *options, "-f", "json"],
                                    env=env, catch_exceptions=False)
        return json.loads(result.stdout)[0]["action"], result.exit_code

    assert replay() == ("still invalid", 1)
    length = redis_client.xlen("flow_events:4")
    assert replay("--force")[0] == "replayed"
    assert redis_client.xlen("flow_events:4") == length + 1
    for options in (("--force",), ()):  # as the README says: replaying again adds nothing, forced or not
        assert replay(*options)[0] == "already replayed"
        assert redis_client.xlen("flow_events:4") == length + 1
    assert replay("--again", "--force")[0] == "replayed"
    assert redis_client.xlen("flow_events:4") == length + 2
    misuse = CliRunner().invoke(app, ["rejected", "--force"], env=env)
    assert misuse.exit_code == 2


def test_status_says_a_store_error_once(redis_server: RedisServer) -> None:
    dead_store = f"http://u:p@127.0.0.1:{free_port()}/flowtrack"
    proc = run_cli(["status"], cli_env(redis_server.url, dead_store, COLUMNS="200"), check=False)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout.count("cannot reach ClickHouse") == 1 and "UNHEALTHY" in proc.stdout, proc.stdout
    assert "healthy" not in proc.stdout.replace("UNHEALTHY", "")


def test_a_part_of_events_the_engine_sets_aside_as_broken_is_reported_and_can_be_stored_again(
        redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> None:
    """chDB committed merged parts it could not write on a disk filling and freeing again, then detached them at the
    next start: acknowledged events vanished and `status` said healthy (found by review). A part made unreadable on
    disk (its checksums emptied) stands for it: `status` is unhealthy and says how to get the rows back, and a drain
    under a new group from the oldest entry stores them again, once."""
    store_dir = tmp_path / "store"
    env = cli_env(redis_server.url, f"chdb://{store_dir}")
    xadd_all(redis_client, [("flow_events:1", {"session_id": f"s{n % 4}", "node_id": f"n{n}", "event_type": "t"})
                            for n in range(40)])
    run_cli(["run", "--drain"], env)
    parts = [p for p in (store_dir / "data" / "flowtrack" / "events").resolve().iterdir()
             if (p / "checksums.txt").exists()]
    assert parts
    for part in parts:
        (part / "checksums.txt").write_bytes(b"")

    status = run_cli(["status", "--json"], env, check=False)
    assert status.returncode == 1, status.stdout + status.stderr
    problems = " ".join(json.loads(status.stdout)["problems"])
    assert "flowtrack.events were set aside by the engine as broken" in problems
    assert "FLOWTRACK_GROUP_START_ID=0 FLOWTRACK_INSERT_DEDUPLICATE=false" in problems
    assert "detached/broken" in problems
    visible = run_cli(["sql", "SELECT count() AS n FROM flowtrack.flow_events", "--format", "json"], env)
    assert json.loads(visible.stdout)[0]["n"] == 0  # the rows are gone: what the report is about

    again = {**env, "FLOWTRACK_GROUP": "flowtrack-recover", "FLOWTRACK_GROUP_START_ID": "0"}
    run_cli(["run", "--drain"], again)
    visible = run_cli(["sql", "SELECT count() AS n FROM flowtrack.flow_events", "--format", "json"], env)
    assert json.loads(visible.stdout)[0]["n"] == 0  # the engine remembers the batches' tokens: dropped as re-sent
    recovered = run_cli(["run", "--drain"], {**again, "FLOWTRACK_GROUP": "flowtrack-recover-2",
                                             "FLOWTRACK_INSERT_DEDUPLICATE": "false"})
    assert "set aside by the engine as broken" in recovered.stderr  # the worker says so at start too
    visible = run_cli(["sql", "SELECT count() AS n, uniqExact(event_id) AS ids FROM flowtrack.flow_events",
                       "--format", "json"], env)
    assert json.loads(visible.stdout)[0] == {"n": 40, "ids": 40}
