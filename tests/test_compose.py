"""docker-compose.yml and the deploy/ files, checked statically (no Docker engine here), and the Redis ACL
file it renders checked for real against a redis-server."""

from __future__ import annotations

import re
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.conftest import ROOT
from tests.test_security import redis_binaries, server_version
from worker.redisserver import free_port
from worker.source import PRODUCER_ACL_RULES, WORKER_ACL_RULES

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY\b", re.I)


def test_the_stack_has_its_services_each_with_a_healthcheck() -> None:
    assert {"redis", "clickhouse", "grafana", "prometheus", "worker"} <= set(SERVICES)
    for name, service in SERVICES.items():
        check = service.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        assert "disable" not in check


def test_every_dependency_waits_on_a_condition() -> None:
    for name, service in SERVICES.items():
        if name in ("redis", "clickhouse", "keeper"):
            assert "depends_on" not in service
            continue
        depends = service.get("depends_on")
        assert isinstance(depends, dict) and depends, f"{name}: depends_on with conditions"
        for target, spec in depends.items():
            assert target in SERVICES
            assert spec["condition"] in ("service_healthy", "service_started", "service_completed_successfully")
    assert SERVICES["worker"]["depends_on"] == {"redis": {"condition": "service_healthy"},
                                                "clickhouse": {"condition": "service_healthy"}}
    assert SERVICES["grafana"]["depends_on"]["clickhouse"]["condition"] == "service_healthy"


def test_images_are_pinned() -> None:
    for name, service in SERVICES.items():
        image = service.get("image", "")
        if "build" in service:
            continue
        assert ":" in image and not image.endswith((":latest", ":main")), f"{name}: pin {image}"
    grafana_version = tuple(int(p) for p in SERVICES["grafana"]["image"].split(":")[1].split(".")[:2])
    assert grafana_version >= (11, 6)


def test_no_secret_literals() -> None:
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if SECRET_KEY.search(str(key)) and isinstance(value, str):
                    assert value.startswith("${") or "$${" in value or "$$" in value, \
                        f"{path}.{key} must come from the environment, not a literal"
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")
        elif isinstance(node, str):
            # user:password@ in URLs must be a variable
            for secret in re.findall(r"//[^:/@\s]+:([^@\s]+)@", node):
                assert secret.startswith("${"), f"{path}: URL with a literal password"

    walk(COMPOSE, "compose")
    example = (ROOT / ".env.example").read_text()
    for line in example.splitlines():
        if SECRET_KEY.search(line.split("=", 1)[0]) and "=" in line and not line.startswith("#"):
            assert line.split("=", 1)[1] == "", f".env.example must not ship a password: {line}"
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert not (ROOT / ".env").exists() or "?? .env" not in _git_status()


def _git_status() -> str:
    return subprocess.run(["git", "status", "--short", "--ignored=no"], cwd=ROOT, capture_output=True,
                          text=True).stdout


def test_every_referenced_variable_is_documented_in_env_example() -> None:
    lines = (ROOT / "docker-compose.yml").read_text().splitlines()
    text = "\n".join(line.split(" #", 1)[0] for line in lines if not line.lstrip().startswith("#"))
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    documented = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
                  if "=" in line and not line.startswith("#")}
    assert used <= documented, f"add to .env.example: {sorted(used - documented)}"


def test_grafana_is_locked_down_and_has_the_plugin() -> None:
    env = SERVICES["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_DASHBOARDS_MIN_REFRESH_INTERVAL"] == "1s"
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD")
    # Grafana 11.6's image installs GF_INSTALL_PLUGINS ("id version") before starting; it has no
    # GF_PLUGINS_PREINSTALL_SYNC (that came after 11.6), which it would silently ignore.
    assert SERVICES["grafana"]["image"] == "grafana/grafana:11.6.0"
    assert not any(name.startswith("GF_PLUGINS_PREINSTALL") for name in env)
    plugin, version = env["GF_INSTALL_PLUGINS"].split()
    assert plugin == "grafana-clickhouse-datasource"
    assert tuple(int(part) for part in version.split(".")) >= (4, 20, 0)
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"


