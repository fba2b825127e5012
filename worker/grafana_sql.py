"""What Grafana and its ClickHouse plugin do to a query before ClickHouse sees it, and where the queries live.

No Grafana server runs next to flowtrack's tests and benchmark, so this module does the two steps
Grafana would: put in the dashboard variables (``${user_id:percentencode}`` …), then expand the plugin's
macros (``$__timeFilter`` …) exactly as the ClickHouse plugin 4.20 renders them (pkg/macros/macros.go,
plus the ``$__timeFrom``/``$__timeTo`` defaults of its SQL layer). It also finds every ClickHouse query
of the generated dashboards (panel targets and query variables) and of the provisioned alert rules, so
the tests and ``flowtrack bench queries`` run whatever the artefacts hold today.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

CLICKHOUSE_TYPE = "grafana-clickhouse-datasource"  # the plugin id (grafana/common.py: CLICKHOUSE_TYPE)
GRAFANA_DIR = Path(__file__).resolve().parent.parent / "grafana"
DASHBOARD_DIR = GRAFANA_DIR / "dashboards"
ALERT_FILE = GRAFANA_DIR / "provisioning" / "alerting" / "flowtrack.yaml"


# The query settings of Grafana's ClickHouse user (profile grafana_readonly, deploy/clickhouse/users.xml; a test keeps
# the two equal): every dashboard and alert query runs under them, so the benchmark runs them under them too.
# - max_memory_usage: a query over the budget fails rather than starve the server.
# - use_skip_indexes_if_final: off by default on 25.3; lets skip indexes prune reads under FINAL.
# - max_bytes_before_external_group_by / _sort: a GROUP BY over every session of a long range (Most common paths
#   before migration 009, 30 days, all users: 1.0 GB at 10M events, 4.6 GB at 50M) spills to disk instead of failing
#   at the budget.
GRAFANA_QUERY_SETTINGS: dict[str, int] = {
    "max_memory_usage": 1_000_000_000,
    "use_skip_indexes_if_final": 1,
    "max_bytes_before_external_group_by": 300_000_000,
    "max_bytes_before_external_sort": 300_000_000,
}


class MacroError(ValueError):
    """A query uses a macro the plugin does not have, or calls one with the wrong arguments."""


@dataclass
class QueryContext:
    from_s: int
    to_s: int
    interval_s: int = 1
    variables: dict[str, str] = field(default_factory=dict)


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.]*)(?::([a-z]+))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_MACRO = re.compile(r"\$__([A-Za-z_]+)")


def apply_variables(sql: str, ctx: QueryContext) -> str:
    """Grafana's template-variable interpolation: ``${v}``, ``$v`` and the ``sqlstring`` and ``percentencode``
    formats."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        fmt = match.group(2)
        if name.startswith("__"):
            return match.group(0)  # a macro, expanded by the plugin backend
        if name not in ctx.variables:
            raise KeyError(f"query uses ${name}, which the dashboard does not define")
        value = ctx.variables[name]
        if fmt == "sqlstring":
            return "'" + value.replace("'", "''") + "'"
        if fmt == "percentencode":  # Grafana's encodeURIComponentStrict: all but A-Z a-z 0-9 - _ . ~ as %XX (UTF-8)
            return quote(value, safe="")
        if fmt is not None:
            raise ValueError(f"unexpected variable format {fmt!r}")
        return value

    return _VARIABLE.sub(one, sql)


def _macro_args(sql: str, start: int) -> tuple[list[str], int]:
    """Arguments of a macro call whose '(' is at ``start``; returns them and the index after ')'."""
    depth, args, current = 0, [], ""
    for i in range(start, len(sql)):
        ch = sql[i]
        if ch == "(":
            depth += 1
            if depth == 1:
                continue
        elif ch == ")":
            depth -= 1
            if depth == 0:
                args.append(current.strip())
                return args, i + 1
        elif ch == "," and depth == 1:
            args.append(current.strip())
            current = ""
            continue
        current += ch
    raise MacroError(f"unbalanced macro call at {start}: {sql[start:start + 60]!r}")


