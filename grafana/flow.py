"""Flow: one session as a trace waterfall, as a node graph, and as its events in order."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import nodegraph, table
from grafana_foundation_sdk.models.dashboard import VariableRefresh, VariableSort

from grafana.common import CLICKHOUSE, FLOW_UID, SQL, TAGS, Format, dashboard_links, expand, unit, user_variable


def dashboard() -> dash.Dashboard:
    return (
        dash.Dashboard("Flows — flow")
        .uid(FLOW_UID)
        .tags(TAGS)
        .links(dashboard_links(FLOW_UID))
        .description("One flow (session): its tree of nodes as a trace waterfall and a node graph, and its events.")
        .time("now-24h", "now")
        .refresh("5s")
        .with_variable(user_variable())
        .with_variable(session_variable())
        .with_panel(session_summary())
        .with_panel(trace_waterfall())
        .with_panel(node_graph("{session}", "Flow as a graph"))
        .with_panel(events_in_order())
    )


def session_variable() -> dash.QueryVariable:
    """The flows of the time range, newest first (optionally of one user); any id can be typed in."""
    return (
        dash.QueryVariable("session_id")
        .label("Session")
        .datasource(CLICKHOUSE)
        .query(
            # Sessions with events in the range, latest activity first: a key range of the time-ordered copy.
            expand("SELECT session_id FROM flowtrack.events_by_time "
                   "WHERE $__timeFilter(ts) AND {user_filter} GROUP BY session_id ORDER BY max(ts) DESC LIMIT 500")
        )
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.DISABLED)
        .allow_custom_value(True)
    )


def session_summary() -> table.Panel:
    return (
        table.Panel()
        .title("Session")
        .height(4)
        .span(24)
        .datasource(CLICKHOUSE)
        .with_target(SQL("""
            SELECT user_id, session_id, status, started_at, ended_at, duration_ms, event_count, error_count
            FROM flowtrack.flow_sessions
            WHERE session_id = {session}
              AND user_id IN (SELECT user_id FROM flowtrack.session_spans WHERE session_id = {session})
            """).ref_id("A"))
        .unit("short")
        .override_by_name("duration_ms", unit("ms"))
    )


def trace_waterfall() -> dash.Panel:
    """flow_nodes with the column names Grafana's trace view reads (times and durations in ms); the session's
    nodes and events are read grouped on the identity, not through FINAL (grafana/common.py says why)."""
    return (
        dash.Panel()
        .type("traces")
        .title("Flow as a trace (node timings)")
        .height(14)
        .span(24)
        .datasource(CLICKHOUSE)
        .with_target(SQL("""
            SELECT
                n.session_id AS traceID,
                n.node_id AS spanID,
                n.parent_id AS parentSpanID,
                n.name AS operationName,
                splitByChar('_', n.name)[1] AS serviceName,
                toUnixTimestamp64Milli(n.start_ts) AS startTime,
                n.duration_ms AS duration,
                arrayConcat([map('key', 'status', 'value', n.status), map('key', 'node_id', 'value', n.node_id)],
                             a.tags) AS tags,
                [map('key', 'user_id', 'value', n.user_id)] AS serviceTags,
                if(n.status = 'error', 2, 0) AS statusCode
            FROM {session_nodes} AS n
            LEFT JOIN
            (
                SELECT node_id,
                       arrayFlatten(groupArray(arrayMap(k -> map('key', concat(event_type, '.', k),
                                                                 'value', attributes[k]),
                                                        mapKeys(attributes)))) AS tags
                FROM {session_events}
                GROUP BY node_id
            ) AS a ON a.node_id = n.node_id
            ORDER BY n.start_ts
            """, Format.TRACE, session_expr="{session}").ref_id("A"))
    )


def node_graph(session_expr: str, title: str) -> nodegraph.Panel:
    """Nodes and edges of one session; ``session_expr`` is SQL (or a fragment name) giving its session_id.
    Edges read the session's nodes once (an edge needs its parent among them: a window over the same read)."""
    return (
        nodegraph.Panel()
        .title(title)
        .height(14)
        .span(24)
        .datasource(CLICKHOUSE)
        .nodes(nodegraph.NodeOptions().main_stat_unit("ms").arcs([
            nodegraph.ArcOption().field("arc__ok").color("green"),
            nodegraph.ArcOption().field("arc__error").color("red"),
        ]))
        .edges(nodegraph.EdgeOptions().main_stat_unit("ms"))
        .with_target(SQL("""
            SELECT node_id AS id, name AS title, node_id AS subtitle, duration_ms AS mainstat,
                   status AS secondarystat, if(status = 'error', 0, 1) AS arc__ok,
                   if(status = 'error', 1, 0) AS arc__error, toString(start_ts) AS detail__started
            FROM {session_nodes}
            ORDER BY start_ts
            """, session_expr=session_expr).ref_id("nodes"))
        .with_target(SQL("""
            SELECT concat(parent_id, '->', node_id) AS id, parent_id AS source, node_id AS target,
                   duration_ms AS mainstat
            FROM
            (
                SELECT node_id, parent_id, duration_ms, groupArray(node_id) OVER () AS node_ids
                FROM {session_nodes}
            )
            WHERE parent_id != '' AND has(node_ids, parent_id)
            """, session_expr=session_expr).ref_id("edges"))
    )


def events_in_order() -> table.Panel:
    return (
        table.Panel()
        .title("Events in order")
        .height(12)
        .span(24)
        .datasource(CLICKHOUSE)
        .with_target(SQL("""
            SELECT ts AS time,
                   toUnixTimestamp64Milli(ts) - min(toUnixTimestamp64Milli(ts)) OVER () AS offset_ms,
                   event_type, node_id, parent_id, toJSONString(attributes) AS attributes,
                   toUnixTimestamp64Milli(ingested_at) - toUnixTimestamp64Milli(ts) AS ingest_lag_ms,
                   event_id, source_stream, source_id
            FROM {session_events}
            ORDER BY ts, event_id
            """, session_expr="{session}").ref_id("A"))
        .unit("short")
        .override_by_name("offset_ms", unit("ms"))
        .override_by_name("ingest_lag_ms", unit("ms"))
    )