def test_worker_uses_least_privilege_users_and_serves_health() -> None:
    env = SERVICES["worker"]["environment"]
    assert env["FLOWTRACK_REDIS_URL"].startswith("redis://worker:${REDIS_WORKER_PASSWORD")
    assert env["FLOWTRACK_CLICKHOUSE_URL"].startswith("http://flowtrack_writer:${CLICKHOUSE_WRITER_PASSWORD")
    port = env["FLOWTRACK_METRICS_PORT"]
    assert f"{port}/healthz" in " ".join(SERVICES["worker"]["healthcheck"]["test"])
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert f"worker:{port}" in scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    producer = SERVICES["producer"]
    assert producer["profiles"] == ["demo"]
    assert producer["environment"]["FLOWTRACK_REDIS_URL"].startswith("redis://producer:${REDIS_PRODUCER_PASSWORD")
    assert "FLOWTRACK_CLICKHOUSE_URL" not in producer["environment"]


def test_clickhouse_users() -> None:
    root = ET.parse(ROOT / "deploy" / "clickhouse" / "users.xml").getroot()
    users = root.find("users")
    assert users is not None
    writer, grafana = users.find("flowtrack_writer"), users.find("grafana")
    assert writer is not None and grafana is not None
    for user in (writer, grafana):
        password = user.find("password")
        assert password is not None and password.get("from_env") and not (password.text or "").strip()
    # The writer: explicit grants (without them a user defined in XML holds every privilege but access management),
    # on the flowtrack database, plus one system table and CLUSTER: no source (FILE, URL, REMOTE, S3 …), no SYSTEM.
    assert writer.find("allow_databases") is None and writer.find("access_management") is None
    assert _grants(writer) == WRITER_GRANTS
    # Grafana: SELECT on flowtrack and nothing else (no FILE, URL, REMOTE, S3: explicit grants replace the defaults,
    # and cannot be combined with allow_databases / access_management).
    assert [q.text for q in grafana.findall("grants/query")] == ["GRANT SELECT ON flowtrack.*"]
    assert grafana.find("allow_databases") is None and grafana.find("access_management") is None
    profile = root.find(f"profiles/{grafana.findtext('profile')}")
    assert profile is not None
    assert profile.findtext("readonly") in ("1", "2")
    constraint = profile.find("constraints/max_execution_time")
    assert constraint is not None and constraint.find("changeable_in_readonly") is not None
    default_networks = [ip.text for ip in users.findall("default/networks/ip")]
    assert default_networks and set(default_networks) <= {"::1", "127.0.0.1"}
    env = SERVICES["clickhouse"]["environment"]
    for user in (writer, grafana):
        assert user.find("password").get("from_env") in env  # type: ignore[union-attr]


WRITER_GRANTS = {
    ("SELECT", "flowtrack.*"), ("INSERT", "flowtrack.*"), ("ALTER", "flowtrack.*"), ("CREATE DATABASE", "flowtrack.*"),
    ("CREATE TABLE", "flowtrack.*"), ("CREATE VIEW", "flowtrack.*"), ("DROP TABLE", "flowtrack.*"),
    ("DROP VIEW", "flowtrack.*"), ("TRUNCATE", "flowtrack.*"), ("OPTIMIZE", "flowtrack.*"),
    ("SELECT", "system.merge_tree_settings"), ("CLUSTER", "*.*"),
}
_GRANT = re.compile(r"^GRANT\s+(.+?)\s+ON\s+(\S+)$")


def _grants(user: ET.Element) -> set[tuple[str, str]]:
    """(privilege, on) pairs of a user's grant queries."""
    pairs = set()
    for query in user.findall("grants/query"):
        found = _GRANT.match((query.text or "").strip())
        assert found, query.text
        pairs |= {(privilege.strip(), found.group(2)) for privilege in found.group(1).split(",")}
    return pairs