def _date(epoch_s: int) -> str:
    return f"toDate('{datetime.fromtimestamp(epoch_s, UTC):%Y-%m-%d}')"


def _macros_with_args(ctx: QueryContext) -> dict[str, tuple[int, Callable[[list[str]], str]]]:
    """name -> (number of arguments, rendering), as macros.go renders them."""
    f, t, n = ctx.from_s, ctx.to_s, max(1, ctx.interval_s)

    def date_time_filter(a: list[str]) -> str:
        return (f"({a[0]} >= {_date(f)} AND {a[0]} <= {_date(t)}) AND "
                f"({a[1]} >= toDateTime({f}) AND {a[1]} <= toDateTime({t}))")

    return {
        "timeFilter": (1, lambda a: f"{a[0]} >= toDateTime({f}) AND {a[0]} <= toDateTime({t})"),
        "timeFilter_ms": (1, lambda a: f"{a[0]} >= fromUnixTimestamp64Milli({f * 1000}) AND "
                                       f"{a[0]} <= fromUnixTimestamp64Milli({t * 1000})"),
        "dateFilter": (1, lambda a: f"{a[0]} >= {_date(f)} AND {a[0]} <= {_date(t)}"),
        "dateTimeFilter": (2, date_time_filter),
        "dt": (2, date_time_filter),
        "timeInterval": (1, lambda a: f"toStartOfInterval(toDateTime({a[0]}), INTERVAL {n} second)"),
        "timeInterval_ms": (1, lambda a: f"toStartOfInterval(toDateTime64({a[0]}, 3), "
                                         f"INTERVAL {n * 1000} millisecond)"),
        "timeFrom": (1, lambda a: f"{a[0]} >= toDateTime({f})"),
        "timeTo": (1, lambda a: f"{a[0]} <= toDateTime({t})"),
    }


def expand_macros(sql: str, ctx: QueryContext) -> str:
    """The ClickHouse plugin's macros (pkg/macros/macros.go, plugin 4.20); unknown ones are refused."""
    f, t, n = ctx.from_s, ctx.to_s, max(1, ctx.interval_s)
    fixed = {
        "fromTime": f"toDateTime({f})", "toTime": f"toDateTime({t})",
        "fromTime_ms": f"fromUnixTimestamp64Milli({f * 1000})", "toTime_ms": f"fromUnixTimestamp64Milli({t * 1000})",
        "interval_s": str(n),
    }
    with_args = _macros_with_args(ctx)
    out, i = "", 0
    while True:
        match = _MACRO.search(sql, i)
        if match is None:
            return out + sql[i:]
        out += sql[i:match.start()]
        name = match.group(1)
        if name in with_args:
            arity, render = with_args[name]
            args, end = _macro_args(sql, match.end())
            if len(args) != arity:
                raise MacroError(f"$__{name} takes {arity} argument(s), got {args}")
            out += render(args)
            i = end
        elif name in fixed:
            out += fixed[name]
            i = match.end()
        else:
            raise MacroError(f"$__{name} is not a macro of the ClickHouse plugin")


def render_sql(sql: str, ctx: QueryContext) -> str:
    return expand_macros(apply_variables(sql, ctx), ctx)


