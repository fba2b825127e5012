"""Worker metrics: a real pipeline (real redis-server, embedded ClickHouse) scraped over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request
from typing import Any

import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_settings, xadd_all
from worker.metrics import MetricsServer, WorkerMetrics
from worker.pipeline import Pipeline, run_worker
from worker.redisserver import RedisServer, free_port
from worker.settings import Settings
from worker.stats import Stats
from worker.store import Store


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _entries(count: int, stream: str = "flow_events:7") -> list[tuple[str, dict[str, Any]]]:
    entries: list[tuple[str, dict[str, Any]]] = []
    for i in range(count):
        entries.append((stream, {"session_id": f"s-{i % 5}", "node_id": f"n-{i}", "event_type": "llm_call"}))
    entries.append((stream, {"node_id": "x", "event_type": "llm_call"}))  # no session_id: rejected
    return entries


def test_run_worker_serves_metrics_and_health(redis_server: RedisServer, redis_client: redis.Redis,
                                              store: Store, clickhouse_url: str) -> None:
    xadd_all(redis_client, _entries(40))
    port = free_port()
    settings = make_settings(redis_server.url, clickhouse_url, metrics_port=port)
    base = f"http://127.0.0.1:{port}"

    async def scenario() -> tuple[bool, dict[Any, float], int, dict[str, Any], dict[Any, float]]:
        worker = asyncio.create_task(run_worker(settings))
        # Wait until everything is stored and the group refresher has seen the stream.
        metrics: dict[Any, float] = {}
        for _ in range(200):
            await asyncio.sleep(0.1)
            try:
                _code, text = await asyncio.to_thread(_get, f"{base}/metrics")
            except OSError:
                continue
            metrics = _samples(text)
            if (metrics.get(("flowtrack_events_acked_total", ())) == 41
                    and (("flowtrack_consumer_group_pending", (("group", "flowtrack"), ("stream", "flow_events:7"))))
                    in metrics):
                break
        health_code, health_text = await asyncio.to_thread(_get, f"{base}/healthz")
        # Add more entries: the lag/pending gauges are refreshed from Redis while the worker runs.
        xadd_all(redis_client, _entries(10))
        for _ in range(100):
            await asyncio.sleep(0.1)
            later = _samples((await asyncio.to_thread(_get, f"{base}/metrics"))[1])
            if later.get(("flowtrack_events_acked_total", ())) == 52:
                break
        os.kill(os.getpid(), signal.SIGTERM)  # the worker's own handler: finish and exit
        ok = await asyncio.wait_for(worker, timeout=30)
        return ok, metrics, health_code, json.loads(health_text), later

    ok, metrics, health_code, health, later = asyncio.run(scenario())
    assert ok
    assert metrics[("flowtrack_events_read_total", ())] == 41
    assert metrics[("flowtrack_events_stored_total", ())] == 40
    assert metrics[("flowtrack_events_rejected_total", ())] == 1
    assert sum(v for (name, _), v in metrics.items() if name == "flowtrack_rejected_by_reason_total") == 1
    assert metrics[("flowtrack_batches_total", ())] >= 1
    assert metrics[("flowtrack_batch_size_rows_count", ())] == metrics[("flowtrack_batches_total", ())]
    assert metrics[("flowtrack_batch_size_rows_sum", ())] == 41
    assert metrics[("flowtrack_insert_duration_seconds_count", ())] >= 1
    assert metrics[("flowtrack_insert_duration_seconds_bucket", (("le", "+Inf"),))] >= 1
    key = (("group", "flowtrack"), ("stream", "flow_events:7"))
    assert metrics[("flowtrack_consumer_group_consumers", key)] == 1
    assert metrics[("flowtrack_healthy", ())] == 1
    assert health_code == 200 and health["status"] == "ok"
    assert later[("flowtrack_events_acked_total", ())] == 52
    # After the second round everything is acknowledged; the refresher reads lag/pending from Redis.
    assert later[("flowtrack_consumer_group_lag", key)] >= 0
    assert later[("flowtrack_consumer_group_pending", key)] >= 0
    # The server is gone once the worker has stopped.
    try:
        _get(f"{base}/metrics")
        raise AssertionError("the metrics server still answers after the worker stopped")
    except OSError:
        pass


def test_group_gauges_follow_redis(redis_server: RedisServer, redis_client: redis.Redis,
                                   store: Store, clickhouse_url: str) -> None:
    """Lag and pending come from the group itself: unread entries show as lag, read-unacked as pending."""
    settings = make_settings(redis_server.url, clickhouse_url, metrics_port=free_port())

    async def scenario() -> tuple[dict[Any, float], dict[Any, float]]:
        pipeline = Pipeline(settings, store=store)
        await pipeline.source.discover(force=True)
        xadd_all(redis_client, _entries(9, stream="flow_events"))
        metrics = WorkerMetrics(pipeline.stats, pipeline.source, settings, refresh_s=0.05)
        metrics.server.start()
        try:
            from worker.metrics import read_group_info

            pipeline.stats.groups = await read_group_info(pipeline.source)
            pipeline.stats.groups_refreshed_at = 0.0
            before = _samples((await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics.server.port}/metrics"))[1])
            got = await pipeline.source.read(4, None)  # first read: own pending entries (none)
            got += await pipeline.source.read(4, None)  # then new ones: delivered, not acknowledged
            assert sum(len(items) for _, items in got) == 4
            pipeline.stats.groups = await read_group_info(pipeline.source)
            after = _samples((await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics.server.port}/metrics"))[1])
        finally:
            await metrics.stop()
            await pipeline.close()
        return before, after

    before, after = asyncio.run(scenario())
    key = (("group", "flowtrack"), ("stream", "flow_events"))
    assert before[("flowtrack_consumer_group_lag", key)] == 10
    assert before[("flowtrack_consumer_group_pending", key)] == 0
    assert after[("flowtrack_consumer_group_lag", key)] == 6
    assert after[("flowtrack_consumer_group_pending", key)] == 4


def test_health_turns_bad_when_the_sink_or_redis_fails_too_long() -> None:
    stats = Stats()
    settings = Settings(unhealthy_after_s=0.2, metrics_port=free_port())
    server = MetricsServer(stats, settings, host="127.0.0.1").start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        assert _get(f"{url}/healthz")[0] == 200
        stats.record_sink_failure("Code: 210. connection refused")
        assert _get(f"{url}/healthz")[0] == 200  # a short outage is waited out, still healthy
        import time

        time.sleep(0.3)
        code, body = _get(f"{url}/healthz")
        assert code == 503
        report = json.loads(body)
        assert report["status"] == "unhealthy" and "connection refused" in report["last_sink_error"]
        metrics = _samples(_get(f"{url}/metrics")[1])
        assert metrics[("flowtrack_healthy", ())] == 0
        assert metrics[("flowtrack_sink_failing_seconds", ())] >= 0.2
        assert metrics[("flowtrack_sink_failures_total", ())] == 1
        stats.record_sink_ok(0.01)
        assert _get(f"{url}/healthz")[0] == 200
        # Redis unreachable as long: no progress either (it reported healthy all along)
        stats.record_source_failure("Redis unreachable: connection refused")
        assert _get(f"{url}/healthz")[0] == 200
        time.sleep(0.3)
        code, body = _get(f"{url}/healthz")
        assert code == 503 and "connection refused" in json.loads(body)["last_source_error"]
        stats.record_source_ok()
        assert _get(f"{url}/healthz")[0] == 200
        assert _get(f"{url}/nope")[0] == 404
    finally:
        server.stop()


def test_metrics_off_by_default(redis_server: RedisServer) -> None:
    settings = Settings(redis_url=redis_server.url)
    assert settings.metrics_port == 0

    async def scenario() -> object:
        pipeline = Pipeline(settings, store=None)
        try:
            return WorkerMetrics.start(pipeline.stats, pipeline.source, settings)
        finally:
            await pipeline.close()

    assert asyncio.run(scenario()) is None


def test_group_gauges_need_nothing_beyond_the_worker_acl(redis_server: RedisServer, redis_client: redis.Redis,
                                                         clickhouse_url: str) -> None:
    """The refresher runs on the worker's own connection: it must live within WORKER_ACL_RULES."""
    from worker.metrics import read_group_info
    from worker.source import WORKER_ACL_RULES

    redis_client.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", "worker", "on", ">worker-secret", *WORKER_ACL_RULES.split())
    xadd_all(redis_client, _entries(3, stream="flow_events:9"))
    url = f"redis://worker:worker-secret@127.0.0.1:{redis_server.port}/0"
    settings = make_settings(url, clickhouse_url)

    async def scenario() -> dict[str, Any]:
        pipeline = Pipeline(settings)
        try:
            await pipeline.source.discover(force=True)
            return dict(await read_group_info(pipeline.source))
        finally:
            await pipeline.close()

    groups = asyncio.run(scenario())
    assert groups["flow_events:9"].lag == 4
    assert groups["flow_events:9"].pending == 0


