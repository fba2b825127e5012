"""Terminal views (issue 5), driven for real: a real redis-server, a store filled by the real pipeline.

Store commands run in-process through typer's CliRunner (they share the session's embedded store, as
chDB allows one store per process); `tail` runs as a subprocess; the store-lock test runs a second
process against its own store.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from tests.conftest import ROOT, cli_env, derived_id, drain, make_settings, run_cli, xadd_all
from worker.cli import app
from worker.poison import NARROWING_GROUPS
from worker.producer import FlowSpec, ProduceConfig, encode, generate_flows
from worker.redisserver import RedisServer
from worker.store import Store

LONG_TEXT = "lorem ipsum " * 40


def invoke(args: Sequence[str], redis_url: str, clickhouse_url: str) -> Any:
    result = CliRunner().invoke(app, list(args), env=cli_env(redis_url, clickhouse_url), catch_exceptions=False)
    return result


def flow_entries(flows: Sequence[FlowSpec]) -> list[tuple[str, dict[str, str]]]:
    entries = []
    for flow in flows:
        for event in flow.events:
            entries.append((f"flow_events:{flow.user_id}", encode(event, "flat", per_user_stream=True)))
    return entries


def handmade_flow(session: str = "s-hand") -> list[tuple[str, dict[str, str]]]:
    """root -> (a -> b), root -> c (error, with a long attribute); an orphan whose parent never arrives."""
    base = 1_700_000_000_000
    rows = [("root", "", "user_message", 0, {"text": LONG_TEXT}),
            ("a", "root", "llm_call", 10, {"model": "gpt-4o"}),
            ("b", "a", "tool_call", 20, {"tool": "web_search"}),
            ("b", "a", "tool_result", 320, {"tool": "web_search"}),
            ("a", "root", "llm_response", 400, {"tokens": "42"}),
            ("c", "root", "error", 450, {"message": "upstream timeout"}),
            ("orphan", "ghost", "tool_call", 460, {})]
    entries = []
    for node, parent, event_type, offset, attrs in rows:
        fields = {"session_id": session, "node_id": node, "event_type": event_type,
                  "timestamp": str(base + offset), **attrs}
        if parent:
            fields["parent_id"] = parent
        entries.append(("flow_events:77", fields))
    return entries


@pytest.fixture
def filled(redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str
           ) -> Iterator[dict[str, Any]]:
    flows = list(generate_flows(ProduceConfig(users=3, seed=7), sessions=30))
    entries = flow_entries(flows) + handmade_flow()
    entries.append(("flow_events:2", {"session_id": "s-bad", "event_type": "llm_call"}))  # no node_id
    xadd_all(redis_client, entries)
    drain(make_settings(redis_server.url, clickhouse_url))
    yield {"flows": flows, "redis_url": redis_server.url, "clickhouse_url": clickhouse_url, "entries": entries}


# -- history -----------------------------------------------------------------------------------
def test_history_lists_a_users_sessions_with_counts_and_status(filled: dict[str, Any]) -> None:
    flows: list[FlowSpec] = filled["flows"]
    user = flows[0].user_id
    expected = {f.session_id: f for f in flows if f.user_id == user}
    result = invoke(["history", user, "--since", "0", "-f", "json"], filled["redis_url"], filled["clickhouse_url"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["session_id"] for r in rows} == set(expected)
    for row in rows:
        spec = expected[row["session_id"]]
        assert row["user_id"] == user
        assert row["event_count"] == len(spec.events)
        assert row["status"] == spec.status
        assert row["error_count"] == (1 if spec.status == "failed" else 0)
        assert (row["ended_at"] is None) == (spec.status == "active")

    by_events = json.loads(invoke(["history", "--since", "0", "--sort", "events", "-f", "json"],
                                  filled["redis_url"], filled["clickhouse_url"]).stdout)
    counts = [r["event_count"] for r in by_events]
    assert counts == sorted(counts, reverse=True) and len(by_events) == len(flows) + 1  # + the handmade one

    failed = json.loads(invoke(["history", "--since", "0", "--status", "failed", "-f", "json"],
                               filled["redis_url"], filled["clickhouse_url"]).stdout)
    assert {r["session_id"] for r in failed} == {f.session_id for f in flows if f.status == "failed"} | {"s-hand"}

    csv_out = invoke(["history", user, "--since", "0", "-f", "csv"], filled["redis_url"], filled["clickhouse_url"])
    assert csv_out.stdout.splitlines()[0].startswith("user_id,session_id,started_at")
    assert len(csv_out.stdout.splitlines()) == len(expected) + 1

    table = invoke(["history", user, "--since", "0"], filled["redis_url"], filled["clickhouse_url"])
    assert all(session in table.stdout for session in expected)

    # a time range that excludes everything
    empty = invoke(["history", user, "--since", "1h", "--until", "30m", "-f", "json"],
                   filled["redis_url"], filled["clickhouse_url"])
    assert json.loads(empty.stdout) == []
    bad_sort = invoke(["history", "--sort", "nope"], filled["redis_url"], filled["clickhouse_url"])
    assert bad_sort.exit_code == 2


# -- show --------------------------------------------------------------------------------------
def test_show_draws_the_tree_with_offsets_errors_and_folded_attributes(filled: dict[str, Any]) -> None:
    result = invoke(["show", "s-hand", "-f", "json"], filled["redis_url"], filled["clickhouse_url"])
    assert result.exit_code == 0, result.output
    flow = json.loads(result.stdout)
    assert flow["status"] == "failed" and flow["user_id"] == "77" and flow["event_count"] == 7
    nodes = [(n["node_id"], n["depth"], n["parent_id"]) for n in flow["nodes"]]
    assert nodes == [("root", 0, ""), ("a", 1, "root"), ("b", 2, "a"), ("c", 1, "root"), ("orphan", 0, "ghost")]
    by_id = {n["node_id"]: n for n in flow["nodes"]}
    assert by_id["b"]["offset_ms"] == 20 and by_id["b"]["duration_ms"] == 300
    assert by_id["a"]["events"] == ["llm_call", "llm_response"]
    assert by_id["c"]["status"] == "error" and by_id["orphan"]["note"] == "orphan"

    text = invoke(["show", "s-hand"], filled["redis_url"], filled["clickhouse_url"]).stdout
    lines = text.splitlines()
    assert "session s-hand" in lines[0] and "failed" in lines[0]
    assert lines[1].startswith("user_message root") and "…(+" in lines[1]  # long text folded
    assert LONG_TEXT.strip() not in text
    assert lines[2].startswith("├── llm_call a")
    assert lines[3].startswith("│   └── tool_call b") and "+20ms" in lines[3] and "300ms" in lines[3]
    assert lines[4].startswith("└── error c") and "✗ error" in lines[4] and "upstream timeout" in lines[4]
    assert "orphan" in lines[5] and "ghost" in lines[5]

    missing = invoke(["show", "s-nope"], filled["redis_url"], filled["clickhouse_url"])
    assert missing.exit_code == 1 and "no session" in missing.output


def test_show_handles_a_500_level_deep_and_a_2000_node_flow(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    base = 1_700_000_000_000
    deep = [("flow_events:5", {"session_id": "s-deep", "node_id": f"n{i}", "event_type": "llm_call",
                               "timestamp": str(base + i), **({"parent_id": f"n{i - 1}"} if i else {})})
            for i in range(500)]
    wide = [("flow_events:6", {"session_id": "s-wide", "node_id": f"w{i}", "event_type": "tool_call",
                               "timestamp": str(base + i), **({"parent_id": f"w{(i - 1) // 3}"} if i else {})})
            for i in range(2000)]
    xadd_all(redis_client, deep + wide)
    drain(make_settings(redis_server.url, clickhouse_url))

    result = invoke(["show", "s-deep", "-f", "json"], redis_server.url, clickhouse_url)
    nodes = json.loads(result.stdout)["nodes"]
    assert [n["depth"] for n in nodes] == list(range(500))
    text = invoke(["show", "s-deep"], redis_server.url, clickhouse_url).stdout.splitlines()
    assert len(text) == 501 and text[-1].lstrip("│ ┆0123456789").startswith("└── llm_call n499")
    assert "499" in text[-1]  # the depth is shown once guides are collapsed
    assert max(len(line) for line in text) < 200  # guides do not grow with depth

    started = time.monotonic()
    wide_json = json.loads(invoke(["show", "s-wide", "-f", "json"], redis_server.url, clickhouse_url).stdout)
    wide_text = invoke(["show", "s-wide"], redis_server.url, clickhouse_url).stdout.splitlines()
    assert time.monotonic() - started < 30
    assert len(wide_json["nodes"]) == 2000 and len(wide_text) == 2001
    parents = {n["node_id"]: n["parent_id"] for n in wide_json["nodes"]}
    seen: set[str] = set()
    for n in wide_json["nodes"]:  # depth-first: every node comes after its parent
        assert n["parent_id"] == "" or n["parent_id"] in seen
        seen.add(n["node_id"])
    assert parents["w7"] == "w2"


# -- status ------------------------------------------------------------------------------------
def test_status_reports_streams_groups_and_rejections_and_fails_when_unhealthy(filled: dict[str, Any]) -> None:
    url, ch = filled["redis_url"], filled["clickhouse_url"]
    result = invoke(["status", "--json"], url, ch)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["healthy"] is True
    streams = {s["name"]: s for s in report["streams"]}
    assert set(streams) >= {"flow_events:1", "flow_events:2", "flow_events:3", "flow_events:77"}
    per_stream: dict[str, int] = {}
    for stream, _ in filled["entries"]:
        per_stream[stream] = per_stream.get(stream, 0) + 1
    for name, count in per_stream.items():
        assert streams[name]["length"] == count
        group = streams[name]["group"]
        assert group["lag"] == 0 and group["pending"] == 0
        assert [c["name"] for c in group["consumers"]] == ["test-worker"]
    assert report["store"]["events"] == len(filled["entries"]) - 1
    assert report["store"]["rejected"] == 1
    assert report["store"]["rejected_by_reason"] == {"missing required field …": 1}
    assert "flow_events:77" in invoke(["status"], url, ch).stdout

    # Unhealthy: entries delivered to a consumer that died, idle over the claim threshold; and lag.
    client = redis.Redis.from_url(url, protocol=2)
    xadd_all(client, [("flow_events:1", {"session_id": "s-x", "node_id": "n", "event_type": "llm_call"})] * 3)
    client.xreadgroup("flowtrack", "dead-consumer", {"flow_events:1": ">"}, count=2)
    time.sleep(0.05)
    result = invoke(["status", "--json", "--claim-idle-ms", "10", "--max-lag", "0"], url, ch)
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    group = {s["name"]: s for s in report["streams"]}["flow_events:1"]["group"]
    assert group["pending"] == 2 and group["stale_pending"] == 2 and group["lag"] == 1
    assert any("idle over the claim threshold" in p for p in report["problems"])
    assert any("lag 1" in p for p in report["problems"])
    assert "UNHEALTHY" in invoke(["status", "--claim-idle-ms", "10"], url, ch).stdout
    client.close()

    # Redis down: unhealthy, said plainly
    down = invoke(["status", "--no-store", "--json", "--redis-url", "redis://127.0.0.1:1/0"], url, ch)
    assert down.exit_code == 1 and "Redis unreachable" in json.loads(down.stdout)["problems"][0]


# -- sql ---------------------------------------------------------------------------------------
def test_sql_binds_parameters_and_refuses_writes(filled: dict[str, Any], tmp_path: Path) -> None:
    url, ch = filled["redis_url"], filled["clickhouse_url"]
    count_sql = "SELECT count() AS n FROM flowtrack.flow_events WHERE session_id = {s:String}"
    ok = invoke(["sql", count_sql, "-p", "s=s-hand", "-f", "json"], url, ch)
    assert json.loads(ok.stdout) == [{"n": 7}]
    injected = invoke(["sql", count_sql, "-p", "s=x' OR 1=1 OR '", "-f", "json"], url, ch)
    assert json.loads(injected.stdout) == [{"n": 0}]
    for statement in ("INSERT INTO flowtrack.rejected (reason) VALUES ('x')", "DROP TABLE flowtrack.events",
                      "/* hi */ TRUNCATE TABLE flowtrack.events", "ALTER TABLE flowtrack.events DELETE WHERE 1"):
        refused = invoke(["sql", statement], url, ch)
        assert refused.exit_code == 1 and "read-only" in refused.output
    target = tmp_path / "out.tsv"
    outfile = invoke(["sql", f"SELECT 1 INTO OUTFILE '{target}'"], url, ch)
    assert outfile.exit_code == 1 and "OUTFILE" in outfile.output and not target.exists()
    assert invoke(["sql", "SELECT count() FROM flowtrack.events", "-f", "json"], url, ch).exit_code == 0
    assert json.loads(invoke(["sql", count_sql, "-p", "s=s-hand", "-f", "json"], url, ch).stdout) == [{"n": 7}]


# -- rejected and replay -------------------------------------------------------------------------
def test_rejected_lists_reasons_and_replay_is_idempotent(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    url = redis_server.url
    flows = list(generate_flows(ProduceConfig(users=2, seed=11), sessions=4))
    entries = flow_entries(flows)
    ids = xadd_all(redis_client, entries)
    broken_id = xadd_all(redis_client, [("flow_events:1", {"session_id": "s-bad", "event_type": "llm_call"})])[0]
    # Every entry was delivered to consumers that died, as often as it takes to be poison (the last deliveries
    # alone, worker/poison.py): the worker that reclaims them rejects them all, good entries land in rejected_events.
    for stream in sorted({s for s, _ in entries} | {"flow_events:1"}):
        redis_client.xgroup_create(stream, "flowtrack", id="0")
        delivered = redis_client.xreadgroup("flowtrack", "dead-worker", {stream: ">"})
        held = [entry_id for _, items in delivered for entry_id, _ in items]
        redis_client.xclaim(stream, "flowtrack", "dead-worker", 0, held, retrycount=1 + len(NARROWING_GROUPS),
                            justid=True)
    time.sleep(0.2)
    drain(make_settings(url, clickhouse_url, max_deliveries=1, claim_idle_ms=100, claim_interval_s=0.1))
    assert store.scalar("SELECT count() FROM flowtrack.flow_events") == 0

    listed = invoke(["rejected", "-f", "json", "--limit", "1000"], url, clickhouse_url)
    rows = json.loads(listed.stdout)
    assert len(rows) == len(entries) + 1
    assert all(r["replayed"] == "" for r in rows)
    assert {r["reason"].split(" ")[0] for r in rows} == {"delivered"}
    table = invoke(["rejected", "--reason", "delivered", "--limit", "3"], url, clickhouse_url).stdout
    assert "delivered" in table and "limit 3 reached" in table
    poison_reason = f"delivered {2 + len(NARROWING_GROUPS)} times without being acknowledged, the last time alone"
    assert all(r["reason"].startswith(poison_reason) for r in rows)

    user1 = [(s, i) for (s, _), i in zip(entries, ids, strict=True) if s == "flow_events:1"]
    fields_of = {i: f for (_, f), i in zip(entries, ids, strict=True)}
    chosen = [i for _, i in user1]
    replay = invoke(["rejected", "--replay", "flow_events:1", *chosen, broken_id, "1-1", "-f", "json"],
                    url, clickhouse_url)
    outcomes = {o["source_id"]: o for o in json.loads(replay.stdout)}
    assert replay.exit_code == 1  # one is still invalid, one does not exist
    assert outcomes[broken_id]["action"] == "still invalid" and "node_id" in outcomes[broken_id]["detail"]
    assert outcomes["1-1"]["action"] == "not found"
    for entry_id in chosen:
        assert outcomes[entry_id]["action"] == "replayed"
        assert outcomes[entry_id]["event_id"] == derived_id("flow_events:1", entry_id, fields_of[entry_id])
    length = redis_client.xlen("flow_events:1")
    again = json.loads(invoke(["rejected", "--replay", "flow_events:1", *chosen, "-f", "json"],
                              url, clickhouse_url).stdout)
    assert {o["action"] for o in again} == {"already replayed"}
    assert redis_client.xlen("flow_events:1") == length  # nothing re-added
    queued = json.loads(invoke(["rejected", "--stream", "flow_events:1", "-f", "json", "--limit", "1000"],
                               url, clickhouse_url).stdout)
    assert sum(r["replayed"].startswith("queued ") for r in queued) == len(chosen)

    drain(make_settings(url, clickhouse_url))
    # --force does not repeat a replay; --again does: re-added again, yet visible once (same pinned event_id)
    forced = json.loads(invoke(["rejected", "--replay", "flow_events:1", *chosen, "--force", "-f", "json"],
                               url, clickhouse_url).stdout)
    assert {o["action"] for o in forced} == {"already replayed"}
    repeated = json.loads(invoke(["rejected", "--replay", "flow_events:1", *chosen, "--again", "-f", "json"],
                                 url, clickhouse_url).stdout)
    assert {o["action"] for o in repeated} == {"replayed"}
    drain(make_settings(url, clickhouse_url))
    stored = store.query("SELECT event_id, ts, attributes['replayed_from'] FROM flowtrack.flow_events "
                         "ORDER BY event_id")[1]
    assert sorted(r[0] for r in stored) == sorted(derived_id("flow_events:1", i, fields_of[i]) for i in chosen)
    assert {r[2] for r in stored} == {f"flow_events:1/{i}" for i in chosen}
    expected_ts = {derived_id("flow_events:1", i, e[1]): int(e[1]["timestamp"])
                   for e, i in zip(entries, ids, strict=True) if e[0] == "flow_events:1"}
    assert all(round(r[1].timestamp() * 1000) == expected_ts[r[0]] for r in stored)
    sessions = {f.session_id: f for f in flows if f.user_id == "1"}
    _, session_rows = store.query("SELECT session_id, event_count FROM flowtrack.flow_sessions")
    counted = {str(r[0]): int(r[1]) for r in session_rows}
    assert counted == {sid: len(f.events) for sid, f in sessions.items()}
    after = json.loads(invoke(["rejected", "--stream", "flow_events:1", "-f", "json", "--limit", "1000"],
                              url, clickhouse_url).stdout)
    assert sum(r["replayed"] == "stored" for r in after) == len(chosen)

    assert invoke(["rejected", "--replay"], url, clickhouse_url).exit_code == 2  # no selection: refuse


# -- tail --------------------------------------------------------------------------------------
def test_tail_reads_without_the_group_and_filters(filled: dict[str, Any], redis_client: redis.Redis) -> None:
    url = filled["redis_url"]
    env = cli_env(url, "chdb:///nonexistent-not-used")
    before = {s: redis_client.xinfo_groups(s) for s in ("flow_events:1", "flow_events:77")}
    out = run_cli(["tail", "--since", "0", "--no-follow", "-f", "json"], env)
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(records) == len(filled["entries"])
    assert sum(1 for r in records if r.get("rejected")) == 1
    ids = [(int(r["source_id"].split("-")[0]), int(r["source_id"].split("-")[1])) for r in records]
    assert ids == sorted(ids)  # merged across streams in entry-id order

    user77 = run_cli(["tail", "--since", "0", "--no-follow", "-f", "json", "-u", "77", "-t", "tool_call"], env)
    got = [json.loads(line) for line in user77.stdout.splitlines()]
    assert [(r["node_id"], r["event_type"]) for r in got] == [("b", "tool_call"), ("orphan", "tool_call")]
    text = run_cli(["tail", "--since", "0", "--no-follow", "-s", "s-hand"], env).stdout
    assert "c ← root" in text and "error" in text and len(text.splitlines()) == 7
    assert run_cli(["tail", "--since", "0", "-n", "5", "-f", "json"], env).stdout.count("\n") == 5

    # follow mode: entries added after start arrive; the command stops after --count
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "tail", "-n", "3", "-f", "json", "-u", "9"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    added = 0
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        xadd_all(redis_client, [("flow_events:9", {"session_id": "s-live", "node_id": f"n{added}",
                                                   "event_type": "llm_call"})])
        added += 1
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    live = [json.loads(line) for line in stdout.splitlines()]
    assert len(live) == 3 and all(r["session_id"] == "s-live" for r in live)
    assert [int(r["node_id"][1:]) for r in live] == sorted(int(r["node_id"][1:]) for r in live)

    # never joined the group: no pending entries, no consumer, no group on the new stream
    after = {s: redis_client.xinfo_groups(s) for s in ("flow_events:1", "flow_events:77")}
    assert after == before
    for groups in after.values():
        assert [int(g["pending"]) for g in groups] == [0] and [int(g["consumers"]) for g in groups] == [1]
    assert redis_client.xinfo_groups("flow_events:9") == []


# -- the store lock ------------------------------------------------------------------------------
def test_store_commands_say_plainly_when_a_worker_holds_the_store(redis_server: RedisServer,
                                                                   tmp_path: Path) -> None:
    store_url = f"chdb://{tmp_path / 'held'}"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom worker.settings import Settings\nfrom worker.store import "
         f"Store\nStore.open(Settings(clickhouse_url={store_url!r})).migrate()\nprint('ready', flush=True)\n"
         "time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        env = cli_env(redis_server.url, store_url)
        for args in (["history"], ["show", "s-1"], ["status"], ["rejected"], ["rejected", "--replay", "--all"],
                     ["sql", "SELECT 1"], ["migrate"], ["demo", "--duration-s", "1"]):
            proc = run_cli(args, env, check=False)
            assert proc.returncode == 3, (args, proc.stdout, proc.stderr)
            message = " ".join(proc.stderr.split())
            assert f"in use by another process (pid {holder.pid})" in message, (args, message)
            assert "FLOWTRACK_CLICKHOUSE_URL=http" in message and "Stop that process" in message
            assert "Traceback" not in proc.stderr
        redis_only = run_cli(["status", "--no-store", "--json"], env, check=False)
        assert redis_only.returncode == 0 and json.loads(redis_only.stdout)["healthy"] is True
    finally:
        holder.kill()
        holder.wait(10)


def test_status_classes_rejections_without_the_values_they_quote(store: Store) -> None:
    """`status` groups rejections by reason class in the store: a bad value quoted in a reason (even one holding a
    colon or a quote) is not a class of its own, and the total counts every rejection, however many classes."""
    from worker.flows import StatusReport, store_status
    from worker.normalize import Normalizer, Rejection
    from worker.sink import Sink

    normalizer = Normalizer()
    rejected = [normalizer.normalize("flow_events:9", f"9-{n}", {
        "session_id": "s", "node_id": "n", "event_type": "t", "timestamp": f"at {n}:{n} 'o\"clock {n}"})
        for n in range(1500)]
    assert all(isinstance(r, Rejection) for r in rejected)
    Sink(store).write([], rejected)  # type: ignore[arg-type]
    report = StatusReport("redis://unused", "flowtrack", 60000, 1000)
    store_status(report, store)
    assert report.rejected_by_reason == {"timestamp … is neither ISO-N nor epoch seconds/milliseconds": 1500}
    assert report.rejected_total == 1500
