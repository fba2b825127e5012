"""ClickHouse cluster mode (FLOWTRACK_CLICKHOUSE_CLUSTER): the statements worker/clusterddl.py generates from the
single-node migrations, checked three ways.

- Structurally, golden-free: every statement runs ON CLUSTER, every MergeTree-family engine is Replicated, every
  physical name is a Distributed table over its local table sharded by session, materialized views live on the local
  tables, views on the Distributed names.
- Executed in chDB: the same generator without ON CLUSTER and with plain engines (what an embedded engine without
  Keeper can run), over a one-shard cluster of the embedded node itself (a config file with remote_servers), through
  the same Store.migrate and Sink as a server; the relations must have the single-node columns and, after the same
  batches (re-inserted, redelivered, purged), the same rows. The production statements themselves are parsed by the
  engine (formatQuery).
- Against a real cluster (`server` marker) when FLOWTRACK_TEST_CLICKHOUSE_URL and FLOWTRACK_TEST_CLICKHOUSE_CLUSTER
  are set; skipped here (no ClickHouse server on this machine).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CLUSTER_ENV, ROOT, SERVER_URL_ENV, make_settings, xadd_all
from worker.clusterddl import LOCAL_SUFFIX, SESSION_SHARDING_KEY, ClusterDDL, ClusterDDLError, cluster_ddl_for
from worker.errors import ConfigError
from worker.settings import Settings
from worker.store import Store, load_migrations

CLUSTER = "flowtrack_cluster"
MERGE_TREE_ENGINE = re.compile(r"ENGINE\s*=\s*(\w*MergeTree)\b")
DISTRIBUTED = re.compile(r"^CREATE (?:OR REPLACE )?TABLE (?:IF NOT EXISTS )?flowtrack\.(\w+) ON CLUSTER `(\S+)` "
                         r"AS flowtrack\.(\w+) ENGINE = Distributed\('([^']+)', 'flowtrack', '(\w+)', (.+)\)$")
CREATED = re.compile(r"^CREATE (?:OR REPLACE )?(TABLE|VIEW|MATERIALIZED VIEW|DATABASE) (?:IF NOT EXISTS )?"
                     r"(?:flowtrack\.)?(\w+)")


def single_node_tables() -> dict[str, str]:
    """Every MergeTree-family table the single-node migrations leave in place -> its CREATE statement."""
    tables: dict[str, str] = {}
    for migration in load_migrations():
        for statement in migration.statements:
            created = re.match(r"CREATE TABLE IF NOT EXISTS flowtrack\.(\w+)", statement)
            if created and MERGE_TREE_ENGINE.search(statement):
                tables[created.group(1)] = statement
            dropped = re.match(r"DROP TABLE IF EXISTS flowtrack\.(\w+)", statement)
            if dropped:
                tables.pop(dropped.group(1), None)
    return tables


def cluster_statements(**form: bool) -> tuple[ClusterDDL, list[str]]:
    ddl = ClusterDDL(CLUSTER, **form)
    out = ddl.bookkeeping()
    for migration in load_migrations():
        out += ddl.transform_all(migration.statements)
    return ddl, [" ".join(statement.split()) for statement in out]


# -- the generated statements, structurally ---------------------------------------------------------
def test_every_statement_runs_on_the_cluster_and_every_merge_tree_is_replicated() -> None:
    _, statements = cluster_statements()
    assert statements
    for statement in statements:
        if statement.startswith("INSERT INTO"):  # through the Distributed tables, from the node migrate talks to
            assert " ON CLUSTER " not in statement
            continue
        assert f" ON CLUSTER `{CLUSTER}`" in statement, statement
        for engine in MERGE_TREE_ENGINE.findall(statement):
            assert engine.startswith("Replicated"), statement
        assert "non_replicated_deduplication_window" not in statement
    # The insert-dedup windows of the single-node tables carry over, at the same size, as replicated windows.
    windows = [s for s in statements if "replicated_deduplication_window = 10000" in s]
    assert len(windows) == sum("non_replicated_deduplication_window = 10000" in s
                               for m in load_migrations() for s in m.statements)


def test_every_physical_name_is_a_distributed_table_over_its_local_table_sharded_by_session() -> None:
    ddl, statements = cluster_statements()
    tables = single_node_tables()
    assert set(tables) == {"events", "events_by_time", "sessions", "session_spans", "rejected"}
    assert set(ddl.sharded) == set(tables)
    last_distributed: dict[str, tuple[str, ...]] = {}
    for statement in statements:
        found = DISTRIBUTED.match(statement)
        if found:
            last_distributed[found.group(1)] = found.groups()
    for table, create in tables.items():
        _, on_cluster, as_table, cluster, local, key = last_distributed[table]
        assert (on_cluster, cluster) == (CLUSTER, CLUSTER)
        assert as_table == local == table + LOCAL_SUFFIX
        has_session = re.search(r"\n\s*session_id\s+String", create) is not None
        # A flow's copies meet on one shard (so ReplacingMergeTree collapses them) and its reads stay there; the
        # one table without sessions is sharded by its identity, for the same reason.
        assert key == (SESSION_SHARDING_KEY if has_session
                       else "cityHash64(source_stream, source_id, cityHash64(raw))"), table
    # Nothing else is Distributed, and no public relation was renamed: every view keeps its name.
    views = {m.group(2) for s in statements if (m := CREATED.match(s)) and m.group(1) == "VIEW"}
    assert {"flow_events", "flow_sessions", "flow_nodes", "rejected_events", "session_totals"} <= views


def test_materialized_views_live_on_local_tables_and_views_read_distributed_names() -> None:
    ddl, statements = cluster_statements()
    mvs = [s for s in statements if s.startswith("CREATE MATERIALIZED VIEW")]
    assert len(mvs) == 3  # sessions_mv (002, dropped by 005), session_spans_mv, events_by_time_mv
    for statement in mvs:
        target = re.search(r" TO flowtrack\.(\w+) ", statement)
        sources = re.findall(r"\bFROM flowtrack\.(\w+)", statement)
        assert target and target.group(1).endswith(LOCAL_SUFFIX), statement
        assert sources and all(source.endswith(LOCAL_SUFFIX) for source in sources), statement
    final = cluster_ddl_for(CLUSTER, (m.statements for m in load_migrations()))
    # A view's rows land on the shard of the row that fired it: the source and target shard the same way, so what a
    # view writes sits where the Distributed table would have put it.
    assert final.sharded["events"] == final.sharded["events_by_time"]
    assert final.sharded["sessions"] == final.sharded["session_spans"]
    for statement in statements:
        if statement.startswith("CREATE VIEW"):
            assert LOCAL_SUFFIX + " " not in statement + " " and "_local" not in statement, statement
    assert ddl.sharded == final.sharded


def test_run_time_statements_go_to_the_local_tables_of_every_node() -> None:
    ddl = cluster_ddl_for(CLUSTER, (m.statements for m in load_migrations()))
    delete = "DELETE FROM flowtrack.events WHERE (source_stream, source_id) IN {keys:Array(Tuple(String, String))}"
    assert ddl.runtime(delete) == (f"DELETE FROM flowtrack.events_local ON CLUSTER `{CLUSTER}` "
                                   "WHERE (source_stream, source_id) IN {keys:Array(Tuple(String, String))}")
    assert ddl.runtime("ALTER TABLE flowtrack.sessions MODIFY TTL toDateTime(last_event_at) + toIntervalDay(7)") == (
        f"ALTER TABLE flowtrack.sessions_local ON CLUSTER `{CLUSTER}` MODIFY TTL toDateTime(last_event_at) + "
        "toIntervalDay(7)")
    # A column change reaches the Distributed table too (it carries the columns); as a migration it is two statements.
    assert ddl.transform("ALTER TABLE flowtrack.events ADD COLUMN IF NOT EXISTS tenant String") == [
        f"ALTER TABLE flowtrack.events_local ON CLUSTER `{CLUSTER}` ADD COLUMN IF NOT EXISTS tenant String",
        f"ALTER TABLE flowtrack.events ON CLUSTER `{CLUSTER}` ADD COLUMN IF NOT EXISTS tenant String"]
    for unchanged in ("INSERT INTO flowtrack.sessions SELECT * FROM flowtrack.session_totals",
                      "SELECT count() FROM flowtrack.events FINAL"):
        assert ddl.runtime(unchanged) == unchanged
    # A guard asks system.tables about the physical table: on a cluster, the local one.
    assert ddl.guard("SELECT count() FROM system.tables WHERE name = 'events' AND sorting_key = 'event_id'") == \
        "SELECT count() FROM system.tables WHERE name = 'events_local' AND sorting_key = 'event_id'"


def test_the_session_paths_migration_has_a_cluster_form() -> None:
    """009: a column on the rollup's local and Distributed tables, views replaced in place on every node, the backfill's
    slices through the Distributed tables (with their settings)."""
    ddl = cluster_ddl_for(CLUSTER, (m.statements for m in load_migrations() if m.version < 9))
    paths = next(m for m in load_migrations() if m.version == 9)
    out = [" ".join(s.split()) for s in ddl.transform_all(paths.statements)]
    on = f"ON CLUSTER `{CLUSTER}`"
    column = "ADD COLUMN IF NOT EXISTS path LowCardinality(String)"
    assert out[:2] == [f"ALTER TABLE flowtrack.sessions_local {on} {column}",
                       f"ALTER TABLE flowtrack.sessions {on} {column}"]
    views = [s for s in out if s.startswith("CREATE OR REPLACE VIEW")]
    assert [s.split()[4:7] for s in views] == [["flowtrack.session_totals", "ON", "CLUSTER"],
                                               ["flowtrack.flow_session_paths", "ON", "CLUSTER"]]
    assert all("_local" not in s for s in views)
    assert f"OPTIMIZE TABLE flowtrack.sessions_local {on} FINAL" in out  # the backfill's versions collapsed
    inserts = [s for s in out if s.startswith("INSERT INTO flowtrack.sessions ")]
    assert len(inserts) == 8  # the backfill's slices
    assert all(" ON CLUSTER " not in s and "optimize_aggregation_in_order = 1" in s for s in inserts)
    assert len(out) == 2 + 1 + 8 + 1 + 1


@pytest.mark.parametrize("statement", [
    "OPTIMIZE TABLE flowtrack.events FINAL DEDUPLICATE",
    "OPTIMIZE TABLE flowtrack.unknown FINAL",
    "CREATE TABLE IF NOT EXISTS flowtrack.cache (k String) ENGINE = Memory",
    "CREATE MATERIALIZED VIEW flowtrack.mv AS SELECT 1",  # no TO table: its inner table would not be sharded
    "RENAME TABLE flowtrack.events TO flowtrack.events_old",
    "TRUNCATE TABLE flowtrack.unknown",
])
def test_a_statement_without_a_cluster_rule_is_refused_before_anything_runs(statement: str) -> None:
    ddl = cluster_ddl_for(CLUSTER, (m.statements for m in load_migrations()))
    with pytest.raises(ClusterDDLError):
        ddl.transform(statement)


def test_the_cluster_setting_is_validated() -> None:
    url = "http://w:p@ch:8123/flowtrack"
    assert Settings.from_env({"FLOWTRACK_CLICKHOUSE_URL": url,
                              "FLOWTRACK_CLICKHOUSE_CLUSTER": "flowtrack"}).clickhouse_cluster == "flowtrack"
    assert Settings.from_env({}).clickhouse_cluster is None
    for bad in ("flow track", "a`b", "x'); DROP TABLE t; --"):
        with pytest.raises(ConfigError, match="not a cluster name"):
            Settings.from_env({"FLOWTRACK_CLICKHOUSE_URL": url, "FLOWTRACK_CLICKHOUSE_CLUSTER": bad})
    for embedded in ({}, {"FLOWTRACK_CLICKHOUSE_URL": "chdb:///tmp/x"}):
        with pytest.raises(ConfigError, match="needs a ClickHouse server"):
            Settings.from_env({**embedded, "FLOWTRACK_CLICKHOUSE_CLUSTER": "flowtrack"})
    with pytest.raises(ClusterDDLError):
        ClusterDDL("a b")


# -- executed by the engine ---------------------------------------------------------------------------
_FORMAT_ALL = textwrap.dedent("""
    import json, sys, chdb.session
    session = chdb.session.Session(sys.argv[1])
    out = []
    for statement in json.load(sys.stdin):
        literal = "'" + statement.replace("\\\\", "\\\\\\\\").replace("'", "\\\\'") + "'"
        out.append(session.query("SELECT formatQuery(" + literal + ")", "JSONEachRow").bytes().decode())
    print(json.dumps(out))
