"""Flows — live: what is happening right now, refreshed every second."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import nodegraph, stat, table, timeseries
from grafana_foundation_sdk.models import common

from grafana.common import (
    CLICKHOUSE,
    LIVE_UID,
    SQL,
    TAGS,
    Format,
    dashboard_links,
    legend_table,
    link_to_flow,
    open_flow_link,
    unit,
    user_variable,
)
from grafana.flow import node_graph


def dashboard() -> dash.Dashboard:
    return (
        dash.Dashboard("Flows — live")
        .uid(LIVE_UID)
        .tags(TAGS)
        .links(dashboard_links(LIVE_UID))
        .description("Flow events as they arrive: rate by type, the latest events with their ingest lag, "
                     "active sessions, event-to-stored lag, and the latest flow as a graph.")
        .time("now-5m", "now")
        .refresh("1s")
        .timepicker(dash.TimePicker().refresh_intervals(["1s", "2s", "5s", "10s", "30s", "1m"]))
        .with_variable(user_variable())
        .with_panel(events_per_second())
        .with_panel(active_sessions())
        .with_panel(stored_lag())
        .with_panel(latest_events())
        .with_panel(latest_flow())
    )


def events_per_second() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title("Events per second by type")
        .height(8)
        .span(12)
        .datasource(CLICKHOUSE)
        .unit("ops")
        .legend(legend_table())
        .stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
        .fill_opacity(30)
        .with_target(SQL("""
            SELECT time, event_type, events_per_s FROM
            (
                SELECT $__timeInterval(ts) AS time, toString(event_type) AS event_type,
                       count() / $__interval_s AS events_per_s
                FROM flowtrack.events_by_time FINAL
                WHERE $__timeFilter(ts) AND ts < {open_bucket} AND {user_filter}
                GROUP BY time, event_type
                ORDER BY event_type, time {fill_buckets}
            )
            ORDER BY time, event_type
            """, Format.TIME_SERIES).ref_id("A"))
    )


def active_sessions() -> stat.Panel:
    """Sessions with no end event yet that had activity in the time range."""
    return (
        stat.Panel()
        .title("Active sessions")
        .description("Sessions without an end or error event that had events in the time range.")
        .height(8)
        .span(4)
        .datasource(CLICKHOUSE)
        .graph_mode(common.BigValueGraphMode.NONE)
        .unit("short")
        .with_target(SQL("""
            SELECT count() AS active_sessions
            FROM flowtrack.flow_sessions
            WHERE status = 'active'
              AND (user_id, session_id) IN (SELECT user_id, session_id FROM flowtrack.events_by_time
                                            WHERE $__timeFilter(ts) AND {user_filter})
            """).ref_id("A"))
    )


def stored_lag() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title("Event → stored lag (p50 / p99)")
        .description("Milliseconds from an event's timestamp to its insert into ClickHouse, per stored copy "
                     "(a redelivered copy counts with its own, later, insert). Buckets without inserts are gaps: "
                     "a quantile of nothing is not zero.")
        .height(8)
        .span(8)
        .datasource(CLICKHOUSE)
        .unit("ms")
        .legend(legend_table())
        .with_target(SQL("""
            SELECT $__timeInterval(ingested_at) AS time,
                   quantile(0.5)({store_lag_ms}) AS p50,
                   quantile(0.99)({store_lag_ms}) AS p99
            FROM flowtrack.events_by_time
            WHERE $__timeFilter(ingested_at) AND ingested_at < {open_bucket} AND {user_filter}
            GROUP BY time
            ORDER BY time
            """, Format.TIME_SERIES).ref_id("A"))
    )


def latest_events() -> table.Panel:
    return (
        table.Panel()
        .title("Latest events")
        .height(12)
        .span(24)
        .datasource(CLICKHOUSE)
        .with_target(SQL("""
            SELECT ts AS time, user_id, session_id, node_id, parent_id, event_type,
                   {store_lag_ms} AS ingest_lag_ms
            FROM flowtrack.events_by_time FINAL
            WHERE $__timeFilter(ts) AND {user_filter}
            ORDER BY ts DESC
            LIMIT 200
            """).ref_id("A"))
        .unit("short")
        .override_by_name("session_id", link_to_flow())
        .override_by_name("ingest_lag_ms", unit("ms"))
    )


def latest_flow() -> nodegraph.Panel:
    """The most recently active session of the chosen user (of anyone when user_id is empty)."""
    return node_graph("{latest_session}", "Latest flow (of the chosen user)").links(open_flow_link())
