"""Grafana: every dashboard panel query, query variable and alert-rule query runs against ClickHouse.

No Grafana server runs here, so the test does what Grafana and the ClickHouse plugin would do: put in
the dashboard variables (``${user_id:sqlstring}`` …), expand the plugin's macros (``$__timeFilter`` …,
exactly as plugin 4.20 renders them), and run the SQL on the embedded ClickHouse after the real
pipeline stored a realistic corpus. Plus: the committed JSON is not stale, and the provisioning
files hang together.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client import generate_latest

from grafana import build, common
from tests.conftest import ROOT, make_settings, xadd_all
from worker.grafana_sql import MacroError, QueryContext, render_sql  # the expander, shared with the benchmark
from worker.metrics import MetricsServer
from worker.pipeline import Pipeline
from worker.producer import ProduceConfig, produce
from worker.redisserver import RedisServer
from worker.source import connect
from worker.stats import GroupInfo, Stats
from worker.store import Store

DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
PROVISIONING = ROOT / "grafana" / "provisioning"
ALERTS = PROVISIONING / "alerting" / "flowtrack.yaml"


# -- what the dashboards and alert files contain ---------------------------------------------------
@dataclass
class Query:
    where: str  # dashboard/panel/refId, for messages
    sql: str
    fmt: int  # 0 time series, 1 table, 3 traces
    panel_type: str
    ref_id: str


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # inside rows


def clickhouse_queries(name: str, dashboard: dict[str, Any]) -> list[Query]:
    found = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("datasource", {}).get("type") == common.CLICKHOUSE_TYPE:
                found.append(Query(f"{name} / {panel['title']} / {target['refId']}", target["rawSql"],
                                   int(target["format"]), panel["type"], target["refId"]))
    return found


def prometheus_exprs() -> list[tuple[str, str]]:
    exprs = []
    for name, dashboard in dashboards().items():
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                if target.get("datasource", {}).get("type") == common.PROMETHEUS_TYPE:
                    exprs.append((f"{name} / {panel['title']}", target["expr"]))
    for rule in alert_rules():
        for item in rule["data"]:
            if item["datasourceUid"] == common.PROMETHEUS_UID:
                exprs.append((f"alert {rule['uid']}", item["model"]["expr"]))
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var["type"] == "query":
            assert var["datasource"]["uid"] == common.CLICKHOUSE_UID
            query = var["query"]
            out.append((var["name"], query if isinstance(query, str) else query["rawSql"]))
    return out


# -- a corpus written by the real pipeline ---------------------------------------------------------
@dataclass
class Corpus:
    store: Store
    ctx: QueryContext
    user_id: str
    failed_session: str
    events: int


BAD_ENTRIES = [
    ("flow_events:3", {"node_id": "n1", "event_type": "llm_call"}),  # no session_id
    ("flow_events:3", {"session_id": "s-bad", "node_id": "n1"}),  # no event_type
    ("flow_events", {"session_id": "s-x", "node_id": "n1", "event_type": "tool_call"}),  # no user anywhere
    ("flow_events:4", {"data": "{not json"}),
]


@pytest.fixture
def corpus(redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> Corpus:
    settings = make_settings(redis_server.url, clickhouse_url)
    config = ProduceConfig(users=6, shape="mixed", error_ratio=0.25, open_ratio=0.15, seed=20260424)

    async def fill() -> int:
        producer = connect(settings)
        try:
            sent = await produce(producer, config, count=1500)
        finally:
            await producer.aclose()
        xadd_all(redis_client, BAD_ENTRIES)
        pipeline = Pipeline(settings, store=store)
        try:
            assert await pipeline.run(drain=True)
        finally:
            await pipeline.close()
        assert pipeline.stats.stored == sent and pipeline.stats.rejected == len(BAD_ENTRIES)
        return sent

    sent = asyncio.run(fill())
    now = int(time.time())
    # The producer stamps events up to a few seconds ahead: a range around now holds them all.
    ctx = QueryContext(from_s=now - 3600, to_s=now + 600, interval_s=10)
    _, rows = store.query("SELECT user_id, session_id FROM flowtrack.flow_sessions WHERE status = 'failed' "
                          "ORDER BY event_count DESC, session_id LIMIT 1")
    assert rows, "the corpus should hold failed sessions"
    user_id, failed_session = str(rows[0][0]), str(rows[0][1])
    return Corpus(store, ctx, user_id, failed_session, sent)


def _run(corpus: Corpus, sql: str, variables: dict[str, str],
         ctx: QueryContext | None = None) -> tuple[list[str], list[Any]]:
    base = ctx or corpus.ctx
    rendered = render_sql(sql, QueryContext(base.from_s, base.to_s, base.interval_s, variables))
    try:
        columns, rows = corpus.store.query(rendered)
    except Exception as exc:
        raise AssertionError(f"query failed: {exc}\n--- rendered SQL ---\n{rendered}") from exc
    return columns, list(rows)


# -- the tests -------------------------------------------------------------------------------------
def test_every_dashboard_query_runs_on_pipeline_data(corpus: Corpus) -> None:
    results: dict[str, tuple[list[str], list[Any]]] = {}
    failures: list[str] = []
    ran = 0
    for name, dashboard in dashboards().items():
        defined = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
        for user in ("", corpus.user_id):
            variables = {"user_id": user, "session_id": corpus.failed_session}
            variables = {k: v for k, v in variables.items() if k in defined}
            for query in clickhouse_queries(name, dashboard):
                try:
                    results[f"{query.where} [user={user or 'all'}]"] = _run(corpus, query.sql, variables)
                    ran += 1
                except (AssertionError, KeyError) as exc:
                    failures.append(f"{query.where}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert ran >= 30

    def rows(key: str, user: str = "all") -> list[Any]:
        return results[f"{key} [user={user}]"][1]

    def columns(key: str) -> list[str]:
        return results[f"{key} [user=all]"][0]

    # Key panels return data, with the shapes their visualizations need.
    assert rows("flows-live.json / Events per second by type / A")
    assert columns("flows-live.json / Events per second by type / A")[0] == "time"
    latest = rows("flows-live.json / Latest events / A")
    assert len(latest) == 200
    assert all(r[1] == corpus.user_id for r in rows("flows-live.json / Latest events / A", corpus.user_id))
    assert rows("flows-live.json / Event → stored lag (p50 / p99) / A")
    assert rows("flows-live.json / Active sessions / A")[0][0] >= 1
    assert rows("flows-live.json / Latest flow (of the chosen user) / nodes", corpus.user_id)

    sessions = rows("flows-history.json / Sessions / A")
    assert {r[-1] for r in sessions} == {"completed", "failed", "active"}
    assert rows("flows-history.json / Completed / failed / active sessions (by start time) / A")
    bands = rows("flows-history.json / Duration of finished sessions / A")
    assert [b[0] for b in bands] == ["< 1 s", "1-5 s", "5-15 s", "15-60 s", "1-5 min", "5-15 min", "15-60 min",
                                     "≥ 1 h"]
    finished = corpus.store.scalar(render_sql(
        "SELECT count() FROM flowtrack.flow_sessions WHERE $__timeFilter(started_at) AND status != 'active'",
        QueryContext(corpus.ctx.from_s, corpus.ctx.to_s, corpus.ctx.interval_s, {})))
    assert sum(b[1] for b in bands) == finished > 0  # every finished session, none left out
    paths = rows("flows-history.json / Most common paths / A")
    assert paths and all(str(p[0]).startswith("user_message") for p in paths)
    assert sum(p[1] for p in paths) > 0
    fails = rows("flows-history.json / Where flows fail / A")
    assert fails and {f[1] for f in fails} == {"error"}
    assert rows("flows-history.json / Error messages / A")[0][1] == "upstream timeout"

    summary = rows("flow.json / Session / A")
    assert len(summary) == 1 and summary[0][2] == "failed"
    trace_columns = columns("flow.json / Flow as a trace (node timings) / A")
    assert {"traceID", "spanID", "parentSpanID", "serviceName", "operationName", "startTime", "duration",
            "tags", "serviceTags", "statusCode"} <= set(trace_columns)
    spans = rows("flow.json / Flow as a trace (node timings) / A")
    span = dict(zip(trace_columns, spans[0], strict=True))
    assert span["traceID"] == corpus.failed_session and span["parentSpanID"] == ""
    assert any(dict(zip(trace_columns, s, strict=True))["statusCode"] == 2 for s in spans)
    assert all(isinstance(tag, dict) and set(tag) == {"key", "value"} for s in spans
               for tag in dict(zip(trace_columns, s, strict=True))["tags"])
    nodes = rows("flow.json / Flow as a graph / nodes")
    edges = rows("flow.json / Flow as a graph / edges")
    node_ids = {n[0] for n in nodes}
    assert len(nodes) == len(spans) and edges
    assert all(e[1] in node_ids and e[2] in node_ids for e in edges)
    assert columns("flow.json / Flow as a graph / edges")[:3] == ["id", "source", "target"]
    events = rows("flow.json / Events in order / A")
    assert [e[0] for e in events] == sorted(e[0] for e in events) and events[0][1] == 0

    reasons = rows("pipeline.json / Rejected entries by reason / A")
    assert sum(r[2] for r in reasons) == len(BAD_ENTRIES)
    assert len(rows("pipeline.json / Latest rejected entries / A")) == len(BAD_ENTRIES)


HOSTILE_VALUES = [
    "x\\' = '' OR 1) UNION ALL SELECT now64(3), name, engine, '', '', '', 0 FROM system.tables --",  # backslash-quote
    "abc\\",  # a trailing backslash ended the literal's closing quote
    "DOMAIN\\alice",  # \a read as a bell
    "o'brien", "it''s", "%27 OR 1=1 --", "\u00e9t\u00e9 \U0001f600", "a\nb", "{a,b}",
]


def test_variables_a_viewer_types_are_values_never_sql(corpus: Corpus) -> None:
    """Every ClickHouse query of every dashboard, with user and session variables holding quotes, backslashes and an
    injection: each runs, and finds nothing, as for a user that does not exist (no row of system tables, no other
    user's rows)."""
    for value in HOSTILE_VALUES:
        for name, dashboard in dashboards().items():
            defined = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
            variables = {k: value for k in ("user_id", "session_id") if k in defined}
            if not variables:
                continue
            for query in clickhouse_queries(name, dashboard):
                if query.where.endswith("/ session_id"):  # the variable's own options: every session of a user
                    continue
                _, rows = _run(corpus, query.sql, variables)
                names = " ".join(str(cell) for row in rows for cell in row)
                assert "MergeTree" not in names and "system" not in names, (query.where, value, rows[:3])
                if "Latest events" in query.where or "Sessions / A" in query.where:
                    assert rows == [], (query.where, value, rows[:3])


def test_query_variables_return_values(corpus: Corpus) -> None:
    seen = 0
    for name, dashboard in dashboards().items():
        for var_name, sql in variable_queries(dashboard):
            for user in ("", corpus.user_id):
                columns, rows = _run(corpus, sql, {"user_id": user})
                assert rows, f"{name}: variable {var_name} has no values"
                assert len(columns) == 1
                seen += 1
            if var_name == "session_id":
                _, rows = _run(corpus, sql, {"user_id": corpus.user_id})
                assert corpus.failed_session in {r[0] for r in rows}
    assert seen >= 2


def test_alert_rule_queries_return_one_number(corpus: Corpus) -> None:
    rules = alert_rules()
    values: dict[str, float] = {}
    for rule in rules:
        for item in rule["data"]:
            if item["datasourceUid"] != common.CLICKHOUSE_UID:
                continue
            span = item["relativeTimeRange"]
            now = int(time.time())
            ctx = QueryContext(now - int(span["from"]), now - int(span["to"]) + 60)
            columns, rows = _run(corpus, item["model"]["rawSql"], {}, ctx)
            assert len(rows) == 1 and len(columns) == 1, f"{rule['uid']}: one row with one number, got {rows}"
            value = rows[0][0]
            assert isinstance(value, int | float) and math.isfinite(value), (rule["uid"], value)
            values[rule["uid"]] = float(value)
    assert len(values) >= 4
    # What the rules would decide on this corpus:
    assert values["flowtrack-rejected-events"] == len(BAD_ENTRIES)  # fires: rejects appeared
    assert values["flowtrack-no-events"] == corpus.events  # quiet: events are arriving
    assert 0 < values["flowtrack-failed-flow-ratio"] < 1
    assert values["flowtrack-stored-lag"] >= 0


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    assert len(rules) >= 5
    titles = " ".join(r["title"].lower() for r in rules)
    for topic in ("failed-flow ratio", "lag", "rejected", "no events", "pending"):
        assert topic in titles, topic
    for rule in rules:
        refs = {item["refId"] for item in rule["data"]}
        assert rule["condition"] in refs
        for item in rule["data"]:
            assert item["model"]["refId"] == item["refId"]
            if item["datasourceUid"] == "__expr__":
                assert item["model"]["expression"] in refs
            else:
                assert item["datasourceUid"] in (common.CLICKHOUSE_UID, common.PROMETHEUS_UID)
                assert "relativeTimeRange" in item
        assert rule["uid"].startswith("flowtrack-") and rule["for"] and rule["labels"]["severity"]
    doc = yaml.safe_load(ALERTS.read_text())
    receiver = doc["contactPoints"][0]["receivers"][0]
    assert receiver["type"] == "webhook" and receiver["settings"]["url"] == "${FLOWTRACK_ALERT_WEBHOOK_URL}"
    assert doc["policies"][0]["receiver"] == doc["contactPoints"][0]["name"]


def test_prometheus_queries_use_metrics_the_worker_exposes() -> None:
    stats = Stats()
    stats.groups = {"flow_events": GroupInfo(lag=1, pending=2, consumers=1)}
    exposition = generate_latest(MetricsServer(stats, make_settings("redis://x", "chdb:///x")).registry).decode()
    exposed = set(re.findall(r"^(flowtrack_[a-z_]+)", exposition, re.M))
    exposed |= set(re.findall(r"^# TYPE (flowtrack_[a-z_]+)", exposition, re.M))
    exprs = prometheus_exprs()
    assert len(exprs) >= 10
    for where, expr in exprs:
        for metric in re.findall(r"\bflowtrack_[a-z_]+", expr):
            assert metric in exposed, f"{where}: {metric} is not exposed by worker/metrics.py"
    jobs = re.findall(r'job="([^"]+)"', " ".join(e for _, e in exprs))
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert set(jobs) <= {c["job_name"] for c in scrape["scrape_configs"]}


def test_committed_dashboard_json_is_fresh() -> None:
    rendered = build.render_all()
    committed = {p.name: p.read_text() for p in DASHBOARD_DIR.glob("*.json")}
    assert set(rendered) == set(committed), "grafana/dashboards/ and grafana/build.py disagree on the files"
    for name, text in rendered.items():
        assert committed[name] == text, f"grafana/dashboards/{name} is stale: run `python -m grafana.build`"
    assert build.main(["--check"]) == 0


def test_dashboards_have_the_promised_views() -> None:
    boards = {d["uid"]: d for d in dashboards().values()}
    assert set(boards) == {common.LIVE_UID, common.HISTORY_UID, common.FLOW_UID, common.PIPELINE_UID}
    types = {p["type"] for d in boards.values() for p in panels(d)}
    assert {"table", "timeseries", "nodeGraph", "traces", "stat", "barchart"} <= types
    live = boards[common.LIVE_UID]
    assert live["refresh"] == "1s"
    user_var = next(v for v in live["templating"]["list"] if v["name"] == "user_id")
    assert user_var["type"] == "textbox" and user_var["query"] == ""
    flow_vars = {v["name"]: v for v in boards[common.FLOW_UID]["templating"]["list"]}
    assert flow_vars["session_id"]["type"] == "query"
    for board in boards.values():
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids))
        for panel in panels(board):
            for target in panel.get("targets", []):
                if target["datasource"]["type"] == common.CLICKHOUSE_TYPE:
                    assert target["editorType"] == "sql" and target["format"] in (0, 1, 2, 3)
            if panel["type"] == "traces":
                assert all(t["format"] == 3 for t in panel["targets"])
            if panel["type"] == "nodeGraph":
                assert sorted(t["refId"] for t in panel["targets"]) == ["edges", "nodes"]
    # The history's sessions table links each session to the flow view.
    links = json.dumps(boards[common.HISTORY_UID])
    assert f"/d/{common.FLOW_UID}/flow?var-session_id=${{__value.raw}}" in links