""")


def test_the_engine_parses_every_production_statement(tmp_path: Path) -> None:
    ddl, statements = cluster_statements()
    statements.append(ddl.runtime("DELETE FROM flowtrack.events_by_time WHERE (session_id, event_id, "
                                  "toUnixTimestamp64Milli(ingested_at)) IN {keys:Array(Tuple(String, String, Int64))}"))
    proc = subprocess.run([sys.executable, "-c", _FORMAT_ALL, str(tmp_path / "parse")], input=json.dumps(statements),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    formatted = [json.loads(line)[next(iter(json.loads(line)))] for line in json.loads(proc.stdout)]
    assert len(formatted) == len(statements)
    for original, text in zip(statements, formatted, strict=True):
        flat = " ".join(text.split())
        assert ("ON CLUSTER" in flat) == ("ON CLUSTER" in original), (original, flat)
        assert "Replicated" not in original or "Replicated" in flat


# One process per store (chDB); prints what the test compares, as JSON.
_PROBE = textwrap.dedent("""
    import json, sys, time
    import clickhouse_connect
    from worker.clusterddl import ClusterDDL
    from worker.normalize import Normalizer, Rejection
    from worker.settings import Settings
    from worker.sink import Refusal, Sink
    from worker.store import Store

    mode, path, config, base = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if mode == "cluster":
        client = clickhouse_connect.get_client(dsn=f"chdb://{path}", chdb_options={"config-file": config})
        store = Store(client, "embedded cluster form", embedded=True,
                      cluster=ClusterDDL("flowtrack_test", on_cluster=False, replicated=False))
    else:
        store = Store.open(Settings(clickhouse_url=f"chdb://{path}"))
    refused = "none"
    if mode == "cluster":  # a migration with a statement the cluster rules do not cover: nothing runs at all
        import worker.store as store_module
        shipped = store_module.load_migrations
        bad = store_module.Migration(999, "999_bad", ("RENAME TABLE flowtrack.events TO flowtrack.events_old",))
        store_module.load_migrations = lambda directory=None: [*shipped(directory), bad]
        try:
            store.migrate()
        except Exception as exc:
            databases = store.query("SELECT count() FROM system.databases WHERE name = 'flowtrack'")[1][0][0]
            refused = f"{type(exc).__name__}, flowtrack databases: {databases}"
        store_module.load_migrations = shipped
    first = store.migrate()
    normalizer = Normalizer()

    def event(session, n, kind="llm_call", entry=None, user="u1"):
        fields = {"session_id": session, "node_id": f"n{n}", "event_type": kind, "user_id": user,
                  "timestamp": str(base + n * 1000), "parent_id": "n0" if n else "", "k": f"v{n}"}
        return normalizer.normalize("flow_events", entry or f"{base + n}-{session[1:]}", fields)

    sink = Sink(store)
    batch = [event(f"s{s}", n, kind) for s in range(6)
             for n, kind in enumerate(("user_message", "llm_call", "error" if s % 3 == 0 else "tool_call",
                                       "flow_completed" if s % 2 == 0 else "llm_response"))]
    sink.write(batch, [Rejection("flow_events", "1-0", "missing session_id", '{"x":"1"}')])
    time.sleep(0.01)
    sink.write(batch, [])  # a batch re-inserted after a crash between insert and ack: same token
    time.sleep(0.01)
    sink.write(batch[:5] + [event("s1", 9, "flow_completed", entry="9-0")], [])  # redelivered copies + a new event
    time.sleep(0.01)
    sink._purge([Refusal(batch[1], "refused", int(time.time() * 1000))])  # as for a row ClickHouse refused
    sink.rollup.flush([(batch[1].user_id, batch[1].session_id)])
    sink.rollup.close()
    store.retention_days = 30
    second = store.migrate()

    def rows(sql):
        return [list(map(str, row)) for row in store.query(sql)[1]]

    unknown = "none"
    if mode == "cluster":  # a cluster the server does not define: refused before any write
        try:
            Store(client, "x", embedded=True, cluster=ClusterDDL("not_defined", on_cluster=False,
                                                                 replicated=False)).migrate()
        except Exception as exc:
            unknown = f"{type(exc).__name__}: {exc}"
    write_settings = store._write_settings()

    relations = ["flow_events", "flow_sessions", "flow_nodes", "rejected_events", "flow_session_paths", "events",
                 "events_by_time", "sessions", "session_spans", "rejected", "session_totals"]
    physical = "_local" if mode == "cluster" else ""
    print(json.dumps({
        "first": first, "second": second, "unknown_cluster": unknown, "refused": refused,
        "write_settings": write_settings,
        "columns": {r: rows(f"DESCRIBE TABLE flowtrack.{r}") for r in relations},
        "engines": dict(rows("SELECT name, engine FROM system.tables WHERE database = 'flowtrack'")),
        "ttl": rows(f"SELECT name, position(engine_full, ' TTL ') > 0 FROM system.tables WHERE database = "
                    f"'flowtrack' AND name IN ('events{physical}', 'sessions{physical}', 'rejected{physical}') "
                    "ORDER BY name"),
        "flow_events": rows("SELECT event_id, user_id, session_id, node_id, parent_id, event_type, ts, attributes, "
                            "source_stream, source_id FROM flowtrack.flow_events ORDER BY event_id"),
        "flow_sessions": rows("SELECT * FROM flowtrack.flow_sessions ORDER BY session_id"),
        "flow_session_paths": rows("SELECT * FROM flowtrack.flow_session_paths ORDER BY session_id"),
        "flow_nodes": rows("SELECT * FROM flowtrack.flow_nodes ORDER BY session_id, node_id"),
        "rejected_events": rows("SELECT source_stream, source_id, reason, raw FROM flowtrack.rejected_events"),
        "stored_copies": rows("SELECT count() FROM flowtrack.events"),
        "spans": rows("SELECT session_id, min(start_ts), max(end_ts) FROM flowtrack.session_spans "
                      "GROUP BY session_id ORDER BY session_id"),
    }))
