"""Flows — history: the sessions of a time range, their outcomes, durations, common paths and failures."""

from __future__ import annotations

from grafana_foundation_sdk.builders import barchart, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.models import common

from grafana.common import (
    CLICKHOUSE,
    HISTORY_UID,
    SQL,
    TAGS,
    Format,
    dashboard_links,
    legend_table,
    link_to_flow,
    unit,
    user_variable,
)


def dashboard() -> dash.Dashboard:
    return (
        dash.Dashboard("Flows — history")
        .uid(HISTORY_UID)
        .tags(TAGS)
        .links(dashboard_links(HISTORY_UID))
        .description("Sessions over a time range: outcomes, durations, the most common paths and where flows fail.")
        .time("now-24h", "now")
        .refresh("30s")
        .with_variable(user_variable())
        .with_panel(outcomes_over_time())
        .with_panel(duration_distribution())
        .with_panel(sessions())
        .with_panel(common_paths())
        .with_panel(where_flows_fail())
        .with_panel(error_messages())
    )


def sessions() -> table.Panel:
    return (
        table.Panel()
        .title("Sessions")
        .description("Click a session id to open the flow.")
        .height(12)
        .span(24)
        .datasource(CLICKHOUSE)
        .with_target(SQL("""
            SELECT started_at, ended_at, user_id, session_id, duration_ms, event_count, error_count, status
            FROM flowtrack.flow_sessions
            WHERE {started_in_range}
            ORDER BY started_at DESC
            LIMIT 1000
            """).ref_id("A"))
        .unit("short")
        .override_by_name("session_id", link_to_flow())
        .override_by_name("duration_ms", unit("ms"))
    )


def outcomes_over_time() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title("Completed / failed / active sessions (by start time)")
        .height(8)
        .span(14)
        .datasource(CLICKHOUSE)
        .legend(legend_table())
        .draw_style(common.GraphDrawStyle.BARS)
        .fill_opacity(80)
        .stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
        .unit("short")
        .with_target(SQL("""
            SELECT time, status, sessions FROM
            (
                SELECT $__timeInterval(started_at) AS time, status, count() AS sessions
                FROM flowtrack.flow_sessions
                WHERE {started_in_range} AND started_at < {open_bucket}
                GROUP BY time, status
                ORDER BY status, time {fill_buckets}
            )
            ORDER BY time, status
            """, Format.TIME_SERIES).ref_id("A"))
    )


def duration_distribution() -> barchart.Panel:
    """Finished sessions counted per duration band in the store (every one of them: a histogram panel bins the rows
    it is sent, and sending one per session had to stop at a row limit: 100,000 of 508,200 over 30 days at 10M
    events, the first in the rollup's user order)."""
    return (
        barchart.Panel()
        .title("Duration of finished sessions")
        .description("Sessions that started in the time range and have finished, per duration band.")
        .height(8)
        .span(10)
        .datasource(CLICKHOUSE)
        .unit("short")
        .x_field("duration")
        .with_target(SQL("""
            SELECT ['< 1 s', '1-5 s', '5-15 s', '15-60 s', '1-5 min', '5-15 min', '15-60 min', '≥ 1 h'][band]
                   AS duration, sessions
            FROM
            (
                SELECT 1 + countEqual(arrayMap(limit_ms -> duration_ms >= limit_ms,
                                               [1000, 5000, 15000, 60000, 300000, 900000, 3600000]), 1) AS band,
                       count() AS sessions
                FROM flowtrack.flow_sessions
                WHERE {started_in_range} AND status != 'active'
                GROUP BY band
                ORDER BY band WITH FILL FROM 1 TO 9
            )
            ORDER BY band
            """).ref_id("A"))
    )


