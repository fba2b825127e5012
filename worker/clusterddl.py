"""The ClickHouse cluster form of flowtrack's schema, generated from the single-node migrations.

``FLOWTRACK_CLICKHOUSE_CLUSTER=<name>`` makes ``migrate`` run every migration of ``schemas/clickhouse`` through
:class:`ClusterDDL`, a fixed set of rules over the statement kinds the migrations use, instead of keeping a second
copy of the schema (two copies drift; one set of rules changes only when a migration uses a new kind of statement,
and then :class:`ClusterDDLError` says so before anything runs — tests/test_clickhouse_cluster.py transforms every
migration). The rules:

- a MergeTree-family table ``X`` becomes ``X_local`` on every node (``ON CLUSTER``), its engine the Replicated
  variant with the server's ``default_replica_path``/``default_replica_name`` (``/clickhouse/tables/{uuid}/{shard}``
  and ``{replica}``: the UUID is chosen once by the ``ON CLUSTER`` initiator, so a rename or ``EXCHANGE`` keeps the
  Keeper path right, which a ``{table}`` macro would not), and ``X`` becomes a ``Distributed`` table over it, sharded
  by ``cityHash64(session_id)`` (one flow on one shard: its copies meet there, ReplacingMergeTree collapses them, and
  per-session reads touch one shard) or, for a table without sessions, by its sorting key (its identity);
- views (``CREATE [OR REPLACE] VIEW``) keep their text and read the Distributed names, so ``flow_events``,
  ``flow_sessions``, ``flow_nodes``, ``rejected_events`` and every physical name a dashboard reads are unchanged;
- a materialized view moves to the local tables (it fires on the replica that takes an insert; its result is a part
  of a replicated table like any other);
- ``TRUNCATE``/``EXCHANGE``/``ALTER``/``DELETE``/``OPTIMIZE`` act on the local tables ``ON CLUSTER`` (after an
  ``EXCHANGE`` the two Distributed tables are recreated over the swapped local tables' columns); ``INSERT … SELECT``
  goes through the Distributed tables (the store sends it with ``distributed_foreground_insert = 1``);
- the insert-dedup window of a table (``non_replicated_deduplication_window``) becomes
  ``replicated_deduplication_window`` of the same size.

``on_cluster=False, replicated=False`` gives the same statements without ``ON CLUSTER`` and with plain engines: the form
the embedded engine runs (no Keeper, no distributed DDL), over a one-shard cluster of the node itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

DATABASE = "flowtrack"
LOCAL_SUFFIX = "_local"
SESSION_SHARDING_KEY = "cityHash64(session_id)"
CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_QUALIFIED = re.compile(rf"\b{DATABASE}\.({_NAME})\b")
_CREATE_DATABASE = re.compile(rf"^CREATE\s+DATABASE\s+(IF\s+NOT\s+EXISTS\s+)?{DATABASE}\s*$", re.I)
_CREATE_TABLE = re.compile(
    rf"^CREATE\s+TABLE\s+(IF\s+NOT\s+EXISTS\s+)?{DATABASE}\.({_NAME})\s*(\(.*\))\s*"
    rf"ENGINE\s*=\s*({_NAME})(\s*\([^)]*\))?(.*)$", re.I | re.S)
_CREATE_VIEW = re.compile(
    rf"^CREATE\s+(OR\s+REPLACE\s+)?VIEW\s+(IF\s+NOT\s+EXISTS\s+)?{DATABASE}\.({_NAME})\s+(AS\s.*)$", re.I | re.S)
_CREATE_MV = re.compile(
    rf"^CREATE\s+MATERIALIZED\s+VIEW\s+(IF\s+NOT\s+EXISTS\s+)?{DATABASE}\.({_NAME})\s+"
    rf"TO\s+{DATABASE}\.({_NAME})\s+(AS\s.*)$", re.I | re.S)
_DROP = re.compile(rf"^DROP\s+(TABLE|VIEW)\s+(IF\s+EXISTS\s+)?{DATABASE}\.({_NAME})\s*$", re.I)
_TRUNCATE = re.compile(rf"^TRUNCATE\s+TABLE\s+(IF\s+EXISTS\s+)?{DATABASE}\.({_NAME})\s*$", re.I)
_EXCHANGE = re.compile(rf"^EXCHANGE\s+TABLES\s+{DATABASE}\.({_NAME})\s+AND\s+{DATABASE}\.({_NAME})\s*$", re.I)
_ALTER = re.compile(rf"^ALTER\s+TABLE\s+{DATABASE}\.({_NAME})\s+(.*)$", re.I | re.S)
_OPTIMIZE = re.compile(rf"^OPTIMIZE\s+TABLE\s+{DATABASE}\.({_NAME})(\s+FINAL)?\s*$", re.I)
_DELETE = re.compile(rf"^DELETE\s+FROM\s+{DATABASE}\.({_NAME})\s+(WHERE\s.*)$", re.I | re.S)
_INSERT = re.compile(rf"^INSERT\s+INTO\s+{DATABASE}\.({_NAME})\b", re.I)
_ORDER_BY = re.compile(r"\bORDER\s+BY\s+(.*?)\s*(?:\bSETTINGS\b|\bTTL\b|\bSAMPLE\b|\bPRIMARY\b|$)", re.I | re.S)
_SESSION_COLUMN = re.compile(r"(?:^|[(,\n])\s*session_id\s+", re.I)
_COLUMN_COMMAND = re.compile(r"\b(ADD|DROP|MODIFY|RENAME|COMMENT|CLEAR)\s+COLUMN\b", re.I)
_DEDUP_WINDOW = re.compile(r"\bnon_replicated_deduplication_window\b", re.I)


class ClusterDDLError(ValueError):
    """A single-node statement the cluster rules do not cover: add a rule before shipping the migration."""


def valid_cluster_name(name: str) -> bool:
    return bool(CLUSTER_NAME.match(name))


def local_name(table: str) -> str:
    return table + LOCAL_SUFFIX


@dataclass
class ClusterDDL:
    """Turns single-node statements, in migration order, into their cluster form (keeps which tables are sharded)."""

    cluster: str
    on_cluster: bool = True
    replicated: bool = True
    # sharded table (public name) -> its sharding key
    sharded: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not valid_cluster_name(self.cluster):
            raise ClusterDDLError(f"not a cluster name: {self.cluster!r}")

    # -- what runs before the migrations -----------------------------------------------------------
    def bookkeeping(self) -> list[str]:
        """The database and the migrations table. schema_migrations is one replica set over every node of the
        cluster (no shard in its Keeper path, replica names ``{shard}-{replica}``), so any node the worker talks to
        knows which migrations ran, and a migration is recorded once for the whole cluster."""
        engine = ("ReplicatedReplacingMergeTree('/clickhouse/tables/{uuid}', '{shard}-{replica}')"
                  if self.replicated else "ReplacingMergeTree")
        return [
            f"CREATE DATABASE IF NOT EXISTS {DATABASE}{self._on()}",
            f"CREATE TABLE IF NOT EXISTS {DATABASE}.schema_migrations{self._on()} "
            "(version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
            f"ENGINE = {engine} ORDER BY version",
        ]

    # -- migrations ------------------------------------------------------------------------------
    def transform_all(self, statements: Iterable[str]) -> list[str]:
        return [out for statement in statements for out in self.transform(statement)]

    def transform(self, statement: str) -> list[str]:
        """The cluster statements for one single-node statement; updates which tables are sharded."""
        text = statement.strip().rstrip(";").strip()
        for rule in (self._create_database, self._create_table, self._create_view, self._create_mv, self._drop,
                     self._truncate, self._exchange, self._alter, self._optimize, self._delete, self._insert):
            out = rule(text)
            if out is not None:
                return out
        raise ClusterDDLError(f"no cluster form for this statement (add a rule to worker/clusterddl.py): "
                              f"{' '.join(text.split())[:200]}")

    def guard(self, query: str) -> str:
        """A migration's ``-- only-if:`` query asks system.tables about a physical table: on a cluster, the local
        one (every node has it; the Distributed table has no sorting or partition key)."""
        for table in self.sharded:
            query = re.sub(rf"'{table}'", f"'{local_name(table)}'", query)
        return query

    # -- statements the worker issues at run time --------------------------------------------------
    def runtime(self, statement: str) -> str:
        """DELETE/ALTER/TRUNCATE on a sharded table go to its local tables on every node; the rest is unchanged
        (INSERT and SELECT go through the Distributed tables)."""
        text = statement.strip()
        for pattern in (_DELETE, _ALTER, _TRUNCATE):
            if pattern.match(text):
                out = self.transform(text)
                if len(out) != 1:
                    raise ClusterDDLError(f"a run-time statement must stay one statement: {text[:200]}")
                return out[0]
        return statement

    # -- rules -------------------------------------------------------------------------------------
    def _on(self) -> str:
        return f" ON CLUSTER `{self.cluster}`" if self.on_cluster else ""

    def _create_database(self, text: str) -> list[str] | None:
        if not _CREATE_DATABASE.match(text):
            return None
        return [f"CREATE DATABASE IF NOT EXISTS {DATABASE}{self._on()}"]

    def _create_table(self, text: str) -> list[str] | None:
        found = _CREATE_TABLE.match(text)
        if not found:
            return None
        if_not_exists, table, columns, engine, args, rest = found.groups()
        if not engine.endswith("MergeTree") or engine.startswith("Replicated"):
            raise ClusterDDLError(f"{DATABASE}.{table}: only non-replicated MergeTree-family tables have a cluster "
                                  f"form (got {engine})")
        key = self._sharding_key(columns, rest, table)
        self.sharded[table] = key
        if self.replicated:
            engine = "Replicated" + engine
            rest = _DEDUP_WINDOW.sub("replicated_deduplication_window", rest)
        exists = "IF NOT EXISTS " if if_not_exists else ""
        local = f"CREATE TABLE {exists}{DATABASE}.{local_name(table)}{self._on()} {columns} " \
                f"ENGINE = {engine}{args or ''}{rest}"
        return [local, self._distributed(table, "CREATE TABLE " + exists)]

    def _distributed(self, table: str, create: str) -> str:
        return (f"{create}{DATABASE}.{table}{self._on()} AS {DATABASE}.{local_name(table)} "
                f"ENGINE = Distributed('{self.cluster}', '{DATABASE}', '{local_name(table)}', {self.sharded[table]})")

    @staticmethod
    def _sharding_key(columns: str, rest: str, table: str) -> str:
        if _SESSION_COLUMN.search(columns):
            return SESSION_SHARDING_KEY
        order = _ORDER_BY.search(rest)
        if not order:
            raise ClusterDDLError(f"{DATABASE}.{table} has neither session_id nor ORDER BY to shard by")
        key = order.group(1).strip()
        inner = key[1:-1] if key.startswith("(") and key.endswith(")") else key
        return f"cityHash64({inner})"

    def _create_view(self, text: str) -> list[str] | None:
        found = _CREATE_VIEW.match(text)
        if not found:
            return None
        or_replace, if_not_exists, view, body = found.groups()
        replace = "OR REPLACE " if or_replace else ""
        return [f"CREATE {replace}VIEW {if_not_exists or ''}{DATABASE}.{view}{self._on()} {body}"]

    def _create_mv(self, text: str) -> list[str] | None:
        found = _CREATE_MV.match(text)
        if not found:
            return None
        if_not_exists, view, target, body = found.groups()
        if target not in self.sharded:
            raise ClusterDDLError(f"materialized view {view} writes to {target}, which is not a sharded table")
        local_body = _QUALIFIED.sub(lambda m: f"{DATABASE}.{self._local_if_sharded(m.group(1))}", body)
        return [f"CREATE MATERIALIZED VIEW {if_not_exists or ''}{DATABASE}.{view}{self._on()} "
                f"TO {DATABASE}.{local_name(target)} {local_body}"]

    def _local_if_sharded(self, table: str) -> str:
        return local_name(table) if table in self.sharded else table

    def _drop(self, text: str) -> list[str] | None:
        found = _DROP.match(text)
        if not found:
            return None
        kind, if_exists, name = found.groups()
        exists = "IF EXISTS " if if_exists else ""
        if kind.upper() == "TABLE" and name in self.sharded:
            del self.sharded[name]
            return [f"DROP TABLE {exists}{DATABASE}.{name}{self._on()}",
                    f"DROP TABLE {exists}{DATABASE}.{local_name(name)}{self._on()}"]
        return [f"DROP {kind.upper()} {exists}{DATABASE}.{name}{self._on()}"]

    def _truncate(self, text: str) -> list[str] | None:
        found = _TRUNCATE.match(text)
        if not found:
            return None
        if_exists, table = found.groups()
        self._require_sharded(table, "TRUNCATE")
        return [f"TRUNCATE TABLE {'IF EXISTS ' if if_exists else ''}{DATABASE}.{local_name(table)}{self._on()}"]

    def _exchange(self, text: str) -> list[str] | None:
        found = _EXCHANGE.match(text)
        if not found:
            return None
        first, second = found.groups()
        self._require_sharded(first, "EXCHANGE")
        self._require_sharded(second, "EXCHANGE")
        self.sharded[first], self.sharded[second] = self.sharded[second], self.sharded[first]
        # The Distributed tables keep pointing at their local names, which now hold the other table: recreate them
        # with the columns of the local table they now read.
        return [f"EXCHANGE TABLES {DATABASE}.{local_name(first)} AND {DATABASE}.{local_name(second)}{self._on()}",
                self._distributed(first, "CREATE OR REPLACE TABLE "),
                self._distributed(second, "CREATE OR REPLACE TABLE ")]

    def _alter(self, text: str) -> list[str] | None:
        found = _ALTER.match(text)
        if not found:
            return None
        table, commands = found.groups()
        self._require_sharded(table, "ALTER")
        out = [f"ALTER TABLE {DATABASE}.{local_name(table)}{self._on()} {commands}"]
        if _COLUMN_COMMAND.search(commands):  # the Distributed table carries the columns too
            out.append(f"ALTER TABLE {DATABASE}.{table}{self._on()} {commands}")
        return out

    def _optimize(self, text: str) -> list[str] | None:
        found = _OPTIMIZE.match(text)
        if not found:
            return None
        table, final = found.groups()
        self._require_sharded(table, "OPTIMIZE")
        return [f"OPTIMIZE TABLE {DATABASE}.{local_name(table)}{self._on()}{' FINAL' if final else ''}"]

    def _delete(self, text: str) -> list[str] | None:
        found = _DELETE.match(text)
        if not found:
            return None
        table, where = found.groups()
        self._require_sharded(table, "DELETE")
        # The statement the worker wrote, moved to the local table: nothing from outside is added.
        return [f"DELETE FROM {DATABASE}.{local_name(table)}{self._on()} {where}"]  # noqa: S608

    def _insert(self, text: str) -> list[str] | None:
        found = _INSERT.match(text)
        if not found:
            return None
        self._require_sharded(found.group(1), "INSERT")
        return [text]

    def _require_sharded(self, table: str, what: str) -> None:
        if table not in self.sharded:
            raise ClusterDDLError(f"{what} on {DATABASE}.{table}, which no migration created as a MergeTree table")


def cluster_ddl_for(cluster: str, migrations: Iterable[Iterable[str]], *, on_cluster: bool = True,
                    replicated: bool = True) -> ClusterDDL:
    """A ClusterDDL that has seen these migrations' statements (so it knows the sharded tables as they are now)."""
    ddl = ClusterDDL(cluster, on_cluster=on_cluster, replicated=replicated)
    for statements in migrations:
        ddl.transform_all(statements)
    return ddl
