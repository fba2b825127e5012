"""Shared pieces of the dashboards: datasources, the ClickHouse query type, SQL fragments, small builders.

grafana-foundation-sdk has no builder for the ClickHouse plugin (``grafana-clickhouse-datasource``),
so this module defines one with the SDK's documented custom-query-type pattern: a ``Dataquery``
variant whose JSON is what the plugin saves for an SQL-editor query
(``{refId, datasource, editorType: "sql", rawSql, format, queryType}``).
"""

from __future__ import annotations

import enum
import re
from typing import Any, Self

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DashboardLink, DashboardLinkType, DataSourceRef, DynamicConfigValue

# -- datasources (uids fixed by grafana/provisioning/datasources/flowtrack.yaml) -----------------
CLICKHOUSE_TYPE = "grafana-clickhouse-datasource"
CLICKHOUSE_UID = "flowtrack-clickhouse"
PROMETHEUS_TYPE = "prometheus"
PROMETHEUS_UID = "flowtrack-prometheus"
CLICKHOUSE = DataSourceRef(type_val=CLICKHOUSE_TYPE, uid=CLICKHOUSE_UID)
PROMETHEUS = DataSourceRef(type_val=PROMETHEUS_TYPE, uid=PROMETHEUS_UID)

# -- dashboard uids (links between dashboards use them) -----------------------------------------
LIVE_UID = "flowtrack-live"
HISTORY_UID = "flowtrack-history"
FLOW_UID = "flowtrack-flow"
PIPELINE_UID = "flowtrack-pipeline"
TAGS = ["flowtrack"]
# Titles of the links between the dashboards (each dashboard links to the other three).
DASHBOARD_TITLES = {LIVE_UID: "Flows — live", HISTORY_UID: "Flows — history", FLOW_UID: "Flows — flow",
                    PIPELINE_UID: "Flows — pipeline"}

