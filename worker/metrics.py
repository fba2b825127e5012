"""Metrics: ``/metrics`` (Prometheus text format) and ``/healthz`` for a running worker.

The HTTP server runs in a daemon thread and only *reads* the pipeline's ``Stats``; every value is
collected at scrape time, so nothing is counted twice. Consumer-group state (lag, pending and
consumers per stream) needs Redis, which lives on the worker's event loop: an asyncio
task refreshes it into ``Stats.groups`` every few seconds.

Health turns bad (HTTP 503) when the sink, or Redis, has been failing for longer than
``settings.unhealthy_after_s`` (a ClickHouse or Redis outage the worker is waiting out: it makes no progress).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from redis.exceptions import ResponseError

from worker.errors import ConfigError
from worker.settings import Settings
from worker.source import Source, text, vanished
from worker.stats import Buckets, GroupInfo, Stats

log = logging.getLogger(__name__)

PREFIX = "flowtrack"
GROUP_REFRESH_S = 5.0
LAG_COUNT_CAP = 10000  # Redis < 7 only: lag counted with XRANGE up to this many


class StatsCollector(Collector):
    """Turns a ``Stats`` into metric families at each scrape."""

    def __init__(self, stats: Stats, settings: Settings) -> None:
        self.stats = stats
        self.settings = settings

    def collect(self) -> Iterable[Metric]:
        s = self.stats
        counters = (
            ("events_read", "Stream entries read (new, re-read and reclaimed).", s.read),
            ("events_stored", "Events inserted into ClickHouse.", s.stored),
            ("events_rejected", "Entries stored in the rejected relation (contract violations, poison).", s.rejected),
            ("events_acked", "Entries acknowledged (XACK) after being stored.", s.acked),
            ("batches", "Batches written.", s.batches),
            ("entries_reclaimed", "Idle pending entries reclaimed from other consumers (XCLAIM).", s.claimed),
            ("entries_deleted_while_pending", "Pending entries deleted from their stream before being processed.",
             s.deleted_while_pending),
            ("entries_lost_with_stream", "Entries pending on other consumers when their stream was deleted (DEL, "
             "FLUSHDB): gone with it, Redis cannot give them back.", s.lost_with_stream),
            ("entries_narrowed", "Entries delivered past FLOWTRACK_MAX_DELIVERIES, in a narrowed group (a crash "
             "loop, or an entry that kills the worker).", s.narrowed),
            ("entries_poison", "Entries rejected for being delivered alone past every narrowing level.", s.poison),
            ("sink_failures", "Failed insert attempts (retried).", s.sink_failures),
            ("source_failures", "Failed Redis calls (retried).", s.source_failures),
        )
        for name, doc, value in counters:
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc)
            family.add_metric([], float(value))
            yield family
        by_reason = CounterMetricFamily(f"{PREFIX}_rejected_by_reason", "Rejected entries by reason class.",
                                        labels=["reason"])
        for reason, count in sorted(dict(s.rejected_by_reason).items()):
            by_reason.add_metric([reason], float(count))
        yield by_reason
        yield _histogram(f"{PREFIX}_batch_size_rows", "Entries per written batch.", s.batch_rows_hist)
        yield _histogram(f"{PREFIX}_insert_duration_seconds", "Seconds per successful insert.", s.insert_seconds_hist)

        failing_s = s.sink_failing_for_s()
        yield _gauge(f"{PREFIX}_sink_failing_seconds", "Seconds the sink has been failing (0 while healthy).",
                     failing_s)
        yield _gauge(f"{PREFIX}_healthy", "1 while /healthz is OK, 0 when the sink has failed for too long.",
                     1.0 if healthy(s, self.settings) else 0.0)
        yield _gauge(f"{PREFIX}_last_batch_rows", "Entries in the last written batch.", s.last_batch_rows)
        yield _gauge(f"{PREFIX}_uptime_seconds", "Seconds since the worker started.", s.uptime_s)

        groups = dict(s.groups)
        labels = ["stream", "group"]
        lag = GaugeMetricFamily(f"{PREFIX}_consumer_group_lag",
                                "Entries not yet delivered to the consumer group (-1: unknown).", labels=labels)
        pending = GaugeMetricFamily(f"{PREFIX}_consumer_group_pending",
                                    "Entries delivered to the group and not yet acknowledged.", labels=labels)
        consumers = GaugeMetricFamily(f"{PREFIX}_consumer_group_consumers", "Consumers in the group.",
                                      labels=labels)
        for stream, info in sorted(groups.items()):
            key = [stream, self.settings.group]
            lag.add_metric(key, float(info.lag))
            pending.add_metric(key, float(info.pending))
            consumers.add_metric(key, float(info.consumers))
        yield from (lag, pending, consumers)
        refreshed = s.groups_refreshed_at
        yield _gauge(f"{PREFIX}_consumer_group_info_age_seconds",
                     "Seconds since lag/pending were last read from Redis (-1: never).",
                     -1.0 if refreshed is None else time.monotonic() - refreshed)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], float(value))
    return family


def _histogram(name: str, doc: str, buckets: Buckets) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], [(le, float(n)) for le, n in buckets.cumulative()], sum_value=buckets.sum)
    return family


def healthy(stats: Stats, settings: Settings) -> bool:
    return max(stats.sink_failing_for_s(), stats.source_failing_for_s()) <= settings.unhealthy_after_s


def health_report(stats: Stats, settings: Settings) -> dict[str, Any]:
    failing_s = stats.sink_failing_for_s()
    source_failing_s = stats.source_failing_for_s()
    return {
        "status": "ok" if healthy(stats, settings) else "unhealthy",
        "sink_failing_s": round(failing_s, 3),
        "source_failing_s": round(source_failing_s, 3),
        "unhealthy_after_s": settings.unhealthy_after_s,
        "last_sink_error": stats.last_sink_error if failing_s > 0 else "",
        "last_source_error": stats.last_source_error if source_failing_s > 0 else "",
        "read": stats.read,
        "stored": stats.stored,
        "rejected": stats.rejected,
        "uptime_s": round(stats.uptime_s, 3),
    }


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP, in a daemon thread; ``start()`` then ``stop()``."""

    def __init__(self, stats: Stats, settings: Settings, host: str = "0.0.0.0", port: int | None = None) -> None:
        self.stats = stats
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(StatsCollector(stats, settings))
        self._host = host
        self._port = settings.metrics_port if port is None else port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0 = any free port)."""
        if self._server is None:
            return self._port
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(owner.registry))
                elif path in ("/healthz", "/health"):
                    report = health_report(owner.stats, owner.settings)
                    code = 200 if report["status"] == "ok" else 503
                    self._send(code, "application/json", json.dumps(report).encode())
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

            def _send(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics: " + format, *args)

        try:
            self._server = ThreadingHTTPServer((self._host, self._port), Handler)
        except OSError as exc:  # in use (another worker on this host), not allowed, no such address
            raise ConfigError(f"cannot serve metrics on {self._host}:{self._port} (FLOWTRACK_METRICS_PORT): "
                              f"{exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="flowtrack-metrics", daemon=True)
        self._thread.start()
        log.info("serving /metrics and /healthz on %s:%d", self._host, self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


async def read_group_info(source: Source) -> dict[str, GroupInfo]:
    """Lag, pending and consumers of the worker's group on every stream it consumes.

    Uses only XINFO GROUPS (and XRANGE on Redis < 7), both within the worker's ACL rules.
    """
    result: dict[str, GroupInfo] = {}
    redis = source.redis
    for stream in list(source.streams):
        info = GroupInfo()
        try:
            groups = await redis.xinfo_groups(stream)
        except ResponseError as exc:
            if not vanished(exc):
                raise
            continue  # deleted since the worker found it; the pipeline notices and recovers
        for group in groups:
            if text(group.get("name")) != source.group:
                continue
            lag = group.get("lag")
            info.lag = int(lag) if lag is not None else await _count_after(
                redis, stream, text(group.get("last-delivered-id") or "0-0"))
            info.pending = int(group.get("pending") or 0)
            info.consumers = int(group.get("consumers") or 0)
        result[stream] = info
    return result


async def _count_after(redis: Any, stream: str, last_id: str, cap: int = LAG_COUNT_CAP) -> int:
    """Entries after ``last_id`` (Redis < 7 reports no lag): exact up to ``cap``, else -1 (unknown)."""
    entries = await redis.xrange(stream, min=f"({last_id}", max="+", count=cap + 1)
    return len(entries) if len(entries) <= cap else -1


async def refresh_group_info(source: Source, stats: Stats, interval_s: float = GROUP_REFRESH_S) -> None:
    """Forever: read consumer-group state into ``stats.groups``; Redis errors are logged and retried."""
    while True:
        try:
            stats.groups = await read_group_info(source)
            stats.groups_refreshed_at = time.monotonic()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a Redis outage is the pipeline's business; keep the last values
            log.debug("cannot refresh consumer-group metrics: %s", exc)
        await asyncio.sleep(interval_s)


class WorkerMetrics:
    """What ``run_worker`` starts and stops: the HTTP server and the consumer-group refresher."""

    def __init__(self, stats: Stats, source: Source, settings: Settings,
                 refresh_s: float = GROUP_REFRESH_S) -> None:
        self.server = MetricsServer(stats, settings)
        self._source = source
        self._stats = stats
        self._refresh_s = refresh_s
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def start(cls, stats: Stats, source: Source, settings: Settings) -> WorkerMetrics | None:
        """Start serving when ``settings.metrics_port`` is set; None when metrics are off."""
        if not settings.metrics_port:
            return None
        metrics = cls(stats, source, settings)
        metrics.server.start()
        metrics._task = asyncio.create_task(refresh_group_info(source, stats, metrics._refresh_s),
                                            name="flowtrack-group-metrics")
        return metrics

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.server.stop()