# What each kind of statement the worker sends to a server needs (ClickHouse's access rights: EXCHANGE is a rename
# both ways, CREATE OR REPLACE drops the old object). A statement of a kind not listed fails the test below: decide
# its grant, then list it.
_NEEDS = {
    "SELECT": {"SELECT"}, "INSERT INTO": {"INSERT", "SELECT"}, "ALTER TABLE": {"ALTER"}, "DELETE FROM": {"ALTER"},
    "CREATE DATABASE": {"CREATE DATABASE"}, "CREATE TABLE": {"CREATE TABLE"},
    "CREATE OR REPLACE TABLE": {"CREATE TABLE", "DROP TABLE"}, "CREATE VIEW": {"CREATE VIEW"},
    "CREATE OR REPLACE VIEW": {"CREATE VIEW", "DROP VIEW"}, "CREATE {REPLACE}VIEW": {"CREATE VIEW", "DROP VIEW"},
    "CREATE MATERIALIZED VIEW": {"CREATE VIEW", "INSERT"},
    "DROP TABLE": {"DROP TABLE"}, "DROP VIEW": {"DROP VIEW"},
    "DROP {KIND.UPPER()}": {"DROP TABLE", "DROP VIEW"}, "TRUNCATE TABLE": {"TRUNCATE"},
    "OPTIMIZE TABLE": {"OPTIMIZE"}, "EXCHANGE TABLES": {"SELECT", "INSERT", "CREATE TABLE", "DROP TABLE"},
}
_STATEMENT_KIND = re.compile(r"^(" + "|".join(sorted(map(re.escape, _NEEDS), key=len, reverse=True)) + r")(?=\s|$)")
# Sent by the store only to the embedded engine, which has no users (worker/store.py says where).
_EMBEDDED_ONLY = {"SYSTEM JEMALLOC PURGE"}
# SQL text in the modules that talk to a server on the worker's behalf (the benchmarks run on the embedded engine).
_WORKER_SQL_MODULES = ("store.py", "clusterddl.py", "sink.py", "rollup.py")
_SQL_LITERAL = re.compile(r'\b[rf]{0,2}"((?:SELECT|INSERT|ALTER|DELETE|CREATE|DROP|TRUNCATE|OPTIMIZE|EXCHANGE|SYSTEM|'
                          r'RENAME|ATTACH|DETACH|KILL|GRANT|REVOKE|SET)\b[^"]*)"')


def _worker_statements() -> list[str]:
    statements = []
    for sql_file in sorted((ROOT / "schemas" / "clickhouse").glob("*.sql")):
        text = "\n".join(line for line in sql_file.read_text().splitlines() if not line.lstrip().startswith("--"))
        statements += [s.strip() for s in text.split(";") if s.strip()]
    for module in _WORKER_SQL_MODULES:
        statements += _SQL_LITERAL.findall((ROOT / "worker" / module).read_text())
    return statements


def test_the_writers_grants_cover_every_statement_the_worker_sends() -> None:
    root = ET.parse(ROOT / "deploy" / "clickhouse" / "users.xml").getroot()
    writer = root.find("users/flowtrack_writer")
    assert writer is not None
    granted = {privilege for privilege, on in _grants(writer) if on == "flowtrack.*"}
    statements = _worker_statements()
    kinds = set()
    for statement in statements:
        flat = " ".join(statement.split())
        if flat in _EMBEDDED_ONLY:
            continue
        found = _STATEMENT_KIND.match(flat.upper())
        assert found, f"a statement of a kind the writer's grants were not checked for: {flat[:80]!r}"
        kinds.add(found.group(1))
        assert _NEEDS[found.group(1)] <= granted, flat[:80]
    # The scan found the statements it is meant to (a regex gone blind would pass everything).
    assert {"INSERT INTO", "ALTER TABLE", "DELETE FROM", "CREATE MATERIALIZED VIEW", "EXCHANGE TABLES",
            "OPTIMIZE TABLE", "TRUNCATE TABLE", "CREATE OR REPLACE VIEW", "DROP TABLE"} <= kinds
    # Reads outside flowtrack: only what the writer was granted, or what every user may read.
    readable = {on for privilege, on in _grants(writer) if privilege == "SELECT"}
    tables = _system_tables_read()
    assert {"one", "columns", "merge_tree_settings"} <= tables
    for table in tables - _READABLE_BY_EVERY_USER - _EMBEDDED_ONLY_SYSTEM_TABLES:
        assert f"system.{table}" in readable, table


# With select_from_system_db_requires_grant (on by default in the server's config), these stay readable by everyone.
_READABLE_BY_EVERY_USER = {"one", "tables", "columns", "databases"}
# Read by the start-up heals, which run on the embedded engine only (Store.migrate).
_EMBEDDED_ONLY_SYSTEM_TABLES = {"parts", "detached_parts"}


def _system_tables_read() -> set[str]:
    """system.* tables named in the worker's SQL: string literals of its modules, migrations and their guards."""
    texts = [(ROOT / "worker" / module).read_text() for module in _WORKER_SQL_MODULES]
    literals = [literal for text in texts for literal in re.findall(r'"[^"\n]*"', text)]
    for sql_file in (ROOT / "schemas" / "clickhouse").glob("*.sql"):
        literals += [line for line in sql_file.read_text().splitlines()
                     if not line.lstrip().startswith("--") or line.startswith("-- only-if:")]
    return set(re.findall(r"\bsystem\.(\w+)", " ".join(literals)))