# -- SQL fragments: panel SQL names them as {name}; SQL() and expand() put them in ----------------
# A variable's value reaches the SQL percent-encoded and is decoded by ClickHouse: Grafana's percentencode leaves
# only A-Z a-z 0-9 - _ . ~ and %XX, so nothing a viewer types (the user box, a session id in the URL) can end the
# literal. ${var:sqlstring} only doubles quotes, and ClickHouse also reads backslash escapes in a literal: `x\' OR 1)
# UNION ALL SELECT … FROM system.tables --` ran as SQL, and `DOMAIN\alice` matched nothing (\a is a bell).
USER = "decodeURLComponent('${user_id:percentencode}')"
SESSION = "decodeURLComponent('${session_id:percentencode}')"
FRAGMENTS: dict[str, str] = {
    # The user_id variable is a text box: empty means every user.
    "user": USER,
    "user_filter": f"({USER} = '' OR user_id = {USER})",
    "session": SESSION,
    # Milliseconds from an event's own time to the moment it was stored.
    "store_lag_ms": "(toUnixTimestamp64Milli(ingested_at) - toUnixTimestamp64Milli(ts))",
    # Sessions that started in the time range (a filter on flow_sessions). With a user it is a key range of the
    # rollup (sorted by user_id, session_id); for every user one pass over the rollup (one row per session).
    # Narrowing by the (user_id, session_id) pairs of the range's events does not help: a day's sessions sit in
    # nearly every granule, and building the pair set costs more than the pass (measured: 4x slower at 10M).
    "started_in_range": "{user_filter} AND $__timeFilter(started_at)",
    # One session's events as flow_events shows them, and its nodes as flow_nodes defines them (003), for the
    # session given by the caller's `session_expr`. Copies are collapsed by grouping on the identity (the last
    # stored copy wins, FINAL's rule) instead of reading flow_events/flow_nodes (events FINAL): a session's key
    # range sits in every part of the table, and FINAL's merge of ~40 one-granule ranges costs several times
    # the read itself (measured at 10M: ~20 ms grouped, 40-180 ms under FINAL for one session).
    "session_events": "(SELECT session_id, event_id, argMax(user_id, stored) AS user_id, "
                      "argMax(node_id, stored) AS node_id, argMax(parent_id, stored) AS parent_id, "
                      "toString(argMax(event_type, stored)) AS event_type, argMax(ts, stored) AS ts, "
                      "max(stored) AS ingested_at, argMax(attributes, stored) AS attributes, "
                      "toString(argMax(source_stream, stored)) AS source_stream, "
                      "argMax(source_id, stored) AS source_id, argMax(is_error, stored) AS is_error "
                      "FROM (SELECT *, ingested_at AS stored FROM flowtrack.events WHERE session_id = {session_expr}) "
                      "GROUP BY session_id, event_id)",
    "session_nodes": "(SELECT session_id, node_id, argMinIf(parent_id, (ts, event_id), parent_id != '') AS parent_id, "
                     "argMin(event_type, (ts, event_id)) AS name, min(ts) AS start_ts, max(ts) AS end_ts, "
                     "dateDiff('millisecond', start_ts, end_ts) AS duration_ms, "
                     "if(countIf(is_error = 1) > 0, 'error', 'ok') AS status, any(user_id) AS user_id "
                     "FROM {session_events} GROUP BY session_id, node_id)",
    # The range's events (as flow_events shows them) of the chosen user, or of every user. Every user: a key range
    # of the time-ordered copy (FINAL is partition-local there). One user: the user's sessions from the rollup
    # (its key prefix), their events by key from events, copies collapsed on the identity; the time-ordered copy
    # has no user in its key, so a user's month there is a scan of the month. The branch not taken has a constant
    # false filter and reads nothing.
    "range_events": "(SELECT session_id, event_id, ts, event_type, node_id, parent_id, is_error, user_id "
                    "FROM flowtrack.events_by_time FINAL WHERE {user} = '' AND $__timeFilter(ts) "
                    "UNION ALL "
                    "SELECT session_id, event_id, ts, event_type, node_id, parent_id, is_error, user_id FROM "
                    "(SELECT session_id, event_id, argMax(ts, stored) AS ts, argMax(event_type, stored) AS event_type, "
                    "argMax(node_id, stored) AS node_id, argMax(parent_id, stored) AS parent_id, "
                    "argMax(is_error, stored) AS is_error, argMax(user_id, stored) AS user_id "
                    "FROM (SELECT *, ingested_at AS stored FROM flowtrack.events WHERE {user} != '' "
                    "AND session_id IN (SELECT session_id FROM flowtrack.sessions WHERE user_id = {user} "
                    "AND last_event_at >= $__fromTime)) "
                    "GROUP BY session_id, event_id) "
                    "WHERE $__timeFilter(ts) AND user_id = {user})",
    # Sessions with an error event in the range (a superset is fine: callers read their events in the range).
    "error_sessions": "(SELECT session_id FROM flowtrack.events_by_time "
                      "WHERE {user} = '' AND $__timeFilter(ts) AND is_error = 1 "
                      "UNION ALL SELECT session_id FROM flowtrack.sessions WHERE user_id = {user} "
                      "AND error_count > 0 AND last_event_at >= $__fromTime)",
    # The session of the latest event. Every user: a read of the end of the time-ordered copy. One user: the key
    # range of the rollup (sorted by user_id), not the time-ordered copy filtered by user, which read back to the
    # user's last event (the whole table for a user without events).
    "latest_session": "(SELECT session_id FROM ("
                      "SELECT session_id, ts FROM (SELECT session_id, ts FROM flowtrack.events_by_time "
                      "WHERE {user} = '' ORDER BY ts DESC LIMIT 1) "
                      "UNION ALL SELECT session_id, last_event_at AS ts FROM flowtrack.sessions FINAL "
                      "WHERE {user} != '' AND user_id = {user}) ORDER BY ts DESC LIMIT 1)",
    # Time series: buckets of $__interval_s; the last one still filling is left out (it would draw a drop), and
    # buckets without rows are drawn as zero (ORDER BY … {fill_buckets}).
    "first_bucket": "toStartOfInterval($__fromTime, INTERVAL $__interval_s SECOND)",
    "open_bucket": "toStartOfInterval($__toTime, INTERVAL $__interval_s SECOND)",
    "fill_buckets": "WITH FILL FROM {first_bucket} TO {open_bucket} STEP INTERVAL $__interval_s SECOND",
}
FLOW_LINK = f"/d/{FLOW_UID}/flow?var-session_id=${{__value.raw}}&${{__url_time_range}}"
_PLACEHOLDER = re.compile(r"(?<!\$)\{([a-z_]+)\}")


