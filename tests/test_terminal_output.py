"""Terminal output (issue 10, items 10, 11, 14): stream data never drives the terminal, `show` is linear in
the size of the flow, and a closed stdout (`| head -1`) ends a command quietly with exit 0."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from tests.conftest import ROOT, cli_env, drain, make_settings, xadd_all
from worker.cli import app
from worker.flows import Node, place_nodes
from worker.redisserver import RedisServer
from worker.store import Store
from worker.views import tree_lines, visible

HOSTILE = "\x1b]0;title\x07\x1b[2J"  # sets the window title, then clears the screen
MARKUP = "[bold]x[/bold]"
HOSTILE_STREAM = "flow_events:\x1b[2J"  # a user id (from the key) that is an escape sequence too
CONTROL = ("\x1b", "\x07", "\x9b", "\u202e")


def assert_inert(text: str) -> None:
    for char in CONTROL:
        assert char not in text, f"{char!r} reached the terminal"


def invoke(args: Sequence[str], redis_url: str, clickhouse_url: str) -> Any:
    return CliRunner().invoke(app, list(args), env=cli_env(redis_url, clickhouse_url), catch_exceptions=False)


@pytest.fixture
def hostile(redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str
            ) -> Iterator[dict[str, str]]:
    base = {"session_id": "s-esc", "event_type": "tool_call", "timestamp": "1700000000000"}
    xadd_all(redis_client, [
        (HOSTILE_STREAM, {**base, "node_id": "root\x1b[31m", "message": HOSTILE, "text": MARKUP}),
        (HOSTILE_STREAM, {**base, "node_id": "child\u202e", "parent_id": "root\x1b[31m", "timestamp": "1700000000100",
                          "event_type": "error\x07", "message": MARKUP + HOSTILE}),
        (HOSTILE_STREAM, {"session_id": "s-esc\x1b[2J", "event_type": "x", "bad\x1b": HOSTILE}),  # rejected
    ])
    drain(make_settings(redis_server.url, clickhouse_url))
    yield {"redis_url": redis_server.url, "clickhouse_url": clickhouse_url}


def test_visible_escapes_every_control_character() -> None:
    assert visible(HOSTILE) == "\\x1b]0;title\\x07\\x1b[2J"
    assert visible("a\nb\tc\x00\x7f\x9b\u202ed é ✓ 日本") == "a\\nb\\tc\\x00\\x7f\\x9b\\u202ed é ✓ 日本"


def test_tail_shows_control_characters_escaped_and_json_exact(hostile: dict[str, str]) -> None:
    env = cli_env(hostile["redis_url"], "chdb:///nonexistent-not-used")
    text = subprocess.run([sys.executable, "-m", "worker.cli", "tail", "--since", "0", "--no-follow"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    assert_inert(text.stdout)
    assert "\\x1b]0;title\\x07" in text.stdout and MARKUP in text.stdout and "root\\x1b[31m" in text.stdout
    assert "rejected" in text.stdout
    as_json = subprocess.run([sys.executable, "-m", "worker.cli", "tail", "--since", "0", "--no-follow", "-f", "json"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert records[0]["attributes"]["message"] == HOSTILE and records[0]["user_id"] == "\x1b[2J"
    assert records[1]["node_id"] == "child\u202e"


def test_store_views_show_control_characters_escaped_and_markup_as_typed(hostile: dict[str, str]) -> None:
    url, ch = hostile["redis_url"], hostile["clickhouse_url"]
    show = invoke(["show", "s-esc", "--attr-width", "0"], url, ch)
    assert show.exit_code == 0, show.output
    assert_inert(show.output)
    assert "\\x1b]0;title\\x07\\x1b[2J" in show.output and MARKUP in show.output and "child\\u202e" in show.output
    exact = json.loads(invoke(["show", "s-esc", "-f", "json"], url, ch).stdout)
    assert {n["node_id"] for n in exact["nodes"]} == {"root\x1b[31m", "child\u202e"}

    history = invoke(["history", "--since", "0"], url, ch)
    assert history.exit_code == 0 and "\\x1b[2J" in history.output
    assert_inert(history.output)

    rejected = invoke(["rejected"], url, ch)
    assert rejected.exit_code == 0 and "flow_events:\\x1b[2J" in rejected.output
    assert_inert(rejected.output)

    table = invoke(["sql", "SELECT attributes['message'] AS m, attributes['text'] AS t FROM flowtrack.flow_events "
                           "WHERE node_id LIKE 'root%'"], url, ch)
    assert table.exit_code == 0, table.output
    assert_inert(table.output)
    assert "\\x1b]0;title\\x07" in table.output and MARKUP in table.output
    as_json = json.loads(invoke(["sql", "SELECT attributes['message'] AS m FROM flowtrack.flow_events "
                                        "WHERE node_id LIKE 'root%'", "-f", "json"], url, ch).stdout)
    assert as_json == [{"m": HOSTILE}]


def test_status_shows_stream_names_escaped(hostile: dict[str, str]) -> None:
    status = invoke(["status", "--no-store"], hostile["redis_url"], hostile["clickhouse_url"])
    assert "flow_events:\\x1b[2J" in status.output
    assert_inert(status.output)


# -- show: linear in the size of the flow -----------------------------------------------------------------
def chain(depth: int) -> list[Node]:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    return [Node(f"n{i}", f"n{i - 1}" if i else "", "llm_call", t0 + timedelta(milliseconds=i),
                 t0 + timedelta(milliseconds=i + 1), 1, "ok") for i in range(depth)]


def fan(width: int) -> list[Node]:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    root = Node("root", "", "user_message", t0, t0, 0, "ok")
    return [root] + [Node(f"k{i}", "root", "tool_call", t0 + timedelta(milliseconds=i), t0, 0, "ok")
                     for i in range(width)]


def test_show_draws_a_20k_deep_chain_with_bounded_lines() -> None:
    placed = place_nodes(chain(20_000))
    assert [p.depth for p in placed] == list(range(20_000))
    lines = [line.plain for line in tree_lines(placed, width=120)]
    assert len(lines) == 20_000
    assert lines[0].startswith("llm_call n0")
    assert "19999" in lines[-1] and "n19999" in lines[-1]  # the depth is shown where guides are elided
    assert max(len(line) for line in lines) < 160  # indentation is capped: total output is linear


def test_show_memory_grows_linearly_with_depth() -> None:
    """Memory, not time (timings are noisy here): 4x the depth may take about 4x the memory, not 16x."""

    def peak_bytes(depth: int) -> int:
        nodes = chain(depth)
        tracemalloc.start()
        try:
            tree_lines(place_nodes(nodes), width=120)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak_bytes(2500), peak_bytes(10_000)
    assert large < 6 * small, (small, large)
    assert large < 40_000_000, large  # ~14 MB measured; ancestor tuples per node took ~400 MB here


def test_show_draws_a_20k_wide_flow() -> None:
    placed = place_nodes(fan(20_000))
    lines = [line.plain for line in tree_lines(placed, width=120)]
    assert len(lines) == 20_001
    assert all(line.startswith("├── tool_call k") for line in lines[1:-1])
    assert lines[-1].startswith("└── tool_call k19999")


def test_tree_guides_follow_the_last_child_flags() -> None:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    spec = [("r", ""), ("a", "r"), ("a1", "a"), ("a2", "a"), ("b", "r"), ("b1", "b"), ("b1x", "b1")]
    nodes = [Node(n, p, "t", t0 + timedelta(milliseconds=i), t0, 0, "ok") for i, (n, p) in enumerate(spec)]
    lines = [line.plain.split("  +")[0] for line in tree_lines(place_nodes(nodes), width=200)]
    assert lines == ["t r", "├── t a", "│   ├── t a1", "│   └── t a2", "└── t b", "    └── t b1", "        └── t b1x"]


def test_show_of_a_deep_flow_end_to_end(redis_server: RedisServer, redis_client: redis.Redis, store: Store,
                                        clickhouse_url: str) -> None:
    depth = 3000
    entries = [("flow_events:3", {"session_id": "s-deep", "node_id": f"n{i}", "event_type": "llm_call",
                                  "timestamp": str(1_700_000_000_000 + i), **({"parent_id": f"n{i - 1}"} if i else {})})
               for i in range(depth)]
    xadd_all(redis_client, entries)
    drain(make_settings(redis_server.url, clickhouse_url))
    started = time.monotonic()
    result = invoke(["show", "s-deep"], redis_server.url, clickhouse_url)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == depth + 1 and f"n{depth - 1}" in lines[-1] and f"{depth - 1}" in lines[-1]
    assert max(len(line) for line in lines) < 200
    print(f"show of a {depth}-deep flow: {time.monotonic() - started:.2f} s")


# -- a closed stdout ends the command quietly ---------------------------------------------------------------
def test_tail_follow_into_a_closed_pipe_exits_0(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    env = cli_env(redis_server.url, "chdb:///nonexistent-not-used")
    stop = threading.Event()

    def keep_adding() -> None:  # new entries keep arriving, so tail keeps writing into the closed pipe
        client = redis.Redis.from_url(redis_server.url)
        while not stop.is_set():
            client.xadd("flow_events:4", {"session_id": "s", "node_id": "n", "event_type": "x"})
            time.sleep(0.2)
        client.close()

    adder = threading.Thread(target=keep_adding, daemon=True)
    adder.start()
    try:
        for output in ("json", "text"):
            proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "tail", "-f", output], env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert proc.stdout is not None and proc.stderr is not None
            assert proc.stdout.readline(), "tail printed nothing"  # `| head -1`: one line, then close the pipe
            proc.stdout.close()
            assert proc.wait(timeout=30) == 0, output
            stderr = proc.stderr.read().decode()
            assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception" not in stderr, stderr
    finally:
        stop.set()
        adder.join()


def test_sql_into_a_closed_pipe_exits_0(tmp_path: Any) -> None:
    url = f"chdb://{tmp_path / 'store'}"
    env = cli_env("redis://127.0.0.1:1/0", url)
    for output in ("csv", "table"):
        shell = (f"{sys.executable} -m worker.cli sql 'SELECT number FROM numbers(200000)' -f {output} | head -1; "
                 "echo \"rc=${PIPESTATUS[0]}\" >&2")
        proc = subprocess.run(["bash", "-c", shell], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.stdout.count("\n") == 1, proc.stdout[:200]
        assert proc.stderr.strip().endswith("rc=0"), proc.stderr
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_demo_live_view_shows_stored_text_escaped_and_markup_as_typed() -> None:
    """The demo's frame renders the latest stored events: hostile ids/types must stay inert there too."""
    import io

    from rich.console import Console

    from worker.demo import Counters, Snapshot, _view
    from worker.pipeline import Pipeline

    settings = make_settings("redis://127.0.0.1:1/0", "chdb:///nonexistent-never-opened")
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    snapshot = Snapshot(latest=[(ts, HOSTILE, MARKUP, "node\x1b[31m", "parent\u202e", "error\x07")],
                        error="")
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=True, color_system=None)
    console.print(_view(Pipeline(settings), Counters(), snapshot, 1.0, 200))
    text = out.getvalue()
    assert_inert(text)
    assert MARKUP in text  # shown as typed, not read as markup
    assert "\\x1b" in text