def _words(count: int) -> list[str]:
    return ["".join(chr(97 + (n // 26 ** k) % 26) for k in range(3)) for n in range(count)]


def test_rejection_classes_stay_few_whatever_values_the_entries_hold() -> None:
    """Reasons quote the entry's own values (a timestamp's text, an attribute's name): each distinct bad value must not
    become a class of its own (kept for the worker's life, one Prometheus series each)."""
    from worker.batch import Batch
    from worker.normalize import Normalizer, Rejection
    from worker.sink import WriteResult
    from worker.stats import MAX_REASON_CLASSES, OTHER_REASONS, Stats

    normalizer = Normalizer()
    words = _words(300)
    rejected = [normalizer.normalize("flow_events:1", f"1-{n}", fields) for n, fields in enumerate(
        [{"session_id": "s", "node_id": "n", "event_type": "t", "timestamp": f"when {w} 'x\"{w}"} for w in words]
        + [{"data": f'{{"session_id": "s", "node_id": "n", "event_type": "t", "timestamp": "{w}:{w}"}}'}
           for w in words]
        + [{"data": f'{{"session_id": "s", "node_id": "n", "event_type": "t", "timestamp": {10 ** 14},'
                    f' "user_id": "{w}"}}'} for w in words])]
    assert all(isinstance(r, Rejection) for r in rejected)
    stats = Stats()
    result = WriteResult()
    result.rejected = rejected  # type: ignore[assignment]
    stats.record_write(result, Batch(max_rows=1, max_wait_s=1.0))
    assert sum(stats.rejected_by_reason.values()) == 900
    assert len(stats.rejected_by_reason) <= 3, stats.rejected_by_reason

    # Whatever a future reason says, the classes are capped; what is over the cap is still counted.
    many = WriteResult()
    many.rejected = [Rejection("s", f"1-{n}", f"reason {word} kind", "{}")  # type: ignore[assignment]
                     for n, word in enumerate(_words(1000))]
    stats.record_write(many, Batch(max_rows=1, max_wait_s=1.0))
    assert len(stats.rejected_by_reason) <= MAX_REASON_CLASSES + 1  # and the one for the rest
    assert sum(stats.rejected_by_reason.values()) == 1900 and stats.rejected_by_reason[OTHER_REASONS] > 0