def common_paths() -> table.Panel:
    """A path is the session's event types in time order, kept in the rollup (flow_session_paths, migration 009):
    one GROUP BY over one row per session, no events scan and no join (which went over Grafana's 1 GB budget over
    30 days at 100M events)."""
    return (
        table.Panel()
        .title("Most common paths")
        .description("Sessions that started in the time range, grouped by their path: the session's event types in "
                     "time order — its whole path, including events after the range (at most 50 steps, then …).")
        .height(10)
        .span(14)
        .datasource(CLICKHOUSE)
        .with_target(SQL("""
            SELECT path, count() AS sessions, countIf(status = 'failed') AS failed,
                   round(avg(duration_ms)) AS avg_duration_ms
            FROM flowtrack.flow_session_paths
            WHERE {started_in_range}
            GROUP BY path
            ORDER BY sessions DESC, path
            LIMIT 20
            """).ref_id("A"))
        .unit("short")
        .override_by_name("avg_duration_ms", unit("ms"))
    )


def where_flows_fail() -> table.Panel:
    """Error nodes, by the kind of node they hang under (the step that failed)."""
    return (
        table.Panel()
        .title("Where flows fail")
        .description("Nodes with an error event in the time range, by the node they hang under (its event type); "
                     "node names from the range's events.")
        .height(10)
        .span(10)
        .datasource(CLICKHOUSE)
        .with_target(SQL("""
            SELECT ifNull(nullIf(arrayFirst(p -> p.1 = n.2, nodes).3, ''), '(root)') AS failed_after,
                   n.3 AS error_type, count() AS failures, uniqExact(session_id) AS sessions
            FROM
            (
                SELECT session_id, groupArray((node_id, parent_id, name, failed)) AS nodes
                FROM
                (
                    SELECT session_id, node_id, argMinIf(parent_id, (ts, event_id), parent_id != '') AS parent_id,
                           toString(argMin(event_type, (ts, event_id))) AS name, max(is_error) AS failed
                    FROM {range_events}
                    WHERE session_id IN {error_sessions}
                    GROUP BY session_id, node_id
                )
                GROUP BY session_id
            )
            ARRAY JOIN arrayFilter(x -> x.4 = 1, nodes) AS n
            GROUP BY failed_after, error_type
            ORDER BY failures DESC, failed_after
            LIMIT 20
            """).ref_id("A"))
        .unit("short")
    )


def error_messages() -> table.Panel:
    """The range's error events (from the time-ordered copy) with their attributes looked up in events by key.

    Copies are collapsed on the identity (the last stored copy wins) before the error filter: an event whose later
    copy is no longer an error is not one (filtering first let the older error copy win). Only copies in the range
    are read: the time filter prunes the table to the range's weeks (a key lookup otherwise costs a granule in
    every part, and attributes are the widest column); an event re-sent at another time counts, as in
    events_by_time, at its copies in the range."""
    return (
        table.Panel()
        .title("Error messages")
        .description("Error events of the time range by type, message and code (their 'message' and 'code' "
                     "attributes).")
        .height(8)
        .span(24)
        .datasource(CLICKHOUSE)
        .with_target(SQL("""
            SELECT toString(event_type) AS event_type, attributes['message'] AS message, attributes['code'] AS code,
                   count() AS events, uniqExact(session_id) AS sessions, max(ts) AS last_seen
            FROM
            (
                SELECT session_id, event_id, argMax(ts, stored) AS ts, argMax(event_type, stored) AS event_type,
                       argMax(attributes, stored) AS attributes, argMax(user_id, stored) AS user_id,
                       argMax(is_error, stored) AS is_error
                FROM
                (
                    SELECT *, ingested_at AS stored
                    FROM flowtrack.events
                    WHERE $__timeFilter(ts)
                      AND (session_id, event_id) IN (SELECT session_id, event_id FROM flowtrack.events_by_time
                                                     WHERE $__timeFilter(ts) AND is_error = 1 AND {user_filter})
                )
                GROUP BY session_id, event_id
            )
            WHERE is_error = 1 AND $__timeFilter(ts) AND {user_filter}
            GROUP BY event_type, message, code
            ORDER BY events DESC, event_type, message
            LIMIT 50
            """).ref_id("A"))
        .unit("short")
    )