def expand(template: str, **extra: str) -> str:
    """Put the named fragments into SQL text (fragments may name others); unknown names are an error."""
    fragments = {**FRAGMENTS, **extra}

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in fragments:
            raise KeyError(f"unknown SQL fragment {{{name}}}")
        return fragments[name]

    previous = None
    while previous != template:
        previous, template = template, _PLACEHOLDER.sub(one, template)
    return template


class Format(enum.IntEnum):
    """The plugin's result formats (``format`` in a query)."""

    TIME_SERIES = 0
    TABLE = 1
    LOGS = 2
    TRACE = 3


_QUERY_TYPES = {Format.TIME_SERIES: "timeseries", Format.TABLE: "table", Format.LOGS: "logs",
                Format.TRACE: "traces"}


class ClickHouseQuery(cogvariants.Dataquery):
    """An SQL-editor query of the ClickHouse plugin."""

    def __init__(self, raw_sql: str, fmt: Format = Format.TABLE, ref_id: str | None = None,
                 hide: bool | None = None) -> None:
        self.raw_sql = raw_sql
        self.format = fmt
        self.ref_id = ref_id
        self.hide = hide

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {
            "datasource": CLICKHOUSE.to_json(),
            "editorType": "sql",
            "format": int(self.format),
            "pluginVersion": "4.20.0",
            "queryType": _QUERY_TYPES[self.format],
            "rawSql": self.raw_sql,
        }
        if self.ref_id is not None:
            payload["refId"] = self.ref_id
        if self.hide is not None:
            payload["hide"] = self.hide
        return payload

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        return cls(str(data.get("rawSql", "")), Format(int(data.get("format", Format.TABLE))), data.get("refId"),
                   data.get("hide"))


class SQL(cogbuilder.Builder[cogvariants.Dataquery]):
    """Builder for ``ClickHouseQuery``: ``SQL("SELECT …", Format.TIME_SERIES).ref_id("A")``."""

    def __init__(self, raw_sql: str, fmt: Format = Format.TABLE, **fragments: str) -> None:
        self._internal = ClickHouseQuery(_tidy(expand(raw_sql, **fragments)), fmt)

    def build(self) -> ClickHouseQuery:
        return self._internal

    def ref_id(self, ref_id: str) -> Self:
        self._internal.ref_id = ref_id
        return self

    def hide(self, hide: bool) -> Self:
        self._internal.hide = hide
        return self


def _tidy(sql: str) -> str:
    """Dedent and strip so the SQL reads well in the panel editor and in the JSON."""
    import textwrap

    return textwrap.dedent(sql).strip()


def promql(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).range().datasource(PROMETHEUS)


def dashboard_links(current_uid: str) -> list[cogbuilder.Builder[DashboardLink]]:
    """Links to the other dashboards, keeping the time range and the variables (user_id, session_id)."""
    return [dash.DashboardLink(title).type(DashboardLinkType.LINK).url(f"/d/{uid}").icon("dashboard")
            .keep_time(True).include_vars(True)
            for uid, title in DASHBOARD_TITLES.items() if uid != current_uid]


def open_flow_link() -> list[cogbuilder.Builder[DashboardLink]]:
    """Panel link of a node graph: the Flow dashboard, same time range and variables (its session_id list
    starts with the chosen user's newest flow, the one the live graph shows)."""
    return [dash.DashboardLink("Open in Flows — flow").type(DashboardLinkType.LINK)
            .url(f"/d/{FLOW_UID}?${{__all_variables}}&${{__url_time_range}}")]


def link_to_flow(title: str = "Open this flow") -> list[DynamicConfigValue]:
    """Field override: make a session_id cell open the Flow dashboard for that session."""
    return [DynamicConfigValue(id_val="links", value=[{"title": title, "url": FLOW_LINK}])]


def unit(value: str) -> list[DynamicConfigValue]:
    return [DynamicConfigValue(id_val="unit", value=value)]


def legend_table() -> common_builders.VizLegendOptions:
    return (common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM).show_legend(True))


def user_variable() -> dash.TextBoxVariable:
    return (dash.TextBoxVariable("user_id").label("User id").default_value("")
            .description("Show one user's flows; leave empty for every user."))
