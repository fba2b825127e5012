"""Read-only SQL against the configured store, with output as a table, CSV or JSON.

Read-only is enforced twice: the statement must start with a reading keyword (a clear error for
the user), and ClickHouse runs it with ``readonly=1`` (the real guarantee). Values are bound as
``{name:Type}`` parameters, never interpolated.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

import orjson

from worker.errors import ReadOnlyQueryError
from worker.store import Store

READ_KEYWORDS = ("SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS")
_LEADING_COMMENTS = re.compile(r"^\s*(?:(?:--[^\n]*\n)|(?:/\*.*?\*/)|\s)*", re.S)
# Literals, quoted identifiers and comments, blanked before looking for clauses that write.
_NOT_CODE = re.compile(r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.)*\"|`(?:[^`\\]|\\.)*`|--[^\n]*|/\*.*?\*/", re.S)
# readonly=1 does not stop these: INTO OUTFILE writes a file on the client side (chDB: this process).
_WRITING_CLAUSES = re.compile(r"\bINTO\s+OUTFILE\b", re.I)


def check_read_only(sql: str) -> None:
    body = _LEADING_COMMENTS.sub("", sql).lstrip("( \n\t")
    keyword = body.split(None, 1)[0].upper() if body.split() else ""
    if keyword not in READ_KEYWORDS:
        raise ReadOnlyQueryError(
            f"only read-only statements are allowed ({', '.join(READ_KEYWORDS)}); got {keyword or 'nothing'!r}")
    if _WRITING_CLAUSES.search(_NOT_CODE.sub(" ", sql)):
        raise ReadOnlyQueryError("INTO OUTFILE writes a file: not allowed in read-only SQL "
                                 "(use --format csv/json and redirect the output instead)")


def run_read_only(store: Store, sql: str, parameters: dict[str, Any] | None = None
                  ) -> tuple[list[str], list[Sequence[Any]]]:
    check_read_only(sql)
    try:
        return store.query(sql, parameters=parameters, settings={"readonly": 1})
    except Exception as exc:
        if "readonly" in str(exc).lower() or "READONLY" in str(exc):
            raise ReadOnlyQueryError(f"ClickHouse refused a write in read-only mode: {exc}") from exc
        raise


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
            raise ReadOnlyQueryError(f"--param takes name=value, got {pair!r}")
        params[name.strip()] = value
    return params
