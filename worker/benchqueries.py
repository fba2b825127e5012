"""``flowtrack bench queries``: every query flowtrack's users run, timed on a store of N realistic events.

The queries are found, not copied: every ClickHouse panel target and query variable of the generated
dashboards (grafana/dashboards/*.json), every ClickHouse query of the provisioned alert rules, and the
functions behind ``history``, ``show``, ``status`` and the demo's live view, called as the CLI calls them
(so whatever SQL they run today is what is measured). Grafana's variables and the ClickHouse plugin's
macros are expanded as Grafana and the plugin would (worker/grafana_sql.py).

Each query runs at its dashboard's default time range and over 30 days, three times (best-of-3 and
median wall time, as the caller sees it); the engine's own figures (rows and bytes read, peak memory,
duration) come from ``system.query_log``. Time ranges end at the store's anchor, the instant its
synthetic month ends (queries that call ``now()`` themselves, like the demo view's, see real time).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from rich.markup import escape
from rich.table import Table

from worker import grafana_sql
from worker.benchstore import StoreInfo
from worker.grafana_sql import QueryContext
from worker.store import Store

RANGE_DEFAULT = "default"
RANGE_30D = "30d"
THIRTY_DAYS_S = 30 * 86400
LIVE_UID, HISTORY_UID, FLOW_UID = "flowtrack-live", "flowtrack-history", "flowtrack-flow"  # grafana/common.py
TAG_PREFIX = "fbq"


# -- targets (issue 9) -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Targets:
    scale: str
    every_query_ms: float | None = None  # panels, variables, alerts at their default range
    live_refresh_ms: float | None = None
    one_flow_ms: float | None = None  # Flow dashboard panels and `show`
    user_history_30d_ms: float | None = None  # History dashboard for one user over 30 days and `history`
    alert_ms: float | None = None
    memory_bytes: int = 1 << 30


TARGETS_10M = Targets("10M", every_query_ms=200, live_refresh_ms=300)
TARGETS_100M = Targets("100M", live_refresh_ms=500, one_flow_ms=100, user_history_30d_ms=300, alert_ms=1000)


def targets_for(events: int) -> Targets:
    return TARGETS_100M if events >= 100_000_000 else TARGETS_10M


# -- what is measured ------------------------------------------------------------------------------
@dataclass
class Case:
    """One query (or CLI function) at one variable binding and one time range."""

    kind: str  # panel | variable | alert | cli
    group: str  # dashboard file, "alerts" or "cli"
    name: str  # panel title / refId, variable name, alert uid, CLI command
    binding: str  # "all users", "user <id>", ""
    range: str  # default | 30d | the CLI's own
    sql: str = ""  # the rendered SQL (panels, variables, alerts)
    run: Callable[[Store], int] | None = None  # CLI functions: returns result rows
    panel_id: int = 0


@dataclass
class Measurement:
    kind: str
    group: str
    name: str
    binding: str
    range: str
    runs_ms: list[float] = field(default_factory=list)
    best_ms: float = 0.0
    median_ms: float = 0.0
    result_rows: int = 0
    queries: int = 0  # statements per run (CLI functions run several)
    engine_ms: float = 0.0  # query_log duration of the best run
    read_rows: int = 0  # of the best run, summed over its statements
    read_bytes: int = 0
    peak_memory_bytes: int = 0  # the largest over all runs and statements
    error: str = ""
    sql: str = ""
    panel_id: int = 0


@dataclass
class GroupSummary:
    group: str
    range: str
    queries: int
    p50_ms: float
    p95_ms: float
    max_ms: float


@dataclass
class QueryBenchResult:
    store: dict[str, Any]
    anchor: str
    subjects: dict[str, str]
    repeat: int
    measurements: list[Measurement]
    dashboards: list[GroupSummary]
    live_refresh_ms: dict[str, float]  # binding -> sum of the live dashboard's panels (best-of-3, default range)
    targets: dict[str, Any]
    failures: list[str]
    passed: bool
    seconds: float

    def to_json(self) -> str:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2).decode()


class TaggedStore(Store):
    """The bench store, marking every statement with a log_comment so query_log figures can be summed per run."""

    def __init__(self, base: Store) -> None:
        super().__init__(base.client, base.description, base.embedded)
        self._lock = base._lock
        self.tag = ""
        self.statements = 0
        self.sql: list[str] = []  # what the last run executed (CLI functions: their SQL, however it is written)

    def query(self, sql: str, parameters: dict[str, Any] | None = None,
              settings: dict[str, Any] | None = None) -> tuple[list[str], list[Sequence[Any]]]:
        self.statements += 1
        self.sql.append(sql)
        return super().query(sql, parameters, {**(settings or {}), "log_comment": self.tag})


# -- subjects: the session and the user the flow and history queries look at ------------------------
def pick_subjects(store: Store, anchor_s: int) -> dict[str, str]:
    """A completed session of about average size from the last day, and a user with an average history."""
    since = anchor_s - 86400
    _, rows = store.query(
        "WITH (SELECT avg(event_count) FROM flowtrack.flow_sessions) AS mean "
        "SELECT session_id, user_id, event_count FROM flowtrack.flow_sessions "
        "WHERE status = 'completed' AND started_at >= toDateTime({since:Int64}) "
        "ORDER BY abs(event_count - mean), session_id LIMIT 1", {"since": since})
    if not rows:
        _, rows = store.query("SELECT session_id, user_id, event_count FROM flowtrack.flow_sessions "
                              "ORDER BY last_event_at DESC LIMIT 1")
    session, session_user, size = (str(v) for v in rows[0])
    _, users = store.query(
        "WITH per_user AS (SELECT user_id, count() AS sessions FROM flowtrack.flow_sessions GROUP BY user_id) "
        "SELECT user_id, sessions FROM per_user "
        "ORDER BY abs(sessions - (SELECT avg(sessions) FROM per_user)), user_id LIMIT 1")
    user, sessions = (str(v) for v in users[0])
    return {"session_id": session, "session_user": session_user, "session_events": size, "user_id": user,
            "user_sessions": sessions}


# -- discovery -------------------------------------------------------------------------------------
def _bindings(dashboard: dict[str, Any], subjects: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """The dashboard as it opens (text boxes at their defaults), and with the chosen user typed in."""
    defaults = grafana_sql.default_variables(dashboard)
    names = {str(v["name"]) for v in dashboard.get("templating", {}).get("list", [])}
    base = {**defaults, **({"session_id": subjects["session_id"]} if "session_id" in names else {})}
    if "user_id" not in names:
        return [("", base)]
    opened = "all users" if not defaults.get("user_id") else f"user {defaults['user_id']}"
    return [(opened, base), (f"user {subjects['user_id']}", {**base, "user_id": subjects["user_id"]})]


def _ranges(dashboard: dict[str, Any], anchor_s: int) -> list[tuple[str, int, int]]:
    time_range = dashboard.get("time", {"from": "now-6h", "to": "now"})
    start = anchor_s - grafana_sql.relative_seconds(str(time_range.get("from", "now-6h")))
    end = anchor_s - grafana_sql.relative_seconds(str(time_range.get("to", "now")))
    return [(RANGE_DEFAULT, start, end), (RANGE_30D, anchor_s - THIRTY_DAYS_S, anchor_s)]


def dashboard_cases(dashboards: dict[str, dict[str, Any]], subjects: dict[str, str], anchor_s: int) -> list[Case]:
    cases = []
    for name, dashboard in dashboards.items():
        queries = grafana_sql.panel_queries(name, dashboard)
        variables = grafana_sql.variable_queries(name, dashboard)
        for range_name, start, end in _ranges(dashboard, anchor_s):
            for binding, values in _bindings(dashboard, subjects):
                for query in queries:
                    ctx = QueryContext(start, end, grafana_sql.interval_seconds(end - start, query.max_data_points),
                                       values)
                    cases.append(Case("panel", name, f"{query.panel} / {query.ref_id}", binding, range_name,
                                      grafana_sql.render_sql(query.sql, ctx), panel_id=query.panel_id))
                for variable in variables:
                    ctx = QueryContext(start, end, grafana_sql.interval_seconds(end - start), values)
                    cases.append(Case("variable", name, f"${variable.name}", binding, range_name,
                                      grafana_sql.render_sql(variable.sql, ctx)))
    return cases


def alert_cases(anchor_s: int, alert_file: Path = grafana_sql.ALERT_FILE) -> list[Case]:
    cases = []
    for alert in grafana_sql.alert_queries(alert_file):
        for range_name, start, end in ((RANGE_DEFAULT, anchor_s - alert.from_s, anchor_s - alert.to_s),
                                       (RANGE_30D, anchor_s - THIRTY_DAYS_S, anchor_s)):
            ctx = QueryContext(start, end, grafana_sql.interval_seconds(end - start))
            cases.append(Case("alert", "alerts", f"{alert.uid} / {alert.ref_id}", "", range_name,
                              grafana_sql.render_sql(alert.sql, ctx)))
    return cases


def cli_cases(subjects: dict[str, str], anchor_s: int) -> list[Case]:
    """The functions the CLI calls, with the arguments a user would give."""
    from worker import flows

    anchor = datetime.fromtimestamp(anchor_s, UTC)
    user, session = subjects["user_id"], subjects["session_id"]

    def history_user(store: Store) -> int:
        return len(flows.history(store, user, anchor - timedelta(days=30))[1])

    def history_all(store: Store) -> int:
        return len(flows.history(store, None, anchor - timedelta(days=7))[1])

    def show(store: Store) -> int:
        flow = flows.load_flow(store, session)
        if flow is None:
            raise LookupError(f"flowtrack show {session}: no such session")
        return len(flows.place_nodes(flow.nodes, flow.started_at))

    def status(store: Store) -> int:
        report = flows.StatusReport("", "", 0, 0)
        flows.store_status(report, store)
        return len(report.sessions)

    def demo_view(store: Store) -> int:
        from worker import demo

        snapshot = demo.Snapshot()
        demo._read_store(store, snapshot)  # what the demo's live view reads once a second
        return len(snapshot.latest) + len(snapshot.placed)

    return [
        Case("cli", "cli", f"history {user} --since 30d", f"user {user}", RANGE_30D, run=history_user),
        Case("cli", "cli", "history (all users, --since 7d)", "all users", "7d", run=history_all),
        Case("cli", "cli", f"show {session}", f"session {session}", "", run=show),
        Case("cli", "cli", "status (store half)", "", "", run=status),
        Case("cli", "cli", "demo live view (one refresh)", "", "last 60 s", run=demo_view),
    ]


# -- running ---------------------------------------------------------------------------------------
def _run_once(store: TaggedStore, case: Case) -> int:
    if case.run is not None:
        return case.run(store)
    # Dashboards and alerts run as Grafana's ClickHouse user: under its profile's settings.
    return len(store.query(case.sql, settings=grafana_sql.GRAFANA_QUERY_SETTINGS)[1])


def measure(store: Store, cases: Sequence[Case], repeat: int,
            progress: Callable[[str, int, int], None]) -> list[Measurement]:
    """Run each case `repeat` times; identical rendered SQL is measured once and its figures reused."""
    tagged = TaggedStore(store)
    results: list[Measurement] = []
    done_sql: dict[str, Measurement] = {}
    tags: dict[str, list[str]] = {}
    for index, case in enumerate(cases):
        progress("queries", index, len(cases))
        m = Measurement(case.kind, case.group, case.name, case.binding, case.range, sql=case.sql,
                        panel_id=case.panel_id)
        earlier = done_sql.get(case.sql) if case.sql else None
        if earlier is not None:
            results.append(_copy_figures(m, earlier))
            continue
        tags[str(index)] = []
        for attempt in range(repeat):
            tagged.tag = f"{TAG_PREFIX}:{index}:{attempt}"
            tagged.statements = 0
            tagged.sql = []
            tags[str(index)].append(tagged.tag)
            started = time.perf_counter()
            try:
                m.result_rows = _run_once(tagged, case)
            except Exception as exc:  # a broken query is a finding, not the end of the benchmark
                m.error = " ".join(str(exc).split())[:500]
                break
            m.runs_ms.append(round((time.perf_counter() - started) * 1000, 2))
            m.queries = tagged.statements
            if case.run is not None:
                m.sql = ";\n".join(tagged.sql)
        if m.runs_ms:
            m.best_ms = min(m.runs_ms)
            m.median_ms = round(statistics.median(m.runs_ms), 2)
        results.append(m)
        if case.sql:
            done_sql[case.sql] = m
    progress("queries", len(cases), len(cases))
    _add_engine_figures(store, results, tags)
    for m in results:  # copies made before the engine figures arrived
        if m.sql and m.sql in done_sql and done_sql[m.sql] is not m:
            _copy_figures(m, done_sql[m.sql])
    return results


def _copy_figures(target: Measurement, source: Measurement) -> Measurement:
    for name in ("runs_ms", "best_ms", "median_ms", "result_rows", "queries", "engine_ms", "read_rows",
                 "read_bytes", "peak_memory_bytes", "error"):
        setattr(target, name, getattr(source, name))
    return target


def _add_engine_figures(store: Store, results: list[Measurement], tags: dict[str, list[str]]) -> None:
    """Rows, bytes, memory and engine time per run from system.query_log (chDB keeps it when configured)."""
    store.command("SYSTEM FLUSH LOGS")
    _, rows = store.query(
        "SELECT log_comment, sum(read_rows), sum(read_bytes), max(memory_usage), sum(query_duration_ms) "
        "FROM system.query_log WHERE type = 'QueryFinish' AND startsWith(log_comment, {prefix:String}) "
        "GROUP BY log_comment", {"prefix": f"{TAG_PREFIX}:"})
    by_tag = {str(r[0]): (int(r[1]), int(r[2]), int(r[3]), float(r[4])) for r in rows}
    for index, run_tags in tags.items():
        m = results[int(index)]
        figures = [by_tag.get(tag) for tag in run_tags[:len(m.runs_ms)]]
        known = [f for f in figures if f is not None]
        if not known:
            continue
        best = figures[m.runs_ms.index(m.best_ms)] if m.runs_ms else None
        best = best or known[0]
        m.read_rows, m.read_bytes, _, m.engine_ms = best[0], best[1], best[2], best[3]
        m.peak_memory_bytes = max(f[2] for f in known)


# -- summaries and the verdict ---------------------------------------------------------------------
def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[rank]


def summarize(measurements: Sequence[Measurement]) -> list[GroupSummary]:
    out = []
    keys = dict.fromkeys((m.group, m.range) for m in measurements if m.kind in ("panel", "variable", "alert"))
    for group, range_name in keys:
        best = [m.best_ms for m in measurements if (m.group, m.range) == (group, range_name)
                and m.kind in ("panel", "variable", "alert") and not m.error]
        out.append(GroupSummary(group, range_name, len(best), round(_percentile(best, 0.5), 2),
                                round(_percentile(best, 0.95), 2), round(max(best, default=0.0), 2)))
    return out


def live_refresh(measurements: Sequence[Measurement], live_file: str) -> dict[str, float]:
    """Per binding: the sum of the live dashboard's panel queries (best-of-3) at its default range."""
    totals: dict[str, float] = {}
    for m in measurements:
        if m.kind == "panel" and m.group == live_file and m.range == RANGE_DEFAULT:
            totals[m.binding] = round(totals.get(m.binding, 0.0) + m.best_ms, 2)
    return totals