def test_the_benchmark_runs_dashboard_queries_under_grafanas_profile() -> None:
    """flowtrack bench queries applies GRAFANA_QUERY_SETTINGS to every dashboard and alert query: they must be what
    Grafana's ClickHouse user gets, or the figures describe another server."""
    from worker.grafana_sql import GRAFANA_QUERY_SETTINGS

    root = ET.parse(ROOT / "deploy" / "clickhouse" / "users.xml").getroot()
    profile = root.find(f"profiles/{root.findtext('users/grafana/profile')}")
    assert profile is not None
    query_settings = {child.tag: int(child.text or "") for child in profile
                      if child.tag not in ("readonly", "constraints", "max_execution_time", "max_result_rows",
                                           "result_overflow_mode")}
    assert query_settings == GRAFANA_QUERY_SETTINGS


def test_redis_keeps_data_and_uses_the_tested_acl_rules() -> None:
    service = SERVICES["redis"]
    start = (ROOT / "deploy" / "redis" / "start.sh").read_text()
    assert "--appendonly yes" in start and "--aclfile" in start
    template = (ROOT / "deploy" / "redis" / "users.acl.template").read_text().splitlines()
    assert template[0] == "user default off"
    assert template[1] == f"user worker on >${{REDIS_WORKER_PASSWORD}} {WORKER_ACL_RULES}"
    assert template[2] == f"user producer on >${{REDIS_PRODUCER_PASSWORD}} {PRODUCER_ACL_RULES}"
    assert any(v.startswith("redis-data:") for v in service["volumes"])


