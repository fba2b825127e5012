"""Read-only SQL against the configured store, with output as a table, CSV or JSON.

What holds, and who enforces it (no guessing at ClickHouse's grammar with regular expressions):

1. The engine parses the user's text, as data: ``SELECT formatQuery({sql:String})`` refuses multi-statements
   and syntax errors (with positions in the user's own text) and returns the one statement in canonical form
   (comments dropped, dollar-quoted and escaped literals re-quoted).
2. The engine's own syntax tree of that statement (``EXPLAIN AST``, parse only, nothing runs) must be a
   reading statement (SELECT, DESCRIBE, SHOW, EXISTS, EXPLAIN), must not write its result to a file
   (``INTO OUTFILE``), and may call no table function that leaves the store (file, url, s3, remote, mysql,
   executable, python, …: everything but a short list of generators). ``readonly`` does not stop these:
   ``DESC file(…)`` reads a file and ``DESC url(…)`` connects even with ``readonly=1``, ``file('…')`` is also a
   scalar function that reads any file, and in the embedded engine INTO OUTFILE is written by this process.
3. Only that canonical statement runs, on a connection that is read-only by itself: the embedded engine gets
   its own connection created with ``readonly=1`` (a session setting the statement cannot lift: ``SETTINGS
   readonly=0`` is refused); a server gets ``readonly=1`` as a request setting, and should be reached as a
   user without FILE/URL/REMOTE/S3 grants (``flowtrack_sql`` in deploy/clickhouse/users.xml).

What the embedded engine does not offer (chDB 4.4, engine 26.9; checked): users and grants (a users config
passed with ``config-file`` is read but its users and profiles are not applied, every connection is the
``default`` user, and ``CREATE USER`` is refused), and a file sandbox (``user_files_path`` does not confine
absolute paths in clickhouse-local). Hence the parser-based checks in 1 and 2.

Values are bound as ``{name:Type}`` parameters, never interpolated.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import clickhouse_connect
import orjson

from worker.errors import ConfigError, FlowtrackError, ReadOnlyQueryError
from worker.store import Store

READ_STATEMENTS = ("Select", "Describe", "Show", "Exists", "Explain")  # root node names of EXPLAIN AST
# Table functions that only generate or reshape data given in the statement itself.
SAFE_TABLE_FUNCTIONS = frozenset({"numbers", "numbers_mt", "zeros", "zeros_mt", "generateseries",
                                  "generate_series", "primes", "values", "view", "format", "null"})


class QueryFailedError(FlowtrackError):
    """ClickHouse refused or could not run the statement; the message is ClickHouse's, cleaned to one line."""


@dataclass
class ReadOnlyConnection:
    """A connection to the store on which nothing can write: see the module docstring."""

    client: Any
    settings: dict[str, Any]
    owned: bool  # a connection of its own (embedded), closed after use

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> tuple[list[str], list[Sequence[Any]]]:
        result = self.client.query(sql, parameters=parameters or None, settings=self.settings)
        return list(result.column_names), list(result.result_rows)

    def close(self) -> None:
        if self.owned:
            self.client.close()


# Limits of an ad-hoc statement on the embedded store, which has no server profile to set them (a server's
# flowtrack_sql profile has its own): readonly=1 refuses SETTINGS in the statement, so without them a runaway query
# (numbers_mt(1e13), a groupArray over everything) would hold the machine's cores and memory until killed.
DEFAULT_TIMEOUT_S = 300
MAX_MEMORY_BYTES = 4 << 30


def open_read_only(store: Store, timeout_s: float = DEFAULT_TIMEOUT_S) -> ReadOnlyConnection:
    if store.embedded:
        # Another handle on the same in-process engine, created read-only: the settings are the session's.
        options = {"readonly": "1", "max_execution_time": str(max(1, round(timeout_s))),
                   "max_memory_usage": str(MAX_MEMORY_BYTES)}
        client = clickhouse_connect.get_client(dsn=f"chdb://{store.client.path}", chdb_options=options)
        return ReadOnlyConnection(client, {}, owned=True)
    return ReadOnlyConnection(store.client, {"readonly": 1}, owned=False)


def canonical_statement(connection: ReadOnlyConnection, sql: str) -> str:
    """The one statement in ``sql``, as the engine's parser reads and prints it (comments dropped)."""
    try:
        _, rows = connection.query("SELECT formatQuery({sql:String})", {"sql": sql})
    except Exception as exc:
        raise QueryFailedError(clickhouse_message(exc)) from None
    return str(rows[0][0])


def check_takes_format(connection: ReadOnlyConnection, statement: str) -> None:
    """The statement is run with a FORMAT clause of ours: it must take one (the parser says). Checked once the
    statement is known to be a reading one, so that a write gets the read-only refusal, not this."""
    try:
        connection.query("SELECT formatQuery({sql:String})", {"sql": statement + "\nFORMAT Native"})
    except Exception:
        raise QueryFailedError("the statement ends with its own FORMAT clause: choose the output with "
                               "--format table, csv or json") from None


# clickhouse-connect takes a statement ending in LIMIT 0 for a metadata probe that returns no rows; EXPLAIN returns
# rows. The tree of the same statement with LIMIT 1 has the same statement kind, clauses and table functions.
_TRAILING_LIMIT_ZERO = re.compile(r"\bLIMIT\s+0\s*$", re.IGNORECASE)