def judge(measurements: Sequence[Measurement], live: dict[str, float], targets: Targets,
          files: dict[str, str]) -> list[str]:
    """Every way the figures miss the issue's targets, in words."""
    failures = [f"{m.group} / {m.name} [{m.binding or '-'}, {m.range or '-'}]: failed: {m.error}"
                for m in measurements if m.error]

    def over(m: Measurement, limit: float, what: str) -> None:
        if not m.error and m.best_ms > limit:
            failures.append(f"{what}: {m.group} / {m.name} [{m.binding or '-'}, {m.range or '-'}] "
                            f"{m.best_ms:.0f} ms > {limit:.0f} ms")

    for m in measurements:
        if m.peak_memory_bytes > targets.memory_bytes:
            failures.append(f"memory: {m.group} / {m.name} [{m.binding}, {m.range}] "
                            f"{m.peak_memory_bytes / 2**20:.0f} MiB > {targets.memory_bytes / 2**20:.0f} MiB")
        at_default = m.range == RANGE_DEFAULT
        if targets.every_query_ms is not None and m.kind in ("panel", "variable", "alert") and at_default:
            over(m, targets.every_query_ms, "every query")
        if targets.alert_ms is not None and m.kind == "alert" and at_default:
            over(m, targets.alert_ms, "alert")
        if targets.one_flow_ms is not None and (
                (m.kind == "panel" and m.group == files.get(FLOW_UID) and at_default) or m.name.startswith("show ")):
            over(m, targets.one_flow_ms, "one flow")
        if targets.user_history_30d_ms is not None and m.binding.startswith("user ") and (
                (m.kind == "panel" and m.group == files.get(HISTORY_UID) and m.range == RANGE_30D)
                or (m.name.startswith("history ") and m.range == RANGE_30D)):
            over(m, targets.user_history_30d_ms, "user history 30d")
    if targets.live_refresh_ms is not None:
        for binding, total in live.items():
            if total > targets.live_refresh_ms:
                failures.append(f"live refresh [{binding}]: {total:.0f} ms > {targets.live_refresh_ms:.0f} ms")
    return failures