def test_a_long_id_folds_instead_of_squeezing_the_other_columns_out() -> None:
    """A 256-char user id (the contract's limit) or a long stream key on a 120-column terminal: every column still
    shows its value (the id folds over several lines)."""
    from rich.console import Console

    from worker.flows import RejectedRow
    from worker.views import history_table, rejected_table

    started = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    history = history_table([("u" * 256, "s-1", started, started + timedelta(seconds=3), 3000, 7, 1, "failed")],
                            "sessions")
    rejected = rejected_table([RejectedRow(started, "k" * 300, "1-0", "missing required field 'node_id'",
                                           '{"a":"b"}', "")])
    for table, expected in ((history, ("s-1", "3.0s", "failed")), (rejected, ("missing required", '{"a":"b"}'))):
        console = Console(width=120, record=True, color_system=None)
        console.print(table)
        shown = console.export_text()
        assert all(value in shown for value in expected), shown
    # and nothing of the long id is lost
    console = Console(width=120, record=True, color_system=None)
    console.print(history)
    assert console.export_text().replace("\n", "").replace(" ", "").replace("│", "").count("u") >= 256


def test_an_event_at_the_epoch_shows_its_time_and_only_a_missing_time_shows_a_dash(
        redis_server: RedisServer, redis_client: redis.Redis, store: Store, clickhouse_url: str) -> None:
    """1970-01-01T00:00:00 is a time the contract accepts (an entry id of 0-1 without a timestamp): it is shown."""
    from worker.views import format_time

    assert format_time(datetime(1970, 1, 1, tzinfo=UTC)) == "1970-01-01 00:00:00.000"
    assert format_time(None) == "-"
    redis_client.execute_command("XADD", "flow_events:13", "0-1", "session_id", "s-epoch", "node_id", "n1",
                                 "event_type", "user_message")
    drain(make_settings(redis_server.url, clickhouse_url))
    env = cli_env(redis_server.url, clickhouse_url)
    shown = CliRunner().invoke(app, ["show", "s-epoch"], env=env, catch_exceptions=False).output
    assert "started 1970-01-01 00:00:00.000 UTC" in shown
    history = CliRunner().invoke(app, ["history", "13", "--since", "30000d"], env=env, catch_exceptions=False).output
    assert "1970-01-01 00:00:00.000" in history