""")
# A cluster of one shard whose only replica is this node: chDB takes it as local (its tcp_port), so Distributed
# tables read and write the local tables in-process, as a server does for its own shard.
_ONE_NODE_CLUSTER = """<clickhouse>
  <tcp_port>9000</tcp_port>
  <remote_servers><flowtrack_test><shard><internal_replication>true</internal_replication>
    <replica><host>localhost</host><port>9000</port></replica></shard></flowtrack_test></remote_servers>
</clickhouse>
"""


def _probe(mode: str, tmp_path: Path, base_ms: int) -> dict[str, Any]:
    """``base_ms``: the time of the flows' first events (the same for both stores; recent, so retention keeps them)."""
    config = tmp_path / "config.xml"
    config.write_text(_ONE_NODE_CLUSTER)
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode, str(tmp_path / f"store-{mode}"), str(config),
                           str(base_ms)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_the_cluster_form_runs_in_the_engine_with_the_single_node_columns_and_rows(tmp_path: Path) -> None:
    base_ms = int(time.time() * 1000) - 86_400_000
    single, cluster = _probe("single", tmp_path, base_ms), _probe("cluster", tmp_path, base_ms)
    assert cluster["first"] == single["first"] == [m.name for m in load_migrations()]
    assert cluster["second"] == single["second"] == []  # idempotent, bookkeeping included
    assert cluster["columns"] == single["columns"]
    engines = cluster["engines"]
    for table in ("events", "events_by_time", "sessions", "session_spans", "rejected"):
        assert engines[table] == "Distributed"
        assert engines[table + LOCAL_SUFFIX] == single["engines"][table]
    for view in ("flow_events", "flow_sessions", "flow_nodes", "rejected_events", "session_totals",
                 "flow_session_paths"):
        assert engines[view] == single["engines"][view] == "View"
    assert engines["events_by_time_mv"] == engines["session_spans_mv"] == "MaterializedView"
    assert {name for name in engines if name.endswith("_006") or name.endswith("_007")} == set()
    # Same data in, same rows out: the re-inserted batch dropped, redelivered copies collapsed, the purged event gone.
    for relation in ("flow_events", "flow_sessions", "flow_nodes", "rejected_events", "flow_session_paths",
                     "stored_copies", "spans"):
        assert cluster[relation] == single[relation], relation
    assert len(cluster["flow_events"]) == 6 * 4 + 1 - 1
    # Physical copies: the 24 first stored, 5 redelivered in a new batch and the new event, minus both copies of the
    # purged entry (the re-inserted batch never landed).
    assert int(cluster["stored_copies"][0][0]) == 24 + 5 + 1 - 2
    statuses = {row[1]: row[7] for row in cluster["flow_sessions"]}
    assert statuses == {"s0": "failed", "s1": "completed", "s2": "completed", "s3": "failed", "s4": "completed",
                        "s5": "active"}
    # The path (009) of every session, through the Distributed rollup: the purged llm_call of s0 left it.
    paths = {row[1]: row[-1] for row in cluster["flow_session_paths"]}
    assert paths["s0"] == "user_message → error → flow_completed"
    assert paths["s1"] == "user_message → llm_call → tool_call → llm_response → flow_completed"
    assert [row[:-1] for row in cluster["flow_session_paths"]] == cluster["flow_sessions"]
    assert cluster["refused"] == "ConfigError, flowtrack databases: 0"
    assert cluster["unknown_cluster"].startswith("ConfigError: ") and "no cluster named 'not_defined'" in \
        cluster["unknown_cluster"]
    # One replica per shard here: no quorum to wait for (a server's cluster gets insert_quorum = its replicas).
    assert cluster["write_settings"] == {"distributed_foreground_insert": 1, "distributed_product_mode": "global",
                                         "optimize_skip_unused_shards": 1, "lightweight_deletes_sync": 2,
                                         "max_partitions_per_insert_block": 0, "optimize_on_insert": 0}
    assert single["write_settings"] == {"max_partitions_per_insert_block": 0, "optimize_on_insert": 0}
    # Retention reached the local tables, where the data is.
    assert cluster["ttl"] == [["events_local", "1"], ["rejected_local", "1"], ["sessions_local", "1"]]
    assert single["ttl"] == [["events", "1"], ["rejected", "1"], ["sessions", "1"]]


