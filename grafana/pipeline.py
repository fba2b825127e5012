"""Pipeline: the worker's health from its Prometheus metrics, and rejected entries from ClickHouse."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import stat, table, timeseries
from grafana_foundation_sdk.models import common

from grafana.common import (
    CLICKHOUSE,
    PIPELINE_UID,
    PROMETHEUS,
    SQL,
    TAGS,
    Format,
    dashboard_links,
    legend_table,
    promql,
    unit,
)

RATE = "$__rate_interval"


def dashboard() -> dash.Dashboard:
    return (
        dash.Dashboard("Flows — pipeline")
        .uid(PIPELINE_UID)
        .tags(TAGS)
        .links(dashboard_links(PIPELINE_UID))
        .description("The flowtrack worker: throughput, batches, insert latency, consumer-group lag and pending, "
                     "reclaimed entries, health; rejected entries by reason.")
        .time("now-1h", "now")
        .refresh("10s")
        .with_panel(worker_health())
        .with_panel(throughput())
        .with_panel(batch_size())
        .with_panel(insert_latency())
        .with_panel(group_lag_and_pending())
        .with_panel(reclaimed_and_lost())
        .with_panel(rejected_by_reason())
        .with_panel(latest_rejected())
    )


def worker_health() -> stat.Panel:
    return (
        stat.Panel()
        .title("Workers healthy / sink failing for")
        .height(6)
        .span(6)
        .datasource(PROMETHEUS)
        .graph_mode(common.BigValueGraphMode.NONE)
        .with_target(promql("sum(flowtrack_healthy)", "healthy workers").ref_id("A"))
        .with_target(promql("count(up{job=\"flowtrack-worker\"} == 1)", "workers up").ref_id("B"))
        .with_target(promql("max(flowtrack_sink_failing_seconds)", "sink failing (s)").ref_id("C"))
        .unit("short")
        .override_by_name("sink failing (s)", unit("s"))
    )


def throughput() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title("Entries read / stored / rejected per second")
        .height(6)
        .span(18)
        .datasource(PROMETHEUS)
        .unit("ops")
        .legend(legend_table())
        .with_target(promql(f"sum(rate(flowtrack_events_read_total[{RATE}]))", "read").ref_id("A"))
        .with_target(promql(f"sum(rate(flowtrack_events_stored_total[{RATE}]))", "stored").ref_id("B"))
        .with_target(promql(f"sum(rate(flowtrack_events_rejected_total[{RATE}]))", "rejected").ref_id("C"))
        .with_target(promql(f"sum(rate(flowtrack_events_acked_total[{RATE}]))", "acknowledged").ref_id("D"))
    )


def batch_size() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title("Batch size (rows)")
        .unit("short")
        .height(8)
        .span(12)
        .datasource(PROMETHEUS)
        .legend(legend_table())
        .with_target(promql(
            f"sum(rate(flowtrack_batch_size_rows_sum[{RATE}])) / sum(rate(flowtrack_batch_size_rows_count[{RATE}]))",
            "mean").ref_id("A"))
        .with_target(promql(
            f"histogram_quantile(0.99, sum by (le) (rate(flowtrack_batch_size_rows_bucket[{RATE}])))",
            "p99").ref_id("B"))
    )


def insert_latency() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title("Insert latency")
        .height(8)
        .span(12)
        .datasource(PROMETHEUS)
        .unit("s")
        .legend(legend_table())
        .with_target(promql(
            f"histogram_quantile(0.5, sum by (le) (rate(flowtrack_insert_duration_seconds_bucket[{RATE}])))",
            "p50").ref_id("A"))
        .with_target(promql(
            f"histogram_quantile(0.99, sum by (le) (rate(flowtrack_insert_duration_seconds_bucket[{RATE}])))",
            "p99").ref_id("B"))
    )


def group_lag_and_pending() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title("Consumer group: lag (undelivered) and pending (unacknowledged)")
        .unit("short")
        .height(8)
        .span(12)
        .datasource(PROMETHEUS)
        .legend(legend_table())
        .with_target(promql("sum(max by (stream) (flowtrack_consumer_group_lag))", "lag").ref_id("A"))
        .with_target(promql("sum(max by (stream) (flowtrack_consumer_group_pending))", "pending").ref_id("B"))
        .with_target(promql("topk(5, max by (stream) (flowtrack_consumer_group_pending))",
                            "pending {{stream}}").ref_id("C"))
    )


def reclaimed_and_lost() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title("Reclaimed, deleted-while-pending, narrowed and poison entries")
        .unit("short")
        .height(8)
        .span(12)
        .datasource(PROMETHEUS)
        .legend(legend_table())
        .with_target(promql(f"sum(increase(flowtrack_entries_reclaimed_total[{RATE}]))", "reclaimed").ref_id("A"))
        .with_target(promql(f"sum(increase(flowtrack_entries_deleted_while_pending_total[{RATE}]))",
                            "deleted while pending").ref_id("B"))
        .with_target(promql(f"sum(increase(flowtrack_entries_poison_total[{RATE}]))", "poison").ref_id("C"))
        .with_target(promql(f"sum(increase(flowtrack_sink_failures_total[{RATE}]))", "insert failures").ref_id("D"))
        .with_target(promql(f"sum(increase(flowtrack_entries_narrowed_total[{RATE}]))",
                            "narrowed (crash loop)").ref_id("E"))
    )


def rejected_by_reason() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title("Rejected entries by reason")
        .unit("short")
        .height(8)
        .span(12)
        .datasource(CLICKHOUSE)
        .legend(legend_table())
        .draw_style(common.GraphDrawStyle.BARS)
        .with_target(SQL("""
            SELECT time, reason_class, rejected FROM
            (
                SELECT $__timeInterval(received_at) AS time,
                       substring(splitByChar(':', reason)[1], 1, 80) AS reason_class,
                       count() AS rejected
                FROM flowtrack.rejected_events
                WHERE $__timeFilter(received_at) AND received_at < {open_bucket}
                GROUP BY time, reason_class
                ORDER BY reason_class, time {fill_buckets}
            )
            ORDER BY time, reason_class
            """, Format.TIME_SERIES).ref_id("A"))
    )


def latest_rejected() -> table.Panel:
    return (
        table.Panel()
        .title("Latest rejected entries")
        .unit("short")
        .height(8)
        .span(12)
        .datasource(CLICKHOUSE)
        .with_target(SQL("""
            SELECT received_at, source_stream, source_id, reason, raw
            FROM flowtrack.rejected_events
            WHERE $__timeFilter(received_at)
            ORDER BY received_at DESC
            LIMIT 100
            """).ref_id("A"))
    )