@pytest.fixture(params=redis_binaries(), ids=lambda path: f"redis-{server_version(path)}")
def acl_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """A real redis-server (each one found here, the oldest supported included) started from the ACL file the
    compose entrypoint renders."""
    template = (ROOT / "deploy" / "redis" / "users.acl.template").read_text()
    (tmp_path / "users.acl").write_text(template.replace("${REDIS_WORKER_PASSWORD}", "w-pass")
                                        .replace("${REDIS_PRODUCER_PASSWORD}", "p-pass"))
    port = free_port()
    proc = subprocess.Popen([request.param, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
                             "--aclfile", str(tmp_path / "users.acl"), "--save", "", "--appendonly", "yes"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port, username="producer", password="p-pass").ping()
                break
            except redis.exceptions.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise AssertionError(f"redis-server refused the rendered ACL file: {err}") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_rendered_acl_file_is_accepted_and_enforced(acl_redis: int) -> None:
    producer = redis.Redis(port=acl_redis, username="producer", password="p-pass", protocol=2)
    worker = redis.Redis(port=acl_redis, username="worker", password="w-pass", protocol=2)
    anonymous = redis.Redis(port=acl_redis, protocol=2)
    producer.xadd("flow_events:1", {"session_id": "s", "node_id": "n", "event_type": "user_message"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        producer.xadd("secrets", {"a": "b"})
    worker.xgroup_create("flow_events:1", "flowtrack", id="0")
    assert worker.xreadgroup("flowtrack", "c", {"flow_events:1": ">"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.xadd("flow_events:1", {"a": "b"})
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
        anonymous.get("flow_events:1")
    for client in (producer, worker, anonymous):
        client.close()


# -- profile `cluster`: 2 shards x 2 replicas with ClickHouse Keeper (deploy/clickhouse/cluster/) --------------------
CLUSTER_DIR = ROOT / "deploy" / "clickhouse" / "cluster"
CLUSTER_NODES = ("ch-s1r1", "ch-s1r2", "ch-s2r1", "ch-s2r2")


def _mounted(service: dict[str, Any], container_path: str) -> Path:
    """The repo file a service mounts at container_path."""
    for volume in service["volumes"]:
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == container_path:
            return ROOT / source
    raise AssertionError(f"nothing mounted at {container_path}")


def _xml(path: Path) -> ET.Element:
    return ET.parse(path).getroot()


def test_the_cluster_profile_has_keeper_four_nodes_a_worker_and_grafana() -> None:
    in_profile = {name for name, service in SERVICES.items() if "cluster" in service.get("profiles", [])}
    assert in_profile == {"keeper", *CLUSTER_NODES, "worker-cluster", "grafana-cluster"}
    # The single-node stack is untouched: its services start without a profile, as before.
    assert all("profiles" not in SERVICES[name] for name in ("redis", "clickhouse", "worker", "grafana", "prometheus"))
    for node in CLUSTER_NODES:
        service = SERVICES[node]
        assert service["hostname"] == node
        assert service["image"] == SERVICES["clickhouse"]["image"]
        assert service["depends_on"] == {"keeper": {"condition": "service_healthy"}}
    data = [next(v for v in SERVICES[node]["volumes"] if v.endswith(":/var/lib/clickhouse")) for node in CLUSTER_NODES]
    assert len(set(data)) == len(CLUSTER_NODES)  # each replica its own disk
    assert SERVICES["keeper"]["entrypoint"][-1] == "--config-file=/etc/clickhouse-keeper/keeper.xml"


def test_remote_servers_list_two_shards_of_two_replicas_with_distinct_macros() -> None:
    config = _xml(_mounted(SERVICES["ch-s1r1"], "/etc/clickhouse-server/config.d/flowtrack-cluster.xml"))
    clusters = config.find("remote_servers")
    assert clusters is not None and [c.tag for c in clusters] == ["flowtrack"]
    shards = clusters.findall("flowtrack/shard")
    assert len(shards) == 2
    shard_of: dict[str, int] = {}
    for number, shard in enumerate(shards, start=1):
        assert shard.findtext("internal_replication") == "true"  # replication copies; Distributed writes one replica
        replicas = shard.findall("replica")
        assert len(replicas) == 2
        for replica in replicas:
            assert replica.findtext("port") == "9000"
            shard_of[replica.findtext("host") or ""] = number
    assert set(shard_of) == set(CLUSTER_NODES)
    secret = clusters.find("flowtrack/secret")
    assert secret is not None and secret.get("from_env") and not (secret.text or "").strip()
    macros = set()
    for node in CLUSTER_NODES:
        service = SERVICES[node]
        # Every node runs the same cluster config; only its macros file differs.
        assert _mounted(service, "/etc/clickhouse-server/config.d/flowtrack-cluster.xml") \
            == CLUSTER_DIR / "cluster.xml"
        own = _xml(_mounted(service, "/etc/clickhouse-server/config.d/flowtrack-node.xml"))
        shard, replica = own.findtext("macros/shard"), own.findtext("macros/replica")
        assert shard is not None and int(shard) == shard_of[node], node
        assert replica == node and own.findtext("interserver_http_host") == node
        assert own.findtext("macros/cluster") == "flowtrack"
        macros.add((shard, replica))
        # Optional for compose (it interpolates services of inactive profiles too), required by the node's start.
        start = " ".join(service["entrypoint"])
        for variable in (secret.get("from_env"), "CLICKHOUSE_INTERSERVER_PASSWORD"):
            assert service["environment"][variable] == f"${{{variable}:-}}"
            assert f'test -n "$${variable}"' in start and "exit 1" in start
        assert start.endswith("exec /entrypoint.sh")
    assert len(macros) == len(CLUSTER_NODES)
    # The Keeper path of a table without engine arguments: per table (its UUID) and per shard.
    path = config.findtext("default_replica_path") or ""
    assert "{uuid}" in path and "{shard}" in path and config.findtext("default_replica_name") == "{replica}"
    assert config.find("distributed_ddl/path") is not None  # ON CLUSTER needs the DDL queue
    password = config.find("interserver_http_credentials/password")
    assert password is not None and password.get("from_env") == "CLICKHOUSE_INTERSERVER_PASSWORD"


def test_keeper_is_reachable_under_the_names_the_nodes_use() -> None:
    config = _xml(CLUSTER_DIR / "cluster.xml")
    nodes = config.findall("zookeeper/node")
    keeper = _xml(_mounted(SERVICES["keeper"], "/etc/clickhouse-keeper/keeper.xml"))
    server = keeper.find("keeper_server")
    assert server is not None
    assert [(n.findtext("host"), n.findtext("port")) for n in nodes] == [("keeper", server.findtext("tcp_port"))]
    assert "keeper" in SERVICES
    raft = server.findall("raft_configuration/server")
    assert [(s.findtext("id"), s.findtext("hostname")) for s in raft] == [(server.findtext("server_id"), "keeper")]
    assert keeper.findtext("listen_host") == "0.0.0.0"
    assert f"/dev/tcp/127.0.0.1/{server.findtext('tcp_port')}" in " ".join(SERVICES["keeper"]["healthcheck"]["test"])
    mounted = {v.split(":")[1] for v in SERVICES["keeper"]["volumes"]}
    for storage in ("log_storage_path", "snapshot_storage_path"):
        assert any((server.findtext(storage) or "").startswith(m) for m in mounted), storage


def test_cluster_users_are_the_single_node_users_unchanged_in_privileges() -> None:
    single = _mounted(SERVICES["clickhouse"], "/etc/clickhouse-server/users.d/flowtrack.xml")
    base_profiles = {p.tag for p in _xml(single).find("profiles")}  # type: ignore[union-attr]
    for node in CLUSTER_NODES:
        service = SERVICES[node]
        assert _mounted(service, "/etc/clickhouse-server/users.d/flowtrack.xml") == single
        overlay = _xml(_mounted(service, "/etc/clickhouse-server/users.d/flowtrack-cluster.xml"))
        # The overlay sets query settings in existing profiles, and gives the writer REMOTE (cluster() over
        # system.one counts the replicas that answer): its grants replaced whole by users.xml's plus that one.
        assert [child.tag for child in overlay] == ["users", "profiles"]
        users = overlay.find("users")
        assert [user.tag for user in users] == ["flowtrack_writer"]  # type: ignore[union-attr]
        writer = users.find("flowtrack_writer")  # type: ignore[union-attr]
        assert [child.tag for child in writer] == ["grants"]  # type: ignore[union-attr]
        assert writer.find("grants").get("replace") == "replace"  # type: ignore[union-attr]
        assert _grants(writer) == WRITER_GRANTS | {("REMOTE", "*.*")}  # type: ignore[arg-type]
        for profile in overlay.find("profiles"):  # type: ignore[union-attr]
            assert profile.tag in base_profiles
            assert [(s.tag, s.text) for s in profile] == [("distributed_product_mode", "global"),
                                                          ("optimize_skip_unused_shards", "1")]
        # The users' passwords come from the same variables as on the single node.
        for variable in ("CLICKHOUSE_WRITER_PASSWORD", "CLICKHOUSE_GRAFANA_PASSWORD", "CLICKHOUSE_SQL_PASSWORD"):
            assert service["environment"][variable] == SERVICES["clickhouse"]["environment"][variable]


def test_the_cluster_worker_and_grafana_point_at_the_cluster() -> None:
    worker = SERVICES["worker-cluster"]["environment"]
    config = _xml(CLUSTER_DIR / "cluster.xml")
    assert worker["FLOWTRACK_CLICKHOUSE_CLUSTER"] in {c.tag for c in config.find("remote_servers")}  # type: ignore[union-attr]
    url = worker["FLOWTRACK_CLICKHOUSE_URL"]
    assert url.startswith("http://flowtrack_writer:${CLICKHOUSE_WRITER_PASSWORD")
    assert url.split("@", 1)[1].split(":")[0] in CLUSTER_NODES
    # Its own consumer group: with both stacks up, each store gets every entry (one group would split them).
    assert worker["FLOWTRACK_GROUP"] != SERVICES["worker"]["environment"].get("FLOWTRACK_GROUP", "flowtrack")
    assert worker["FLOWTRACK_CONSUMER"] != SERVICES["worker"]["environment"]["FLOWTRACK_CONSUMER"]
    assert set(SERVICES["worker-cluster"]["depends_on"]) == {"redis", *CLUSTER_NODES}
    grafana = SERVICES["grafana-cluster"]
    cluster_sources = yaml.safe_load(
        _mounted(grafana, "/etc/grafana/provisioning/datasources/flowtrack.yaml").read_text())
    sources = yaml.safe_load((ROOT / "grafana" / "provisioning" / "datasources" / "flowtrack.yaml").read_text())
    clickhouse = cluster_sources["datasources"][0]
    assert clickhouse["jsonData"]["host"] in CLUSTER_NODES
    clickhouse["jsonData"]["host"] = "clickhouse"
    assert cluster_sources == sources  # the same datasources but for the host
    assert grafana["environment"] == SERVICES["grafana"]["environment"]
    mounted = {v.split(":")[1] for v in grafana["volumes"]}
    assert {"/etc/grafana/provisioning/dashboards", "/etc/grafana/provisioning/alerting"} <= mounted