# -- a real cluster ---------------------------------------------------------------------------------------
needs_cluster = pytest.mark.skipif(
    not (os.environ.get(SERVER_URL_ENV) and os.environ.get(CLUSTER_ENV)),
    reason=f"set {SERVER_URL_ENV} and {CLUSTER_ENV} (a cluster of its remote_servers) to run against a ClickHouse "
           "cluster; this machine has no ClickHouse server")


def _cluster_store() -> Store:
    return Store.open(Settings(clickhouse_url=os.environ[SERVER_URL_ENV],
                               clickhouse_cluster=os.environ[CLUSTER_ENV]))


@pytest.mark.server
@needs_cluster
def test_migrate_on_a_real_cluster_creates_the_layout_on_every_replica() -> None:
    store = _cluster_store()
    store.migrate()
    assert store.migrate() == []
    name = os.environ[CLUSTER_ENV]
    # (cluster functions over system.one: the writer has no grant on system.clusters)
    replicas = store.scalar(f"SELECT count() FROM clusterAllReplicas('{name}', system.one)")
    _, rows = store.query(f"SELECT hostName(), name, engine FROM clusterAllReplicas('{name}', system.tables) "
                          "WHERE database = 'flowtrack'")
    by_host: dict[str, dict[str, str]] = {}
    for host, table, engine in rows:
        by_host.setdefault(host, {})[table] = engine
    assert len(by_host) == replicas
    for host, tables in by_host.items():
        for table in ("events", "events_by_time", "sessions", "session_spans", "rejected"):
            assert tables[table] == "Distributed", host
            assert tables[table + LOCAL_SUFFIX].startswith("Replicated"), host
        assert tables["schema_migrations"] == "ReplicatedReplacingMergeTree"
        assert {"flow_events", "flow_sessions", "flow_nodes", "rejected_events"} <= set(tables)
    _, migrations = store.query(f"SELECT hostName(), count() FROM clusterAllReplicas('{name}', "
                                "flowtrack.schema_migrations) GROUP BY 1")
    assert {count for _, count in migrations} == {len(load_migrations())}