def run_queries(store: Store, info: StoreInfo, repeat: int, progress: Callable[[str, int, int], None],
                dashboard_dir: Path = grafana_sql.DASHBOARD_DIR,
                alert_file: Path = grafana_sql.ALERT_FILE) -> QueryBenchResult:
    started = time.perf_counter()
    dashboards = grafana_sql.load_dashboards(dashboard_dir)
    files = {str(d.get("uid", "")): name for name, d in dashboards.items()}
    subjects = pick_subjects(store, info.anchor_s)
    cases = (dashboard_cases(dashboards, subjects, info.anchor_s) + alert_cases(info.anchor_s, alert_file)
             + cli_cases(subjects, info.anchor_s))
    measurements = measure(store, cases, repeat, progress)
    live = live_refresh(measurements, files.get(LIVE_UID, ""))
    targets = targets_for(info.events)
    failures = judge(measurements, live, targets, files)
    return QueryBenchResult(asdict(info), datetime.fromtimestamp(info.anchor_s, UTC).isoformat(), subjects, repeat,
                            measurements, summarize(measurements), live, asdict(targets), failures, not failures,
                            round(time.perf_counter() - started, 1))


# -- the report ------------------------------------------------------------------------------------
def _mb(value: int) -> str:
    return f"{value / 2**20:,.1f}"