# -- time ranges and intervals as Grafana computes them --------------------------------------------
_RELATIVE = re.compile(r"^now(?:-(\d+)([smhdwMy]))?$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "M": 30 * 86400, "y": 365 * 86400}


def relative_seconds(text: str) -> int:
    """Seconds before now of a dashboard time like 'now-24h' ('now' = 0); rounding ('now/d') is refused."""
    match = _RELATIVE.match(text.strip())
    if match is None:
        raise ValueError(f"cannot read the dashboard time {text!r} (expected now or now-<n><unit>)")
    return int(match.group(1)) * _UNIT_S[match.group(2)] if match.group(1) else 0


# Grafana's kbn.roundInterval: the raw interval (ms) is rounded to one of these steps.
_ROUND_INTERVAL_MS = (
    (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000), (3500, 2000), (7500, 5000),
    (12500, 10000), (17500, 15000), (25000, 20000), (45000, 30000), (90000, 60000), (210000, 120000),
    (450000, 300000), (750000, 600000), (1050000, 900000), (1500000, 1200000), (2700000, 1800000),
    (5400000, 3600000), (9000000, 7200000), (16200000, 10800000), (24300000, 21600000), (64800000, 43200000),
    (129600000, 86400000), (604800000, 86400000), (1814400000, 604800000),
)
DEFAULT_MAX_DATA_POINTS = 1000  # Grafana uses the panel's width in pixels; a wide panel is about this


def interval_seconds(range_s: int, max_data_points: int = DEFAULT_MAX_DATA_POINTS, min_interval_s: int = 0) -> int:
    """``$__interval`` in whole seconds, as Grafana derives it from the range and the panel's resolution."""
    raw_ms = range_s * 1000 / max(1, max_data_points)
    rounded_ms = next((step for limit, step in _ROUND_INTERVAL_MS if raw_ms < limit), 2592000000)
    return max(1, min_interval_s, rounded_ms // 1000)


# -- where the queries are -------------------------------------------------------------------------
@dataclass(frozen=True)
class PanelQuery:
    dashboard: str  # file name, e.g. flows-live.json
    panel_id: int
    panel: str  # title
    panel_type: str
    ref_id: str
    sql: str
    fmt: int  # 0 time series, 1 table, 2 logs, 3 traces
    max_data_points: int


@dataclass(frozen=True)
class VariableQuery:
    dashboard: str
    name: str
    sql: str


@dataclass(frozen=True)
class AlertQuery:
    uid: str
    title: str
    ref_id: str
    sql: str
    from_s: int  # relativeTimeRange: seconds before now
    to_s: int


def load_dashboards(directory: Path = DASHBOARD_DIR) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # inside rows


def _is_clickhouse(source: Any) -> bool:
    return isinstance(source, dict) and source.get("type") == CLICKHOUSE_TYPE


def panel_queries(name: str, dashboard: dict[str, Any]) -> list[PanelQuery]:
    """Every ClickHouse target of every panel (a target without its own datasource inherits the panel's)."""
    found = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if _is_clickhouse(target.get("datasource", panel.get("datasource"))) and target.get("rawSql"):
                found.append(PanelQuery(name, int(panel.get("id", 0)), str(panel.get("title", "")),
                                        str(panel.get("type", "")), str(target.get("refId", "")),
                                        str(target["rawSql"]), int(target.get("format", 1)),
                                        int(panel.get("maxDataPoints") or DEFAULT_MAX_DATA_POINTS)))
    return found


def variable_queries(name: str, dashboard: dict[str, Any]) -> list[VariableQuery]:
    found = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query" and _is_clickhouse(var.get("datasource")):
            query = var["query"]
            found.append(VariableQuery(name, str(var["name"]), query if isinstance(query, str) else query["rawSql"]))
    return found


def default_variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """Each text box and constant variable at the value the dashboard opens with."""
    values = {}
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") in ("textbox", "constant", "custom"):
            current = var.get("current") or {}
            value = current.get("value") if isinstance(current, dict) else None
            values[str(var["name"])] = str(value if value is not None else var.get("query") or "")
    return values


def alert_queries(path: Path = ALERT_FILE) -> list[AlertQuery]:
    """The ClickHouse query of every provisioned alert rule, with its relative time range."""
    import yaml  # a dev dependency: only the tests and the benchmark read the provisioning files

    doc = yaml.safe_load(path.read_text())
    found = []
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            for item in rule.get("data", []):
                model = item.get("model", {})
                if _is_clickhouse(model.get("datasource")) and model.get("rawSql"):
                    span = item.get("relativeTimeRange", {})
                    found.append(AlertQuery(str(rule["uid"]), str(rule.get("title", "")), str(item["refId"]),
                                            str(model["rawSql"]), int(span.get("from", 600)), int(span.get("to", 0))))
    return found