def syntax_tree(connection: ReadOnlyConnection, statement: str, parameters: dict[str, Any] | None = None
                ) -> list[str]:
    _, rows = connection.query(f"EXPLAIN AST {_TRAILING_LIMIT_ZERO.sub('LIMIT 1', statement)}", parameters)
    return [str(row[0]) for row in rows]


_READ_ONLY = "flowtrack sql is read-only: only reading statements run (SELECT, DESCRIBE, SHOW, EXISTS, EXPLAIN)"
# How the parser prints a reading statement (formatQuery): its first keyword, maybe after parentheses.
_READING_START = re.compile(r"[\s(]*(SELECT|WITH|DESC|DESCRIBE|SHOW|EXISTS|EXPLAIN)\b", re.IGNORECASE)


def refusal(tree: Sequence[str], table_functions: frozenset[str]) -> str | None:
    """Why the parsed statement may not run, or None. ``tree`` is EXPLAIN AST's dump: one node per line,
    indented by depth, ``Function <name>`` for every function call (table functions included).

    Identifiers are dumped unescaped, so a name may add lines of its own: that can only add refusals,
    never hide a node the parser produced.
    """
    root = tree[0].split(None, 1)[0] if tree and tree[0].strip() else ""
    if not root.startswith(READ_STATEMENTS):
        return _READ_ONLY + f"; this is {root.removesuffix('Query') or 'nothing'}"
    for line in tree[1:]:
        depth = len(line) - len(line.lstrip(" "))
        node, _, rest = line.strip().partition(" ")
        if depth == 1 and node == "Literal":  # a literal child of the statement itself is its INTO OUTFILE
            return ("INTO OUTFILE writes a file: not allowed here (use --format csv/json and redirect the "
                    "output instead)")
        if node == "Function":
            name = rest.split(" ", 1)[0]
            if name.lower() in table_functions and name.lower() not in SAFE_TABLE_FUNCTIONS:
                return (f"{name}() reaches outside the store (files, URLs, other servers, programs): not "
                        f"allowed here; allowed table functions: {', '.join(sorted(SAFE_TABLE_FUNCTIONS))}")
    return None


def run_read_only(store: Store, sql: str, parameters: dict[str, Any] | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[list[str], list[Sequence[Any]]]:
    connection = open_read_only(store, timeout_s)
    try:
        statement = canonical_statement(connection, sql)
        try:
            tree = syntax_tree(connection, statement, parameters)
            _, names = connection.query("SELECT lower(name) FROM system.table_functions")
        except Exception as exc:
            if not _READING_START.match(statement):  # EXPLAIN AST itself fails on some (SYSTEM FLUSH LOGS)
                raise ReadOnlyQueryError(_READ_ONLY + f"; this is {statement.split(None, 1)[0]}") from None
            raise QueryFailedError(clickhouse_message(exc)) from None
        reason = refusal(tree, frozenset(str(row[0]) for row in names))
        if reason:
            raise ReadOnlyQueryError(reason)
        check_takes_format(connection, statement)
        try:
            return connection.query(statement, parameters)
        except Exception as exc:
            raise QueryFailedError(clickhouse_message(exc)) from None
    finally:
        connection.close()


_EXCEPTION = re.compile(r"(?:Code: (\d+)\. )?DB::Exception: ")
_TRAILERS = (re.compile(r":? In scope SELECT formatQuery\(.*$"), re.compile(r"\s*\(version [^)]*\)"),
             re.compile(r"\s*FORMAT Native\b"))
_EXPECTED = re.compile(r"(Expected one of: )((?:[^,.]+, ){8})[^.]*")
_REPEATED_NAME = re.compile(r"(\(\w+\))(?:\.? \1)+")
_USER_PREFIX = re.compile(r"^\w+: (?=Not enough privileges|Cannot execute|Authentication)")


def clickhouse_message(exc: BaseException) -> str:
    """ClickHouse's own words about the statement, on one line: no traceback, no client-side wrapping, and
    nothing about the text flowtrack adds to run it (``formatQuery(…)``, ``FORMAT Native``)."""
    text = " ".join(str(exc).split())
    parts = list(_EXCEPTION.finditer(text))
    if not parts:
        return text[:500] or type(exc).__name__
    code = next((p.group(1) for p in reversed(parts) if p.group(1)), None)
    message = text[parts[-1].end():]
    for trailer in _TRAILERS:
        message = trailer.sub("", message)
    message = _USER_PREFIX.sub("", _EXPECTED.sub(r"\1\2…", _REPEATED_NAME.sub(r"\1", message))).strip()
    return f"ClickHouse: {message}" + (f" [code {code}]" if code else "")


def to_jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


def format_json(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    records = [{c: to_jsonable(v) for c, v in zip(columns, row, strict=True)} for row in rows]
    return orjson.dumps(records, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()


def format_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(v) for v in row])
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list | tuple):
        return orjson.dumps(to_jsonable(value)).decode()
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def parse_params(pairs: Sequence[str]) -> dict[str, str]:
    """`name=value` pairs for `{name:Type}` placeholders."""
    params: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--param takes name=value, got {pair!r}")
        params[name.strip()] = value
    return params