def report_tables(result: QueryBenchResult) -> list[Table]:
    store = result.store
    head = Table(title="flowtrack bench queries", show_header=False, title_justify="left")
    head.add_column("what", style="bold")
    head.add_column("value")
    head.add_row("store", f"{store['events']:,} events, {store['sessions']:,} sessions, {store['users']:,} users, "
                          f"{store['disk_bytes'] / 2**20:,.0f} MiB on disk, {store['parts_after_load']} parts "
                          + ("(reused)" if store["reused"] else f"(loaded in {store['load_s']:.0f} s)"))
    head.add_row("time ranges end at", f"{result.anchor} (the store's anchor)")
    head.add_row("subjects", f"session {result.subjects['session_id']} ({result.subjects['session_events']} events), "
                             f"user {result.subjects['user_id']} ({result.subjects['user_sessions']} sessions)")
    for binding, total in result.live_refresh_ms.items():
        head.add_row(escape(f"live refresh [{binding}]"),
                     f"{total:,.0f} ms (sum of its panels, best of {result.repeat})")
    queries = Table(title=f"queries (best of {result.repeat}, wall ms)", title_justify="left")
    for column in ("group", "query", "binding", "range", "best", "median", "engine", "rows read", "MiB read",
                   "peak MiB", "rows"):
        queries.add_column(column, justify="left" if column in ("group", "query", "binding", "range") else "right")
    for m in result.measurements:
        style = "red" if m.error else None
        queries.add_row(escape(m.group), escape(m.name), escape(m.binding), m.range,
                        "ERR" if m.error else f"{m.best_ms:,.1f}", f"{m.median_ms:,.1f}", f"{m.engine_ms:,.0f}",
                        f"{m.read_rows:,}", _mb(m.read_bytes),
                        _mb(m.peak_memory_bytes), f"{m.result_rows:,}", style=style)
    groups = Table(title=f"per dashboard (best of {result.repeat} of each query, ms)", title_justify="left")
    for column in ("group", "range", "queries", "p50", "p95", "max"):
        groups.add_column(column, justify="left" if column in ("group", "range") else "right")
    for g in result.dashboards:
        groups.add_row(escape(g.group), g.range, str(g.queries), f"{g.p50_ms:,.1f}", f"{g.p95_ms:,.1f}",
                       f"{g.max_ms:,.1f}")
    verdict = Table(title=f"targets ({result.targets['scale']})", show_header=False, title_justify="left")
    verdict.add_column("result")
    for failure in result.failures[:60]:
        verdict.add_row(escape(failure), style="red")
    if len(result.failures) > 60:
        verdict.add_row(f"… {len(result.failures) - 60} more (see --json)", style="red")
    verdict.add_row("PASS" if result.passed else "FAIL", style="green" if result.passed else "bold red")
    return [head, queries, groups, verdict]