def test_provisioning_files_hang_together() -> None:
    sources = yaml.safe_load((PROVISIONING / "datasources" / "flowtrack.yaml").read_text())["datasources"]
    by_uid = {s["uid"]: s for s in sources}
    assert by_uid[common.CLICKHOUSE_UID]["type"] == common.CLICKHOUSE_TYPE
    assert by_uid[common.PROMETHEUS_UID]["type"] == common.PROMETHEUS_TYPE
    clickhouse = by_uid[common.CLICKHOUSE_UID]
    assert clickhouse["jsonData"]["username"] == "grafana"
    assert clickhouse["secureJsonData"]["password"] == "${CLICKHOUSE_GRAFANA_PASSWORD}"
    used = {t["datasource"]["uid"] for d in dashboards().values() for p in panels(d) for t in p.get("targets", [])}
    used |= {item["datasourceUid"] for r in alert_rules() for item in r["data"]} - {"__expr__"}
    assert used <= set(by_uid)
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "flowtrack.yaml").read_text())["providers"][0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_macro_expander_matches_the_plugin() -> None:
    """The expander itself: what plugin 4.20's macros.go renders, and unknown macros are refused."""
    ctx = QueryContext(1000, 2000, 5, {"user_id": "o'brien"})
    assert render_sql("$__timeFilter(ts)", ctx) == "ts >= toDateTime(1000) AND ts <= toDateTime(2000)"
    assert render_sql("$__timeInterval(toDateTime(ts))", ctx) == \
        "toStartOfInterval(toDateTime(toDateTime(ts)), INTERVAL 5 second)"
    assert render_sql("x = ${user_id:sqlstring} AND $__fromTime < $__toTime", ctx) == \
        "x = 'o''brien' AND toDateTime(1000) < toDateTime(2000)"
    # Grafana's encodeURIComponentStrict: only A-Z a-z 0-9 - _ . ~ stay as they are
    assert render_sql("${user_id:percentencode}", QueryContext(1000, 2000, 5, {"user_id": "o'b\\ (é)*!~"})) == \
        "o%27b%5C%20%28%C3%A9%29%2A%21~"
    with pytest.raises(MacroError):
        render_sql("$__nope(ts)", ctx)
    with pytest.raises(KeyError):
        render_sql("${session_id:sqlstring}", ctx)


def test_build_writes_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "OUT_DIR", tmp_path)
    assert build.main([]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(build.DASHBOARDS)
    assert build.main(["--check"]) == 0
    (tmp_path / "flow.json").write_text("{}")
    assert build.main(["--check"]) == 1


# -- edges of the time series and alerts (issue 9) ---------------------------------------------------
def _panel_sql(dashboard_file: str, title: str) -> str:
    for query in clickhouse_queries(dashboard_file, dashboards()[dashboard_file]):
        if query.where.startswith(f"{dashboard_file} / {title} /"):
            return query.sql
    raise KeyError(title)


@pytest.mark.parametrize(("dashboard_file", "title", "series_column"), [
    ("flows-live.json", "Events per second by type", 1),
    ("flows-history.json", "Completed / failed / active sessions (by start time)", 1),
    ("pipeline.json", "Rejected entries by reason", 1),
])
def test_time_series_leave_out_the_open_bucket_and_draw_empty_buckets_as_zero(
        corpus: Corpus, dashboard_file: str, title: str, series_column: int) -> None:
    step = 60
    now = int(time.time())
    # The range ends mid-bucket (the bucket holding 'to' is still filling) and starts an hour before the data.
    to_s = (now // step) * step + step // 2 + 600
    ctx = QueryContext(from_s=now - 3600, to_s=to_s, interval_s=step)
    columns, rows = _run(corpus, _panel_sql(dashboard_file, title), {"user_id": ""}, ctx)
    assert columns[0] == "time" and rows
    open_bucket = (to_s // step) * step
    first_bucket = ((now - 3600) // step) * step
    times = sorted({int(r[0].timestamp()) for r in rows})
    assert times[-1] < open_bucket, "the bucket still filling is not drawn"
    assert times == list(range(first_bucket, open_bucket, step)), "every bucket is there, empty ones too"
    series = {r[series_column] for r in rows}
    for name in series:
        per_bucket = [r for r in rows if r[series_column] == name]
        assert len(per_bucket) == len(times), f"{name}: one row per bucket"
    assert any(r[-1] == 0 for r in rows), "empty buckets are zero"
    assert [r[0] for r in rows] == sorted(r[0] for r in rows), "ordered by time, as the plugin needs"


def _alert_sql(uid: str) -> str:
    for rule in alert_rules():
        if rule["uid"] == uid:
            return str(rule["data"][0]["model"]["rawSql"])
    raise KeyError(uid)


def test_failed_flow_ratio_needs_twenty_finished_flows(corpus: Corpus) -> None:
    """A few failures alone in a quiet window are not an incident; from 20 finished flows on the ratio counts."""
    from worker.normalize import FlowEvent, Normalizer
    from worker.sink import Sink

    normalizer = Normalizer()
    sink = Sink(corpus.store)
    quiet_s = int(time.time()) - 3 * 86400  # a window the corpus does not touch

    def failed_flows(first: int, count: int) -> None:
        events = []
        for n in range(first, first + count):
            for i, kind in enumerate(("user_message", "error")):
                item = normalizer.normalize("flow_events:q", f"{n}-{i}", {
                    "session_id": f"s-quiet-{n}", "node_id": f"n{i}", "event_type": kind, "user_id": "q",
                    "timestamp": str((quiet_s + n) * 1000 + i)})
                assert isinstance(item, FlowEvent)
                events.append(item)
        sink.write(events, [])
        sink.rollup.flush()

    ctx = QueryContext(from_s=quiet_s - 60, to_s=quiet_s + 900)
    sql = _alert_sql("flowtrack-failed-flow-ratio")
    failed_flows(1, 5)
    assert _run(corpus, sql, {}, ctx)[1][0][0] == 0
    failed_flows(6, 15)
    assert _run(corpus, sql, {}, ctx)[1][0][0] == 1.0


def test_every_panel_has_a_unit() -> None:
    """Numbers mean nothing without units; the trace view and the node graph carry theirs in their own options."""
    missing = []
    for name, dashboard in dashboards().items():
        for panel in panels(dashboard):
            if panel.get("type") in ("traces", "row"):
                continue
            if panel.get("type") == "nodeGraph":
                unit_set = panel.get("options", {}).get("nodes", {}).get("mainStatUnit")
            else:
                unit_set = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
            if not unit_set:
                missing.append(f"{name} / {panel.get('title')}")
    assert not missing, missing


# -- Most common paths: one GROUP BY over the rollup's paths (migration 009) ----------------------------
def test_most_common_paths_groups_the_sessions_started_in_the_range_by_their_whole_path(store: Store) -> None:
    from worker.normalize import FlowEvent, Normalizer
    from worker.sink import Sink

    normalizer = Normalizer()
    from_s = int(time.time()) - 7200
    to_s = from_s + 3600
    entries = iter(range(1, 10_000))

    def flow(session: str, user: str, steps: list[tuple[str, int]]) -> list[FlowEvent]:
        """(event type, ms after the range's start) per step."""
        out = []
        for n, (kind, offset_ms) in enumerate(steps):
            item = normalizer.normalize("flow_events", f"{from_s * 1000}-{next(entries)}", {
                "session_id": session, "node_id": f"n{n}", "event_type": kind, "user_id": user,
                "timestamp": str(from_s * 1000 + offset_ms)})
            assert isinstance(item, FlowEvent)
            out.append(item)
        return out

    completed = [flow(f"s-ok-{k}", user, [("user_message", 1000), ("llm_call", 1500), ("flow_completed", 1000 + d)])
                 for k, (user, d) in enumerate((("u1", 1000), ("u1", 2000), ("u2", 3000)))]
    failed = flow("s-failed", "u2", [("user_message", 5000), ("llm_call", 5100), ("error", 5500)])
    # Starts a second before the range ends and goes on after it: its whole path counts.
    late = flow("s-late", "u2", [("user_message", 3_599_000), ("llm_call", 3_599_500), ("tool_call", 3_660_000),
                                 ("flow_completed", 3_661_000)])
    # Started before the range: not counted, though it has events inside.
    early = flow("s-early", "u1", [("user_message", -60_000), ("llm_call", 1000), ("flow_completed", 2000)])
    sink = Sink(store)
    sink.write([e for f in completed for e in f] + failed + late + early, [])
    sink.write(failed[1:] + completed[0][:1], [])  # redelivered copies in another batch
    sink.rollup.close()

    sql = _panel_sql("flows-history.json", "Most common paths")
    corpus = Corpus(store, QueryContext(from_s=from_s, to_s=to_s, interval_s=10), "", "", 0)
    columns, rows = _run(corpus, sql, {"user_id": ""})
    assert columns == ["path", "sessions", "failed", "avg_duration_ms"]
    assert [tuple(r) for r in rows] == [
        ("user_message → llm_call → flow_completed", 3, 0, 2000),
        ("user_message → llm_call → error", 1, 1, 500),
        ("user_message → llm_call → tool_call → flow_completed", 1, 0, 62000),
    ]
    _, rows = _run(corpus, sql, {"user_id": "u1"})
    assert [tuple(r) for r in rows] == [("user_message → llm_call → flow_completed", 2, 0, 1500)]


def test_an_error_a_later_copy_replaced_is_not_an_error_message(corpus: Corpus) -> None:
    """An event stored as an error, then re-sent (same event_id) as another type: flow_events shows the later copy,
    so "Error messages" and "Where flows fail" count no error for it (the error panel used to filter before
    collapsing, and the older error copy won)."""
    from worker.normalize import FlowEvent, Normalizer
    from worker.sink import Sink

    normalizer = Normalizer()
    sink = Sink(corpus.store)
    at_s = int(time.time()) - 5 * 86400  # a window the corpus does not touch
    base = {"session_id": "s-replaced", "node_id": "n1", "event_id": "e-replaced", "user_id": "u-replaced",
            "timestamp": str(at_s * 1000)}
    for n, (kind, message) in enumerate((("error", "boom"), ("tool_result", ""))):
        item = normalizer.normalize("flow_events:u-replaced", f"{at_s * 1000 + n}-0",
                                    {**base, "event_type": kind, "message": message})
        assert isinstance(item, FlowEvent)
        sink.write([item], [])  # two inserts: the second copy is the later one
    sink.rollup.flush()
    ctx = QueryContext(from_s=at_s - 60, to_s=at_s + 60)
    history = dashboards()["flows-history.json"]
    queries = {q.where: q.sql for q in clickhouse_queries("flows-history.json", history)}
    for title in ("Error messages", "Where flows fail"):
        sql = next(sql for where, sql in queries.items() if f"/ {title} /" in where)
        assert _run(corpus, sql, {"user_id": "u-replaced"}, ctx)[1] == [], title
    shown = corpus.store.query("SELECT event_type FROM flowtrack.flow_events WHERE session_id = 's-replaced'")[1]
    assert [str(r[0]) for r in shown] == ["tool_result"]


def test_a_node_is_named_and_placed_by_its_first_event_in_every_view(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    """A node's name is its first event's type and its parent the first parent one of its events names, ties in time
    broken by event_id (as the session's path). argMin(event_type, ts) and anyIf(parent_id, …) left both to chance:
    two events of one node in the same millisecond, or a parent named again differently later, gave flow_nodes,
    `flowtrack show` and the Flow dashboard different trees (found by review)."""
    from worker.flows import load_flow

    session, ts_ms = "s-first-event", 1_764_000_000_000
    entries: list[tuple[str, dict[str, Any]]] = [("flow_events:1", {
        "session_id": session, "node_id": "root", "event_type": "user_message", "event_id": "r",
        "timestamp": str(ts_ms)})]
    expected: dict[str, tuple[str, str]] = {"root": ("", "user_message")}
    for n in range(24):
        node, at = f"n{n:02}", str(ts_ms + 10 + n)
        # the same millisecond: the smaller event_id comes first; stored in the other order
        entries.append(("flow_events:1", {"session_id": session, "node_id": node, "event_type": "tool_result",
                                          "event_id": f"{node}-b", "timestamp": at, "parent_id": "root"}))
        entries.append(("flow_events:1", {"session_id": session, "node_id": node, "event_type": "tool_call",
                                          "event_id": f"{node}-a", "timestamp": at, "parent_id": "root"}))
        # later, an event of the node naming another parent (its event_id sorts first)
        entries.append(("flow_events:1", {"session_id": session, "node_id": node, "event_type": "tool_log",
                                          "event_id": f"{node}-0", "timestamp": str(ts_ms + 100 + n),
                                          "parent_id": "elsewhere"}))
        expected[node] = ("root", "tool_call")
    xadd_all(redis_client, entries)

    async def drain() -> None:
        pipeline = Pipeline(make_settings(redis_server.url, clickhouse_url), store=store)
        try:
            assert await pipeline.run(drain=True)
        finally:
            await pipeline.close()

    asyncio.run(drain())

    _, rows = store.query("SELECT node_id, parent_id, name FROM flowtrack.flow_nodes WHERE session_id = {s:String}",
                          {"s": session})
    assert {node: (parent, name) for node, parent, name in rows} == expected
    flow = load_flow(store, session)
    assert flow is not None and {node.node_id: (node.parent_id, node.name) for node in flow.nodes} == expected
    now = int(time.time())
    ctx = QueryContext(now - 3600, now + 600, 10, {"session_id": session})
    graph = {query.where: query.sql for query in clickhouse_queries("flow.json", dashboards()["flow.json"])}
    _, nodes = store.query(render_sql(graph["flow.json / Flow as a graph / nodes"], ctx))
    assert {node: name for node, name, *_ in nodes} == {node: name for node, (_, name) in expected.items()}
    _, edges = store.query(render_sql(graph["flow.json / Flow as a graph / edges"], ctx))
    assert {(source, target) for _, source, target, _ in edges} == {("root", node) for node in expected
                                                                    if node != "root"}
    _, spans = store.query(render_sql(graph["flow.json / Flow as a trace (node timings) / A"], ctx))
    assert {span: (parent, name) for _, span, parent, name, *_ in spans} == expected
