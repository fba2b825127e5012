"""Every command against a real Redis Cluster, given nothing but one node's URL (issue 12).

One cluster of 3 primaries x 1 replica on loopback for the module (worker/rediscluster.py), flushed between tests;
the commands run as subprocesses, as a user runs them. The bench and the "node down" case start clusters of their
own (the bench: 2 primaries, no replicas, as `--redis-cluster-shards 2` does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import ROOT, cli_env, run_cli, sql_json
from worker.rediscluster import LocalCluster, key_slots

GROUP = "flowtrack"  # the worker's default group


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(primaries=3, replicas=1) as local:
        yield local


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[redis.RedisCluster]:
    for primary in cluster.primaries():
        with cluster.client(primary) as node:
            node.flushall()
    cluster_client = redis.RedisCluster.from_url(cluster.url, protocol=2)
    yield cluster_client
    cluster_client.close()


def owner_port(cluster: LocalCluster, stream: str) -> int:
    (slot,) = key_slots([stream])
    return cluster.primary_for_slot(slot).port


def event(n: int) -> dict[str, str]:
    return {"session_id": f"s-{n}", "node_id": f"n-{n}", "event_type": "llm_call",
            "timestamp": str(1_700_000_000_000 + n)}


def tail_records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


# Plain per-user names land on every primary (one slot each); hash-tagged names share one slot (the blocking read).
SPREAD = [f"flow_events:{user}" for user in range(1, 13)]
ONE_SLOT = [f"flow_events:{{s07}}:{user}" for user in (7, 71, 135)]


@pytest.mark.parametrize("streams", [SPREAD, ONE_SLOT], ids=["spread-over-primaries", "one-hash-tag"])
def test_tail_shows_entries_from_every_primary_and_never_joins_the_group(
        cluster: LocalCluster, client: redis.RedisCluster, streams: list[str]) -> None:
    for stream in streams:  # the worker's group exists: the tail must leave it alone
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    backlog = {(stream, client.xadd(stream, event(n)).decode()) for n, stream in enumerate(streams * 3)}
    owners = {owner_port(cluster, s) for s in streams}
    if streams == SPREAD:
        assert owners == {p.port for p in cluster.primaries()}, "the streams must cover every primary"
    env = cli_env(cluster.url, "chdb:///nonexistent-not-used")

    proc = run_cli(["tail", "--since", "1h", "--no-follow", "-f", "json"], env, timeout_s=60)
    shown = [(r["source_stream"], r["source_id"]) for r in tail_records(proc.stdout)]
    assert sorted(shown) == sorted(backlog)  # each entry once, from every primary
    assert [s[1] for s in shown] == sorted((s[1] for s in shown), key=lambda i: tuple(map(int, i.split("-"))))

    # Live: entries keep arriving on every stream while the tail follows; it stops after --count of them.
    added: set[tuple[str, str]] = set()
    stop = threading.Event()

    def keep_adding() -> None:
        n = 1000
        while not stop.is_set():
            for stream in streams:
                added.add((stream, client.xadd(stream, event(n)).decode()))
                n += 1
            time.sleep(0.1)

    want = 4 * len(streams)
    tail = subprocess.Popen([sys.executable, "-m", "worker.cli", "tail", "-f", "json", "--count", str(want)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    adder = threading.Thread(target=keep_adding, daemon=True)
    adder.start()
    try:
        out, err = tail.communicate(timeout=60)
    finally:
        stop.set()
        adder.join()
    assert tail.returncode == 0, err[-2000:]
    live = [(r["source_stream"], r["source_id"]) for r in tail_records(out)]
    assert len(live) == want and len(set(live)) == want and set(live) <= added
    assert {owner_port(cluster, s) for s, _ in live} == owners

    for stream in streams:  # no consumer joined, nothing pending, no other group
        groups = client.xinfo_groups(stream)
        assert [(g["name"], g["consumers"], g["pending"]) for g in groups] == [(GROUP.encode(), 0, 0)]


def test_tail_follows_a_stream_whose_slot_moves(cluster: LocalCluster, client: redis.RedisCluster) -> None:
    """The slot of one followed stream is migrated to another primary mid-follow (MOVED, then ASK-free reads from the
    new owner): the tail keeps showing its entries, none skipped, none twice."""
    moving, steady = "flow_events:1", "flow_events:2"
    assert owner_port(cluster, moving) != owner_port(cluster, steady)
    (slot,) = key_slots([moving])
    target = next(p for p in cluster.primaries() if p.port != owner_port(cluster, moving))
    for stream in (moving, steady):
        client.xadd(stream, event(0))
    added: list[tuple[str, str]] = []
    stop = threading.Event()

    def keep_adding() -> None:
        n = 1
        while not stop.is_set():
            for stream in (moving, steady):
                added.append((stream, client.xadd(stream, event(n)).decode()))
                n += 1
            time.sleep(0.05)

    want = 60
    tail = subprocess.Popen([sys.executable, "-m", "worker.cli", "tail", "-f", "json", "--count", str(want)],
                            env=cli_env(cluster.url, "chdb:///nonexistent-not-used"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    adder = threading.Thread(target=keep_adding, daemon=True)
    adder.start()
    try:
        time.sleep(1.0)
        cluster.migrate_slot(slot, target)
        moved_at = len(added)
        out, err = tail.communicate(timeout=60)
    finally:
        stop.set()
        adder.join()
    assert tail.returncode == 0, err[-2000:]
    assert owner_port(cluster, moving) == target.port
    live = [(r["source_stream"], r["source_id"]) for r in tail_records(out)]
    assert len(set(live)) == len(live) == want and set(live) <= set(added)
    for stream in (moving, steady):  # each stream's entries in order, without a gap, past the move
        ids = [i for s, i in live if s == stream]
        expected = [i for s, i in added if s == stream]
        start = expected.index(ids[0])
        assert ids == expected[start:start + len(ids)]
    assert any(entry in live for entry in added[moved_at:] if entry[0] == moving)


def streams_by_primary(cluster: LocalCluster) -> dict[int, dict[str, int]]:
    found: dict[int, dict[str, int]] = {}
    for primary in cluster.primaries():
        with cluster.client(primary) as node:
            found[primary.port] = {key.decode(): int(node.xlen(key)) for key in node.scan_iter(_type="stream")}
    return found


@pytest.mark.parametrize(("options", "names"), [
    ([], "tagged"), (["--shard-tags", "0"], "plain"), (["--single-stream"], "single")])
def test_produce_spreads_entries_over_the_primaries(cluster: LocalCluster, client: redis.RedisCluster,
                                                    options: list[str], names: str) -> None:
    proc = run_cli(["produce", "--count", "900", "--users", "40", "--seed", "5", *options],
                   cli_env(cluster.url, "chdb:///nonexistent-not-used"), timeout_s=60)
    assert "Redis Cluster" in proc.stdout
    by_primary = streams_by_primary(cluster)
    every = {name: length for streams in by_primary.values() for name, length in streams.items()}
    assert sum(every.values()) == 900
    if names == "single":
        assert list(every) == ["flow_events"]
        return
    assert all(by_primary.values()), f"a primary holds no stream: {by_primary}"
    for name in every:
        prefix, *middle, user = name.split(":")
        assert prefix == "flow_events" and 1 <= int(user) <= 40
        # tagged: flow_events:{sNN}:<user>, NN = user mod 64 (a worker reads one slot's streams with one command)
        assert middle == ([f"{{s{int(user) % 64:02d}}}"] if names == "tagged" else [])


def test_status_sums_lag_and_pending_over_the_cluster(cluster: LocalCluster, client: redis.RedisCluster) -> None:
    lengths: dict[str, int] = {}
    for n, stream in enumerate(SPREAD):
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        for i in range(n + 1):
            client.xadd(stream, event(i))
        lengths[stream] = n + 1
    one_per_primary = {owner_port(cluster, stream): stream for stream in reversed(SPREAD)}
    assert len(one_per_primary) == len(cluster.primaries())
    pending: dict[str, int] = {}
    for stream in one_per_primary.values():  # a consumer holds up to two entries of a stream on every primary
        client.xreadgroup(GROUP, "worker-a", {stream: ">"}, count=2)
        pending[stream] = min(2, lengths[stream])
    lag = sum(lengths.values()) - sum(pending.values())
    env = cli_env(cluster.url, "chdb:///nonexistent-not-used")

    proc = run_cli(["status", "--no-store", "--json", "--max-lag", "100"], env)
    report = json.loads(proc.stdout)
    assert report["healthy"] is True and report["redis"]["error"] is None
    assert {s["name"] for s in report["streams"]} == set(SPREAD)
    assert report["redis"]["total_lag"] == lag and report["redis"]["total_pending"] == sum(pending.values())
    assert report["redis"]["cluster_primaries"] == 3
    text = run_cli(["status", "--no-store", "--max-lag", "100"], env).stdout
    assert f"12 stream(s) on a Redis Cluster of 3 primaries, total lag {lag}, pending {sum(pending.values())}" in text
    assert {s["name"]: s["group"]["pending"] for s in report["streams"] if s["group"]["pending"]} == pending

    over = run_cli(["status", "--no-store", "--json", "--max-lag", "11"], env, check=False)
    assert over.returncode == 1  # flow_events:12 holds 12 unread entries
    assert json.loads(over.stdout)["problems"] == ["flow_events:12: lag 12 entries (over --max-lag 11)"]
    time.sleep(0.05)
    stale = run_cli(["status", "--no-store", "--json", "--claim-idle-ms", "1"], env, check=False)
    assert stale.returncode == 1
    assert len(json.loads(stale.stdout)["problems"]) == len(pending)  # idle pending entries on every primary


def test_status_tail_and_produce_with_a_primary_down_fail_in_one_line() -> None:
    with LocalCluster(primaries=2, replicas=0) as small:
        env = cli_env(small.url, "chdb:///nonexistent-not-used")
        down = small.nodes[1]  # not the URL's node: the client finds the cluster, then one primary is gone
        down.kill()
        proc = run_cli(["status", "--no-store"], env, check=False, timeout_s=60)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stdout.startswith("UNHEALTHY: Redis unreachable") and f":{down.port}" in proc.stdout
        for args in (["tail", "--since", "1h", "--no-follow"], ["produce", "--count", "100"]):
            failed = run_cli(args, env, check=False, timeout_s=60)
            assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
            assert failed.stderr.count("\n") == 1 and f":{down.port}" in failed.stderr, failed.stderr


def test_demo_with_a_cluster_node_url_stores_events(cluster: LocalCluster, client: redis.RedisCluster,
                                                    tmp_path: Path) -> None:
    store = f"chdb://{tmp_path / 'store'}"
    replica = next(n for n in cluster.nodes if n not in cluster.primaries())  # any node will do, a replica too
    proc = run_cli(["demo", "--duration-s", "4", "--rate", "200", "--users", "8", "--redis-url", replica.url,
                    "--clickhouse-url", store], cli_env(cluster.url, store), timeout_s=120)
    assert "stored" in proc.stdout
    by_primary = streams_by_primary(cluster)
    written = {name for streams in by_primary.values() for name in streams}
    assert len([port for port, streams in by_primary.items() if streams]) >= 2
    rows = sql_json("SELECT source_stream, count() AS n FROM flowtrack.events GROUP BY source_stream", store)
    stored = {row["source_stream"]: int(row["n"]) for row in rows}
    assert stored and set(stored) <= written
    assert {owner_port(cluster, s) for s in stored} == {port for port, streams in by_primary.items() if streams}


def test_bench_on_a_cluster_verifies_exactly_once() -> None:
    proc = run_cli(["bench", "--redis-cluster-shards", "2", "--workers", "2", "--events", "3000", "--streams", "8",
                    "--latency-s", "0", "--naive-max-s", "0", "--idle-s", "0", "--json"],
                   {k: v for k, v in os.environ.items() if not k.startswith("FLOWTRACK_")}, timeout_s=300)
    result = json.loads(proc.stdout)
    assert "a cluster of 2 primaries" in result["redis_server"]
    assert result["pipeline"]["exit_codes"] == [0, 0]
    assert result["floor"]["events"] == result["pipeline"]["events"] == 3000
    verification = result["verification"]
    assert verification["ok"] is True, verification
    assert verification["missing"] == verification["duplicated"] == verification["wrongly_rejected"] == 0
    assert verification["stored_rows"] + verification["rejected"] == 3000


def test_bench_on_a_cluster_node_url_verifies_and_leaves_no_keys(cluster: LocalCluster,
                                                                 client: redis.RedisCluster) -> None:
    client.xadd("flow_events:1", event(1))  # the user's data: left alone
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWTRACK_")}
    args = ["bench", "--redis-url", cluster.url, "--events", "2000", "--streams", "6", "--latency-s", "0",
            "--naive-max-s", "0", "--idle-s", "0", "--json"]
    result = json.loads(run_cli(args, env, timeout_s=300).stdout)
    assert "a Redis Cluster at" in result["redis_server"] and result["verification"]["ok"] is True
    assert result["pipeline"]["events"] == 2000
    left = {name for streams in streams_by_primary(cluster).values() for name in streams}
    assert left == {"flow_events:1"}
    client.xadd("bench_events:{s01}:1", event(1))  # a run needs an empty bench keyspace: refused, in one line
    refused = run_cli(args, env, check=False)
    assert refused.returncode == 1 and "already holds 1 bench key(s)" in refused.stderr
    assert len(refused.stderr.split()) > 5 and len(refused.stderr.strip().splitlines()) == 1


ODD_KEYS = [b"flow_events:\xff", b"flow_events:\xfe", b"flow_events:\xc3"]  # not UTF-8, one on each primary


def test_tail_and_status_take_keys_that_are_not_utf8(cluster: LocalCluster, client: redis.RedisCluster) -> None:
    ports = set()
    for key in ODD_KEYS:  # set up through the owner's plain client (redis-py's cluster XREADGROUP loops on them)
        (slot,) = key_slots([key])
        owner = cluster.primary_for_slot(slot)
        ports.add(owner.port)
        with cluster.client(owner) as node:
            node.xadd(key, event(0))  # type: ignore[arg-type]
            node.xgroup_create(key, GROUP, id="0")
            node.xreadgroup(GROUP, b"c\xff", {key: ">"})  # type: ignore[dict-item, arg-type]
    assert ports == {p.port for p in cluster.primaries()}
    shown = {rf"flow_events:\x{key[-1]:02x}" for key in ODD_KEYS}
    env = cli_env(cluster.url, "chdb:///nonexistent-not-used")

    backlog = tail_records(run_cli(["tail", "--since", "1h", "--no-follow", "-f", "json"], env).stdout)
    assert {r["source_stream"] for r in backlog} == shown
    assert all(r["reason"].startswith("stream key is not valid UTF-8") for r in backlog)

    stop = threading.Event()

    def keep_adding() -> None:  # the live read names the exact keys on every node
        while not stop.is_set():
            for key in ODD_KEYS:
                client.xadd(key, event(1))  # type: ignore[arg-type]
            time.sleep(0.1)

    adder = threading.Thread(target=keep_adding, daemon=True)
    adder.start()
    try:
        live = run_cli(["tail", "-f", "json", "--count", "9"], env, timeout_s=60)
    finally:
        stop.set()
        adder.join()
    assert {r["source_stream"] for r in tail_records(live.stdout)} == shown

    report = json.loads(run_cli(["status", "--no-store", "--json"], env).stdout)
    assert {s["name"] for s in report["streams"]} == shown
    assert all(s["group"]["pending"] == 1 and s["group"]["consumers"][0]["name"] == "c\\xff"
               for s in report["streams"])


def test_rejected_lists_and_replays_entries_of_streams_on_every_primary(cluster: LocalCluster,
                                                                        client: redis.RedisCluster,
                                                                        tmp_path: Path) -> None:
    store = f"chdb://{tmp_path / 'store'}"
    env = cli_env(cluster.url, store)
    one_per_primary = {owner_port(cluster, stream): stream for stream in SPREAD}
    broken = {stream: client.xadd(stream, {"session_id": "s", "event_type": "x"}).decode()  # no node_id
              for stream in one_per_primary.values()}
    run_cli(["run", "--drain"], env)
    listed = json.loads(run_cli(["rejected", "-f", "json"], env).stdout)
    assert {(r["source_stream"], r["source_id"]) for r in listed} == set(broken.items())

    replayed = json.loads(run_cli(["rejected", "--replay", "--all", "--force", "-f", "json"], env).stdout)
    assert {(o["source_stream"], o["action"]) for o in replayed} == {(s, "replayed") for s in broken}
    for outcome in replayed:  # re-added to its own stream, on the primary that owns it
        assert client.xrange(outcome["source_stream"], min=outcome["new_id"], max=outcome["new_id"])
        assert client.xlen(outcome["source_stream"]) == 2
    queued = json.loads(run_cli(["rejected", "-f", "json"], env).stdout)
    assert {r["replayed"] for r in queued} == {f"queued {o['new_id']}" for o in replayed}
    again = json.loads(run_cli(["rejected", "--replay", "--all", "--force", "-f", "json"], env, check=False).stdout)
    assert {o["action"] for o in again} == {"already replayed"}
