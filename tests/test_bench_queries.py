"""`flowtrack bench queries` on a small store: the loader's data has the promised shape, every query the
dashboards, alert rules and CLI run is found, run and reported, and the verdict follows the targets.

No timing assertions: performance is asserted by the benchmark itself (`flowtrack bench queries --check`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker import grafana_sql
from worker.benchqueries import (
    RANGE_30D,
    RANGE_DEFAULT,
    TARGETS_10M,
    TARGETS_100M,
    Measurement,
    judge,
    live_refresh,
    targets_for,
)
from worker.benchstore import MARKER, plan_batches, prepare_directory
from worker.errors import ConfigError
from worker.grafana_sql import MacroError, QueryContext, render_sql
from worker.settings import Settings
from worker.store import Store

ROOT = Path(__file__).resolve().parent.parent
EVENTS = 45_000  # a few worker-sized batches (FLOWTRACK_BATCH_MAX_ROWS)
BATCH_ROWS = Settings().batch_max_rows
DASHBOARDS = ROOT / "grafana" / "dashboards"
ALERTS = ROOT / "grafana" / "provisioning" / "alerting" / "flowtrack.yaml"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FLOWTRACK_")}


def _bench(store: Path, *extra: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "bench", "queries", "--events", str(EVENTS), "--store", str(store),
         "--repeat", "1", "--json", *extra], env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _sql(store: Path, statement: str) -> list[list[str]]:
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "sql", statement, "--format", "csv",
                           "--clickhouse-url", f"chdb://{store}"], env=_env(), capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return list(csv.reader(io.StringIO(proc.stdout)))[1:]


@dataclass
class Run:
    store: Path
    result: dict[str, Any]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    store = tmp_path_factory.mktemp("bench-queries") / "store"
    yield Run(store, _bench(store))


# -- the loader ------------------------------------------------------------------------------------
def test_loader_builds_the_promised_shape(bench_run: Run) -> None:
    info = bench_run.result["store"]
    assert info["events"] == EVENTS and not info["reused"]
    assert info["users"] == EVENTS // 1000
    assert info["batches"] >= 2 and info["parts_after_load"] >= 1  # worker-sized batches, not one insert
    (visible, distinct, sessions, users, first, last), = _sql(bench_run.store, (
        "SELECT count(), uniqExact(event_id), uniqExact(session_id), uniqExact(user_id), "
        "toUnixTimestamp(min(ts)), toUnixTimestamp(max(ts)) FROM flowtrack.flow_events"))
    assert int(visible) == int(distinct) == EVENTS  # exactly N, each visible once
    assert int(sessions) == info["sessions"] and int(users) == info["users"]
    anchor = info["anchor_s"]
    assert anchor - 30 * 86400 <= int(first) < anchor - 29 * 86400  # spread over the last 30 days
    assert anchor - 86400 < int(last) <= anchor

    by_status = {s: (int(n), int(e)) for s, n, e in _sql(bench_run.store, (
        "SELECT status, count(), sum(event_count) FROM flowtrack.flow_sessions GROUP BY status"))}
    assert sum(n for n, _ in by_status.values()) == info["sessions"]  # sessions exact
    assert sum(e for _, e in by_status.values()) == EVENTS
    failed_share = by_status["failed"][0] / info["sessions"]
    assert 0.01 <= failed_share <= 0.035, by_status  # ~2 % failures
    assert by_status["completed"][0] > 0.9 * info["sessions"] and by_status.get("active", (0, 0))[0] >= 1


def test_loader_builds_trees_with_parents_and_error_messages(bench_run: Run) -> None:
    (roots, sessions, orphans, parented), = _sql(bench_run.store, (
        "SELECT countIf(parent_id = ''), uniqExact(session_id), "
        "countIf(parent_id != '' AND (session_id, parent_id) NOT IN "
        "  (SELECT session_id, node_id FROM flowtrack.flow_events)), countIf(parent_id != '') "
        "FROM flowtrack.flow_events"))
    assert int(roots) == int(sessions)  # one root (the user message) per session
    assert int(orphans) == 0 and int(parented) > EVENTS // 2  # every parent exists in its session
    types = dict(_sql(bench_run.store, "SELECT event_type, count() FROM flowtrack.flow_events GROUP BY event_type"))
    assert {"user_message", "llm_call", "llm_response", "tool_call", "tool_result", "flow_completed",
            "error"} <= set(types)
    (errors, with_message), = _sql(bench_run.store, (
        "SELECT count(), countIf(attributes['message'] != '') FROM flowtrack.flow_events WHERE event_type = 'error'"))
    assert int(errors) > 0 and with_message == errors
    (depth,), = _sql(bench_run.store, "SELECT max(toUInt32OrZero(substring(node_id, 5))) FROM flowtrack.flow_events "
                                      "WHERE node_id LIKE 'llm-%' AND node_id NOT LIKE '%.tool-%'")
    assert int(depth) >= 3  # trees several turns deep, each turn under the previous one


def test_a_cached_store_is_reused_and_a_foreign_directory_refused(bench_run: Run, tmp_path: Path) -> None:
    again = _bench(bench_run.store)
    assert again["store"]["reused"] and again["store"]["events"] == EVENTS
    assert again["store"]["anchor_s"] == bench_run.result["store"]["anchor_s"]
    (tmp_path / "precious.txt").write_text("not a bench store")
    with pytest.raises(ConfigError):
        prepare_directory(tmp_path, EVENTS, 7, BATCH_ROWS)
    assert (tmp_path / "precious.txt").exists()
    assert not (tmp_path / MARKER).exists()


def test_an_interrupted_or_other_bench_store_is_cleared_for_a_rebuild(bench_run: Run, tmp_path: Path) -> None:
    current = json.loads((bench_run.store / MARKER).read_text())
    assert prepare_directory(bench_run.store, EVENTS, 7, current["batch_rows"]) is not None  # the control
    for changed in ({"events": -1}, {"seed": 8}, {"events": EVENTS + 1}, {"batch_rows": current["batch_rows"] * 2}):
        marker = {**current, **changed}
        store = tmp_path / f"store-{len(list(tmp_path.iterdir()))}"
        store.mkdir()
        (store / MARKER).write_text(json.dumps(marker))
        (store / "data").mkdir()
        assert prepare_directory(store, EVENTS, 7, current["batch_rows"]) is None
        assert not store.exists() or not any(store.iterdir())


def test_batches_hold_exactly_n_events_in_whole_sessions() -> None:
    sizes = [7, 20, 13, 51, 5, 20, 20]
    batches = plan_batches(sizes, 100, 30)
    assert sum(b.events for b in batches) == 100
    assert [(b.first, b.count) for b in batches] == [(0, 3), (3, 1), (4, 2)]
    assert batches[-1].cut_steps == 100 - sum(sizes[:5])  # the last session is cut, left active
    assert all(b.events >= 30 for b in batches[:-1])
    assert plan_batches(sizes, sum(sizes), 1000)[-1].cut_steps == 0
    with pytest.raises(ValueError):
        plan_batches(sizes, sum(sizes) + 1, 10)


# -- the runner ------------------------------------------------------------------------------------
def _artefact_queries() -> tuple[set[tuple[str, int, str]], set[tuple[str, str]], set[str]]:
    """What the dashboards and alert file hold, read here independently of worker/grafana_sql.py."""
    panels, variables = set(), set()
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in [*board.get("panels", []), *(p for row in board.get("panels", []) for p in row.get("panels", []))]:
            for target in panel.get("targets", []):
                if target.get("datasource", {}).get("type") == "grafana-clickhouse-datasource":
                    panels.add((path.name, panel["id"], target["refId"]))
        for var in board.get("templating", {}).get("list", []):
            if var["type"] == "query":
                variables.add((path.name, f"${var['name']}"))
    doc = yaml.safe_load(ALERTS.read_text())
    alerts = {rule["uid"] for group in doc["groups"] for rule in group["rules"]
              for item in rule["data"] if item["datasourceUid"] == "flowtrack-clickhouse"}
    return panels, variables, alerts


def test_every_discovered_query_runs_and_is_reported(bench_run: Run) -> None:
    result = bench_run.result
    measured = result["measurements"]
    assert [m for m in measured if m["error"]] == []
    panels, variables, alerts = _artefact_queries()
    assert panels and variables and alerts
    for range_name in (RANGE_DEFAULT, RANGE_30D):
        seen_panels = {(m["group"], m["panel_id"], m["name"].rsplit(" / ", 1)[1]) for m in measured
                       if m["kind"] == "panel" and m["range"] == range_name}
        assert seen_panels == panels, range_name
        assert {(m["group"], m["name"]) for m in measured
                if m["kind"] == "variable" and m["range"] == range_name} == variables
        assert {m["name"].split(" / ")[0] for m in measured
                if m["kind"] == "alert" and m["range"] == range_name} == alerts
    # The live, history and flow dashboards run as they open (all users) and for the chosen user.
    user = result["subjects"]["user_id"]
    live = [m for m in measured if m["group"] == "flows-live.json" and m["range"] == RANGE_DEFAULT]
    assert {m["binding"] for m in live} == {"all users", f"user {user}"}
    assert set(result["live_refresh_ms"]) == {"all users", f"user {user}"}
    cli = {m["name"].split(" ")[0] for m in measured if m["kind"] == "cli"}
    assert cli == {"history", "show", "status", "demo"}
    for m in measured:
        assert len(m["runs_ms"]) == result["repeat"] == 1 and m["best_ms"] > 0 and m["queries"] >= 1, m
        assert m["peak_memory_bytes"] > 0, m  # from system.query_log
    show = next(m for m in measured if m["name"].startswith("show "))
    assert show["result_rows"] > 1 and show["read_rows"] > 0  # the flow's nodes, read from the store
    assert show["sql"].count("SELECT") >= show["queries"] >= 1  # the SQL it ran, whatever it is today
    history = next(m for m in measured if m["name"].startswith(f"history {user} "))
    assert history["result_rows"] == int(result["subjects"]["user_sessions"])
    summary = {(g["group"], g["range"]) for g in result["dashboards"]}
    assert {(p.name, r) for p in DASHBOARDS.glob("*.json") for r in (RANGE_DEFAULT, RANGE_30D)} <= summary
    assert result["targets"]["scale"] == "10M"


def test_subjects_are_a_real_average_session_and_user(bench_run: Run) -> None:
    subjects = bench_run.result["subjects"]
    (avg_events,), = _sql(bench_run.store, "SELECT avg(event_count) FROM flowtrack.flow_sessions")
    assert abs(int(subjects["session_events"]) - float(avg_events)) <= 3
    rows = _sql(bench_run.store, "SELECT user_id, count() FROM flowtrack.flow_sessions GROUP BY user_id")
    mean = sum(int(n) for _, n in rows) / len(rows)
    assert abs(int(subjects["user_sessions"]) - mean) <= max(3.0, mean * 0.2)


# -- the verdict (pure: measurements in, failures out) ---------------------------------------------
def _m(kind: str, group: str, name: str, best_ms: float, range_name: str = RANGE_DEFAULT, binding: str = "",
       memory: int = 1 << 20) -> Measurement:
    return Measurement(kind, group, name, binding, range_name, [best_ms], best_ms, best_ms, 1, 1,
                       peak_memory_bytes=memory)


FILES = {"flowtrack-live": "flows-live.json", "flowtrack-history": "flows-history.json", "flowtrack-flow": "flow.json"}


def test_judge_applies_the_10m_targets() -> None:
    ok = [_m("panel", "flows-live.json", "a", 100, binding="all users"),
          _m("panel", "flows-live.json", "b", 150, binding="all users"),
          _m("variable", "flow.json", "$session_id", 199),
          _m("alert", "alerts", "x", 900, RANGE_30D)]  # 30-day figures are reported, not judged at 10M
    live = live_refresh(ok, "flows-live.json")
    assert live == {"all users": 250}
    assert judge(ok, live, TARGETS_10M, FILES) == []
    slow = [*ok, _m("alert", "alerts", "y", 201)]
    assert any("alerts / y" in f for f in judge(slow, live, TARGETS_10M, FILES))
    too_slow_refresh = [*ok, _m("panel", "flows-live.json", "c", 60, binding="all users")]
    failures = judge(too_slow_refresh, live_refresh(too_slow_refresh, "flows-live.json"), TARGETS_10M, FILES)
    assert failures == ["live refresh [all users]: 310 ms > 300 ms"]
    broken = [*ok, Measurement("cli", "cli", "status", "", "", error="boom")]
    assert any("boom" in f for f in judge(broken, live, TARGETS_10M, FILES))


def test_judge_applies_the_100m_targets() -> None:
    assert targets_for(100_000_000) is TARGETS_100M and targets_for(10_000_000) is TARGETS_10M
    fine = [_m("panel", "flow.json", "Session / A", 90), _m("cli", "cli", "show s-1", 99),
            _m("panel", "flows-history.json", "Sessions / A", 290, RANGE_30D, "user 7"),
            _m("panel", "flows-history.json", "Sessions / A", 900, RANGE_30D, "all users"),  # not one user: no target
            _m("alert", "alerts", "x", 999), _m("panel", "flows-live.json", "p", 400, binding="all users")]
    assert judge(fine, live_refresh(fine, "flows-live.json"), TARGETS_100M, FILES) == []
    cases = [(_m("panel", "flow.json", "Session / A", 101), "one flow"),
             (_m("cli", "cli", "show s-1", 120), "one flow"),
             (_m("cli", "cli", "history 7 --since 30d", 301, RANGE_30D, "user 7"), "user history 30d"),
             (_m("alert", "alerts", "x", 1001), "alert"),
             (_m("panel", "pipeline.json", "p", 5, memory=(1 << 30) + 1), "memory")]
    for slow, what in cases:
        failures = judge([slow], {}, TARGETS_100M, FILES)
        assert len(failures) == 1 and failures[0].startswith(what), (what, failures)


def test_text_report_shows_bindings_and_failures_literally(bench_run: Run) -> None:
    """Square brackets in labels are text, not console markup (they were swallowed once)."""
    from rich.console import Console

    from worker.benchqueries import QueryBenchResult, report_tables

    data = dict(bench_run.result)
    data["measurements"] = [Measurement(**m) for m in data["measurements"]]
    data["dashboards"] = []
    data["failures"] = ["live refresh [all users]: 400 ms > 300 ms"]
    console = Console(record=True, width=250)
    for table in report_tables(QueryBenchResult(**data)):
        console.print(table)
    text = console.export_text()
    assert "live refresh [all users]" in text and "400 ms > 300 ms" in text
    assert f"live refresh [user {data['subjects']['user_id']}]" in text


# -- the expander and Grafana's time arithmetic ----------------------------------------------------
def test_expander_renders_every_macro_of_the_plugin() -> None:
    ctx = QueryContext(86400, 2 * 86400 + 5, 30)
    assert render_sql("$__timeFilter_ms(ts)", ctx) == \
        "ts >= fromUnixTimestamp64Milli(86400000) AND ts <= fromUnixTimestamp64Milli(172805000)"
    assert render_sql("$__dateFilter(d)", ctx) == "d >= toDate('1970-01-02') AND d <= toDate('1970-01-03')"
    both = "(d >= toDate('1970-01-02') AND d <= toDate('1970-01-03')) AND (t >= toDateTime(86400) AND " \
           "t <= toDateTime(172805))"
    assert render_sql("$__dateTimeFilter(d, t)", ctx) == both == render_sql("$__dt(d,t)", ctx)
    assert render_sql("$__timeInterval_ms(ts)", ctx) == \
        "toStartOfInterval(toDateTime64(ts, 3), INTERVAL 30000 millisecond)"
    assert render_sql("$__interval_s $__fromTime_ms $__toTime", ctx) == \
        "30 fromUnixTimestamp64Milli(86400000) toDateTime(172805)"
    assert render_sql("$__timeFilter(toDateTime(ts, 'UTC'))", ctx) == \
        "toDateTime(ts, 'UTC') >= toDateTime(86400) AND toDateTime(ts, 'UTC') <= toDateTime(172805)"
    for bad in ("$__dateTimeFilter(d)", "$__timeFilter(a, b)", "$__timeFilter(ts", "$__unknown"):
        with pytest.raises(MacroError):
            render_sql(bad, ctx)


def test_time_ranges_and_intervals_follow_grafana() -> None:
    assert grafana_sql.relative_seconds("now") == 0
    assert grafana_sql.relative_seconds("now-5m") == 300 and grafana_sql.relative_seconds("now-24h") == 86400
    with pytest.raises(ValueError):
        grafana_sql.relative_seconds("now/d")
    assert grafana_sql.interval_seconds(300) == 1  # 0.3 s raw: 200 ms, at least the plugin's 1 s
    assert grafana_sql.interval_seconds(86400) == 60  # 86.4 s raw
    assert grafana_sql.interval_seconds(30 * 86400) == 1800  # 2592 s raw
    assert grafana_sql.interval_seconds(3600, max_data_points=100) == 30  # 36 s raw


def test_a_cached_store_that_lost_events_is_rebuilt(bench_run: Run) -> None:
    """Last in this file: it rebuilds the module's store."""
    tamper = ("import sys; from worker.settings import Settings; from worker.store import Store; "
              "s = Store.open(Settings(clickhouse_url=sys.argv[1])); "
              "s.command(\"DELETE FROM flowtrack.events WHERE event_type = 'error'\")")
    proc = subprocess.run([sys.executable, "-c", tamper, f"chdb://{bench_run.store}"], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (visible,), = _sql(bench_run.store, "SELECT count() FROM flowtrack.flow_events")
    assert int(visible) < EVENTS
    rebuilt = _bench(bench_run.store)
    assert not rebuilt["store"]["reused"]
    (visible,), = _sql(bench_run.store, "SELECT count() FROM flowtrack.flow_events")
    assert int(visible) == EVENTS


def test_event_types_from_the_environment_are_quoted_in_the_bench_stores_sql(store: Store) -> None:
    from worker.benchstore import sql_literal

    for text in ("done", "it's done", "back\\slash'", "é\n\t"):
        assert store.scalar(f"SELECT {sql_literal(text)}") == text
