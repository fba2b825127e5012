"""What a worker process loads: nothing flowtrack never uses (pandas costs ~0.15 s of start-up and ~35 MB of RSS;
pyarrow and numpy, which chDB and clickhouse-connect import when installed, ~40 MB more of a 500 MB budget).

Each check runs in a fresh interpreter (chDB allows one store per process; a module once imported stays)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from worker import store as store_module
from worker.normalize import FlowEvent
from worker.sink import Sink
from worker.store import Store

REPO = Path(__file__).resolve().parent.parent

_PRELUDE = """
import sys
from worker.normalize import FlowEvent, Rejection
from worker.settings import Settings
from worker.sink import Sink
from worker.store import Store

store = Store.open(Settings(clickhouse_url="chdb://" + sys.argv[1]))
store.migrate()
"""

# Every way a worker talks to the store: migrate (records versions with an insert), a batch (events, rejections,
# the rollup's recompute), and reading rows back.
_STEPS = {
    "migrate": "",
    "write a batch": """
event = FlowEvent("e1", "u1", "s1", "n1", "", "llm_call", 1_735_689_600_000, {"k": "v"}, "flow_events", "1-0", 0, 0)
sink = Sink(store)
sink.write([event], [Rejection("flow_events", "2-0", "no session", "{}")])
sink.rollup.close()
""",
    "read rows": """
store.query("SELECT * FROM flowtrack.flow_events")
store.query("SELECT * FROM flowtrack.flow_sessions")
""",
}


_UNUSED_LIBRARIES = ("pandas", "numpy", "pyarrow")


def _run_script(script: str, store_dir: Path) -> str:
    done = subprocess.run([sys.executable, "-c", script, str(store_dir)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("step", list(_STEPS))
def test_talking_to_the_store_imports_no_dataframe_library(step: str, tmp_path: Path) -> None:
    for library in _UNUSED_LIBRARIES:  # the check below would pass vacuously where one is not installed
        assert importlib.util.find_spec(library) is not None, f"{library} is not installed here"
    script = (_PRELUDE + textwrap.dedent(_STEPS[step])
              + f"\nprint(sorted(m for m in {_UNUSED_LIBRARIES!r} if sys.modules.get(m) is not None))\n")
    assert _run_script(script, tmp_path / "store") == "[]", f"imported by: {step}"


def test_pyarrow_stays_importable_after_the_store_is_opened(tmp_path: Path) -> None:
    # The store keeps chDB from importing pyarrow while it connects, and only then.
    script = _PRELUDE + "import pyarrow\nprint(pyarrow.array([1, 2]).to_pylist())\n"
    assert _run_script(script, tmp_path / "store") == "[1, 2]"


def test_a_process_that_already_uses_pyarrow_keeps_it(tmp_path: Path) -> None:
    script = "import pyarrow\n" + _PRELUDE + textwrap.dedent(_STEPS["write a batch"]) + (
        "import chdb.state.sqlitelike as lite\nprint(lite.pa is pyarrow)\n")
    assert _run_script(script, tmp_path / "store") == "True"


def _counting_purges(store: Store) -> list[str]:
    """Record the purge commands the store sends through its own (real) client."""
    sent: list[str] = []
    command = store.client.command

    def counting(sql: str, *args: Any, **kwargs: Any) -> Any:
        if "JEMALLOC PURGE" in sql:
            sent.append(sql)
        return command(sql, *args, **kwargs)

    store.client.command = counting
    return sent


def test_embedded_engine_returns_freed_memory_at_most_every_interval(store: Store,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if not store.embedded:
        pytest.skip("a server's memory is the server's business (checked below)")
    sent = _counting_purges(store)
    monkeypatch.setattr(store_module, "RETURN_FREED_MEMORY_INTERVAL_S", 0.3)
    store._memory_returned_at = 0.0
    try:
        for _ in range(5):
            store.return_freed_memory()
        assert len(sent) == 1, "purged more than once within the interval"
        time.sleep(0.35)
        store.return_freed_memory()
        assert len(sent) == 2, "did not purge again once the interval was over"
        assert store._can_return_memory, "the embedded engine refused SYSTEM JEMALLOC PURGE"
    finally:
        del store.client.command  # the instance attribute: back to the client's own method


def test_a_stored_batch_returns_freed_memory(store: Store) -> None:
    if not store.embedded:
        pytest.skip("embedded engine only")
    sent = _counting_purges(store)
    store._memory_returned_at = 0.0
    try:
        event = FlowEvent("e1", "u1", "s-purge", "n1", "", "llm_call", 1_735_689_600_000, {}, "flow_events", "1-0", 0,
                          0)
        Sink(store).write([event], [])
        assert sent, "a stored batch did not give the engine's freed memory back"
    finally:
        del store.client.command


def test_a_server_store_never_purges(store: Store) -> None:
    # The same real client, described as a server: the purge would be a server-wide SYSTEM command.
    as_server = Store(store.client, "server", embedded=False)
    sent = _counting_purges(as_server)
    try:
        as_server.return_freed_memory()
        assert sent == []
    finally:
        del store.client.command