@pytest.mark.server
@needs_cluster
def test_the_pipeline_on_a_real_cluster_keeps_each_flow_on_one_shard_once(redis_server: Any,
                                                                           redis_client: Any) -> None:
    from tests.conftest import drain

    run = uuid.uuid4().hex[:10]
    sessions = [f"c{run}-{i}" for i in range(40)]
    entries = [("flow_events", {"session_id": s, "node_id": f"n{n}", "event_type": kind, "user_id": f"u{i % 5}",
                                "event_id": f"{s}-{n}"})
               for i, s in enumerate(sessions) for n, kind in enumerate(("user_message", "llm_call", "flow_completed"))]
    xadd_all(redis_client, entries + entries[:30])  # explicit event ids re-sent: the same events
    settings = make_settings(redis_server.url, os.environ[SERVER_URL_ENV], clickhouse_cluster=os.environ[CLUSTER_ENV])
    drain(settings)
    store = _cluster_store()
    like = {"p": f"c{run}-%"}
    assert store.scalar("SELECT count() FROM flowtrack.flow_events WHERE session_id LIKE {p:String}", like) == 120
    _, rows = store.query("SELECT status, event_count, count() FROM flowtrack.flow_sessions "
                          "WHERE session_id LIKE {p:String} GROUP BY 1, 2", like)
    assert rows == [("completed", 3, 40)]
    # Sharded by session: every flow on exactly one shard, the flows spread over the shards.
    _, spread = store.query("SELECT session_id, uniqExact(_shard_num) FROM flowtrack.events "
                            "WHERE session_id LIKE {p:String} GROUP BY session_id HAVING uniqExact(_shard_num) > 1",
                            like)
    assert spread == []
    name = os.environ[CLUSTER_ENV]
    shards = store.scalar(f"SELECT count() FROM cluster('{name}', system.one)")
    used = store.scalar("SELECT uniqExact(_shard_num) FROM flowtrack.events WHERE session_id LIKE {p:String}", like)
    assert used == min(shards, 40)
    # Inserts waited for every replica of their shard: each replica already has its shard's rows.
    _, per_replica = store.query(
        f"SELECT getMacro('shard'), hostName(), count() FROM clusterAllReplicas('{name}', flowtrack.events_local) "
        "WHERE session_id LIKE {p:String} GROUP BY 1, 2", like)
    counts: dict[str, set[int]] = {}
    for shard, _host, count in per_replica:
        counts.setdefault(shard, set()).add(count)
    assert all(len(values) == 1 for values in counts.values()), per_replica


@pytest.mark.server
@needs_cluster
def test_a_retried_batch_is_dropped_by_every_shard_it_reached() -> None:
    from worker.normalize import FlowEvent, Normalizer
    from worker.sink import Sink

    store = _cluster_store()
    store.migrate()
    run = uuid.uuid4().hex[:10]
    normalizer = Normalizer()
    batch = [normalizer.normalize("flow_events", f"{int(time.time() * 1000)}-{i}",
                                  {"session_id": f"r{run}-{i % 20}", "node_id": "n", "event_type": "llm_call",
                                   "user_id": "u"}) for i in range(200)]
    events = [event for event in batch if isinstance(event, FlowEvent)]
    assert len(events) == 200
    sink = Sink(store)
    sink.write(events, [])
    sink.write(events, [])  # the retry after a lost acknowledgment: the same token, split the same way per shard
    sink.rollup.close()
    physical = store.scalar("SELECT count() FROM flowtrack.events WHERE session_id LIKE {p:String}",
                            {"p": f"r{run}-%"})
    assert physical == 200  # not 400: no FINAL here, the shards' replicated dedup dropped the copy
